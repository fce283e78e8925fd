"""Metric writers: JSON lines always, TensorBoard and Weights & Biases optionally; only process 0
writes.

A W&B run is one phase of one workdir: its id is derived from the phase directory, so a resumed
phase logs into the run it started (`resume="allow"`), and its files go under `<phase>/wandb`.
Steps a resumed phase trains again are not logged twice to W&B where its summary says how far
the run got (online); metrics.jsonl drops them instead (`resume`)."""

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

  def __init__(self, directory: str | Path, tensorboard: bool = False, wandb: str = "",
               config: dict | None = None):
    """`wandb`: the W&B project to log to ("" = none); `config` the run's settings shown there."""
    self.enabled = jax.process_index() == 0
    self.path = Path(directory) / "metrics.jsonl"
    self.tb = None
    self.wandb = None
    self._wandb_step = -1
    if self.enabled:
      self.path.parent.mkdir(parents=True, exist_ok=True)
      if tensorboard:
        try:
          from tensorboardX import SummaryWriter
        except ImportError:
          from wdjax.errors import WdjaxError
          raise WdjaxError("log.tensorboard=True needs tensorboardX: pip install 'wdjax[tensorboard]'") from None
        self.tb = SummaryWriter(str(Path(directory) / "tensorboard"))
      if wandb:
        self.wandb = _wandb_run(Path(directory), wandb, config or {})
        self._wandb_step = int(self.wandb.summary.get("step", -1))  # a resumed run: the last it has

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
    scalars = {f"{phase}/{k}": v for k, v in row.items()
               if k not in ("step", "phase", "time") and isinstance(v, (int, float))}
    if self.tb is not None:
      for k, v in scalars.items():
        self.tb.add_scalar(k, v, step)
    if self.wandb is not None and step > self._wandb_step:
      self.wandb.log({"step": int(step), **scalars})

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()
    if self.wandb is not None:
      self.wandb.finish()
      self.wandb = None


def _wandb_run(directory: Path, project: str, config: dict):
  try:
    import wandb
  except ImportError:
    raise errors.WdjaxError("log.wandb=true needs the wandb package: pip install wandb") from None
  import hashlib
  directory = directory.resolve()
  run_id = hashlib.sha256(str(directory).encode()).hexdigest()[:16]
  (directory / "wandb").mkdir(parents=True, exist_ok=True)
  run = wandb.init(project=project, id=run_id, resume="allow", dir=str(directory),
                   name=f"{directory.parent.name}/{directory.name}", config=config)
  # the phase's own step is the x axis: training and evaluation rows of one step are two log
  # calls, each committed at once
  run.define_metric("step")
  run.define_metric("*", step_metric="step")
  return run


def read(directory: str | Path) -> list[dict]:
  path = Path(directory) / "metrics.jsonl"
  return [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []
