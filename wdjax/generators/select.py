"""Weight selection (Xu et al., ICLR 2024): the student is a uniform slice of the teacher.

Each student leaf takes the teacher leaf of its mapped layer and keeps, along every axis that
has a dimension role, the same indices (`paths.uniform_indices`: every k-th when the sizes
divide, else linspace). One index set per role keeps the selection consistent across
residual-connected tensors: the hidden units a LayerNorm keeps are the ones every kernel reads
and writes. With 12 heads of 32 -> 12 heads of 16, every-other selection keeps half of each
teacher head in the student head of the same number.

Depth follows a layer map (default `every_k`: layers 1, 3, 5 of 6 for a 3-layer student, as in
docs/data.md's reference). Unlike the reference script, which skips the classifier because its
pretraining and downstream classes differ, the task teacher's classifier is selected too: the
classes are the same.

As a generator it has no trainable leaves (the selected student is fixed); its main use is as an
initialiser, `method.init="selection"` for a KD student.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from wdjax import trees
from wdjax.config import MethodConfig
from wdjax.generators import paths
from wdjax.models import contract
from wdjax.generators.base import Generator, Params, StudentSpec
from wdjax.generators.registry import Method, register


DEPTH = "depth"  # the key of `indices` that names the teacher layers a one-stack student keeps


class SelectionPlan:
  """For every student leaf: its teacher path(s) and the indices kept along each axis."""

  def __init__(self, teacher_shapes: Params, student_shapes: Params, layer_map: str = "every_k",
               indices: dict[str, np.ndarray] | None = None):
    """`indices`: `{student space (paths.space_of): teacher indices}` kept instead of the
    uniform ones (importance selection), and `{DEPTH: teacher layers}` (ascending) instead of
    the layer map; what it does not name stays uniform."""
    t_flat, s_flat = trees.flatten(teacher_shapes), trees.flatten(student_shapes)
    indices = dict(indices or {})
    kept_layers = indices.pop(DEPTH, None)
    # depth is planned per layer stack (one for an encoder, two for an encoder-decoder)
    depth = lambda flat, stack: 1 + max(trees.layer_of(p) for p in flat if trees.layer_of(p) is not None
                                         and trees.stack_of(p) == stack)
    stacks = sorted({trees.stack_of(p) for p in s_flat if trees.layer_of(p) is not None})
    if kept_layers is None:
      self.stack_layers = {st: paths.layer_map(layer_map, depth(t_flat, st), depth(s_flat, st))
                           for st in stacks}
    else:  # the layer map is not used (it may not even fit these depths)
      kept = [int(l) for l in kept_layers]
      n_t, n_s = depth(t_flat, stacks[0]), depth(s_flat, stacks[0])
      if len(stacks) != 1 or len(kept) != n_s or kept != sorted(set(kept)) or not 0 <= kept[0] <= kept[-1] < n_t:
        raise ValueError(f"indices[{DEPTH!r}] must be {n_s} ascending layers of {n_t} (one layer stack)")
      self.stack_layers = {stacks[0]: [[l] for l in kept]}
    self.n_teacher = sum(depth(t_flat, st) for st in stacks)
    self.n_student = sum(depth(s_flat, st) for st in stacks)
    self.sizes = paths.role_sizes(t_flat, s_flat)
    self.index = {r: paths.uniform_indices(t, s) for r, (t, s) in self.sizes.items()}
    self.indices = indices
    for space, idx in self.indices.items():
      d_t, d_s = self.sizes[space.split("/")[0]]
      if len(idx) != d_s or len(set(np.asarray(idx).tolist())) != d_s or not 0 <= min(idx) <= max(idx) < d_t:
        raise ValueError(f"indices of {space} must be {d_s} distinct units of {d_t}")
    self.student_shapes = {p: tuple(np.shape(x)) for p, x in s_flat.items()}
    self.roles = {p: contract.roles(p, len(shape)) for p, shape in self.student_shapes.items()}
    self.sources: dict[str, list[str]] = {}
    for p in s_flat:
      layer = trees.layer_of(p)
      srcs = [p] if layer is None else [trees.with_layer(p, t)
                                        for t in self.stack_layers[trees.stack_of(p)][layer]]
      missing = [q for q in srcs if q not in t_flat]
      if missing:
        raise ValueError(f"student leaf {p} has no teacher counterpart {missing[0]}")
      for q in srcs:
        want = [self.sizes[r][0] if r else n for r, n in zip(self.roles[p], self.student_shapes[p])]
        if list(np.shape(t_flat[q])) != want:
          raise ValueError(f"teacher leaf {q} has shape {list(np.shape(t_flat[q]))}, "
                           f"expected {want} for student leaf {p}")
      self.sources[p] = srcs

  def select(self, x, path: str):
    """Slice one teacher tensor down to the student leaf `path`'s shape."""
    for axis, role in enumerate(self.roles[path]):
      if role is not None and self.sizes[role][0] != self.sizes[role][1]:
        index = self.indices.get(paths.space_of(path, role), self.index[role])
        x = jnp.take(x, jnp.asarray(index), axis=axis)
    return x

  def apply(self, teacher_params: Params) -> dict[str, jax.Array]:
    """The selected student as a flat dict; from a group of teacher layers, the last one
    (`every_k`'s choice, so a contiguous plan selects what an every-k plan does)."""
    t_flat = trees.flatten(teacher_params)
    return {p: self.select(t_flat[srcs[-1]], p) for p, srcs in self.sources.items()}


def kv_groups(sizes: dict[str, tuple[int, int]], heads_t: int) -> tuple[int, int, int, int] | None:
  """(teacher KV heads, student KV heads, query heads per KV head, head size) when a plan's `kv`
  space (grouped-query attention's keys and values) shrinks, from `SelectionPlan.sizes` and the
  teacher's query heads; None when it is kept whole or absent. The student keeps the head size."""
  if "kv" not in sizes or sizes["kv"][0] == sizes["kv"][1]:
    return None
  head_dim = sizes["attn"][0] // heads_t
  kv_t, kv_s = sizes["kv"][0] // head_dim, sizes["kv"][1] // head_dim
  return kv_t, kv_s, heads_t // kv_t, head_dim


def group_indices(kept: np.ndarray, group: int, head_dim: int) -> tuple[np.ndarray, np.ndarray]:
  """(attention-space, kv-space) indices that keep the KV heads `kept` (ascending) whole, each with
  its `group` query heads: a grouped-query student's heads are some of the teacher's, intact
  (a head's rotary dimensions stay paired, its queries stay with their keys)."""
  expand = lambda heads: (np.reshape(heads, (-1, 1)) * head_dim + np.arange(head_dim)[None]).reshape(-1)
  return expand(np.reshape(kept, (-1, 1)) * group + np.arange(group)[None]), expand(kept)


def uniform_group_indices(plan: SelectionPlan, heads_t: int) -> dict[str, np.ndarray]:
  """`indices` for every student layer of a grouped-query student with fewer KV heads: the KV heads
  of weight selection's uniform rule (`paths.uniform_indices` over heads), with their query
  heads; {} when the KV heads are kept."""
  groups = kv_groups(plan.sizes, heads_t)
  if groups is None:
    return {}
  kv_t, kv_s, group, head_dim = groups
  attn, kv = group_indices(paths.uniform_indices(kv_t, kv_s), group, head_dim)
  out = {}
  for stack_layers in plan.stack_layers.values():
    for l in range(len(stack_layers)):
      out[f"attn/layer_{l}"], out[f"kv/layer_{l}"] = attn, kv
  return out


def select(teacher_params: Params, student_shapes: Params, layer_map: str = "every_k",
           indices: dict[str, np.ndarray] | None = None) -> Params:
  """The weight-selection student (a param tree shaped like `student_shapes`); `indices` as
  `SelectionPlan`'s (importance selection), else uniform."""
  dtypes = {p: x.dtype for p, x in trees.flatten(student_shapes).items()}
  selected = SelectionPlan(teacher_params, student_shapes, layer_map, indices).apply(teacher_params)
  return trees.unflatten({p: x.astype(dtypes[p]) for p, x in selected.items()})


class WeightSelection(Generator):
  """No trainable leaves: `generate` is the selection of the (frozen) teacher."""

  name = "select"

  def __init__(self, student_shapes: Params, teacher_shapes: Params, *, layer_map: str = "every_k",
               indices: dict[str, np.ndarray] | None = None):
    self.plan = SelectionPlan(teacher_shapes, student_shapes, layer_map, indices)

  def init(self, rng, teacher_params, spec: StudentSpec):
    del rng, teacher_params, spec
    return {}, {}

  def generate(self, gen_params, teacher_params, gen_state):
    del gen_params, gen_state
    return trees.unflatten(self.plan.apply(teacher_params))


@dataclasses.dataclass(frozen=True)
class SelectMethod(MethodConfig):
  """Weight selection alone: the student is a fixed slice of the teacher (nothing is trained)."""

  name: str = "select"


register(Method("select", WeightSelection, section=SelectMethod,
                options=lambda m, context: {"layer_map": m.layer_map or "every_k"}))
