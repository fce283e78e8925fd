"""Logit KD from scratch (and CE from scratch with kd.alpha=0): the baselines.

Commands (cpu: MiniLM 6x384 -> 3x192 on Rotten Tomatoes; gpu: MPNet 12x768 -> 6x384):

  wdjax finetune kd:cpu        # the teacher, once per workdir (~4 min on 2 CPU cores)
  wdjax distill kd:cpu         # ~2.5 min on 2 CPU cores
  wdjax distill kd:cpu --set kd.alpha=0 --phase distill_ce

Result (cpu, 3 seeds): see docs/quality.md (benchmarks/quality).
gpu: not yet measured.
"""

from wdjax import presets


def get_config(hardware: str = "cpu"):
  return presets.with_method(presets.rotten_tomatoes(hardware), name="kd")
