"""Weight Squeezing (Chumachenko et al. 2020) and Gated Weight Squeezing, as `docs/methods.md` §4.

    W_s = L W_t R      (a linear map per axis; no nonlinearity)

in Flax layout: every axis of a teacher leaf that has a dimension role is contracted with a map
`M [d_teacher, d_student]`: kernels `K_s = M_in^T K_t M_out`, biases and LayerNorm shifts
`b_s = b_t M`, embeddings `E_s = E_t M_hidden`. A LayerNorm *gain* is not a vector of the space
but a diagonal operator on it, so it maps as `diag(M^T diag(g) M)`, i.e. `g_s = g_t (M * M)`:
for a selection map that is the selection, for a rotation (PCA) a weighted average of gains
(mapping it as a vector would project the all-ones gain onto near-zero components and silence
the network). Maps are

- `sharing="role"` (default): one map per space. The residual stream is one space through the
  whole network, so one `hidden` map serves every embedding, LayerNorm and kernel side that
  touches it; each layer's attention-inner and FFN-inner spaces are spaces of their own, shared by
  the tensors of that layer (Q/K/V/O; up/down). Residual connections stay in one basis, which is
  what lets a linear map preserve function;
- `sharing="tensor"`: a map for every axis of every tensor (most expressive, most parameters).

Initialisation: `identity` (the truncated identity of weight selection's indices, so step 0
*is* the weight-selection student), `xavier` (normal, std sqrt(2/(d_t+d_s))), or `pca`
(orthonormal top principal directions of the teacher's activations in each space, computed by
`pca_maps` on training batches and passed in; the relative-bias `heads` axis, a space of
attention heads rather than of activations, starts at its selection there), or `importance`
(the truncated identity of the units importance selection keeps in each space, passed in as
`indices`: step 0 is the importance-selected student).

Depth: a fixed layer map (`every_k` default), or `layer_mix="learned"`: each student leaf is a
softmax-weighted mix of its teacher group (`contiguous` groups), initialised uniform.

Layout: per-layer leaves (maps of per-layer spaces, W_m, gates, mixes) are stored stacked over
the layers (`encoder/layers/...`, `attn/layers`: `trees.stack_layers`), and a stack's L tensors
are contracted as one batched product; `flat_params` gives the per-layer view.

Gated WS: `W_s = g * W_m + (1 - g) * (L W_t R)`, `g = sigmoid(theta)` per matrix (a scalar),
per row (per output unit: the last axis of a Flax kernel) or per element; `W_m` is a trainable
student-shaped model initialised by weight selection, `theta` at `gate_init` (3.0: g = 0.95, so
training starts from the selected model, as GWS starts from its mid-size model).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from wdjax import trees
from wdjax.config import RankedStartMethod
from wdjax.generators import paths
from wdjax.models import contract
from wdjax.generators.base import Generator, Params
from wdjax.generators.registry import Method, register
from wdjax.generators.select import SelectionPlan


NOT_ACTIVATIONS = ("heads",)  # spaces with no activations to take principal directions of


def xavier_normal(key, d_in: int, d_out: int, lead: tuple[int, ...] = ()) -> jax.Array:
  """`[*lead, d_in, d_out]`: independent Xavier-normal `[d_in, d_out]` matrices."""
  return jax.random.normal(key, (*lead, d_in, d_out), jnp.float32) * np.sqrt(2.0 / (d_in + d_out))


INITS = ("identity", "xavier", "pca", "importance")


class WeightSqueezing(Generator):
  name = "ws"

  def __init__(self, student_shapes: Params, teacher_shapes: Params, *, layer_map: str = "every_k",
               layer_mix: str = "fixed", sharing: str = "role", init: str = "identity",
               gated: bool = False, gate: str = "matrix", gate_init: float = 3.0,
               pca: dict[str, jax.Array] | None = None,
               indices: dict[str, np.ndarray] | None = None):
    if layer_mix not in ("fixed", "learned"):
      raise ValueError(f"layer_mix must be 'fixed' or 'learned', got {layer_mix!r}")
    if sharing not in ("role", "tensor"):
      raise ValueError(f"sharing must be 'role' or 'tensor', got {sharing!r}")
    if init not in INITS:
      raise ValueError(f"init must be one of {', '.join(INITS)}, got {init!r}")
    if init == "importance" and indices is None:
      raise ValueError("init='importance' needs the kept indices (importance.importance_indices)")
    if gate not in ("matrix", "row", "element"):
      raise ValueError(f"gate must be matrix, row or element, got {gate!r}")
    if init == "pca" and pca is None:
      raise ValueError("init='pca' needs the activation PCA maps (pca_maps)")
    if layer_mix == "learned" and layer_map == "every_k":
      layer_map = "contiguous"  # a learned mix needs a group to mix over
    # indices: importance selection's units, or the family's head structure (uniform KV groups)
    self.plan = SelectionPlan(teacher_shapes, student_shapes, layer_map, indices)
    if layer_mix == "learned" and all(len(s) == 1 for s in self.plan.sources.values()):
      raise ValueError(f"layer_mix='learned' mixes each student layer's group of teacher layers, "
                       f"but layer map {layer_map!r} gives every student layer one teacher layer: "
                       "nothing to mix; use layer map 'contiguous' (or a fixed mix)")
    self.layer_mix, self.sharing, self.init_kind = layer_mix, sharing, init
    self.gated, self.gate, self.gate_init, self.pca = gated, gate, gate_init, pca
    self.name = "gws" if gated else "ws"
    self.groups = trees.layer_groups(self.plan.sources)  # stack name -> its leaves, layer order

  # --- which map contracts which axis -------------------------------------------------------

  def space(self, key: str, axis: int) -> str | None:
    """Name of the map that contracts `axis` of the leaves stacked under `key` (a stack name,
    `trees.layer_groups`): per tensor (`<key>/axis_<a>`, one per layer when `key` is a stack)
    or per space (`hidden`: one for the network; `attn/layers`: each layer's own, stacked)."""
    role = self.plan.roles[self.groups[key][0]][axis]
    if role is None:
      return None
    return f"{key}/axis_{axis}" if self.sharing == "tensor" else paths.space_of(key, role)

  def _spaces(self) -> dict[str, tuple[int, int, int, str]]:
    """{map name: (d_teacher, d_student, L for a stack of per-layer maps or 0, its space)}."""
    out = {}
    for key, group in self.groups.items():
      for axis, role in enumerate(self.plan.roles[group[0]]):
        if (name := self.space(key, axis)) is not None:
          out[name] = (*self.plan.sizes[role], len(group) if trees.is_stacked(name) else 0,
                       paths.space_of(key, role))
    return out

  @staticmethod
  def _per_layer(space: str, n: int, one) -> jax.Array:
    """`one(s)` for each layer's space `s` of a stacked `space` (`[n, ...]`), or `one(space)`,
    broadcast to `[n, ...]` when n > 0."""
    if trees.is_stacked(space):
      return jnp.stack([one(s) for s in trees.layer_names(space, n)])
    m = one(space)
    return jnp.broadcast_to(m, (n, *m.shape)) if n else m

  def _selection_map(self, space: str, d_t: int, d_s: int, n: int) -> jax.Array:
    """Weight selection as a map: of the plan's indices (uniform, or those importance selection
    keeps in each layer's space)."""
    return self._per_layer(space, n, lambda s: paths.selection_matrix(
        d_t, d_s, index=self.plan.indices.get(s)))

  def _pca_map(self, space: str, n: int) -> jax.Array:
    """The PCA basis of `space` (`pca_maps` names each layer's space)."""
    return self._per_layer(space, n, lambda s: jnp.asarray(self.pca[s], jnp.float32))

  # --- the contract ---------------------------------------------------------------------------

  def init(self, rng, teacher_params, spec):
    spaces = self._spaces()
    keys = dict(zip(sorted(spaces), jax.random.split(rng, max(len(spaces), 1))))
    maps = {}
    for name, (d_t, d_s, n, space) in spaces.items():
      lead = (n,) if n else ()
      if self.init_kind in ("identity", "importance") or (self.init_kind == "pca" and space in NOT_ACTIVATIONS):
        maps[name] = self._selection_map(space, d_t, d_s, n)
      elif self.init_kind == "xavier":
        maps[name] = xavier_normal(keys[name], d_t, d_s, lead)
      else:
        maps[name] = self._pca_map(space, n)
    gen = {"maps": maps}
    if self.layer_mix == "learned":
      gen["mix"] = {k: jnp.zeros((len(g), len(self.plan.sources[g[0]])), jnp.float32)
                    for k, g in self.groups.items() if len(self.plan.sources[g[0]]) > 1}
    if self.gated:
      selected = self.plan.apply(teacher_params)  # W_m starts as the weight-selection student
      gen["student"] = trees.stack_layers(selected)
      gen["gate"] = trees.stack_layers({p: jnp.full(self._gate_shape(x.shape), self.gate_init, jnp.float32)
                                        for p, x in selected.items()})
    # Nested trees (no '/' inside keys), so checkpoints and sharding rules see ordinary paths;
    # per-layer leaves stacked over the layers (`trees.stack_layers`: one batched product and
    # one optimizer update per stack, not per layer; `flat_params` gives the per-layer view).
    return {k: trees.unflatten(v) for k, v in gen.items()}, {}

  def _gate_shape(self, shape):
    return () if self.gate == "matrix" else shape[-1:] if self.gate == "row" else shape

  def generate(self, gen_params, teacher_params, gen_state):
    """Per stack: the teacher leaves of its layers stacked (or softmax-mixed over each group),
    contracted with their maps at once, then gated with the own model; split into layers."""
    del gen_state
    flat = {k: trees.flatten(v) for k, v in gen_params.items()}
    t_flat = trees.flatten(teacher_params)
    out = {}
    for key, group in self.groups.items():
      sources = [self.plan.sources[p] for p in group]  # [L][ts]
      mix = flat.get("mix", {}).get(key)
      x = paths.stack_sources(t_flat, sources, None if mix is None else jax.nn.softmax(mix, axis=-1))
      maps = tuple(None if (n := self.space(key, a)) is None else flat["maps"][n] for a in range(x.ndim - 1))
      if contract.has(key, contract.GAIN):  # a LayerNorm gain is a diagonal operator: diag(M^T diag(g) M)
        maps = tuple(None if m is None else m * m for m in maps)
      x = paths.project_stacked(x, maps)
      if self.gated:
        g, own = jax.nn.sigmoid(flat["gate"][key]), flat["student"][key]
        if not trees.is_stacked(key):
          g, own = g[None], own[None]
        g = g.reshape(g.shape[0], *(1,) * (x.ndim - g.ndim), *g.shape[1:])  # [L, 1.., gate shape]
        x = g * own + (1.0 - g) * x
      out.update(zip(group, x))
    return trees.unflatten(out)


@dataclasses.dataclass(frozen=True)
class WSMethod(RankedStartMethod):
  """Weight Squeezing: learned linear maps from the teacher's spaces to the student's."""

  name: str = "ws"
  sharing: str = "role"  # one map per space ("role") or one per tensor axis ("tensor")
  init: str = "identity"  # the maps' start: identity (= weight selection at step 0) | xavier | pca
  #                         | importance (= importance selection at step 0)
  layer_mix: str = "fixed"  # the "fixed" layer map, or a "learned" mix over contiguous groups
  pca_batches: int = 8  # init=pca: training batches of teacher activations to decompose


@dataclasses.dataclass(frozen=True)
class GWSMethod(WSMethod):
  """Gated Weight Squeezing: WS's maps plus a student-shaped model, mixed by learned gates."""

  name: str = "gws"
  gate: str = "matrix"  # one gate per matrix | row | element
  gate_init: float = 3.0  # gate logit at init; sigmoid(3) = 0.95 starts from the selected student


def _options(method: WSMethod, context) -> dict:
  opts = dict(layer_map=method.layer_map or "every_k", layer_mix=method.layer_mix,
              sharing=method.sharing, init=method.init)
  if isinstance(method, GWSMethod):
    opts.update(gate=method.gate, gate_init=method.gate_init)
  return opts


def _check(method: WSMethod) -> list[str]:
  return [] if method.pca_batches >= 1 else [f"method.pca_batches={method.pca_batches} (must be at least 1)"]


_CHOICES = {"sharing": ("role", "tensor"), "init": INITS,
            "layer_mix": ("fixed", "learned")}
register(Method("ws", lambda s, t, **o: WeightSqueezing(s, t, gated=False, **o), section=WSMethod,
                options=_options, choices=_CHOICES, check=_check),
         Method("gws", lambda s, t, **o: WeightSqueezing(s, t, gated=True, **o), section=GWSMethod,
                options=_options, choices=dict(_CHOICES, gate=("matrix", "row", "element")), check=_check))
