"""A task's data ready to train on: the three splits (tokenised texts, images, ...) and the label
names (empty where the task has none)."""

from __future__ import annotations

import dataclasses
from typing import Any

from wdjax.data import builders
from wdjax.errors import WdjaxError


@dataclasses.dataclass(frozen=True)
class TaskData:
  name: str
  label_names: tuple[str, ...]
  train: Any  # TokenizedSplit, ImageSplit, PairSplit: what data/pipeline.py batches
  validation: Any
  test: Any
  regression: bool = False  # float scores, no classes (label_names is empty)

  def split(self, name: str) -> Any:
    if name not in builders.SPLITS:
      raise WdjaxError(f"unknown split {name!r}; choose one of {', '.join(builders.SPLITS)}")
    return getattr(self, name)
