"""Importance-based inheritance: the student keeps the teacher's most active units.

Weight selection keeps a uniform slice of every space (every k-th unit). Importance selection
keeps, in every space, the units that carry the most signal on the task's own data: each unit's
score is the root mean square of its activation over the real tokens of a calibration sample of
training batches (`method.calibration_batches`), the activation-based importance that
Minitron ranks neurons, heads and embedding channels by (Muralidharan et al., "Compact
Language Models via Pruning and Knowledge Distillation", 2024, §2.2; there the mean magnitude,
here its RMS, read off the same second moments activation PCA collects):

- `hidden` (the residual stream, one space through the network): the embedding output and
  every block output pooled, so a channel is kept for the whole network, as the LayerNorms and
  every kernel that reads or writes the stream share it;
- `ffn/layer_l`: the GELU output of student layer l's teacher layer (the input of its down
  projection);
- `attn/layer_l`: the attention context of that layer (the input of its output projection),
  per head: a student with the teacher's heads keeps the top dimensions *within* each head (the
  same dimensions for its query, key, value and output rows, so heads stay aligned); a student
  with fewer heads of the teacher's width keeps the heads with the largest total score (any
  other head layout: the top dimensions of the whole space);
- `pooled`: the pooler output.

Indices are kept in ascending order, so the student's units stay in the teacher's order. Depth
follows the layer map, as in weight selection, unless the task ranks layers too: a layer's
*block influence* is how much it turns the residual stream, 1 - cos(x_in, x_out) averaged over
the real tokens of the calibration sample (Men et al., "ShortGPT: Layers in Large Language Models
are More Redundant Than You Expect", 2024), and the student keeps the most influential layers in
their order. Used as `method.init=importance` of KD.
"""

from __future__ import annotations

import numpy as np

from wdjax.generators.select import SelectionPlan


def unit_scores(moments: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """`{teacher space: [d] RMS activation (up to a constant)}` from `pca.second_moments`' sums
  of `x x^T` (only their diagonals are read)."""
  diag = {k: np.diag(v) for k, v in moments.items()}
  scores = {"hidden": np.sqrt(sum(v for k, v in diag.items() if k.startswith("hidden/")))}
  scores.update({k: np.sqrt(v) for k, v in diag.items() if not k.startswith("hidden/")})
  return scores


def block_influence(states, weights):
  """`[layers]` mean over real tokens of 1 - cos(state_l, state_l+1), from the residual stream
  `states` (`layers + 1` arrays `[batch, seq, hidden]`) and `weights [batch, seq]` (1 on real
  tokens); jax.numpy, so that it runs inside the jitted forward pass."""
  import jax.numpy as jnp
  w = weights.astype(jnp.float32)
  out = []
  for x, y in zip(states[:-1], states[1:]):
    x, y = x.astype(jnp.float32), y.astype(jnp.float32)
    cos = jnp.sum(x * y, -1) / jnp.maximum(jnp.linalg.norm(x, axis=-1) * jnp.linalg.norm(y, axis=-1), 1e-12)
    out.append(jnp.sum((1.0 - cos) * w) / jnp.maximum(jnp.sum(w), 1.0))
  return jnp.stack(out)


def top_layers(influence: np.ndarray, n: int) -> np.ndarray:
  """The `n` most influential layers, in their order (`SelectionPlan`'s `indices[DEPTH]`)."""
  return top_units(np.asarray(influence), n)


def top_units(scores: np.ndarray, k: int) -> np.ndarray:
  """The `k` highest-scoring indices of `scores`, ascending (ties: the lower index)."""
  order = np.argsort(-scores, kind="stable")[:k]
  return np.sort(order)


def top_in_heads(scores: np.ndarray, heads_t: int, heads_s: int, d_s: int) -> np.ndarray:
  """Attention-space indices of a student of width `d_s` with `heads_s` heads: the top
  dimensions within every head (`heads_s == heads_t`), the top whole heads (same head width),
  or, when neither fits, the top dimensions of the space (heads mixed, as uniform selection
  mixes them then)."""
  per_head = scores.reshape(heads_t, -1)  # [heads, head_dim]
  hd_t = per_head.shape[1]
  if heads_s == heads_t:
    keep = [h * hd_t + top_units(per_head[h], d_s // heads_s) for h in range(heads_t)]
    return np.concatenate(keep)
  if d_s // heads_s != hd_t:  # no head of the student is one of the teacher's: as uniform selection
    return top_units(scores, d_s)
  heads = top_units(per_head.sum(axis=1), heads_s)
  return (heads[:, None] * hd_t + np.arange(hd_t)[None]).reshape(-1)


def keep_indices(scores: dict[str, np.ndarray], plan: SelectionPlan, heads_t: int,
                 heads_s: int) -> dict[str, np.ndarray]:
  """`{student space: kept teacher indices}` for `SelectionPlan(indices=...)`: every space of
  the student, scored in the teacher layer the plan's layer map takes it from."""
  out = {}
  for space in ("hidden", "pooled"):
    if space in plan.sizes and space in scores:
      out[space] = top_units(scores[space], plan.sizes[space][1])
  for stack, groups in plan.stack_layers.items():
    for l, group in enumerate(groups):
      t = group[-1]  # the teacher layer a student layer is taken from (as `SelectionPlan.apply`)
      for role in ("attn", "ffn"):
        name = f"{role}/layer_{t}"
        if role not in plan.sizes or name not in scores:
          continue
        d_s = plan.sizes[role][1]
        out[f"{role}/layer_{l}"] = (top_in_heads(scores[name], heads_t, heads_s, d_s)
                                    if role == "attn" else top_units(scores[name], d_s))
  return out


def importance_indices(teacher_cfg, teacher_params, student_shapes, split, cfg, method
                       ) -> dict[str, np.ndarray]:
  """The kept indices of every student space, from `method.calibration_batches` training
  batches of the teacher's activations (see the module docstring)."""
  from wdjax.generators import pca
  moments = pca.second_moments(teacher_cfg, teacher_params, split,
                               batches=method.calibration_batches,
                               batch_size=cfg.distill.batch_size, seed=cfg.seed,
                               pad_to_multiple=cfg.data.pad_to_multiple)
  plan = SelectionPlan(teacher_params, student_shapes, method.layer_map or "every_k")
  return keep_indices(unit_scores(moments), plan, teacher_cfg.num_heads, cfg.student.num_heads)
