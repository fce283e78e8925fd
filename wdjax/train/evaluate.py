"""Evaluation-mode predictions over a whole split, and the scores computed from them."""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np

from wdjax.data import pipeline
from wdjax.data.tokenize import TokenizedSplit
from wdjax.train import mesh as mesh_lib


def device_batch(global_batch: dict, mesh) -> dict:
  """This process's share of a global host batch, as global device arrays (without 'index')."""
  local = pipeline.local_slice(global_batch, jax.process_index(), jax.process_count())
  return mesh_lib.put_batch({k: v for k, v in local.items() if k != "index"}, mesh)


class Predictor:
  """`logits(params, split) -> [n, classes]` with one jitted, sharded forward pass (no dropout).

  Batches are sorted by length (little padding); every process gets all the logits.
  """

  def __init__(self, apply_fn: Callable, mesh, params_sharding: Any, batch_size: int,
               pad_to_multiple: int, score: Callable | None = None):
    self.mesh, self.batch_size, self.pad_to_multiple = mesh, batch_size, pad_to_multiple
    self.score = score or scores  # (logits [n, outputs], labels [n]) -> {name: value}
    self._forward = jax.jit(lambda p, b: apply_fn(p, b, None),
                            in_shardings=(params_sharding, mesh_lib.batch_sharding(mesh)),
                            out_shardings=mesh_lib.replicated(mesh))

  def logits(self, params: Any, split: TokenizedSplit) -> np.ndarray:
    out = None
    for batch in pipeline.eval_batches(split, self.batch_size, pad_to_multiple=self.pad_to_multiple):
      logits = np.asarray(self._forward(params, device_batch(batch, self.mesh)))
      if out is None:
        out = np.zeros((len(split), logits.shape[-1]), np.float32)
      valid = batch["index"] >= 0
      out[batch["index"][valid]] = logits[valid]
    return out

  def scores(self, params: Any, split: TokenizedSplit) -> dict[str, float]:
    return self.score(self.logits(params, split), split.labels)


def macro_f1(predicted: np.ndarray, labels: np.ndarray) -> float:
  """The mean over classes of F1 (classes that occur among the labels or the predictions; a
  class never predicted scores 0), so a model that predicts only the majority class of an
  imbalanced task scores low where its accuracy does not."""
  f1 = []
  for c in np.union1d(labels, predicted):
    tp = np.sum((predicted == c) & (labels == c))
    denom = np.sum(predicted == c) + np.sum(labels == c)
    f1.append(2.0 * tp / denom if denom else 0.0)
  return float(np.mean(f1)) if f1 else 0.0


def mcc(predicted: np.ndarray, labels: np.ndarray) -> float:
  """Matthews correlation coefficient (its multi-class form, Gorodkin 2004): 1 for perfect
  predictions, 0 for chance or a constant prediction, whatever the class balance."""
  classes = np.union1d(labels, predicted)
  c = np.zeros((len(classes), len(classes)))
  np.add.at(c, (np.searchsorted(classes, labels), np.searchsorted(classes, predicted)), 1)
  t, p, n = c.sum(1), c.sum(0), c.sum()
  cov = np.trace(c) * n - t @ p
  denom = np.sqrt((n * n - p @ p) * (n * n - t @ t))
  return float(cov / denom) if denom else 0.0


def scores(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
  """Accuracy, macro-F1, MCC and mean cross-entropy of `logits [n, classes]` against `labels [n]`."""
  z = logits - logits.max(-1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  predicted = logits.argmax(-1)
  return {"accuracy": float(np.mean(predicted == labels)),
          "macro_f1": macro_f1(predicted, labels),
          "mcc": mcc(predicted, labels),
          "loss": float(-np.mean(logp[np.arange(len(labels)), labels]))}


def regression_scores(outputs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
  """Pearson and Spearman correlation and mean squared error (also as `loss`) of the scores
  `outputs [n, 1]` against `labels [n]`. A constant prediction correlates 0."""
  from scipy import stats
  pred = np.asarray(outputs, np.float64)[:, 0]
  labels = np.asarray(labels, np.float64)
  mse = float(np.mean((pred - labels) ** 2))
  if np.ptp(pred) == 0 or np.ptp(labels) == 0:
    return {"pearson": 0.0, "spearman": 0.0, "mse": mse, "loss": mse}
  return {"pearson": float(stats.pearsonr(pred, labels)[0]),
          "spearman": float(stats.spearmanr(pred, labels)[0]), "mse": mse, "loss": mse}
