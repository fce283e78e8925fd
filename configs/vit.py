"""Fashion-MNIST with ViTs: the teacher trained from scratch, then students of half its width
by every method (weight selection's ViT-S -> ViT-T setting, scaled to what the hardware trains):

  wdjax finetune configs/vit.py:cpu                                   # the teacher
  wdjax distill  configs/vit.py:cpu                                   # KD student (from scratch)
  wdjax distill  configs/vit.py:cpu --set method.init=selection       # weight selection + KD
  wdjax distill  configs/vit.py:cpu --set kd.alpha=0 --phase distill_ce   # no teacher at all
  wdjax distill  configs/vit.py:cpu --set method.name=ws              # likewise gws, wd, wid, opdf
  wdjax eval     configs/vit.py:cpu --model runs/fashion_vit/distill/model

or every row of the vision table with `python benchmarks/vision/run.py --hardware cpu`.
"""

from wdjax import presets


def get_config(hardware: str = "cpu"):
  return presets.fashion_vit(hardware)
