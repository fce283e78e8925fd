"""Weight Squeezing (Chumachenko et al. 2020) and Gated Weight Squeezing, as `methods.md` §4.

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
`pca_maps` on training batches and passed in).

Depth: a fixed layer map (`every_k` default), or `layer_mix="learned"`: each student leaf is a
softmax-weighted mix of its teacher group (`contiguous` groups), initialised uniform.

Gated WS: `W_s = g * W_m + (1 - g) * (L W_t R)`, `g = sigmoid(theta)` per matrix (a scalar),
per row (per output unit: the last axis of a Flax kernel) or per element; `W_m` is a trainable
student-shaped model initialised by weight selection, `theta` at `gate_init` (3.0: g = 0.95, so
training starts from the selected model, as GWS starts from its mid-size model).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np

from wdjax.generators import paths
from wdjax.generators.base import Generator, Params
from wdjax.generators.select import SelectionPlan


GAIN = re.compile(r"(^|/)(ln|\w+_ln)/scale$")


def xavier_normal(key, d_in: int, d_out: int, lead: tuple[int, ...] = ()) -> jax.Array:
  """`[*lead, d_in, d_out]`: independent Xavier-normal `[d_in, d_out]` matrices."""
  return jax.random.normal(key, (*lead, d_in, d_out), jnp.float32) * np.sqrt(2.0 / (d_in + d_out))


class WeightSqueezing(Generator):
  name = "ws"

  def __init__(self, student_shapes: Params, teacher_shapes: Params, *, layer_map: str = "every_k",
               layer_mix: str = "fixed", sharing: str = "role", init: str = "identity",
               gated: bool = False, gate: str = "matrix", gate_init: float = 3.0,
               pca: dict[str, jax.Array] | None = None):
    if layer_mix not in ("fixed", "learned"):
      raise ValueError(f"layer_mix must be 'fixed' or 'learned', got {layer_mix!r}")
    if sharing not in ("role", "tensor"):
      raise ValueError(f"sharing must be 'role' or 'tensor', got {sharing!r}")
    if init not in ("identity", "xavier", "pca"):
      raise ValueError(f"init must be identity, xavier or pca, got {init!r}")
    if gate not in ("matrix", "row", "element"):
      raise ValueError(f"gate must be matrix, row or element, got {gate!r}")
    if init == "pca" and pca is None:
      raise ValueError("init='pca' needs the activation PCA maps (pca_maps)")
    if layer_mix == "learned" and layer_map == "every_k":
      layer_map = "contiguous"  # a learned mix needs a group to mix over
    self.plan = SelectionPlan(teacher_shapes, student_shapes, layer_map)
    self.layer_mix, self.sharing, self.init_kind = layer_mix, sharing, init
    self.gated, self.gate, self.gate_init, self.pca = gated, gate, gate_init, pca
    self.name = "gws" if gated else "ws"

  # --- which map contracts which axis -------------------------------------------------------

  def role_space(self, path: str, axis: int) -> str | None:
    return paths.space_of(path, self.plan.roles[path][axis])

  def space(self, path: str, axis: int) -> str | None:
    """Name of the map that contracts `axis` of student leaf `path`."""
    if self.plan.roles[path][axis] is None:
      return None
    return f"{path}/axis_{axis}" if self.sharing == "tensor" else self.role_space(path, axis)

  def _spaces(self) -> dict[str, tuple[int, int, str]]:
    """{map name: (d_teacher, d_student, the space it maps)}."""
    out = {}
    for path, axes in self.plan.roles.items():
      for axis, role in enumerate(axes):
        name = self.space(path, axis)
        if name is not None:
          out[name] = (*self.plan.sizes[role], self.role_space(path, axis))
    return out

  # --- the contract ---------------------------------------------------------------------------

  def init(self, rng, teacher_params, spec):
    spaces = self._spaces()
    keys = dict(zip(sorted(spaces), jax.random.split(rng, max(len(spaces), 1))))
    maps = {}
    for name, (d_t, d_s, space) in spaces.items():
      if self.init_kind == "identity":
        maps[name] = paths.selection_matrix(d_t, d_s)
      elif self.init_kind == "xavier":
        maps[name] = xavier_normal(keys[name], d_t, d_s)
      else:
        maps[name] = jnp.asarray(self.pca[space], jnp.float32)
    gen = {"maps": maps}
    if self.layer_mix == "learned":
      gen["mix"] = {p: jnp.zeros((len(s),), jnp.float32) for p, s in self.plan.sources.items()
                    if len(s) > 1}
    if self.gated:
      selected = self.plan.apply(teacher_params)  # W_m starts as the weight-selection student
      gen["student"] = selected
      gen["gate"] = {p: jnp.full(self._gate_shape(x.shape), self.gate_init, jnp.float32)
                     for p, x in selected.items()}
    # Nested trees (no '/' inside keys), so checkpoints and sharding rules see ordinary paths.
    return {k: paths.unflatten(v) for k, v in gen.items()}, {}

  def _gate_shape(self, shape):
    return () if self.gate == "matrix" else shape[-1:] if self.gate == "row" else shape

  def mapped(self, gen_params, teacher_params) -> dict[str, jax.Array]:
    """`L W_t R` for every student leaf (flat dict)."""
    gen_params = {k: paths.flatten(v) for k, v in gen_params.items()}
    t_flat = paths.flatten(teacher_params)
    out = {}
    for path, sources in self.plan.sources.items():
      if self.layer_mix == "learned" and len(sources) > 1:
        w = jax.nn.softmax(gen_params["mix"][path])
        x = sum(w[i] * t_flat[s] for i, s in enumerate(sources))
      else:
        x = t_flat[sources[0]]
      maps = tuple(None if (n := self.space(path, a)) is None else gen_params["maps"][n]
                   for a in range(x.ndim))
      if GAIN.search(path):  # a LayerNorm gain is a diagonal operator: diag(M^T diag(g) M)
        maps = tuple(None if m is None else m * m for m in maps)
      out[path] = paths.project(x, maps)
    return out

  def generate(self, gen_params, teacher_params, gen_state):
    del gen_state
    mapped = self.mapped(gen_params, teacher_params)
    if self.gated:
      gate, own = paths.flatten(gen_params["gate"]), paths.flatten(gen_params["student"])
      for p, x in mapped.items():
        g = jax.nn.sigmoid(gate[p])
        mapped[p] = g * own[p] + (1.0 - g) * x
    return paths.unflatten(mapped)
