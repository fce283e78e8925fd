"""Weight Distillation (Lin et al., ACL 2021), as `docs/methods.md` §1.2-1.3.

Every student tensor is generated from its group of teacher tensors (student layer l from the
contiguous teacher layers `ts*l ... ts*l+ts-1`):

    c   = Lambda w                              layer mixing, Lambda [ts, ts], w [ts]
    M   = project(sum_j c_j W_t^(j), maps)      a map per axis: P (output side), Q (input side)
    W_s = A * tanh(M) + B                       A, B: the student tensor's shape

with tanh-affine everywhere except the output projection (here the classifier head, linear only:
`W_s = M`). Initialisation as in the reference (`init="xavier"`): maps and Lambda Xavier-normal,
w = 1/ts, A = 1, B = 0, so the student at step 0 is a random projection of the teacher, *not* the
teacher, and phase 1 has to learn the maps (the paper runs 30k updates).

`init="identity"` is an extension, not WD (`docs/methods.md` §1.9's "function-preserving mode"): maps
are truncated identities, c is one-hot on the group's last layer and A = W_sel / tanh(W_sel), so
the student at step 0 is exactly the weight-selection student and phase 1 starts from it. Phase 1 trains these generator parameters; `materialize` writes
the dense student, which phase 2 fine-tunes as an ordinary model.

Modes:
- `faithful`: maps are separate for every tensor and axis (the reference code; biases, LayerNorm
  vectors and embeddings get their own output-side map too);
- `elementwise=("enc/",)`: leaves under these prefixes are `A * tanh(W_t) + B` of their own
  teacher leaf (no maps, no layer mixing): the reference's encoder-decoder keeps the teacher's
  encoder shape and re-parameterises it this way while the decoder is compressed (§1.2).
- `lean`: maps shared per space, as Weight Squeezing's `sharing="role"` (one map for the
  residual stream, one per layer for its attention and FFN spaces); Lambda, w, A, B stay per
  tensor. Far fewer parameters; not in the paper.

Layout: the L student layers' copies of a leaf (`encoder/layer_0/mlp/up/kernel`, ...,
`layer_{L-1}`) have one shape and one group size, so their parameters are stored stacked under
the stack's name (`encoder/layers/mlp/up/kernel`: maps `[L, d_t, d_s]`, Lambda `[L, ts, ts]`,
w `[L, ts]`, A and B `[L, *shape]`) and generated together: one batched product per map instead
of L products, and L times fewer leaves for the optimizer. It is the same set of parameters as
the paper's per-tensor ones (`flat_params` gives them one tensor at a time, by their per-tensor
names); only the number of kernels per step changes (WD's overhead over plain KD is mostly
kernel count: its generator's FLOPs are <1% of the step's).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from wdjax import trees
from wdjax.config import RankedStartMethod, TwoPhaseMethod
from wdjax.generators import paths
from wdjax.models import contract
from wdjax.generators.base import Generator, Params
from wdjax.generators.registry import Method, register
from wdjax.generators.select import SelectionPlan
from wdjax.generators.squeeze import xavier_normal

INITS = ("xavier", "identity", "importance")


class WeightDistillation(Generator):
  name = "wd"

  def __init__(self, student_shapes: Params, teacher_shapes: Params, *, mode: str = "faithful",
               layer_map: str = "contiguous", init: str = "xavier", elementwise: tuple[str, ...] = (),
               indices: dict | None = None):
    if mode not in ("faithful", "lean"):
      raise ValueError(f"wd mode must be 'faithful' or 'lean', got {mode!r}")
    if init not in INITS:
      raise ValueError(f"wd init must be one of {INITS} (xavier: the paper's), got {init!r}")
    if init == "importance" and indices is None:
      raise ValueError("init='importance' needs the kept indices (importance.importance_indices)")
    # importance: one teacher layer per student layer (its ranked depth), sliced at its units;
    # otherwise indices, if any, are the family's head structure (uniform KV groups)
    self.plan = SelectionPlan(teacher_shapes, student_shapes, layer_map, indices)
    self.mode, self.init_kind, self.elementwise = mode, init, tuple(elementwise)
    t_flat = trees.flatten(teacher_shapes)
    for path, sources in self.plan.sources.items():
      if self.is_elementwise(path) and (len(sources) != 1 or
                                        tuple(t_flat[sources[0]].shape) != self.plan.student_shapes[path]):
        raise ValueError(f"{path} is generated elementwise (prefix in {self.elementwise}), so it must "
                         "have its teacher leaf's shape and one teacher layer")
    self.groups = trees.layer_groups(self.plan.sources)  # stack name -> its leaves, layer order
    # every map: (d_teacher, d_student, L for one map per layer or 0 for one shared map)
    self.map_specs: dict[str, tuple[int, int, int]] = {}
    for key, group in self.groups.items():
      for axis, role in enumerate(self.plan.roles[group[0]]):
        if (name := self.space(key, axis)) is not None:
          spec = (*self.plan.sizes[role], len(group) if trees.is_stacked(name) else 0)
          if self.map_specs.setdefault(name, spec) != spec:
            raise ValueError(f"map {name}: {spec} for {key}, elsewhere {self.map_specs[name]}")

  def is_elementwise(self, path: str) -> bool:
    """The reference's encoder: `A * tanh(W_t) + B` of the same-shaped teacher leaf, no maps."""
    return any(path.startswith(p) for p in self.elementwise)

  def is_output(self, path: str) -> bool:
    """The output projection (a classifier, a head, a decoder's output): linear maps only."""
    return contract.has(path, contract.OUTPUT)

  def space(self, key: str, axis: int) -> str | None:
    """The map contracting `axis` of the leaves stacked under `key` (None: the axis is kept):
    faithful, `<key>/axis_<a>` (per layer when `key` is a stack); lean, the space's map
    (`attn/layers`: one per layer, stacked; `hidden`: one for the whole network)."""
    role = self.plan.roles[self.groups[key][0]][axis]
    if role is None or self.is_elementwise(key):
      return None
    return f"{key}/axis_{axis}" if self.mode == "faithful" else paths.space_of(key, role)

  def init(self, rng, teacher_params, spec):
    del spec
    identity = self.init_kind in ("identity", "importance")  # step 0 is the selected student
    keys = iter(jax.random.split(rng, len(self.map_specs) + len(self.groups)))
    maps, mix, affine = {}, {}, {}
    for name, (d_t, d_s, n) in sorted(self.map_specs.items()):
      key, lead = next(keys), (n,) if n else ()
      maps[name] = (self.selection_maps(name) if identity else xavier_normal(key, d_t, d_s, lead))
    selected = self.plan.apply(teacher_params) if identity else {}
    for key, group in self.groups.items():
      rng_key, n, ts = next(keys), len(group), len(self.plan.sources[group[0]])
      lead = (n,) if trees.is_stacked(key) else ()
      if trees.is_stacked(key) and not self.is_elementwise(key):
        if identity:  # c = Lambda w = one-hot on the group's last layer (every_k's choice)
          mix[key] = {"lam": jnp.broadcast_to(jnp.eye(ts, dtype=jnp.float32), (n, ts, ts)),
                      "w": jnp.zeros((n, ts), jnp.float32).at[:, -1].set(1.0)}
        else:
          mix[key] = {"lam": xavier_normal(rng_key, ts, ts, (n,)), "w": jnp.full((n, ts), 1.0 / ts, jnp.float32)}
      if not self.is_output(key):
        shape = (*lead, *self.plan.student_shapes[group[0]])
        if identity:  # A * tanh(W_sel) = W_sel exactly: A = W_sel / tanh(W_sel) (1 where W_sel = 0)
          w = jnp.stack([selected[p] for p in group]).reshape(shape)
          t = jnp.tanh(w)
          a = jnp.where(jnp.abs(t) > 1e-12, w / jnp.where(jnp.abs(t) > 1e-12, t, 1.0), 1.0)
        else:
          a = jnp.ones(shape, jnp.float32)
        affine[key] = {"a": a, "b": jnp.zeros(shape, jnp.float32)}
    gen = {"maps": maps, "mix": mix, "affine": affine}
    return {k: trees.unflatten(v) for k, v in gen.items()}, {}

  def selection_maps(self, name: str) -> jax.Array:
    """Map `name` at the plan's selection: `[d_t, d_s]` (`[L, d_t, d_s]` per layer) with a 1 at
    each kept unit (uniform, or the importance-selected ones per layer)."""
    key, axis = next((k, a) for k in self.groups for a in range(len(self.plan.roles[self.groups[k][0]]))
                     if self.space(k, a) == name)
    role = self.plan.roles[self.groups[key][0]][axis]
    d_t, d_s, n = self.map_specs[name]
    layer_paths = self.groups[key] if n else self.groups[key][:1]
    stacked = [paths.selection_matrix(d_t, d_s, index=self.plan.indices.get(
        paths.space_of(p, role), self.plan.index[role])) for p in layer_paths]
    return jnp.stack(stacked) if n else stacked[0]

  def generate(self, gen_params, teacher_params, gen_state):
    del gen_state
    maps = trees.flatten(gen_params["maps"])
    t_flat = trees.flatten(teacher_params)
    out = {}
    for key, group in self.groups.items():
      sources = [self.plan.sources[p] for p in group]  # [L][ts] teacher paths
      c = None  # no mix: each leaf's one teacher leaf (stacked as [1, ...] outside the layers)
      if trees.is_stacked(key) and not self.is_elementwise(key):
        m = _lookup(gen_params["mix"], key)
        c = jnp.einsum("lij,lj->li", m["lam"], m["w"])  # [L, ts]
      x = paths.stack_sources(t_flat, sources, c)  # mix layers first: cheap
      x = paths.project_stacked(x, tuple(None if (n := self.space(key, a)) is None else maps[n]
                                         for a in range(x.ndim - 1)))
      if not self.is_output(key):
        ab = _lookup(gen_params["affine"], key)
        a, b = (ab["a"], ab["b"]) if trees.is_stacked(key) else (ab["a"][None], ab["b"][None])
        x = a * jnp.tanh(x) + b
      out.update(zip(group, x))
    return trees.unflatten(out)


def _lookup(tree: dict, path: str):
  for k in path.split("/"):
    tree = tree[k]
  return tree


@dataclasses.dataclass(frozen=True)
class WDMethod(TwoPhaseMethod, RankedStartMethod):
  """Weight Distillation: phase 1 trains the parameter generator, phase 2 the student it made."""

  name: str = "wd"
  mode: str = "faithful"  # faithful (maps per tensor, as the paper's code) | lean (per space)
  init: str = "xavier"  # the maps' start: xavier (the paper's) | identity (weight selection; an
  #                       extension) | importance (importance selection's units and layers)


register(Method("wd", WeightDistillation, section=WDMethod, two_phase=True,
                options=lambda m, context: {"mode": m.mode, "init": m.init,
                                            "layer_map": m.layer_map or "contiguous"},
                choices={"mode": ("faithful", "lean"), "init": INITS}))
