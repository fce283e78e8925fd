"""Metric writers: JSON lines always, TensorBoard optionally; only process 0 writes."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from wdjax import errors


def _scalar(v: Any) -> Any:
  if isinstance(v, (np.ndarray, jax.Array)):
    v = np.asarray(v).item()
  if isinstance(v, (np.floating, np.integer)):
    v = v.item()
  return v


class MetricWriter:
  """Appends `{"step": s, "phase": ..., **metrics}` lines to `<dir>/metrics.jsonl`."""

  def __init__(self, directory: str | Path, tensorboard: bool = False):
    self.enabled = jax.process_index() == 0
    self.path = Path(directory) / "metrics.jsonl"
    self.tb = None
    if self.enabled:
      self.path.parent.mkdir(parents=True, exist_ok=True)
      if tensorboard:
        try:
          from tensorboardX import SummaryWriter
        except ImportError:
          from wdjax.errors import WdjaxError
          raise WdjaxError("log.tensorboard=True needs tensorboardX: pip install 'wdjax[tensorboard]'") from None
        self.tb = SummaryWriter(str(Path(directory) / "tensorboard"))

  def resume(self, step: int) -> None:
    """Forget the rows of steps after `step`, the step a run resumes from: a run killed after
    its last checkpoint logged steps it will train again, and they would appear twice."""
    if not self.enabled or not self.path.exists():
      return
    lines = self.path.read_text().splitlines(keepends=True)
    kept = [l for l in lines if json.loads(l)["step"] <= step]
    if len(kept) < len(lines):
      tmp = self.path.with_suffix(".tmp")
      with errors.writing("metrics", self.path):
        tmp.write_text("".join(kept))
        tmp.replace(self.path)

  def write(self, step: int, phase: str, metrics: dict[str, Any]) -> None:
    if not self.enabled:
      return
    row = {"step": int(step), "phase": phase, "time": round(time.time(), 3)}
    row.update({k: _scalar(v) for k, v in metrics.items()})
    with errors.writing("metrics", self.path), open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    if self.tb is not None:
      for k, v in row.items():
        if k not in ("step", "phase", "time") and isinstance(v, (int, float)):
          self.tb.add_scalar(f"{phase}/{k}", v, step)

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()


def read(directory: str | Path) -> list[dict]:
  path = Path(directory) / "metrics.jsonl"
  return [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []
