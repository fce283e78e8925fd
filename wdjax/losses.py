"""Losses: cross-entropy and Hinton knowledge distillation, weighted per example.

Every loss takes `weights [batch]` (0 for padding rows of the last eval batch, 1 otherwise) and
returns the weighted mean, so sharded and unsharded batches give the same value.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def _mean(x: Array, weights: Array) -> Array:
  return jnp.sum(x * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def cross_entropy(logits: Array, labels: Array, weights: Array, smoothing: float = 0.0) -> Array:
  """Mean CE of `logits [..., classes]` against integer `labels [...]` (`[batch]` for a
  classifier, `[batch, k]` for masked-LM predictions, `[batch, tgt]` for translation), weighted
  by `weights [...]`. With `smoothing` ε, fairseq's label-smoothed CE:
  `(1 - ε) nll + ε mean_v(-log p_v)`."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
  if smoothing:
    nll = (1.0 - smoothing) * nll - smoothing * jnp.mean(logp, axis=-1)
  return _mean(nll, weights)


def kd_kl(student_logits: Array, teacher_logits: Array, temperature: float, weights: Array) -> Array:
  """T^2 * KL(softmax(z_t/T) || softmax(z_s/T)), the Hinton soft-target term.

  The T^2 factor keeps its gradient scale independent of T (Hinton et al. 2015).
  """
  t = temperature
  log_ps = jax.nn.log_softmax(student_logits.astype(jnp.float32) / t, axis=-1)
  log_pt = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / t, axis=-1)
  kl = jnp.sum(jnp.exp(log_pt) * (log_pt - log_ps), axis=-1)
  return (t * t) * _mean(kl, weights)


def topk_kd(student_logits: Array, topk_logits: Array, topk_ids: Array, temperature: float,
            weights: Array) -> Array:
  """T^2 * KL of the teacher's top-k distribution to the student's, per token: the teacher's
  `topk_logits [..., k]` at vocabulary ids `topk_ids [..., k]` renormalised over those k (its
  cached targets), against the student's full-vocabulary log-probabilities at the same ids
  (mass the student puts elsewhere only lowers them)."""
  t = temperature
  log_ps = jax.nn.log_softmax(student_logits.astype(jnp.float32) / t, axis=-1)
  log_ps = jnp.take_along_axis(log_ps, topk_ids, axis=-1)
  log_pt = jax.nn.log_softmax(topk_logits.astype(jnp.float32) / t, axis=-1)
  kl = jnp.sum(jnp.exp(log_pt) * (log_pt - log_ps), axis=-1)
  return (t * t) * _mean(kl, weights)


def hinton(student_logits: Array, teacher_logits: Array, labels: Array, weights: Array, *,
           temperature: float, alpha: float, label_weights: Array | None = None,
           topk_ids: Array | None = None) -> tuple[Array, dict[str, Array]]:
  """alpha * KD + (1 - alpha) * CE; returns the total and both parts. The CE averages over
  `label_weights` (default `weights`): examples without a gold label get 0 there. With
  `topk_ids`, `teacher_logits` are the teacher's cached top-k logits at those ids (`topk_kd`)."""
  ce = cross_entropy(student_logits, labels, weights if label_weights is None else label_weights)
  kd = (kd_kl(student_logits, teacher_logits, temperature, weights) if topk_ids is None
        else topk_kd(student_logits, teacher_logits, topk_ids, temperature, weights))
  return alpha * kd + (1.0 - alpha) * ce, {"ce": ce, "kd": kd}


def squared_error(outputs: Array, targets: Array, weights: Array) -> Array:
  """Mean squared error of scores `outputs [batch, 1]` against `targets [batch]` (regression)."""
  return _mean(jnp.square(outputs[..., 0].astype(jnp.float32) - targets.astype(jnp.float32)), weights)


def regression_kd(student: Array, teacher: Array, labels: Array, weights: Array, *, alpha: float,
                  label_weights: Array | None = None) -> tuple[Array, dict[str, Array]]:
  """alpha * MSE(student, teacher's score) + (1 - alpha) * MSE(student, label): the KD of a
  regression head, whose one output has no distribution to soften (no temperature)."""
  mse = squared_error(student, labels, weights if label_weights is None else label_weights)
  kd = squared_error(student, teacher[..., 0], weights)
  return alpha * kd + (1.0 - alpha) * mse, {"mse": mse, "kd": kd}


def accuracy(logits: Array, labels: Array, weights: Array) -> Array:
  return _mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32), weights)
