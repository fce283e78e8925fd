"""Deterministic, resumable, per-process batches over an in-memory tokenised split.

A training batch is a pure function of `(seed, step)`: epoch e's order is a permutation drawn
from `np.random.default_rng([seed, e])`, so a run resumed at step s sees exactly the batches an
uninterrupted run would, with no iterator state to checkpoint. Every process computes the same
global batch of indices and keeps its own contiguous slice (process p of P takes rows
`[p*B/P, (p+1)*B/P)`), which is the layout `jax.make_array_from_process_local_data` expects.

Sequence length per batch is the longest example rounded up to `pad_to_multiple` (computed on
the global batch, so all processes agree), which bounds the number of compiled step shapes to
`max_length / pad_to_multiple`. `length_grouping=k` sorts each window of k batches by length
before cutting it into batches (shuffling batch order after), as `group_by_length` does in
other trainers: much less padding on short-text data, the same examples per epoch.
"""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np

from wdjax.data.tokenize import TokenizedSplit
from wdjax.errors import WdjaxError


def padded_length(lengths: np.ndarray, multiple: int, max_length: int) -> int:
  return min(max_length, max(multiple, math.ceil(int(lengths.max()) / multiple) * multiple))


def make_batch(data: TokenizedSplit, index: np.ndarray, length: int) -> dict[str, np.ndarray]:
  """Arrays for the examples `index` (-1 marks a padding row with weight 0)."""
  valid = index >= 0
  safe = np.where(valid, index, 0)
  ids = data.ids[safe, :length].copy()
  lengths = np.where(valid, data.lengths[safe], 0)
  mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int32)
  ids[~valid] = data.pad_id
  labels = data.labels[safe]
  # examples without a gold label (augmented text: KD term only) are -1 or, for scores, NaN
  gold = valid & (np.isfinite(labels) if labels.dtype.kind == "f" else labels >= 0)
  batch = {
      "input_ids": ids,  # [batch, length] int32
      "attention_mask": mask,  # [batch, length] int32
      "labels": np.where(gold, labels, 0).astype(labels.dtype),  # [batch] int32 or float32
      "weights": valid.astype(np.float32),  # [batch] 0 for padding rows
      "label_weights": gold.astype(np.float32),  # [batch] 0 also for examples without a gold label
      "index": index.astype(np.int32),  # [batch] example ids, -1 for padding rows
  }
  if data.token_types is not None:  # text pairs: [batch, length] int32 segment ids
    batch["token_type_ids"] = data.token_types[safe, :length] * mask  # 0 on padding rows
  return batch


def split_batch(data, index: np.ndarray, pad_to_multiple: int) -> dict[str, np.ndarray]:
  """The batch of examples `index` of a split: a split type with its own `batch` method
  (translation pairs, `data/bible.py`) builds it; a `TokenizedSplit` is padded here."""
  if not isinstance(data, TokenizedSplit):
    return data.batch(index, pad_to_multiple)
  length = padded_length(data.lengths[index[index >= 0]], pad_to_multiple, data.ids.shape[1])
  return make_batch(data, index, length)


class TrainBatches:
  """`batch(step)`: the process-local training batch of global step `step`."""

  def __init__(self, data: TokenizedSplit, batch_size: int, *, seed: int, pad_to_multiple: int = 16,
               length_grouping: int = 0, process_index: int = 0, process_count: int = 1):
    if batch_size % process_count:
      raise WdjaxError(f"batch size {batch_size} is not divisible by the {process_count} processes")
    if len(data) < batch_size:
      raise WdjaxError(f"the training split has {len(data)} examples, fewer than one batch of {batch_size}")
    self.data, self.batch_size, self.seed = data, batch_size, seed
    self.pad_to_multiple, self.length_grouping = pad_to_multiple, length_grouping
    self.process_index, self.process_count = process_index, process_count
    self.steps_per_epoch = len(data) // batch_size  # the remainder is dropped, differently each epoch
    self._cached: tuple[int, np.ndarray] | None = None

  def epoch_order(self, epoch: int) -> np.ndarray:
    """`[steps_per_epoch, batch_size]` example ids of one epoch."""
    if self._cached and self._cached[0] == epoch:
      return self._cached[1]
    rng = np.random.default_rng([self.seed, epoch])
    n = self.steps_per_epoch * self.batch_size
    order = rng.permutation(len(self.data))[:n]
    if self.length_grouping > 1:
      window = self.batch_size * self.length_grouping
      chunks = [c[np.argsort(self.data.lengths[c], kind="stable")] for c in np.split(
          order, range(window, n, window))]
      order = np.concatenate(chunks)
    batches = order.reshape(self.steps_per_epoch, self.batch_size)
    if self.length_grouping > 1:
      batches = batches[rng.permutation(self.steps_per_epoch)]
    self._cached = (epoch, batches)
    return batches

  def global_indices(self, step: int) -> np.ndarray:
    return self.epoch_order(step // self.steps_per_epoch)[step % self.steps_per_epoch]

  def batch(self, step: int) -> dict[str, np.ndarray]:
    batch = split_batch(self.data, self.global_indices(step), self.pad_to_multiple)
    return local_slice(batch, self.process_index, self.process_count)


def local_slice(batch: dict[str, np.ndarray], process_index: int, process_count: int
                ) -> dict[str, np.ndarray]:
  """Process `process_index`'s contiguous share of a global batch."""
  n = len(batch["index"]) // process_count
  return {k: v[process_index * n:(process_index + 1) * n] for k, v in batch.items()}


def eval_batches(data: TokenizedSplit, batch_size: int, *, pad_to_multiple: int = 16
                 ) -> Iterator[dict[str, np.ndarray]]:
  """Global batches covering every example once, shortest first (little padding); the last batch
  is filled with weight-0 rows of index -1. `batch["index"]` says which example each row is."""
  order = np.argsort(data.lengths, kind="stable")
  for start in range(0, len(data), batch_size):
    index = np.full(batch_size, -1)
    chunk = order[start:start + batch_size]
    index[:len(chunk)] = chunk
    yield split_batch(data, index, pad_to_multiple)
