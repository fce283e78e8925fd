"""Weight-Inherited Distillation, task-specific: compactors around every kernel of the teacher
(its layers 1, 3, 5 for a 3-layer student) train on the task loss with masks growing towards
the student's width, then the cut-and-merged student is fine-tuned (docs/methods.md §3; half of the
step budget each). No teacher forward pass and no KD term, as in the paper (kd.alpha=0).
Compactors at lr 3e-4, the teacher's weights at 0.02x that (the paper's 1e-6 : 5e-5 ratio),
mask boundaries spaced so that every mask is at the student's width by half of phase 1
(method.reach), masked entries pulled to zero by the reference's momentum-form surgery
(lambda 20).
Variants: --set method.strategy=head (drop whole heads: needs student.num_heads=6 here);
--set method.surgery=clean (g' = lambda p: under Adam ~20x slower decay, see wid.py);
--set method.objective=mlm (task-agnostic: compactors on masked-LM of the task's text from
the pretrained teacher, with an MLM head fitted first; then fine-tuned with a new classifier).
gpu: MPNet 12x768 -> 6x384 (presets); for -> 192 wide add
--set student.hidden_size=192 --set student.intermediate_size=768.

Commands:
  wdjax finetune wid:cpu
  wdjax distill wid:cpu          # phase 1 then phase 2
Result (cpu, 3 seeds, ~200 s each on 2 cores): task-specific 72.73 +- 0.27 (72.4, 73.0, 72.8:
below KD's 77.3 on every seed); with --set kd.alpha=0.9 (KD in both phases) 77.85 +- 1.08
(77.4, 77.1, 79.1), above KD: see docs/quality.md. gpu: not yet measured.
"""

import dataclasses

from wdjax import presets


def get_config(hardware: str = "cpu"):
  cfg = presets.with_method(presets.rotten_tomatoes(hardware), lr=3e-4, name="wid",
                            strategy="dim", phase2_lr=1e-4)
  return dataclasses.replace(cfg, kd=dataclasses.replace(cfg.kd, alpha=0.0))
