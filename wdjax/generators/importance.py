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
  other head layout: the top dimensions of the whole space); a grouped-query student with fewer
  KV heads keeps whole KV heads, each with its query heads, by their query heads' total score;
- `pooled`: the pooler output.

Indices are kept in ascending order, so the student's units stay in the teacher's order. A
student shallower than its teacher keeps the teacher's most influential layers, in their order: a
layer's *block influence* is how much it turns the residual stream, 1 - cos(x_in, x_out)
averaged over the real tokens of the calibration sample (Men et al., "ShortGPT: Layers in Large
Language Models are More Redundant Than You Expect", 2024); an explicit `method.layer_map`
overrides it, and units are then scored in the teacher layer that map gives each student layer.
With `method.depth_score=output` the layers are instead the subset whose network, the teacher
with its other layers skipped, moves the teacher's output representation least: the mean over
real tokens of 1 - cos between the two networks' last representation (the pooler output where
the family has one, else the residual stream leaving the last layer), the loss-of-skipping
criterion of layer pruning (Gromov et al., "The Unreasonable Ineffectiveness of the Deeper
Layers", 2024, compare a block's input and output the same way; Kim et al., "Shortened LLaMA",
2024, skip layers by the loss they cost). It searches every subset when there are at most
`MAX_SUBSETS`, else drops one layer at a time, the one that costs least (greedy). Block
influence scores each layer alone in the full network; the output distance scores the student's
layers together, as they will run.
Used as `method.init=importance` of KD, and as the start of WS, GWS, WD, OPDF and WID.
"""

from __future__ import annotations

import itertools
import math

import numpy as np


from wdjax.generators.select import SelectionPlan, group_indices, kv_groups

MAX_SUBSETS = 256  # depth_score=output: above this many layer subsets, the greedy search


def unit_scores(squares: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """`{teacher space: [d] RMS activation (up to a constant)}` from `calibrate`'s sums of x^2
  over real tokens; the residual stream's (`hidden/*`) are pooled into one `hidden`."""
  scores = {"hidden": np.sqrt(sum(v for k, v in squares.items() if k.startswith("hidden/")))}
  scores.update({k: np.sqrt(v) for k, v in squares.items() if not k.startswith("hidden/")})
  return scores


def block_influence(states, weights):
  """`[layers]` mean over real tokens of 1 - cos(state_l, state_l+1), from the residual stream
  `states` (`layers + 1` arrays `[batch, seq, hidden]`) and `weights [batch, seq]` (1 on real
  tokens); jax.numpy, so that it runs inside the jitted forward pass."""
  import jax.numpy as jnp
  w = weights.astype(jnp.float32)
  return jnp.stack([jnp.sum(angular_distance(x, y) * w) / jnp.maximum(jnp.sum(w), 1.0)
                    for x, y in zip(states[:-1], states[1:])])


def angular_distance(x, y):
  """`[...]` 1 - cos(x, y) over the last axis of two `[..., d]` arrays (float32)."""
  import jax.numpy as jnp
  x, y = x.astype(jnp.float32), y.astype(jnp.float32)
  norms = jnp.linalg.norm(x, axis=-1) * jnp.linalg.norm(y, axis=-1)
  return 1.0 - jnp.sum(x * y, -1) / jnp.maximum(norms, 1e-12)


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
  kv = kv_groups(plan.sizes, heads_t)  # grouped-query attention with fewer KV heads
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
        if role == "attn" and kv is not None:  # whole KV groups, by their query heads' total score
          kv_t, kv_s, size, head_dim = kv
          kept = top_units(scores[name].reshape(kv_t, -1).sum(axis=1), kv_s)
          out[f"attn/layer_{l}"], out[f"kv/layer_{l}"] = group_indices(kept, size, head_dim)
        elif role == "attn":
          out[f"attn/layer_{l}"] = top_in_heads(scores[name], heads_t, heads_s, d_s)
        else:
          out[f"ffn/layer_{l}"] = top_units(scores[name], d_s)
  return out


def calibrate(activation_fn, params, batches, *, keep_finals: bool = False
              ) -> tuple[dict[str, np.ndarray], np.ndarray, list]:
  """(`{space: [d] sum of x^2 over real tokens}`, `[layers]` mean block influence, per batch the
  network's `final_representation` when `keep_finals`, else `[]`) of the network whose
  `activation_fn(params, batch) -> (activations, weights)` is given (`bert.activation_fn`), over
  `batches` (`pca.calibration_batches`). The final representations are what `depth_score=output`
  compares against; held for every batch they take batches x rows x length x width floats (tens of
  MB for a 576-wide LM), so only that score asks for them."""
  import jax
  import jax.numpy as jnp
  from wdjax.generators.pca import row_weights

  @jax.jit
  def stats(params, batch):
    acts, weights = activation_fn(params, batch)
    squares = {k: jnp.einsum("btd,bt->d", jnp.square(x.astype(jnp.float32)), row_weights(x, weights))
               for k, x in acts.items()}
    layers = sorted(int(k.rsplit("_", 1)[1]) for k in acts if k.startswith("hidden/layer_"))
    states = [acts["hidden/embeddings"]] + [acts[f"hidden/layer_{l}"] for l in layers]
    return squares, block_influence(states, weights), final_representation(acts, weights)[0]

  squares, influence, finals, n = {}, 0.0, [], 0
  for b in batches:
    sq, infl, final = stats(params, b)
    for k, v in sq.items():
      squares[k] = squares.get(k, 0) + np.asarray(v, np.float64)
    influence = influence + np.asarray(infl, np.float64)
    n += 1
    if keep_finals:
      finals.append(final)
  return squares, influence / max(n, 1), finals


def keep_layers(params, layers) -> dict:
  """The nested params of the network that runs only the teacher's `layers` (ascending), renumbered
  0..len(layers)-1; every leaf outside the layer stack kept."""
  from wdjax import trees
  flat = trees.flatten(params)
  new_index = {int(t): s for s, t in enumerate(layers)}
  out = {}
  for p, x in flat.items():
    layer = trees.layer_of(p)
    if layer is None:
      out[p] = x
    elif layer in new_index:
      out[trees.with_layer(p, new_index[layer])] = x
  return trees.unflatten(out)


def final_representation(acts: dict, weights):
  """(`[batch, rows, d]`, `[batch, rows]` weights) of a network's last representation: its pooler
  output where it has one, else the residual stream leaving its last layer."""
  import jax.numpy as jnp
  if "pooled" in acts:
    x = acts["pooled"]
    return x, jnp.ones(x.shape[:2], jnp.float32)
  last = max(int(k.rsplit("_", 1)[1]) for k in acts if k.startswith("hidden/layer_"))
  return acts[f"hidden/layer_{last}"], weights


def output_distance_layers(activation_fn_at, params, batches: list, targets: list, n_layers: int,
                           n_keep: int, log=lambda _: None) -> np.ndarray:
  """The `n_keep` teacher layers (ascending) whose network moves the teacher's final
  representation least over `batches` (see the module docstring): every subset when there are at
  most `MAX_SUBSETS`, else greedy removal. `activation_fn_at(depth)` is the family's
  `activation_fn` of the teacher at that depth; `targets`: the teacher's final representation of
  each batch (`calibrate`'s third output)."""
  import jax
  import jax.numpy as jnp
  fns = {}

  def rep_fn(depth):
    if depth not in fns:
      act = activation_fn_at(depth)
      fns[depth] = jax.jit(lambda p, b: final_representation(*act(p, b)))
    return fns[depth]


  @jax.jit
  def distance(x, y, w):
    return jnp.sum(angular_distance(x, y) * w), jnp.sum(w)

  def cost(layers) -> float:
    sub = keep_layers(params, layers)
    total = count = 0.0
    for b, target in zip(batches, targets):
      rep, w = rep_fn(len(layers))(sub, b)
      d, n = distance(target, rep, w)
      total, count = total + float(d), count + float(n)
    return total / max(count, 1.0)

  if math.comb(n_layers, n_keep) <= MAX_SUBSETS:
    candidates = list(itertools.combinations(range(n_layers), n_keep))
    costs = [cost(c) for c in candidates]
    best = candidates[int(np.argmin(costs))]
    log(f"output distance of {len(candidates)} layer subsets: best {list(best)} "
        f"{min(costs):.4f}, median {float(np.median(costs)):.4f}")
    return np.asarray(best)
  kept = list(range(n_layers))
  while len(kept) > n_keep:  # about L^2/2 passes: each step is logged
    costs = [cost(kept[:i] + kept[i + 1:]) for i in range(len(kept))]
    dropped = kept.pop(int(np.argmin(costs)))
    log(f"output distance, greedy: layer {dropped} dropped ({min(costs):.4f}), {len(kept)} left")
  log(f"output distance, greedy: the student keeps layers {kept}")
  return np.asarray(kept)


def cached_indices(cache_dir, key: dict, compute, log=lambda _: None) -> dict[str, np.ndarray]:
  """`compute()`'s indices, read back from `cache_dir` when a ranking of the same `key` (a
  JSON-able description of everything it depends on) was written there; else computed and
  written atomically."""
  import hashlib
  import json
  import os
  from pathlib import Path
  digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
  path = Path(cache_dir) / f"importance_{digest}.json"
  if path.exists():
    log(f"importance ranking read from {path}")
    return {k: np.asarray(v, np.int64) for k, v in json.loads(path.read_text()).items()}
  indices = compute()
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(f".tmp{os.getpid()}")
  tmp.write_text(json.dumps({k: np.asarray(v).tolist() for k, v in indices.items()}))
  os.replace(tmp, path)
  return indices


def importance_indices(activation_fn, teacher_params, student_shapes, split, cfg, method, *,
                       heads_t: int, heads_s: int, activation_fn_at=None,
                       log=lambda _: None) -> dict[str, np.ndarray]:
  """The kept indices of every student space, from `method.calibration_batches` training
  batches of the teacher's activations (see the module docstring): its units by RMS activation
  and, for a shallower student without an explicit `method.layer_map`, its layers by
  `method.depth_score` (`indices[DEPTH]`). `activation_fn_at(depth)`: the family's
  `activation_fn` of the teacher at another depth (what `depth_score=output` runs)."""
  from wdjax import trees
  from wdjax.generators.pca import calibration_batches
  from wdjax.generators.select import DEPTH
  batches = list(calibration_batches(split, batches=method.calibration_batches,
                                     batch_size=cfg.distill.batch_size, seed=cfg.seed,
                                     pad_to_multiple=cfg.data.pad_to_multiple))
  wants_output = not method.layer_map and method.depth_score == "output"
  squares, influence, finals = calibrate(activation_fn, teacher_params, batches, keep_finals=wants_output)
  depth = {}
  n_s = 1 + max(trees.layer_of(p) for p in trees.flatten(student_shapes) if trees.layer_of(p) is not None)
  if not method.layer_map and n_s < len(influence):
    score = method.depth_score
    if score == "output":
      if activation_fn_at is None:
        raise ValueError("depth_score='output' needs the teacher's activation_fn at other depths")
      layers = output_distance_layers(activation_fn_at, teacher_params, batches, finals,
                                      len(influence), n_s, log=log)
    else:
      layers = top_layers(influence, n_s)
    depth = {DEPTH: layers}
    log(f"block influence {', '.join(f'{v:.3f}' for v in influence)}; the student keeps layers "
        f"{depth[DEPTH].tolist()} (depth_score={score})")
  plan = SelectionPlan(teacher_params, student_shapes, method.layer_map or "every_k", depth)
  return {**keep_indices(unit_scores(squares), plan, heads_t, heads_s), **depth}
