"""Unlabelled training text for distillation: perturbed copies of the training examples that the
teacher labels (Tang et al. 2019, "Distilling Task-Specific Knowledge from BERT into Simple
Neural Networks", §3.2 — masking and n-gram sampling, on wordpieces).

A small task starves a small student: on Rotten Tomatoes' 10k snippets every method's 3x192
student overfits after two epochs (validation loss rises while training loss falls). The teacher
can label any text, so KD can train on more of it. Each copy of an example:

- replaces every wordpiece (not [CLS]/[SEP]) by the mask token with probability `p_mask`;
- then, with probability `p_ngram`, keeps only a random window of 1..`max_ngram` wordpieces.

Copies carry label -1: they have no gold label, so they enter the KD term only (the batch's
`label_weights` are 0 for them). Augmentation is deterministic in `seed` (the data's, not the
run's), so every seed and method of a workdir distils from the same text and teacher logits.
"""

from __future__ import annotations

import numpy as np

from wdjax.data.tokenize import TokenizedSplit


def augment(split: TokenizedSplit, copies: int, *, mask_id: int, seed: int = 0,
            p_mask: float = 0.1, p_ngram: float = 0.25, max_ngram: int = 5) -> TokenizedSplit:
  """`split` followed by `copies` perturbed copies of each example (without gold labels)."""
  if copies <= 0:
    return split
  rng = np.random.default_rng([seed, 7919])
  n, width = split.ids.shape
  ids = np.repeat(split.ids, copies, axis=0)  # [n * copies, width]
  lengths = np.repeat(split.lengths, copies)
  inner = (np.arange(width)[None, :] >= 1) & (np.arange(width)[None, :] < lengths[:, None] - 1)
  ids = np.where(inner & (rng.random(ids.shape) < p_mask), mask_id, ids)
  out_ids = np.full_like(ids, split.pad_id)
  out_len = lengths.copy()
  cut = rng.random(len(ids)) < p_ngram
  span = rng.integers(1, max_ngram + 1, len(ids))
  for i in range(len(ids)):
    body = ids[i, 1:lengths[i] - 1]
    if cut[i] and len(body) > span[i]:
      start = rng.integers(0, len(body) - span[i] + 1)
      body = body[start:start + span[i]]
    row = np.concatenate([ids[i, :1], body, ids[i, lengths[i] - 1:lengths[i]]])
    out_ids[i, :len(row)] = row
    out_len[i] = len(row)
  return TokenizedSplit(
      np.concatenate([split.ids, out_ids]), np.concatenate([split.lengths, out_len]).astype(np.int32),
      np.concatenate([split.labels, np.full(len(ids), _NO_LABEL[split.labels.dtype.kind], split.labels.dtype)]),
      split.pad_id)


_NO_LABEL = {"i": -1, "f": np.nan}  # a copy has no gold label: class -1, score NaN (KD term only)
