"""What every generator needs to know about parameter trees, written once.

- **Paths**: trees are flattened to `{"encoder/layer_0/attn/q/kernel": array, ...}` and back
  (`wdjax/trees.py`).
- **Layer maps**: which teacher layers feed student layer l (contiguous groups, every k-th,
  first N, uniform, or all of them for a learned mix).
- **Dimension roles**: what each axis of a leaf *is* (the residual stream "hidden", the attention
  inner space "attn", the FFN inner space "ffn", the pooled space "pooled"), from the families'
  parameter tables (`wdjax/models/contract.py`). Axes without a role (vocabulary rows, positions,
  classes) are the same size in teacher and student and are never mapped.
- **Kernel layout**: kernels are Flax's `[in, out]`, the transpose of the math's `W [out, in]`;
  a map `M_r [d_teacher, d_student]` acts on an axis by contraction, so `K_s = M_in^T K_t M_out`
  is `W_s = M_out^T W_t M_in` in math layout.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from wdjax import trees
from wdjax.models import contract

Params = Any

LAYER_MAPS = ("contiguous", "every_k", "first_n", "uniform", "all")


def layer_map(kind: str, n_teacher: int, n_student: int) -> list[list[int]]:
  """Teacher layers feeding each student layer.

  contiguous: groups of n_t/n_s consecutive layers (WD's grouping: 6->3 gives [0,1],[2,3],[4,5])
  every_k:    the last layer of each group ([1],[3],[5]: docs/data.md's weight-selection reference)
  first_n:    the first n_s layers ([0],[1],[2]: weight selection's depth rule)
  uniform:    round(l (n_t-1)/(n_s-1)), spread over the whole depth ([0],[2],[5])
  all:        every teacher layer for every student layer (a learned mix chooses)
  """
  if n_student > n_teacher:
    raise ValueError(f"a student of {n_student} layers cannot be mapped from {n_teacher}")
  if kind in ("contiguous", "every_k") and n_teacher % n_student:
    raise ValueError(f"layer_map {kind!r} needs n_teacher ({n_teacher}) divisible by "
                     f"n_student ({n_student}); use 'uniform' or 'first_n'")
  k = n_teacher // n_student
  if kind == "contiguous":
    return [list(range(k * l, k * l + k)) for l in range(n_student)]
  if kind == "every_k":
    return [[k * l + k - 1] for l in range(n_student)]
  if kind == "first_n":
    return [[l] for l in range(n_student)]
  if kind == "uniform":
    if n_student == 1:
      return [[n_teacher - 1]]
    return [[int(round(l * (n_teacher - 1) / (n_student - 1)))] for l in range(n_student)]
  if kind == "all":
    return [list(range(n_teacher)) for _ in range(n_student)]
  raise ValueError(f"layer_map must be one of {LAYER_MAPS}, got {kind!r}")


def uniform_indices(n_teacher: int, n_student: int) -> np.ndarray:
  """Weight selection's per-dimension rule: every k-th index when n_s divides n_t, else linspace."""
  if n_student > n_teacher:
    raise ValueError(f"cannot select {n_student} of {n_teacher} indices")
  if n_teacher % n_student == 0:
    return np.arange(0, n_teacher, n_teacher // n_student)
  return np.round(np.linspace(0, n_teacher - 1, n_student)).astype(np.int64)


def role_sizes(teacher_flat: dict, student_flat: dict) -> dict[str, tuple[int, int]]:
  """`{role: (d_teacher, d_student)}`, checked consistent across all leaves."""
  sizes: dict[str, tuple[int, int]] = {}
  for path, s_leaf in student_flat.items():
    t_leaf = teacher_flat.get(path)
    if t_leaf is None:
      continue
    for axis, role in enumerate(contract.roles(path, np.ndim(s_leaf))):
      if role is None:
        continue
      pair = (np.shape(t_leaf)[axis], np.shape(s_leaf)[axis])
      if sizes.setdefault(role, pair) != pair:
        raise ValueError(f"{path}: axis {axis} ({role}) is {pair}, elsewhere {sizes[role]}")
  return sizes


def space_of(path: str, role: str | None) -> str | None:
  """The space an axis of role `role` of leaf `path` lives in: `hidden` and `pooled` are one
  space through the whole network; each layer's `attn` and `ffn` spaces are spaces of their own
  (`attn/layer_l`), since unit j of one layer's FFN has nothing to do with unit j of another's."""
  layer = trees.layer_of(path)
  if role in contract.INNER_SPACES and layer is not None:
    return f"{role}/layer_{layer}"  # roles differ per stack, so names do not collide
  if role in contract.INNER_SPACES and trees.is_stacked(path):
    return f"{role}/layers"  # all the layers' spaces of that role, stacked
  return role


def project(x: jax.Array, maps: tuple[jax.Array | None, ...]) -> jax.Array:
  """Contract each axis i of `x` with `maps[i] [d_t, d_s]` (None leaves the axis alone)."""
  for axis, m in enumerate(maps):
    if m is not None:
      x = jnp.moveaxis(jnp.tensordot(x, m, axes=[[axis], [0]]), -1, axis)
  return x


def project_stacked(x: jax.Array, maps: tuple[jax.Array | None, ...]) -> jax.Array:
  """`project` of L same-shaped tensors at once: `x [L, *shape]`; `maps[i]` contracts axis i of
  every slice, either one `[d_t, d_s]` map shared by all L or one per slice, `[L, d_t, d_s]`
  (a batched matrix product: one kernel where L separate products would be L)."""
  n = x.ndim
  operands, out = [x, list(range(n))], list(range(n))
  for axis, m in enumerate(maps):
    if m is not None:  # the student-side index (n + axis) replaces the teacher-side one in place
      operands += [m, ([0] if m.ndim == 3 else []) + [axis + 1, n + axis]]
      out[axis + 1] = n + axis
  if len(operands) == 2:
    return x
  # one contraction, so the cheapest order is chosen: a [3072, 768] -> [1536, 384] FFN kernel
  # costs 2.7 GFLOP contracting its 768 side first, 4.1 contracting its 3072 side first
  return jnp.einsum(*operands, out, optimize="optimal")


def stack_sources(t_flat: dict[str, jax.Array], sources: list[list[str]],
                  weights: jax.Array | None = None) -> jax.Array:
  """`[L, ...]`: for each of L student leaves, its teacher leaves `sources[l]` mixed with
  `weights [L, ts]` (a learned layer mix), or without weights its first one."""
  if weights is None:
    return jnp.stack([t_flat[s[0]] for s in sources])
  per_layer = lambda w: w.reshape(-1, *(1,) * t_flat[sources[0][0]].ndim)
  return sum(per_layer(weights[:, j]) * jnp.stack([t_flat[s[j]] for s in sources])
             for j in range(len(sources[0])))


def selection_matrix(n_teacher: int, n_student: int, dtype=jnp.float32,
                     index: np.ndarray | None = None) -> jax.Array:
  """`[n_t, n_s]` with a 1 at (idx_j, j): contracting with it is weight selection (of the
  uniform indices, or of `index`)."""
  m = np.zeros((n_teacher, n_student), np.float32)
  idx = uniform_indices(n_teacher, n_student) if index is None else np.asarray(index)
  m[idx, np.arange(n_student)] = 1.0
  return jnp.asarray(m, dtype)
