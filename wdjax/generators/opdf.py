"""OPDF: an over-parameterised student whose matrices train as exact MPO chains (docs/methods.md §2)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from wdjax import trees
from wdjax.config import RankedStartMethod
from wdjax.generators.base import Generator, Params, StudentSpec
from wdjax.generators.registry import Method, register
from wdjax.generators import mpo
from wdjax.generators.mpo import core_shapes, decompose, factorize
from wdjax.models import contract
from wdjax.generators.select import SelectionPlan

CONSTRAINTS = ("mse", "relative")
STARTS = ("selection", "random", "importance")


class MatrixProductOperator(Generator):
  """OPDF (Zhan et al., NeurIPS 2024; docs/methods.md §2): every attention and FFN matrix of the
  student trains as an exact MPO chain, contracted once per step; `aux_loss` pulls the student's
  auxiliary cores (all but the central one) towards the teacher's, decomposed the same way,
  of the aligned teacher layer: student layer i with teacher layer k(i+1)-1 for a teacher k
  times deeper (2i+1 for a half-depth student, §2.4), whichever layers the student starts from.

  gen_params: `{"cores": {<kernel path>/core_k: [d_{k-1}, i_k, j_k, d_k]}, "dense": {...}}`;
  gen_state: `{"targets": {<kernel path>/core_k: teacher core}}` for the constrained cores.
  Per-layer leaves are stored stacked over the layers (`encoder/layers/attn/q/kernel/core_k
  [L, ...]`, `trees.stack_layers`): the L layers' chains contract as one batched chain, and the
  optimizer updates one leaf where there were L; `flat_params` gives the per-layer view.
  Cores decompose the math-layout matrix `W = kernel.T [out, in]`, as the reference.

  The student starts from `start`: "selection" (the teacher's layers by `layer_map`, sliced to
  the student's width: at the same width, the teacher's own layers; `first_n` by default, the
  paper's start, §2.3: LGTM loads the teacher's first L_S layers), "importance" (the units and
  layers importance selection keeps, `indices`) or "random" (its fresh init).
  So the constraint pulls the student's layer i, started as teacher layer i, towards layer 2i+1.
  Width mismatch (an extension, §2.8 b): only the auxiliary cores whose shapes coincide are
  constrained; with none, a non-zero `constraint_lambda` is refused.
  """

  name = "opdf"

  def __init__(self, student_shapes: Params, teacher_shapes: Params, *, n_cores: int = 5,
               constraint_lambda: float | None = None, start: str = "selection",
               layer_map: str = "first_n", constraint: str = "mse",
               indices: dict | None = None):
    if start not in STARTS:
      raise ValueError(f"OPDF start must be one of {STARTS}, got {start!r}")
    if start == "importance" and indices is None:
      raise ValueError("start='importance' needs the kept indices (importance.importance_indices)")
    if constraint not in CONSTRAINTS:
      raise ValueError(f"OPDF constraint must be one of {CONSTRAINTS}, got {constraint!r}")
    self.constraint = constraint
    # where the student starts: the selected (or importance-selected) teacher layers, within
    # the family's head structure where `indices` gives one
    self.plan = SelectionPlan(teacher_shapes, student_shapes, layer_map, indices)
    self.start = start
    self.constraint_lambda = (1e-4 / self.plan.n_student if constraint_lambda is None
                              else constraint_lambda)
    self.aligned = None  # the constraint's teacher layers (§2.4), planned when there is a constraint
    if self.constraint_lambda:
      try:
        self.aligned = SelectionPlan(teacher_shapes, student_shapes, "every_k")
      except ValueError as e:
        raise ValueError(f"OPDF's constraint aligns student layer i with teacher layer k(i+1)-1 "
                         f"(docs/methods.md §2.4): {e}; set the constraint's lambda to 0 to train "
                         "without it") from None
    s_flat, t_flat = trees.flatten(student_shapes), trees.flatten(teacher_shapes)
    self.n_cores = n_cores
    self.factors, self.teacher_factors, self.constrained = {}, {}, {}
    for p, x in s_flat.items():
      if not (contract.has(p, contract.DECOMPOSE) and trees.layer_of(p) is not None):
        continue
      d_in, d_out = np.shape(x)
      self.factors[p] = factorize(d_out, d_in, n_cores)
      self.constrained[p] = ()
      if self.aligned is None:
        continue
      t_in, t_out = np.shape(t_flat[self.aligned.sources[p][-1]])
      t_factors = self.teacher_factors[p] = factorize(t_out, t_in, n_cores)
      centre = (n_cores - 1) // 2
      self.constrained[p] = tuple(
          k for k, (a, b) in enumerate(zip(core_shapes(*self.factors[p]), core_shapes(*t_factors)))
          if k != centre and a == b)
    n_pairs = sum(len(v) for v in self.constrained.values())
    if self.constraint_lambda and n_pairs == 0:
      raise ValueError("no auxiliary core of the student has the shape of the teacher's (their "
                       "widths differ): OPDF's constraint is undefined (docs/methods.md §2.8); set "
                       "the constraint's lambda to 0 to train the over-parameterised student alone")

  def init(self, rng, teacher_params, spec: StudentSpec):
    """The cores of the starting weights, the other leaves as they are, and the aligned teacher
    layers' auxiliary cores as constant targets (decomposed here, once, inside the jit)."""
    del rng
    start = (trees.flatten(spec.init_params) if self.start == "random"
             else self.plan.apply(teacher_params))
    t_flat = trees.flatten(teacher_params)
    cores, targets = {}, {}
    dense = {p: jnp.asarray(x) for p, x in start.items() if p not in self.factors}
    for p in self.factors:
      w = jnp.asarray(start[p], jnp.float32).T
      for k, c in enumerate(decompose(w, *self.factors[p])):
        cores[f"{p}/core_{k}"] = c
      if self.constrained[p]:
        t_w = jnp.asarray(t_flat[self.aligned.sources[p][-1]], jnp.float32).T
        t_cores = decompose(t_w, *self.teacher_factors[p])
        for k in self.constrained[p]:
          targets[f"{p}/core_{k}"] = t_cores[k]
    stack = lambda flat: trees.unflatten(trees.stack_layers(flat))
    return {"cores": stack(cores), "dense": stack(dense)}, {"targets": stack(targets)}

  def generate(self, gen_params, teacher_params, gen_state):
    del teacher_params, gen_state
    out = trees.flatten(gen_params["dense"])
    cores = trees.flatten(gen_params["cores"])
    for key in trees.layer_groups(self.factors):  # decomposed kernels are all per layer
      chain = [cores[f"{key}/core_{k}"] for k in range(self.n_cores)]
      # W [out, in] per layer's matrix; Flax kernels are [in, out]
      out[key] = jnp.swapaxes(jax.vmap(mpo.contract)(chain), -1, -2)
    return trees.unflatten(trees.unstack_layers(out))

  def aux_loss(self, gen_params, teacher_params, gen_state):
    """`mse`: lambda * (1/|M|) sum_m sum_{k aux} MSE(T_s^(m,k), sg(T_t^(m,k))) (§2.5, the paper's
    definition: the released code's version never reaches the gradient). `relative`: lambda x
    the mean over constrained (matrix, core) pairs of ||T_s - T_t||^2 / ||T_t||^2, a scale-free
    form whose gradient is not divided by the cores' sizes (§2.5)."""
    del teacher_params
    if not self.constraint_lambda:
      return jnp.zeros((), jnp.float32)
    flat = trees.flatten(gen_params["cores"])
    targets = trees.flatten(gen_state["targets"])
    # per matrix and core (a stacked leaf holds one per layer [L, ...]): reduce all but the layer axis
    inner = lambda d, k: tuple(range(1, d.ndim)) if trees.is_stacked(k) else None
    if self.constraint == "relative":
      terms = [jnp.sum(jnp.square(flat[k] - jax.lax.stop_gradient(t)), axis=inner(t, k))
               / jnp.maximum(jnp.sum(jnp.square(t), axis=inner(t, k)), 1e-12) for k, t in targets.items()]
      return self.constraint_lambda * jnp.mean(jnp.concatenate([jnp.atleast_1d(x) for x in terms]))
    per_matrix = lambda d, k: jnp.mean(d, axis=inner(d, k)).sum()
    total = sum(per_matrix(jnp.square(flat[k] - jax.lax.stop_gradient(t)), k) for k, t in targets.items())
    return self.constraint_lambda * total / len(self.factors)


@dataclasses.dataclass(frozen=True)
class OPDFMethod(RankedStartMethod):
  """OPDF: every attention and FFN matrix of the student as a product of MPO cores, trained with
  KD and a constraint that keeps the auxiliary cores near the teacher's."""

  name: str = "opdf"
  cores: int = 5  # cores per matrix (2 = the SVD ablation, 5 = Theseus's, 7 = LGTM's)
  constraint_lambda: float = -1.0  # constraint-loss weight (-1 = the paper's 1e-4 / student layers)
  init: str = "selection"  # the cores' start: decomposed teacher layers ("selection") | "random"
  #                          | "importance" (importance selection: its units and layers)
  constraint: str = "mse"  # the constraint's form: "mse" (the paper's) | "relative" (scale-free, §2.5)


def _check(method: OPDFMethod) -> list[str]:
  return [] if method.cores >= 2 else [f"method.cores={method.cores} (an MPO needs at least 2 cores)"]


register(Method("opdf", MatrixProductOperator, section=OPDFMethod, check=_check,
                options=lambda m, context: {
                    "n_cores": m.cores, "start": m.init, "constraint": m.constraint,
                    "constraint_lambda": None if m.constraint_lambda < 0 else m.constraint_lambda,
                    "layer_map": m.layer_map or "first_n"},  # the paper's start (docs/methods.md §2.3)
                choices={"init": STARTS, "constraint": CONSTRAINTS}))
