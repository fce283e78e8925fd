"""The generator contract, and the identity generator (plain KD / fine-tuning) as its first user.

A generator turns trainable generator parameters (and the frozen teacher's parameters) into the
student's parameters. All of it is pure functions over pytrees of `jax.Array`, so a training step
is `loss(apply(generate(gen_params, sg(teacher), state), batch))` under `jax.jit`:

  init(rng, teacher_params, spec)               -> gen_params, gen_state
  generate(gen_params, teacher_params, state)   -> student_params   (differentiable in gen_params)
  aux_loss(gen_params, teacher_params, state)   -> scalar            (0 unless the method has one)
  optimizer_hooks(gen_params, state)            -> OptimizerHooks    (none unless the method has them)
  update_state(gen_params, state, step)         -> state
  materialize(gen_params, teacher_params, state)-> dense student params for export / phase 2
  diagnostics(gen_params, teacher_params, state)-> {name: scalar}     (logged with each evaluation)

Most generators produce the student itself. One that trains a different network (WID trains the
teacher-width network it later cuts) says so with `training_config` (the network `generate`'s
output is applied with) and `model_kwargs` (extra arguments of that network, from the state).
What a method adds to the optimizer comes from one hook, `optimizer_hooks`: gradient surgery,
per-leaf learning-rate factors, a nudge of Adam's first moment (WID has all three).

The teacher is never differentiated, donated or checkpointed here: the training step passes it
through `jax.lax.stop_gradient` and keeps it out of the optimizer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from wdjax import trees
from wdjax.config import KDMethod
from wdjax.generators.registry import Method, register
from wdjax.models.bert import EncoderConfig

Params = Any  # nested dict of jax.Array
MomentInjection = Callable[[Params, Params], tuple[Params, Params]]


@dataclasses.dataclass(frozen=True)
class OptimizerHooks:
  """What a generator adds to the optimizer (`train.step.make_optimizer`); every part optional.

  surgery: a transform on the (clipped) gradients before Adam; its update may read the current
    generator state as the `gen_state` extra argument (WID: masked entries get a penalty).
  lr_factors: per-leaf factors on the learning rate, a pytree like `gen_params` (WID: the
    teacher's weights train 50x slower than the compactors).
  inject: `fn(params, gen_state) -> (keep, target)`: before each Adam update, every entry where
    `keep` is 0 gets `mu <- b1 mu + (1 - b1) target` (see `step.scale_by_adam_injected`).
  """

  surgery: optax.GradientTransformation | None = None
  lr_factors: Params | None = None
  inject: MomentInjection | None = None

  def __bool__(self) -> bool:
    return any(x is not None for x in (self.surgery, self.lr_factors, self.inject))


@dataclasses.dataclass(frozen=True)
class StudentSpec:
  """What a generator must produce: the student's config and its freshly initialised params.

  `init_params` also fixes every leaf's shape and dtype; methods that start from random weights
  (plain KD) use them as they are, others only read their shapes.
  """

  config: EncoderConfig
  init_params: Params


class Generator:
  """Base class with the contract's defaults; a method overrides what it needs."""

  name = "base"

  def init(self, rng: jax.Array, teacher_params: Params | None, spec: StudentSpec
           ) -> tuple[Params, Params]:
    raise NotImplementedError

  def generate(self, gen_params: Params, teacher_params: Params | None, gen_state: Params) -> Params:
    raise NotImplementedError

  def aux_loss(self, gen_params: Params, teacher_params: Params | None, gen_state: Params) -> jax.Array:
    return jnp.zeros((), jnp.float32)

  def optimizer_hooks(self, gen_params: Params, gen_state: Params) -> OptimizerHooks:
    """What the method adds to the optimizer; `gen_params`, `gen_state` may be shapes
    (`jax.ShapeDtypeStruct` trees): only their structure may be read."""
    return OptimizerHooks()

  def update_state(self, gen_params: Params, gen_state: Params, step: jax.Array) -> Params:
    return gen_state

  def training_config(self, student: EncoderConfig) -> EncoderConfig:
    """Config of the network `generate` returns (the student's, unless the method says)."""
    return student

  def model_kwargs(self, gen_state: Params) -> dict:
    """Extra keyword arguments of the training-time network's forward pass."""
    return {}

  def materialize(self, gen_params: Params, teacher_params: Params | None, gen_state: Params) -> Params:
    return self.generate(gen_params, teacher_params, gen_state)

  def diagnostics(self, gen_params: Params, teacher_params: Params | None, gen_state: Params
                  ) -> dict[str, jax.Array]:
    """Scalars that say how the method's training stands (WID: how far the masked entries are
    from zero), logged with every evaluation and stored in the phase's results at its end."""
    return {}

  def flat_params(self, gen_params: Params) -> dict[str, jax.Array]:
    """The generator's parameters (or gradients) as `{name: array}`, one entry per tensor, in
    the per-layer layout of the method's paper and of `benchmarks/torch_ref`: leaves stored
    stacked over layers (`.../layers/...`, `trees.stack_layers`) are split into their layers."""
    return trees.unstack_layers(trees.flatten(gen_params))


class Identity(Generator):
  """The student's own parameters are the generator parameters: plain KD, or fine-tuning."""

  name = "identity"

  def init(self, rng, teacher_params, spec):
    del rng, teacher_params
    return spec.init_params, {}

  def generate(self, gen_params, teacher_params, gen_state):
    del teacher_params, gen_state
    return gen_params


def param_count(tree: Params) -> int:
  return int(sum(x.size for x in jax.tree_util.tree_leaves(tree)))


register(Method("kd", lambda student_shapes, teacher_shapes: Identity(), section=KDMethod,
                choices={"init": ("random", "selection", "importance")}))
