"""OPDF: an over-parameterised student whose matrices train as exact MPO chains (methods.md §2)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np

from wdjax.generators import paths
from wdjax.generators.base import Generator, Params, StudentSpec
from wdjax.generators.mpo import contract, core_shapes, decompose, factorize
from wdjax.generators.select import SelectionPlan

DECOMPOSED = r"encoder/layer_\d+/(attn/(q|k|v|o)|mlp/(up|down))/kernel$"


class MatrixProductOperator(Generator):
  """OPDF (Zhan et al., NeurIPS 2024; methods.md §2): every attention and FFN matrix of the
  student trains as an exact MPO chain, contracted once per step; `aux_loss` pulls the student's
  auxiliary cores (all but the central one) towards the teacher's, decomposed the same way
  (teacher layer by `layer_map`: every_k aligns student layer i with teacher layer 2i+1 for a
  half-depth student, as §2.4).

  gen_params: `{"cores": {<kernel path>/core_k: [d_{k-1}, i_k, j_k, d_k]}, "dense": {...}}`;
  gen_state: `{"targets": {<kernel path>/core_k: teacher core}}` for the constrained cores.
  Cores decompose the math-layout matrix `W = kernel.T [out, in]`, as the reference.

  The student starts from `start`: "selection" (the teacher's layers by `layer_map`, sliced to
  the student's width: at the same width, the teacher's own layers) or "random" (its fresh init).
  Width mismatch (an extension, §2.8 b): only the auxiliary cores whose shapes coincide are
  constrained; with none, a non-zero `constraint_lambda` is refused.
  """

  name = "opdf"

  def __init__(self, student_shapes: Params, teacher_shapes: Params, *, n_cores: int = 5,
               constraint_lambda: float | None = None, start: str = "selection",
               layer_map: str = "every_k"):
    if start not in ("selection", "random"):
      raise ValueError(f"OPDF start must be 'selection' or 'random', got {start!r}")
    self.plan = SelectionPlan(teacher_shapes, student_shapes, layer_map)
    self.start = start
    s_flat, t_flat = paths.flatten(student_shapes), paths.flatten(teacher_shapes)
    self.n_cores = n_cores
    self.factors, self.constrained = {}, {}
    for p, x in s_flat.items():
      if not re.search(DECOMPOSED, p):
        continue
      d_in, d_out = np.shape(x)
      self.factors[p] = factorize(d_out, d_in, n_cores)
      t_in, t_out = np.shape(t_flat[self.plan.sources[p][-1]])
      t_factors = factorize(t_out, t_in, n_cores)
      centre = (n_cores - 1) // 2
      self.constrained[p] = tuple(
          k for k, (a, b) in enumerate(zip(core_shapes(*self.factors[p]), core_shapes(*t_factors)))
          if k != centre and a == b)
    self.teacher_factors = {p: factorize(*np.shape(t_flat[self.plan.sources[p][-1]])[::-1], n_cores)
                            for p in self.factors}
    self._decompose_once(student_shapes, teacher_shapes)
    n_pairs = sum(len(v) for v in self.constrained.values())
    self.constraint_lambda = (1e-4 / self.plan.n_student if constraint_lambda is None
                              else constraint_lambda)
    if self.constraint_lambda and n_pairs == 0:
      raise ValueError("no auxiliary core of the student has the shape of the teacher's (their "
                       "widths differ): OPDF's constraint is undefined (methods.md §2.8); set "
                       "the constraint's lambda to 0 to train the over-parameterised student alone")

  def _decompose_once(self, student: Params, teacher: Params) -> None:
    """The starting cores and the teacher's targets, decomposed here, on the host, once.

    Not in `init`: `init` runs inside a jit sharded over the mesh, where a host callback (SVDs
    in numpy, float64) deadlocks the devices' collectives on multi-device CPU. So OPDF is built
    from concrete weights (as `wdjax distill` builds every generator) and `init` returns these
    arrays; its `teacher_params` / `spec` arguments must be the weights it was built from."""
    t_flat = paths.flatten(teacher)
    if not all(isinstance(x, (np.ndarray, jax.Array)) for x in t_flat.values()):
      raise ValueError("OPDF decomposes the teacher's and the student's matrices when it is "
                       "built: pass their weights, not shapes")
    start = (paths.flatten(student) if self.start == "random" else self.plan.apply(teacher))
    self._start_cores, self._targets = {}, {}
    for p in self.factors:
      self._start_cores[p] = decompose(np.asarray(start[p], np.float32).T, *self.factors[p])
      if self.constrained[p]:
        t_cores = decompose(np.asarray(t_flat[self.plan.sources[p][-1]], np.float32).T,
                            *self.teacher_factors[p])
        self._targets[p] = {k: t_cores[k] for k in self.constrained[p]}

  def init(self, rng, teacher_params, spec: StudentSpec):
    """The cores of the starting weights, the other leaves as they are, the teacher's targets."""
    del rng
    start = (paths.flatten(spec.init_params) if self.start == "random"
             else self.plan.apply(teacher_params))
    cores, targets = {}, {}
    dense = {p: jnp.asarray(x) for p, x in start.items() if p not in self.factors}
    for p in self.factors:
      for k, c in enumerate(self._start_cores[p]):
        cores[f"{p}/core_{k}"] = jnp.asarray(c)
      for k, t in self._targets.get(p, {}).items():
        targets[f"{p}/core_{k}"] = jnp.asarray(t)
    return ({"cores": paths.unflatten(cores), "dense": paths.unflatten(dense)},
            {"targets": paths.unflatten(targets)})

  def _cores(self, gen_params) -> dict[str, list[jax.Array]]:
    flat = paths.flatten(gen_params["cores"])
    return {p: [flat[f"{p}/core_{k}"] for k in range(self.n_cores)] for p in self.factors}

  def generate(self, gen_params, teacher_params, gen_state):
    del teacher_params, gen_state
    out = dict(paths.flatten(gen_params["dense"]))
    for p, cores in self._cores(gen_params).items():
      out[p] = contract(cores).T
    return paths.unflatten(out)

  def aux_loss(self, gen_params, teacher_params, gen_state):
    """lambda * (1/|M|) sum_m sum_{k aux} MSE(T_s^(m,k), sg(T_t^(m,k))) (§2.5, the paper's
    definition: the released code's version never reaches the gradient)."""
    del teacher_params
    if not self.constraint_lambda:
      return jnp.zeros((), jnp.float32)
    flat = paths.flatten(gen_params["cores"])
    targets = paths.flatten(gen_state["targets"])
    total = sum(jnp.mean(jnp.square(flat[k] - jax.lax.stop_gradient(t))) for k, t in targets.items())
    return self.constraint_lambda * total / len(self.factors)
