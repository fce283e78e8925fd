"""Tasks: one module each, found by the `data.dataset` values they serve (`base.py`: the contract).

| module                   | data.dataset                 | teacher                          | metric   |
|--------------------------|------------------------------|----------------------------------|----------|
| text_classification      | rotten-tomatoes, files       | a pretrained encoder, fine-tuned | accuracy |
| image_classification     | fashion-mnist, digits        | a ViT trained from scratch       | accuracy |
| translation              | bible                        | a Transformer from scratch       | BLEU     |

Every module of this package is imported on the first lookup, and registers its task with
`register`: a new task is a new module here.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil

from wdjax.errors import WdjaxError
from wdjax.tasks.base import Task

_TASKS: dict[str, Task] = {}  # data.dataset -> task


def register(task: Task) -> Task:
  for name in task.datasets:
    if name in _TASKS and _TASKS[name] is not task:
      raise ValueError(f"data.dataset {name!r} is served by two tasks: {_TASKS[name].name}, {task.name}")
    _TASKS[name] = task
  return task


@functools.cache
def _discover() -> None:
  """Import every task module (each registers itself; importing one twice is a no-op)."""
  for info in pkgutil.iter_modules(__path__):
    if info.name != "base":
      importlib.import_module(f"{__name__}.{info.name}")


def datasets() -> tuple[str, ...]:
  """Every `data.dataset` value some task serves."""
  _discover()
  return tuple(_TASKS)


def for_dataset(dataset: str) -> Task:
  _discover()
  if dataset not in _TASKS:
    raise WdjaxError(f"unknown data.dataset {dataset!r}; choose one of {', '.join(_TASKS)}")
  return _TASKS[dataset]


__all__ = ["Task", "datasets", "for_dataset", "register"]
