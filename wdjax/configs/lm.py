"""Causal LM: SmolLM2-135M-Instruct (its 4-bit GGUF from PyPI, dequantised) distilled into a
half-depth student (15 of its 30 layers, same width) on the World English Bible:

  wdjax distill lm:cpu                                          # importance + KD (the default)
  wdjax distill lm:cpu --set method.init=selection              # uniform selection (every 2nd layer) + KD
  wdjax distill lm:cpu --set method.init=random                 # KD from scratch
  wdjax distill lm:cpu --set method.init=random --set kd.alpha=0 --phase distill_ce   # CE only
  wdjax eval    lm:cpu --model runs/smollm2_bible/distill_kd_importance/model          # perplexity

or every row with `python benchmarks/lm/run.py --hardware cpu`. `method.init=importance` keeps the
teacher's 15 most influential layers (block influence on 16 training batches), then distils on
the teacher's cached top-64 logits.

Runtime (cpu, 2 cores): the teacher's top-64 logits over the 307k training tokens once (~6 min),
then 15-30 min a student. Result (cpu, seed 0, test perplexity of the 4-bit teacher's weights):
teacher 30.86; importance + KD 59.87; every-2nd-layer selection + KD 244.20; KD from scratch
290.42; CE alone 467.50 (benchmarks/lm/results_cpu.md).
gpu: not yet measured (no GPU lent).
"""

from wdjax import presets


def get_config(hardware: str = "cpu"):
  return presets.smollm_bible(hardware)
