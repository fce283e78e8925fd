"""Weight Distillation: phase 1 trains the generator (per-tensor maps, layer mixing over
contiguous groups, tanh-affine), phase 2 fine-tunes the materialised student; half the step
budget each. --set method.wd_mode=lean shares the maps per space (far fewer parameters).

Commands:

  wdjax finetune configs/wd.py:cpu
  wdjax distill configs/wd.py:cpu           # phase 1 then phase 2, ~4 min on 2 CPU cores

Result (cpu, 3 seeds): see the quality table in README.md. gpu: not yet measured.
"""

from wdjax import presets


def get_config(hardware: str = "cpu"):
  return presets.with_method(presets.rotten_tomatoes(hardware), lr=3e-4, name="wd",
                             wd_mode="faithful", phase2_lr=1e-4)
