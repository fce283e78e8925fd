"""Activation-PCA maps for Weight Squeezing's `init="pca"` (`docs/methods.md` §4.3).

For every space a map contracts, the map is the top-d_student principal directions of the
teacher's activations in that space, an orthonormal `[d_teacher, d_student]` basis:

- `hidden`: the residual stream, all layers pooled (embedding output and every block output);
- `attn/layer_l`, `ffn/layer_l`: student layer l's spaces, from the teacher layer the fixed layer
  map gives it (the attention context, the FFN's GELU output);
- `pooled`: the pooler output.

Directions come from the uncentred second moment over real tokens (padding excluded), because
the maps also carry biases, whose mean matters. Signs are fixed (the largest entry of each
column is positive), so the same data gives the same maps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from wdjax.data import pipeline
from wdjax.generators import paths
from wdjax.models import bert


def calibration_batches(split, *, batches: int, batch_size: int, seed: int, pad_to_multiple: int):
  """The first `batches` training batches of `split` (fewer if an epoch is shorter): the
  calibration sample activation PCA and importance selection read."""
  order = pipeline.TrainBatches(split, batch_size, seed=seed, pad_to_multiple=pad_to_multiple)
  return (order.batch(step) for step in range(min(batches, order.steps_per_epoch)))


def row_weights(x: jax.Array, weights: jax.Array) -> jax.Array:
  """`[batch, rows]` weights of activation `x [batch, rows, d]`: a space computed at fewer rows
  than the input (a pooler's one vector) is at its first rows (`layers.activations`)."""
  return weights[:, :x.shape[1]].astype(jnp.float32)


def second_moments(activation_fn, params, split, *, batches: int, batch_size: int, seed: int,
                   pad_to_multiple: int = 16) -> dict[str, np.ndarray]:
  """`{activation name: sum over real tokens of x x^T}` over the calibration batches;
  `activation_fn(params, batch) -> (activations, weights)` is the family's (`bert.activation_fn`)."""

  @jax.jit
  def moments(params, batch):
    acts, weights = activation_fn(params, batch)
    out = {}
    for name, x in acts.items():
      x = x.astype(jnp.float32) * row_weights(x, weights)[..., None]
      out[name] = jnp.einsum("bti,btj->ij", x, x)
    return out

  total: dict[str, np.ndarray] = {}
  for b in calibration_batches(split, batches=batches, batch_size=batch_size, seed=seed,
                               pad_to_multiple=pad_to_multiple):
    for k, v in moments(params, b).items():
      total[k] = total.get(k, 0) + np.asarray(v, np.float64)
  return total


def top_directions(moment: np.ndarray, k: int) -> np.ndarray:
  """`[d, k]` orthonormal eigenvectors of the k largest eigenvalues, sign-fixed."""
  values, vectors = np.linalg.eigh(moment)
  top = vectors[:, np.argsort(values)[::-1][:k]]
  signs = np.sign(top[np.abs(top).argmax(0), np.arange(k)])
  return (top * signs).astype(np.float32)


def pca_maps(teacher_cfg: bert.EncoderConfig, teacher_params, split, cfg, method) -> dict[str, np.ndarray]:
  """Maps for every space of the student `cfg.student` (see the module docstring)."""
  moments = second_moments(bert.activation_fn(teacher_cfg), teacher_params, split,
                           batches=method.pca_batches,
                           batch_size=cfg.distill.batch_size, seed=cfg.seed,
                           pad_to_multiple=cfg.data.pad_to_multiple)
  s = cfg.student
  layers = paths.layer_map(method.layer_map or "every_k", teacher_cfg.num_layers, s.num_layers)
  maps = {"hidden": top_directions(sum(v for k, v in moments.items() if k.startswith("hidden/")),
                                   s.hidden_size),
          "pooled": top_directions(moments["pooled"], s.hidden_size)}
  for l, group in enumerate(layers):
    maps[f"attn/layer_{l}"] = top_directions(moments[f"attn/layer_{group[-1]}"], s.hidden_size)
    maps[f"ffn/layer_{l}"] = top_directions(moments[f"ffn/layer_{group[-1]}"], s.intermediate_size)
  return maps
