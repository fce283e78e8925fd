"""Weight Squeezing: the student is L W_t R of the frozen teacher; only the maps train.

Maps shared per space (one for the residual stream, one per layer for its attention and FFN
spaces), truncated-identity initialisation (step 0 is the weight-selection student), layers
1, 3, 5 of the teacher. Variants: --set method.sharing=tensor, method.init=xavier|pca,
method.layer_mix=learned.

Commands:

  wdjax finetune ws:cpu
  wdjax distill ws:cpu           # ~3 min on 2 CPU cores

Result (cpu, 3 seeds): see docs/quality.md. gpu: not yet measured.
"""

from wdjax import presets


def get_config(hardware: str = "cpu"):
  return presets.with_method(presets.rotten_tomatoes(hardware), lr=1e-4, name="ws")
