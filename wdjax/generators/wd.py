"""Weight Distillation (Lin et al., ACL 2021), as `methods.md` §1.2-1.3.

Every student tensor is generated from its group of teacher tensors (student layer l from the
contiguous teacher layers `ts*l ... ts*l+ts-1`):

    c   = Lambda w                              layer mixing, Lambda [ts, ts], w [ts]
    M   = project(sum_j c_j W_t^(j), maps)      a map per axis: P (output side), Q (input side)
    W_s = A * tanh(M) + B                       A, B: the student tensor's shape

with tanh-affine everywhere except the output projection (here the classifier, linear only:
`W_s = M`). Initialisation as in the reference (`init="xavier"`): maps and Lambda Xavier-normal,
w = 1/ts, A = 1, B = 0, so the student at step 0 is a random projection of the teacher, *not* the
teacher, and phase 1 has to learn the maps (the paper runs 30k updates).

`init="identity"` is an extension, not WD (`methods.md` §1.9's "function-preserving mode"): maps
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
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from wdjax.generators import paths
from wdjax.generators.base import Generator, Params
from wdjax.generators.select import SelectionPlan
from wdjax.generators.squeeze import xavier_normal

OUTPUT_LEAVES = ("classifier/", "dec/output/")  # linear only: WD's "output projection"


class WeightDistillation(Generator):
  name = "wd"

  def __init__(self, student_shapes: Params, teacher_shapes: Params, *, mode: str = "faithful",
               layer_map: str = "contiguous", init: str = "xavier", elementwise: tuple[str, ...] = ()):
    if mode not in ("faithful", "lean"):
      raise ValueError(f"wd mode must be 'faithful' or 'lean', got {mode!r}")
    if init not in ("xavier", "identity"):
      raise ValueError(f"wd init must be 'xavier' (the paper's) or 'identity', got {init!r}")
    self.plan = SelectionPlan(teacher_shapes, student_shapes, layer_map)
    self.mode, self.init_kind, self.elementwise = mode, init, tuple(elementwise)
    t_flat = paths.flatten(teacher_shapes)
    for path, sources in self.plan.sources.items():
      if self.is_elementwise(path) and (len(sources) != 1 or
                                        tuple(t_flat[sources[0]].shape) != self.plan.student_shapes[path]):
        raise ValueError(f"{path} is generated elementwise (prefix in {self.elementwise}), so it must "
                         "have its teacher leaf's shape and one teacher layer")

  def is_elementwise(self, path: str) -> bool:
    """The reference's encoder: `A * tanh(W_t) + B` of the same-shaped teacher leaf, no maps."""
    return any(path.startswith(p) for p in self.elementwise)

  def space(self, path: str, axis: int) -> str | None:
    role = self.plan.roles[path][axis]
    if role is None or self.is_elementwise(path):
      return None
    return f"{path}/axis_{axis}" if self.mode == "faithful" else paths.space_of(path, role)

  def is_output(self, path: str) -> bool:
    return any(path.startswith(p) for p in OUTPUT_LEAVES)

  def init(self, rng, teacher_params, spec):
    del spec
    maps, mix, affine = {}, {}, {}
    names = sorted({n for p, axes in self.plan.roles.items() for a in range(len(axes))
                    if (n := self.space(p, a)) is not None})
    keys = iter(jax.random.split(rng, len(names) + len(self.plan.sources)))
    identity = self.init_kind == "identity"
    for name in names:
      path, axis = self._example(name)
      d_t, d_s = self.plan.sizes[self.plan.roles[path][axis]]
      key = next(keys)
      maps[name] = paths.selection_matrix(d_t, d_s) if identity else xavier_normal(key, d_t, d_s)
    selected = self.plan.apply(teacher_params) if identity else {}
    for path, sources in self.plan.sources.items():
      key = next(keys)
      ts = len(sources)
      if paths.layer_of(path) is not None and not self.is_elementwise(path):
        if identity:  # c = Lambda w = one-hot on the group's last layer (every_k's choice)
          mix[path] = {"lam": jnp.eye(ts, dtype=jnp.float32),
                       "w": jnp.zeros((ts,), jnp.float32).at[-1].set(1.0)}
        else:
          mix[path] = {"lam": xavier_normal(key, ts, ts), "w": jnp.full((ts,), 1.0 / ts, jnp.float32)}
      if not self.is_output(path):
        shape = self.plan.student_shapes[path]
        if identity:  # A * tanh(W_sel) = W_sel exactly: A = W_sel / tanh(W_sel) (1 where W_sel = 0)
          w = selected[path]
          t = jnp.tanh(w)
          a = jnp.where(jnp.abs(t) > 1e-12, w / jnp.where(jnp.abs(t) > 1e-12, t, 1.0), 1.0)
        else:
          a = jnp.ones(shape, jnp.float32)
        affine[path] = {"a": a, "b": jnp.zeros(shape, jnp.float32)}
    gen = {"maps": maps, "mix": mix, "affine": affine}
    return {k: paths.unflatten(v) for k, v in gen.items()}, {}

  def _example(self, name: str) -> tuple[str, int]:
    for p, axes in self.plan.roles.items():
      for a in range(len(axes)):
        if self.space(p, a) == name:
          return p, a
    raise KeyError(name)

  def generate(self, gen_params, teacher_params, gen_state):
    del gen_state
    maps = paths.flatten(gen_params["maps"])
    mix, affine = gen_params["mix"], gen_params["affine"]
    t_flat = paths.flatten(teacher_params)
    out = {}
    for path, sources in self.plan.sources.items():
      if paths.layer_of(path) is not None and not self.is_elementwise(path):
        m = _lookup(mix, path)
        c = m["lam"] @ m["w"]  # [ts]
        x = sum(c[j] * t_flat[s] for j, s in enumerate(sources))  # mix layers first: cheap
      else:
        x = t_flat[sources[0]]
      x = paths.project(x, tuple(None if (n := self.space(path, a)) is None else maps[n]
                                 for a in range(x.ndim)))
      if not self.is_output(path):
        ab = _lookup(affine, path)
        x = ab["a"] * jnp.tanh(x) + ab["b"]
      out[path] = x
    return paths.unflatten(out)


def _lookup(tree: dict, path: str):
  for k in path.split("/"):
    tree = tree[k]
  return tree
