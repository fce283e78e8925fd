"""Tokenisation with the teacher's own `tokenizer.json` (never a vocab-file reconstruction).

Two pitfalls handled here (`docs/data.md`): transformers' `BertTokenizerFast(vocab_file=...)` silently
maps every word to [UNK], so the `tokenizers` library reads `tokenizer.json` directly; and
all-MiniLM-L6-v2's `tokenizer.json` pads everything to 128, so padding is switched off and done
here, to the batch's own length.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path

import numpy as np

from wdjax.errors import WdjaxError


def digest(*arrays: np.ndarray) -> str:
  """A short content hash of arrays (shapes, dtypes and values): the key of what is computed
  from data once and cached, so other data with the same config and size never reuses it."""
  h = hashlib.sha256()
  for a in arrays:
    a = np.ascontiguousarray(a)
    h.update(f"{a.dtype}{a.shape}".encode())
    h.update(a.tobytes())
  return h.hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class TokenizedSplit:
  """A split held in memory: `ids[i, :lengths[i]]` are example i's tokens, the rest is padding."""

  ids: np.ndarray  # [n, max_length] int32
  lengths: np.ndarray  # [n] int32
  labels: np.ndarray  # [n] int32 class ids (-1: no gold label), or float32 scores (NaN: none)
  pad_id: int
  token_types: np.ndarray | None = None  # [n, max_length] int32 segment ids of text pairs

  def __len__(self) -> int:
    return len(self.labels)

  def take(self, n: int) -> "TokenizedSplit":
    """The first n examples (for quick runs and tests)."""
    types = None if self.token_types is None else self.token_types[:n]
    return TokenizedSplit(self.ids[:n], self.lengths[:n], self.labels[:n], self.pad_id, types)

  def digest(self) -> str:
    """Content hash of the inputs (what a teacher's outputs on this split depend on)."""
    types = () if self.token_types is None else (self.token_types,)
    return digest(self.ids, self.lengths, *types)


class TextEncoder:
  """Text (or text pairs) -> token ids with the model directory's `tokenizer.json`, truncated to
  `max_length`; a pair is truncated longest-first (the longer text loses a token at a time) and
  laid out by the tokenizer's own template (`[CLS] a [SEP] b [SEP]` with segment ids 0 and 1 for
  BERT, `<s> a </s></s> b </s>` for RoBERTa)."""

  def __init__(self, model_dir: str | os.PathLike, max_length: int, pad_id: int):
    from tokenizers import Tokenizer
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
      raise WdjaxError(f"{path} is missing: wdjax tokenises with the teacher's own tokenizer.json")
    self.tokenizer = Tokenizer.from_file(str(path))
    self.tokenizer.no_padding()
    # counts [CLS]/[SEP] within max_length
    self.tokenizer.enable_truncation(max_length, strategy="longest_first")
    self.max_length = max_length
    self.pad_id = pad_id

  def encode(self, texts: list[str], labels: list | np.ndarray,
             pairs: list[str] | None = None) -> TokenizedSplit:
    """`labels` keep their dtype when float (regression), else become int32."""
    inputs = list(texts) if pairs is None else list(zip(texts, pairs))
    encodings = self.tokenizer.encode_batch(inputs)
    ids = np.full((len(texts), self.max_length), self.pad_id, np.int32)
    types = None if pairs is None else np.zeros((len(texts), self.max_length), np.int32)
    lengths = np.zeros(len(texts), np.int32)
    for i, e in enumerate(encodings):
      ids[i, :len(e.ids)] = e.ids
      lengths[i] = len(e.ids)
      if types is not None:
        types[i, :len(e.ids)] = e.type_ids
    labels = np.asarray(labels)
    labels = labels.astype(np.float32 if labels.dtype.kind == "f" else np.int32)
    return TokenizedSplit(ids, lengths, labels, self.pad_id, types)
