"""Text-classification and regression data: Rotten Tomatoes or the user's own files (single texts
or text pairs), tokenised into `TaskData`."""

from __future__ import annotations

import functools
from pathlib import Path

from wdjax import assets
from wdjax.config import DataConfig
from wdjax.data import builders
from wdjax.data.splits import TaskData
from wdjax.data.tokenize import TextEncoder
from wdjax.errors import WdjaxError


def make_builder(data: DataConfig, cache: str = ""):
  data_dir = str(assets.cache_dir(cache) / "tfds")
  if data.dataset == "rotten-tomatoes":
    source = assets.path("rotten-tomatoes", cache) / "rotten_tomatoes_corpus_full.csv.bz2"
    return builders.RottenTomatoes(source=source, data_dir=data_dir, file_format="array_record")
  if data.dataset == "files":
    files = {"train": data.train_file, "validation": data.validation_file, "test": data.test_file}
    return builders.TextFiles(files={k: v for k, v in files.items() if v}, text_column=data.text_column,
                              label_column=data.label_column, group_column=data.group_column,
                              text_pair_column=data.text_pair_column, kind=data.label_kind,
                              data_dir=data_dir, file_format="array_record")
  raise WdjaxError(f"data.dataset must be 'rotten-tomatoes' or 'files', got {data.dataset!r}")


def load(data: DataConfig, tokenizer_dir: str | Path, pad_id: int, cache: str = "") -> TaskData:
  """Prepare (once) and read the dataset, tokenised with `tokenizer_dir`'s tokenizer.json."""
  from wdjax import distributed
  builder = distributed.process0_first("dataset", lambda: builders.prepare(make_builder(data, cache)))
  encoder = TextEncoder(tokenizer_dir, data.max_length, pad_id)
  splits = {}
  for name in builders.SPLITS:
    texts, pairs, labels = builders.read_split(builder, name)
    limit = data.max_train_examples if name == "train" else data.max_eval_examples
    if limit:
      texts, pairs, labels = texts[:limit], pairs[:limit], labels[:limit]
    splits[name] = encoder.encode(texts, labels, pairs if data.text_pair_column else None)
  if data.augment:
    from wdjax.data.augment import augment
    mask_id = next((i for t in ("[MASK]", "<mask>") if (i := encoder.tokenizer.token_to_id(t)) is not None),
                   None)
    if mask_id is None:
      raise WdjaxError(f"data.augment needs a mask token; {tokenizer_dir}'s tokenizer has none")
    splits["train"] = augment(splits["train"], data.augment, mask_id=mask_id)
  regression = builder.regression
  names = () if regression else tuple(builder.info.features["label"].names)
  return TaskData(builder.name, names, **splits, regression=regression)


def is_regression(data: DataConfig) -> bool:
  """Whether `data`'s labels are scores: `label_kind`, or with "auto" what the training file's
  label column holds (`builders.label_kind`); Rotten Tomatoes is classes."""
  if data.label_kind != "auto" or data.dataset != "files":
    return data.label_kind == "regression"
  return _file_kind(data.train_file, data.label_column, _mtime(data.train_file)) == "regression"


def _mtime(path: str) -> float:
  try:
    return Path(path).stat().st_mtime
  except OSError:
    return 0.0  # a missing file is reported by the builder


@functools.lru_cache(maxsize=16)
def _file_kind(path: str, column: str, mtime: float) -> str:
  del mtime  # part of the cache key only
  try:
    rows = builders.read_table(path)
  except WdjaxError:
    return "classes"  # the builder reports the file's problem
  return builders.label_kind(r.get(column) for r in rows)
