"""Fashion-MNIST with ViTs: the teacher trained from scratch, then students of half its width
by every method (weight selection's ViT-S -> ViT-T setting, scaled to what the hardware trains):

  wdjax finetune vit:cpu                                   # the teacher
  wdjax distill  vit:cpu                                   # KD student (from scratch)
  wdjax distill  vit:cpu --set method.init=selection       # weight selection + KD
  wdjax distill  vit:cpu --set kd.alpha=0 --phase distill_ce   # no teacher at all
  wdjax distill  vit:cpu --set method.name=ws              # likewise gws, wd, wid, opdf
  wdjax eval     vit:cpu --model runs/fashion_vit/distill/model

or every row of the vision table with `python benchmarks/quality/run.py --task vision`.

Runtime (cpu, 2 cores of an AMD EPYC): teacher ~5 min, each student 1-2 min (3 seeds x 8 rows:
~40 min). Result (cpu, 3 seeds, test accuracy): teacher 84.60; from scratch CE 77.85, KD 78.57;
weight selection + KD 84.30, WS 83.93, GWS 84.24, WD 83.83, WID 84.21, OPDF + KD 84.13
(benchmarks/quality/results_vision_cpu.md). gpu: not yet measured.
"""

from wdjax import presets


def get_config(hardware: str = "cpu"):
  return presets.fashion_vit(hardware)
