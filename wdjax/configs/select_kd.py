"""Weight selection (Xu et al. 2024) as the student's initialisation, then logit KD.

The student starts as a uniform slice of the teacher (layers 1, 3, 5 of 6; every other unit of
every space) and trains its own weights; lr 1e-4 (docs/data.md's reference for selected students).
--set method.init=importance keeps the teacher's most active units instead (ranked on 16
training batches: docs/methods.md, importance selection).

Commands:

  wdjax finetune select_kd:cpu   # shared teacher (skipped when already trained)
  wdjax distill select_kd:cpu    # ~2.5 min on 2 CPU cores

Result (cpu, 3 seeds): see docs/quality.md. gpu: not yet measured.
"""

from wdjax import presets


def get_config(hardware: str = "cpu"):
  return presets.with_method(presets.rotten_tomatoes(hardware), lr=1e-4, name="kd", init="selection")
