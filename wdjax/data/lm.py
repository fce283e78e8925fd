"""Language-modelling text: documents tokenised and packed into fixed-length sequences.

Each split's documents are tokenised, joined with the end-of-text token between them, and cut
into rows of `length + 1` ids: row i's inputs are its first `length` ids and its targets the
last `length` (so every token of the stream is predicted once, from up to `length` before it
in its row). The last, shorter row of a split is kept for evaluation (its padding has weight 0)
and dropped for training (every training batch is then full length).

Corpora: the World English Bible (the `bible` asset) split by book as the translation data is,
each book one document; or the user's text files, documents separated by blank lines, with
validation and test documents carved from the training file by hash when not given.
"""

from __future__ import annotations

import dataclasses
import os
import sqlite3
from pathlib import Path

import numpy as np

from wdjax.data import bible, builders
from wdjax.data.tokenize import digest
from wdjax.errors import WdjaxError


@dataclasses.dataclass(frozen=True)
class LmSplit:
  """Packed token rows: `ids [n, length + 1]` int32, `lengths [n]` ids per row (2..length + 1)."""

  ids: np.ndarray
  lengths: np.ndarray
  pad_id: int = 0

  def __len__(self) -> int:
    return len(self.lengths)

  @property
  def tokens(self) -> int:
    """Predicted tokens in the split."""
    return int(np.sum(self.lengths - 1))

  def take(self, n: int) -> "LmSplit":
    return LmSplit(self.ids[:n], self.lengths[:n], self.pad_id)

  def digest(self) -> str:
    return digest(self.ids, self.lengths)

  def batch(self, index: np.ndarray, pad_to_multiple: int) -> dict[str, np.ndarray]:
    """Arrays for the rows `index` (-1: a padding row with weight 0), `[batch, t]` each, t the
    longest row's inputs rounded up to `pad_to_multiple` (at most `length`)."""
    from wdjax.data.pipeline import padded_length
    valid = index >= 0
    safe = np.where(valid, index, 0)
    n_in = np.where(valid, self.lengths[safe] - 1, 0)
    t = padded_length(n_in[valid], pad_to_multiple, self.ids.shape[1] - 1)
    rows = self.ids[safe]
    real = (np.arange(t)[None, :] < n_in[:, None])
    return {
        "input_ids": np.where(real, rows[:, :t], self.pad_id).astype(np.int32),
        "attention_mask": real.astype(np.int32),
        "labels": np.where(real, rows[:, 1:t + 1], self.pad_id).astype(np.int32),  # the next tokens
        "weights": real.astype(np.float32),  # [batch, t]: 1 where a next token is predicted
        "index": index.astype(np.int32),
    }


def pack(token_lists: list[list[int]], length: int, eos_id: int, pad_id: int,
         keep_last: bool) -> LmSplit:
  """The documents' ids, an `eos_id` after each, cut into rows of `length + 1` ids (consecutive
  rows overlap by one id: a row's last target is the next row's first input)."""
  if length < 1:
    raise WdjaxError(f"data.max_length must be at least 1, got {length}")
  stream = np.fromiter((t for ids in token_lists for t in (*ids, eos_id)), np.int32)
  if len(stream) < 2:
    raise WdjaxError("the text has fewer than two tokens")
  starts = range(0, len(stream) - 1, length)
  rows = [stream[s:s + length + 1] for s in starts]
  if not keep_last and len(rows) > 1 and len(rows[-1]) < length + 1:
    rows = rows[:-1]
  ids = np.full((len(rows), length + 1), pad_id, np.int32)
  lengths = np.zeros(len(rows), np.int32)
  for i, row in enumerate(rows):
    ids[i, :len(row)] = row
    lengths[i] = len(row)
  return LmSplit(ids, lengths, pad_id)


def bible_books(db: str | os.PathLike, language: str = "en") -> dict[str, list[str]]:
  """`{split: [book text]}` of one Bible translation: each book's verses in canonical order,
  joined by spaces; the validation and test books are the translation data's."""
  if language not in bible.TRANSLATIONS:
    raise WdjaxError(f"task.language={language!r}: one of {', '.join(bible.TRANSLATIONS)}")
  con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
  try:
    rows = con.execute("SELECT bNumber, vText FROM bible WHERE bbName = ? ORDER BY bNumber, cNumber, "
                       "vNumber", (bible.TRANSLATIONS[language],)).fetchall()
  finally:
    con.close()
  books: dict[int, list[str]] = {}
  for book, text in rows:
    text = bible.clean(text)
    if text:
      books.setdefault(book, []).append(text)
  out = {s: [] for s in builders.SPLITS}
  for book, verses in books.items():
    out[bible.split_of(book)].append(" ".join(verses))
  return out


def documents(path: str | os.PathLike) -> list[str]:
  """The documents of a UTF-8 text file: its paragraphs, separated by blank lines."""
  p = Path(path)
  if not p.is_file():
    raise WdjaxError(f"text file {p} does not exist")
  try:
    text = p.read_text(encoding="utf-8")
  except UnicodeDecodeError as e:
    raise WdjaxError(f"{p} is not UTF-8 text ({e})") from None
  docs = [d.strip() for d in text.replace("\r\n", "\n").split("\n\n")]
  docs = [d for d in docs if d]
  if not docs:
    raise WdjaxError(f"{p} holds no text")
  return docs


def text_files(train: str, validation: str = "", test: str = "") -> dict[str, list[str]]:
  """`{split: [document]}` of the user's files; a split without a file is carved from the
  training documents by a hash of each document (about 1 in 10 each), as `files` datasets are."""
  docs = documents(train)
  out = {"train": [], "validation": [], "test": []}
  given = {"validation": validation, "test": test}
  for d in docs:
    split = builders.hash_split(d)
    if split != "train" and given[split]:
      split = "train"  # that split comes from its own file
    out[split].append(d)
  for split, path in given.items():
    if path:
      out[split] = documents(path)
  empty = [s for s, d in out.items() if not d]
  if empty:
    raise WdjaxError(f"no {' or '.join(empty)} documents: give data.{empty[0]}_file or more text "
                     f"(carving takes about 1 in 10 documents of {train})")
  return out
