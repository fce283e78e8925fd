"""The jitted training step, built once per run from a generator and two apply functions.

    loss(gen_params) = task_or_kd_loss(apply(generate(gen_params, sg(teacher), state), batch))
                       + aux_loss(gen_params, sg(teacher), state)

The train state is a plain dict `{step, params, opt_state, gen_state}` (a pytree Orbax saves as
is). The teacher's parameters are a separate, non-donated argument wrapped in `stop_gradient`, so
they are never differentiated, updated or checkpointed. Dropout keys are
`fold_in(key(seed), step)`: a pure function of the step, hence identical on resume.

A non-finite loss or gradient increments the state's sticky `nonfinite_steps` counter; the host
loop checks it (with the loss) before every checkpoint and log line and stops the run, so no
checkpoint ever holds NaNs. (A counter, not a select that keeps the old state: the select costs a
pass over parameters and optimizer state every step, and a run that met a NaN stops anyway.)
"""

from __future__ import annotations

import contextlib
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from wdjax import losses
from wdjax.errors import WdjaxError
from wdjax import trees
from wdjax.config import KDConfig, OptimConfig
from wdjax.generators.base import Generator, MomentInjection, OptimizerHooks, StudentSpec
from wdjax.train.intermediate import IntermediateLoss, token_mask
from wdjax.train.mesh import path_str

Params = Any
Batch = dict[str, jax.Array]
ApplyFn = Callable[..., jax.Array]  # (params, batch, dropout_key, **model_kwargs) -> logits [batch, classes]


def schedule(optim: OptimConfig, total_steps: int) -> optax.Schedule:
  warmup = int(round(optim.warmup_ratio * total_steps))
  decay_steps = max(total_steps - warmup, 1)
  if optim.schedule == "linear":
    decay = optax.linear_schedule(optim.lr, 0.0, decay_steps)
  elif optim.schedule == "cosine":
    decay = optax.cosine_decay_schedule(optim.lr, decay_steps)
  elif optim.schedule == "constant":
    decay = optax.constant_schedule(optim.lr)
  else:
    from wdjax.errors import WdjaxError
    raise WdjaxError(f"optim.schedule must be linear, cosine or constant, got {optim.schedule!r}")
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, optim.lr, warmup), decay], [warmup])


def frozen_mask(params: Params, patterns: tuple[str, ...]) -> Params:
  """True for leaves whose '/'-joined path matches one of the regexes in `patterns`."""
  return jax.tree_util.tree_map_with_path(
      lambda p, _: any(re.search(r, path_str(p)) for r in patterns), params)


def trainable_count(params: Params, patterns: tuple[str, ...]) -> int:
  frozen = jax.tree_util.tree_leaves(frozen_mask(params, patterns))
  return int(sum(x.size for x, f in zip(jax.tree_util.tree_leaves(params), frozen) if not f))


def scale_by_tree(factors: Params) -> optax.GradientTransformation:
  """Multiply each leaf's update by its constant factor (per-group learning rates)."""
  return optax.GradientTransformation(
      lambda params: optax.EmptyState(),
      lambda updates, state, params=None: (
          jax.tree_util.tree_map(lambda u, f: u * f, updates, factors), state))


def scale_by_adam_injected(b1: float, b2: float, eps: float, inject: MomentInjection
                          ) -> optax.GradientTransformationExtraArgs:
  """`optax.scale_by_adam`, whose first moment is nudged before each update where the
  generator's `keep` is 0: `mu <- b1 mu + (1 - b1) target` (WID's momentum-form surgery, §3.4;
  unlike the reference, entries with `keep = 1` are left alone). `inject(params, gen_state)`
  reads the `gen_state` extra argument the training step passes."""
  inner = optax.scale_by_adam(b1=b1, b2=b2, eps=eps)

  def update_fn(updates, state, params=None, *, gen_state=None, **extra):
    del extra
    keep, target = inject(params, gen_state)
    mu = jax.tree_util.tree_map(
        lambda m, k, t: jnp.where(k > 0, m, b1 * m + (1 - b1) * t).astype(m.dtype),
        state.mu, keep, target)
    return inner.update(updates, state._replace(mu=mu), params)

  return optax.GradientTransformationExtraArgs(inner.init, update_fn)


def make_optimizer(optim: OptimConfig, total_steps: int, params: Params,
                   hooks: OptimizerHooks = OptimizerHooks()) -> optax.GradientTransformation:
  """AdamW with warm-up and decay, decay on matrices only, optional frozen paths, and the
  generator's `hooks`: its gradient surgery (first, on the clipped gradients), its nudge of
  Adam's first moment and its per-leaf learning-rate factors (last)."""
  extra, lr_factors, inject = hooks.surgery, hooks.lr_factors, hooks.inject
  if optim.frozen and hooks:
    # the generator's transforms see every leaf; multi_transform would hand them a masked tree
    raise WdjaxError(f"optim.frozen={optim.frozen} cannot be combined with this generator's own "
                     "gradient surgery or learning-rate groups (WID's); leave optim.frozen empty")
  # A matrix per layer: a leaf stacked over the layers ([L, ...] under `layers/`) has one more
  # axis than each layer's tensor, so its biases and LayerNorm vectors are rank 2 but not matrices.
  decay_mask = jax.tree_util.tree_map_with_path(
      lambda p, x: x.ndim - bool(trees.is_stacked(path_str(p))) >= 2, params)
  parts = [optax.clip_by_global_norm(optim.clip_norm)] if optim.clip_norm > 0 else []
  if extra is not None:
    parts.append(extra)
  lr = schedule(optim, total_steps)
  if inject is None:
    parts.append(optax.adamw(lr, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                             weight_decay=optim.weight_decay, mask=decay_mask))
  else:  # optax.adamw's own chain, with the injecting Adam
    parts += [scale_by_adam_injected(optim.b1, optim.b2, optim.eps, inject),
              optax.add_decayed_weights(optim.weight_decay, decay_mask),
              optax.scale_by_learning_rate(lr)]
  if lr_factors is not None:
    parts.append(scale_by_tree(lr_factors))
  tx = optax.chain(*parts)
  if not optim.frozen:
    return tx
  labels = jax.tree_util.tree_map(lambda f: "frozen" if f else "train",
                                  frozen_mask(params, optim.frozen))
  return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


def init_state(generator: Generator, tx: optax.GradientTransformation, seed: int,
               teacher_params: Params | None, spec: StudentSpec) -> dict:
  gen_params, gen_state = generator.init(jax.random.key(seed), teacher_params, spec)
  return {"step": jnp.zeros((), jnp.int32), "params": gen_params,
          "opt_state": tx.init(gen_params), "gen_state": gen_state,
          "nonfinite_steps": jnp.zeros((), jnp.int32)}


# The dot algorithm of a generator's float32 matrix products when the student computes in a
# 16-bit dtype (16-bit operands, float32 accumulation and output), and the oldest NVIDIA GPU
# (compute capability) whose tensor cores take those operands.
_MIXED_PRODUCTS = {"bfloat16": ("BF16_BF16_F32", 8.0), "float16": ("F16_F16_F32", 7.0)}


def generator_products(compute_dtype: str, device: jax.Device | None = None) -> str | None:
  """How the generator's matrix products run for a student computing in `compute_dtype`
  (`EncoderConfig.dtype`) on `device` (default: the first device): under mixed precision on a
  GPU or TPU, with 16-bit operands and float32 accumulation, as `torch.autocast` runs a PyTorch
  generator's; otherwise at JAX's default (None): for a float32 student, on a CPU (which computes
  float32 products either way), and where the chip lacks the algorithm (bf16 before Ampere,
  fp16 on a TPU), on which XLA would refuse to compile the step. The generator's parameters,
  the generated weights and `materialize` stay float32."""
  if compute_dtype not in _MIXED_PRODUCTS:
    return None
  algorithm, min_capability = _MIXED_PRODUCTS[compute_dtype]
  device = device or jax.devices()[0]
  if device.platform == "gpu":
    capability = getattr(device, "compute_capability", None)  # "9.0" on NVIDIA; absent on ROCm
    return algorithm if capability is not None and float(capability) >= min_capability else None
  if device.platform == "tpu":
    return algorithm if compute_dtype == "bfloat16" else None
  return None


def make_train_step(*, generator: Generator, student_apply: ApplyFn, teacher_apply: ApplyFn | None,
                    tx: optax.GradientTransformation, kd: KDConfig, seed: int,
                    frozen: tuple[str, ...] = (), label_smoothing: float = 0.0,
                    products: str | None = None, loss: str = "ce",
                    intermediate: IntermediateLoss | None = None):
  """`step(state, teacher_params, batch) -> (state, metrics)`, not yet jitted.

  The KD targets are `batch["teacher_logits"]` when the batch carries them (or a language
  model's cached top-k, `teacher_topk_logits` at `teacher_topk_ids`), else the teacher's
  forward pass inside the step; with `teacher_apply=None` or `kd.alpha == 0` the loss is CE.
  Leaves matching `frozen` are held by `stop_gradient`, so their gradients are never computed
  (the optimizer's `set_to_zero` alone would still pay for them). `label_smoothing` applies to
  the CE when there are no teacher logits (translation's loss, ε = 0.1 in WD's recipe).
  `products` (`generator_products`): the dot algorithm of `generate`'s matrix products, forward
  and backward (the backward's products are the transposes of the forward's and keep their
  algorithm); None leaves JAX's default. `loss="mse"` trains a regression head (one output):
  squared error, and under KD `losses.regression_kd` with the teacher's scores.
  `intermediate` adds the hidden-state and attention terms (`train/intermediate.py`): both
  networks then run through their `apply.with_activations`, the teacher in every step.
  """
  if loss not in ("ce", "mse"):
    raise ValueError(f"loss must be 'ce' or 'mse', got {loss!r}")
  use_teacher_logits = teacher_apply is not None and kd.alpha > 0

  def step(state: dict, teacher_params: Params | None, batch: Batch):
    key = jax.random.fold_in(jax.random.key(seed), state["step"])
    teacher_params = jax.lax.stop_gradient(teacher_params)
    teacher_out = teacher_acts = None
    if intermediate is not None:
      teacher_out, teacher_acts = jax.lax.stop_gradient(
          teacher_apply.with_activations(teacher_params, batch, None))
    topk_ids = batch.get("teacher_topk_ids")  # a language model's cached top-k logits per token
    if "teacher_logits" in batch:  # precomputed once per run (the teacher is frozen and in eval mode)
      teacher_logits = batch["teacher_logits"]
    elif topk_ids is not None:
      teacher_logits = batch["teacher_topk_logits"]
    elif use_teacher_logits:
      teacher_logits = (teacher_out if teacher_out is not None
                        else jax.lax.stop_gradient(teacher_apply(teacher_params, batch, None)))
    else:
      teacher_logits = None
    labels, weights = batch["labels"], batch["weights"]
    label_weights = batch.get("label_weights", weights)

    def loss_fn(gen_params):
      if frozen:
        gen_params = jax.tree_util.tree_map(
            lambda f, x: jax.lax.stop_gradient(x) if f else x, frozen_mask(gen_params, frozen), gen_params)
      with contextlib.nullcontext() if products is None else jax.default_matmul_precision(products):
        student = generator.generate(gen_params, teacher_params, state["gen_state"])
      model_kwargs = generator.model_kwargs(state["gen_state"])
      inter, inter_parts = jnp.zeros((), jnp.float32), {}
      if intermediate is None:
        logits = student_apply(student, batch, key, **model_kwargs)
      else:
        logits, acts = student_apply.with_activations(student, batch, key, **model_kwargs)
        inter, inter_parts = intermediate(acts, teacher_acts, token_mask(batch, acts))
      if loss == "mse" and teacher_logits is None:
        task = losses.squared_error(logits, labels, label_weights)
        parts = {"mse": task}
      elif loss == "mse":
        task, parts = losses.regression_kd(logits, teacher_logits, labels, weights, alpha=kd.alpha,
                                           label_weights=label_weights)
      elif teacher_logits is None:
        task = losses.cross_entropy(logits, labels, label_weights, smoothing=label_smoothing)
        parts = {"ce": task}
      else:
        task, parts = losses.hinton(logits, teacher_logits, labels, weights,
                                    temperature=kd.temperature, alpha=kd.alpha,
                                    label_weights=label_weights, topk_ids=topk_ids)
      aux = generator.aux_loss(gen_params, teacher_params, state["gen_state"])
      return task + aux + inter, (logits, {**parts, **inter_parts}, aux)

    (total, (logits, parts, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    grad_norm = optax.global_norm(grads)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"],
                                   gen_state=state["gen_state"])
    params = optax.apply_updates(state["params"], updates)
    finite = jnp.isfinite(total) & jnp.isfinite(grad_norm)
    gen_state = generator.update_state(params, state["gen_state"], state["step"] + 1)
    new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state,
                 "gen_state": gen_state,
                 "nonfinite_steps": state["nonfinite_steps"] + (~finite).astype(jnp.int32)}
    metrics = {"loss": total, "aux_loss": aux, "grad_norm": grad_norm,
               "nonfinite_steps": new_state["nonfinite_steps"], **parts}
    if loss == "ce":
      metrics["accuracy"] = losses.accuracy(logits, labels, label_weights)
    return new_state, metrics

  return step


def classifier_apply(graphdef) -> ApplyFn:
  """Apply function of an NNX sequence classifier from its graphdef (merge inside the trace)."""
  from wdjax.models.layers import model_apply
  return model_apply(graphdef, lambda model, batch, dropout_key, **kwargs: model(
      batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"),
      dropout_key=dropout_key, **kwargs))
