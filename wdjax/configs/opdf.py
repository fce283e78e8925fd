"""OPDF + logit KD (docs/methods.md §2): the paper's depth-reduction setting. The student keeps the
teacher's width (cpu: MiniLM 6x384 -> 3x384, 12 heads of 32, FFN 1536) and starts from the
teacher's first layers 0, 1, 2 (the paper's start, docs/methods.md §2.3); every attention and FFN
matrix trains as an exact 5-core MPO chain (2.8x the dense matrices' parameters), contracted once
per step; the constraint loss pulls the auxiliary cores of student layer i towards teacher layer
2i+1's (§2.4: layers 1, 3, 5; lambda = 1e-4 / 3, the paper's 1e-4 / L_S).
lr 2e-5: the chain of square cores amplifies every step on W (the paper uses 1e-6).
Its baseline is the same student from the same layers trained by KD alone (`kd-384` in the
quality benchmark: wdjax/configs/select_kd.py with this student and `method.layer_map=first_n`), and
the ablation `--set method.constraint_lambda=0`.

Commands:
  wdjax finetune opdf:cpu
  wdjax distill opdf:cpu
  wdjax distill opdf:cpu --set method.cores=7   # LGTM's 7 cores (3.7x the dense matrices here)
Result (cpu, 3 seeds): see docs/quality.md. gpu (MPNet 12x768 -> 6x768): not yet
measured.
"""

from wdjax import presets


def get_config(hardware: str = "cpu"):
  cfg = presets.with_method(presets.rotten_tomatoes(hardware), lr=2e-5, name="opdf")
  return presets.same_width(cfg, hardware)
