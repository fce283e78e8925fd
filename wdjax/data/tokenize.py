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
  labels: np.ndarray  # [n] int32
  pad_id: int

  def __len__(self) -> int:
    return len(self.labels)

  def take(self, n: int) -> "TokenizedSplit":
    """The first n examples (for quick runs and tests)."""
    return TokenizedSplit(self.ids[:n], self.lengths[:n], self.labels[:n], self.pad_id)

  def digest(self) -> str:
    """Content hash of the inputs (what a teacher's outputs on this split depend on)."""
    return digest(self.ids, self.lengths)


class TextEncoder:
  """Text -> token ids with the model directory's `tokenizer.json`, truncated to `max_length`."""

  def __init__(self, model_dir: str | os.PathLike, max_length: int, pad_id: int):
    from tokenizers import Tokenizer
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
      raise WdjaxError(f"{path} is missing: wdjax tokenises with the teacher's own tokenizer.json")
    self.tokenizer = Tokenizer.from_file(str(path))
    self.tokenizer.no_padding()
    self.tokenizer.enable_truncation(max_length)  # counts [CLS]/[SEP] within max_length
    self.max_length = max_length
    self.pad_id = pad_id

  def encode(self, texts: list[str], labels: list[int] | np.ndarray) -> TokenizedSplit:
    encodings = self.tokenizer.encode_batch(list(texts))
    ids = np.full((len(texts), self.max_length), self.pad_id, np.int32)
    lengths = np.zeros(len(texts), np.int32)
    for i, e in enumerate(encodings):
      ids[i, :len(e.ids)] = e.ids
      lengths[i] = len(e.ids)
    return TokenizedSplit(ids, lengths, np.asarray(labels, np.int32), self.pad_id)
