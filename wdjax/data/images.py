"""Image-classification data: Fashion-MNIST (TFDS builder over the Debian package's idx files)
and scikit-learn's bundled digits (tiny, for tests), as in-memory splits the training pipeline
batches like tokenised text.

- `FashionMnist`: the 60,000 / 10,000 images of the `fashion-mnist` asset (Debian
  `dataset-fashion-mnist`, fetched and sha256-verified by `wdjax.assets`, never installed), split
  train = the first 55,000 training images, validation = the last 5,000 (a fixed slice, so the
  test set is never used for model selection), test = the standard 10,000.
- `digits`: `sklearn.datasets.load_digits` (1,797 8x8 images, 16 grey levels), split by index
  modulo 10 (0 -> test, 1 -> validation, the rest train: 1,437 / 180 / 180).

Pixels are stored as uint8 and scaled to [0, 1], then standardised with the training split's
mean and std (one scalar each), when a batch is built.
"""

from __future__ import annotations

import dataclasses
import gzip
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from wdjax import assets
from wdjax.data import builders
from wdjax.data.splits import TaskData
from wdjax.data.tokenize import digest
from wdjax.errors import WdjaxError

FASHION_LABELS = ("t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
                  "sneaker", "bag", "ankle boot")
DATASETS = ("fashion-mnist", "digits")


def read_idx(path: Path) -> np.ndarray:
  """An idx file (gzip'd, as MNIST ships): uint8 images `[n, rows, cols]` or labels `[n]`."""
  data = gzip.decompress(Path(path).read_bytes())
  magic = int.from_bytes(data[:4], "big")
  if magic not in (2049, 2051):
    raise WdjaxError(f"{path} is not an idx file of labels or images (magic {magic})")
  n = int.from_bytes(data[4:8], "big")
  if magic == 2049:
    out = np.frombuffer(data, np.uint8, offset=8)
    shape = (n,)
  else:
    rows, cols = int.from_bytes(data[8:12], "big"), int.from_bytes(data[12:16], "big")
    out = np.frombuffer(data, np.uint8, offset=16)
    shape = (n, rows, cols)
  if out.size != int(np.prod(shape)):
    raise WdjaxError(f"{path} is truncated: {out.size} bytes of data for shape {shape}")
  return out.reshape(shape)


class FashionMnist(tfds.core.GeneratorBasedBuilder):
  """Fashion-MNIST (Zalando, MIT): records `{image [28, 28] uint8, label}`; validation is the last
  5,000 of the 60,000 training images."""

  VERSION = tfds.core.Version("1.0.0")
  N_VALIDATION = 5000

  def __init__(self, *, source: str | Path, **kwargs):
    self._source = Path(source)  # the folder of the four idx files
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description=self.__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(28, 28), dtype=np.uint8),
            "label": tfds.features.ClassLabel(names=list(FASHION_LABELS)),
            "order": tfds.features.Tensor(shape=(), dtype=np.int64),  # position in the idx file
        }),
        supervised_keys=("image", "label"))

  def _split_generators(self, dl_manager):
    del dl_manager  # the asset cache holds the files
    x = read_idx(self._source / "train-images-idx3-ubyte.gz")
    y = read_idx(self._source / "train-labels-idx1-ubyte.gz")
    x_test = read_idx(self._source / "t10k-images-idx3-ubyte.gz")
    y_test = read_idx(self._source / "t10k-labels-idx1-ubyte.gz")
    n = len(x) - self.N_VALIDATION
    return {"train": self._generate_examples(x[:n], y[:n]),
            "validation": self._generate_examples(x[n:], y[n:]),
            "test": self._generate_examples(x_test, y_test)}

  def _generate_examples(self, images, labels):
    for i, (image, label) in enumerate(zip(images, labels)):
      # TFDS writes records in the order of its key's hash: `order` restores the file's order.
      yield i, {"image": image, "label": int(label), "order": i}


@dataclasses.dataclass(frozen=True)
class ImageSplit:
  """Images `[n, h, w]` (uint8, one channel) and labels `[n]`; batches are float32
  `[batch, h, w, 1]` standardised with `mean`/`std` (the training split's)."""

  images: np.ndarray
  labels: np.ndarray
  mean: float
  std: float

  def __len__(self) -> int:
    return len(self.labels)

  @property
  def lengths(self) -> np.ndarray:  # what the text pipeline sorts eval batches by: all equal
    return np.ones(len(self), np.int32)

  def digest(self) -> str:
    """Content hash of the inputs (what a teacher's outputs on this split depend on)."""
    return digest(self.images, np.float64([self.mean, self.std]))

  def batch(self, index: np.ndarray, pad_to_multiple: int = 0) -> dict[str, np.ndarray]:
    """Arrays for the examples `index` (-1 marks a padding row with weight 0)."""
    del pad_to_multiple  # images have one shape
    valid = index >= 0
    safe = np.where(valid, index, 0)
    x = (self.images[safe].astype(np.float32) / 255.0 - self.mean) / self.std
    return {"image": x[..., None],  # [batch, h, w, 1]
            "labels": self.labels[safe].astype(np.int32),
            "weights": valid.astype(np.float32), "label_weights": valid.astype(np.float32),
            "index": index.astype(np.int32)}


def image_size(task: TaskData) -> int:
  """Pixels per side of a task's (square) images."""
  return task.train.images.shape[1]


def _fashion_arrays(cache: str) -> tuple[dict, tuple[str, ...]]:
  from wdjax import distributed
  data_dir = str(assets.cache_dir(cache) / "tfds")

  def prepare():
    source = assets.path("fashion-mnist", cache)
    return builders.prepare(FashionMnist(source=source, data_dir=data_dir, file_format="array_record"))

  builder = distributed.process0_first("dataset", prepare)
  out = {}
  for split in builders.SPLITS:
    src = builder.as_data_source(split=split)
    records = sorted(src.__getitems__(range(len(src))), key=lambda r: int(r["order"]))
    out[split] = (np.stack([r["image"] for r in records]), np.array([r["label"] for r in records]))
  return out, FASHION_LABELS


def _digits_arrays() -> tuple[dict, tuple[str, ...]]:
  try:
    from sklearn.datasets import load_digits
  except ImportError:
    raise WdjaxError("data.dataset='digits' needs scikit-learn (pip install scikit-learn)") from None
  d = load_digits()
  images = np.round(d.images * (255 / 16)).astype(np.uint8)  # 0..16 grey levels -> 0..255
  fold = np.arange(len(images)) % 10
  parts = {"test": fold == 0, "validation": fold == 1, "train": fold >= 2}
  return {s: (images[m], d.target[m]) for s, m in parts.items()}, tuple(str(i) for i in range(10))


def load(dataset: str, cache: str = "", max_train_examples: int = 0,
         max_eval_examples: int = 0) -> TaskData:
  """The three splits of `dataset` in memory, standardised by the training split's statistics."""
  if dataset == "fashion-mnist":
    arrays, names = _fashion_arrays(cache)
  elif dataset == "digits":
    arrays, names = _digits_arrays()
  else:
    raise WdjaxError(f"image data.dataset must be one of {DATASETS}, got {dataset!r}")
  x_train = arrays["train"][0].astype(np.float32) / 255.0
  mean, std = float(x_train.mean()), float(x_train.std())
  splits = {}
  for split, (x, y) in arrays.items():
    limit = max_train_examples if split == "train" else max_eval_examples
    if limit:
      x, y = x[:limit], y[:limit]
    splits[split] = ImageSplit(x, y.astype(np.int32), mean, std)
  return TaskData(dataset, names, **splits)
