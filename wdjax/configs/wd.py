"""Weight Distillation: phase 1 trains the generator (per-tensor maps, layer mixing over
contiguous groups, tanh-affine), phase 2 fine-tunes the materialised student; half the step
budget each. --set method.mode=lean shares the maps per space (far fewer parameters).

Maps start as truncated identities (the generator starts at the weight-selection student), an
extension of the paper (docs/methods.md §1.9), phase-1 lr 1e-4: measured 78.18 +- 0.20 against
65.58 +- 6.05 with the paper's xavier-normal maps, which a 326-step phase 1 cannot turn from a
random projection into a good student (the paper runs 30k). The paper's set-up:
--set method.init=xavier --set distill.optim.lr=3e-4.

Commands:

  wdjax finetune wd:cpu
  wdjax distill wd:cpu           # phase 1 then phase 2, ~4 min on 2 CPU cores

Result (cpu, 3 seeds): see docs/quality.md. gpu: not yet measured.
"""

from wdjax import presets


def get_config(hardware: str = "cpu"):
  return presets.with_method(presets.rotten_tomatoes(hardware), lr=1e-4, name="wd",
                             mode="faithful", init="identity", phase2_lr=1e-4)
