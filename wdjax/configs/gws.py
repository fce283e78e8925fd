"""Gated Weight Squeezing: W_s = g * W_m + (1 - g) * L W_t R, per-row gates.

W_m is a trainable student initialised by weight selection, the gate starts at sigmoid(3) = 0.95
(training starts from the selected student), the squeezed branch starts as the same selection.

Commands:

  wdjax finetune gws:cpu
  wdjax distill gws:cpu          # ~3 min on 2 CPU cores

Result (cpu, 3 seeds): see docs/quality.md. gpu: not yet measured.
"""

from wdjax import presets


def get_config(hardware: str = "cpu"):
  return presets.with_method(presets.rotten_tomatoes(hardware), lr=1e-4, name="gws", gate="row")
