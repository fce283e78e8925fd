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


# --- intermediate-layer distillation (`train/intermediate.py`) ---------------------------------

_EXACT = jax.lax.Precision.HIGHEST  # small products whose rounding would bias a least-squares fit


def hidden_mismatch(student: Array, teacher: Array, weights: Array, ridge: float = 1e-4) -> Array:
  """1 - R^2 of the best affine map from the student's states `[batch, rows, d_s]` to the
  teacher's `[batch, rows, d_t]` over the tokens of `weights [batch, rows]` (1 on real ones):
  the share of the teacher's (centred) variance the student's states cannot predict linearly,
  in [0, 1]. The map is the batch's ridge least-squares fit (`ridge` x the mean eigenvalue of
  the student's moment matrix), differentiated through: a projection that needs no parameters
  of its own and is always at its optimum for the current states."""
  w = weights.astype(jnp.float32)[..., None]
  n = jnp.maximum(jnp.sum(w), 1.0)
  x = student.astype(jnp.float32).reshape(-1, student.shape[-1])
  y = teacher.astype(jnp.float32).reshape(-1, teacher.shape[-1])
  w = w.reshape(-1, 1)
  x_mean, y_mean = jnp.sum(x * w, 0) / n, jnp.sum(y * w, 0) / n
  x, y = (x - x_mean) * w, (y - y_mean) * w  # padding rows are zero and drop out of every sum
  xx = jnp.einsum("ni,nj->ij", x, x, precision=_EXACT)
  xy = jnp.einsum("ni,nj->ij", x, y, precision=_EXACT)
  lam = ridge * jnp.trace(xx) / x.shape[-1] + 1e-12
  fit = jnp.linalg.solve(xx + lam * jnp.eye(x.shape[-1]), xy)  # [d_s, d_t]
  residual = y - jnp.einsum("ni,ij->nj", x, fit, precision=_EXACT)
  return jnp.sum(jnp.square(residual)) / jnp.maximum(jnp.sum(jnp.square(y)), 1e-12)


def attention_kl(student_q: Array, student_k: Array, teacher_q: Array, teacher_k: Array,
                 mask: Array, heads: int) -> Array:
  """KL(teacher || student) of the attention distributions softmax(q k^T / sqrt(d / heads)) of
  `heads` heads, averaged over heads and real query rows (MiniLM's attention transfer). Queries
  `[batch, rows, d]` (a layer that computes fewer rows: its first ones; both are cut to the fewer),
  keys `[batch, seq, d]`; widths may differ (the heads split each). `mask [batch, seq]`: 1 on real
  tokens. With `heads` the networks' own head count these are their attention maps (without a
  relative position bias, which MPNet adds)."""
  rows = min(student_q.shape[1], teacher_q.shape[1])

  def logits(q, k):
    q = q[:, :rows].astype(jnp.float32).reshape(*q.shape[:1], rows, heads, -1)
    k = k.astype(jnp.float32).reshape(*k.shape[:2], heads, -1)
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=_EXACT) / jnp.sqrt(q.shape[-1])
    return jnp.where(mask[:, None, None, :] > 0, s, -1e30)

  log_t = jax.nn.log_softmax(logits(teacher_q, teacher_k), -1)
  log_s = jax.nn.log_softmax(logits(student_q, student_k), -1)
  kl = jnp.sum(jnp.exp(log_t) * (log_t - log_s), -1).mean(1)  # [batch, rows]
  return _mean(kl, mask[:, :rows].astype(jnp.float32))
