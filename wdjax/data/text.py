"""Text-classification data: Rotten Tomatoes or the user's own files, tokenised into `TaskData`."""

from __future__ import annotations

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
                              data_dir=data_dir, file_format="array_record")
  raise WdjaxError(f"data.dataset must be 'rotten-tomatoes' or 'files', got {data.dataset!r}")


def load(data: DataConfig, tokenizer_dir: str | Path, pad_id: int, cache: str = "") -> TaskData:
  """Prepare (once) and read the dataset, tokenised with `tokenizer_dir`'s tokenizer.json."""
  from wdjax import distributed
  builder = distributed.process0_first("dataset", lambda: builders.prepare(make_builder(data, cache)))
  encoder = TextEncoder(tokenizer_dir, data.max_length, pad_id)
  splits = {}
  for name in builders.SPLITS:
    texts, labels = builders.read_split(builder, name)
    limit = data.max_train_examples if name == "train" else data.max_eval_examples
    if limit:
      texts, labels = texts[:limit], labels[:limit]
    splits[name] = encoder.encode(texts, labels)
  if data.augment:
    from wdjax.data.augment import augment
    mask_id = next((i for t in ("[MASK]", "<mask>") if (i := encoder.tokenizer.token_to_id(t)) is not None),
                   None)
    if mask_id is None:
      raise WdjaxError(f"data.augment needs a mask token; {tokenizer_dir}'s tokenizer has none")
    splits["train"] = augment(splits["train"], data.augment, mask_id=mask_id)
  return TaskData(builder.name, tuple(builder.info.features["label"].names), **splits)
