"""The host loop: resume, step, log, evaluate, checkpoint, stop cleanly.

It owns no model knowledge: it is handed a jitted step, a batch source, an evaluation function
and a checkpointer. Metrics are fetched from the device only every `log_every` steps and at
checkpoint steps, so dispatch stays asynchronous in between. Before a checkpoint is written the
step's loss and gradient norm are checked: a non-finite value stops the run with one message,
and the checkpoints already on disk stay as they were. SIGTERM (what spot and preemptible
machines get before they are taken away) and Ctrl-C stop the run after the current step with a
checkpoint of that step; rerunning the same command continues from it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from wdjax import profiling
from wdjax.errors import Stopped, WdjaxError
from wdjax.train.checkpoint import Checkpointer
from wdjax.train.metrics import MetricWriter


@dataclasses.dataclass
class LoopSpec:
  """Everything `fit` needs besides the state."""

  name: str  # phase name shown in logs ("finetune", "distill", ...)
  total_steps: int
  steps_per_epoch: int
  train_step: Callable  # jitted (state, teacher_params, batch) -> (state, metrics)
  get_batch: Callable[[int], dict]  # step -> device batch
  evaluate: Callable[[Any], tuple[dict, Any]]  # state -> ({"val_accuracy": ...}, dense model params)
  checkpointer: Checkpointer
  writer: MetricWriter
  meta: dict  # saved with every checkpoint
  log_every: int = 25
  eval_every: int = 0  # 0 = once per epoch
  progress: bool = True
  lr_at: Callable[[int], float] | None = None
  keep_best: bool = True  # export the best-validation model (else the last evaluated one)
  profile_steps: int = 0  # steps to trace with jax.profiler (0 = none)
  profile_dir: str = ""  # where the trace goes (TensorBoard's profile plugin / xprof read it)
  best_metric: str = "accuracy"  # the validation score `best` maximises (`val_<best_metric>`)


PROFILE_SKIP = 5  # steps run before a trace starts: the first compiles, the next settle


class _Profiler:
  """A jax.profiler trace of `spec.profile_steps` steps, from the 6th step this process runs
  (compilation and warm-up left out). Every process traces its own host, into `process_<i>/`
  when there are several (the trace files are named by host, which processes may share)."""

  def __init__(self, spec: LoopSpec, start: int, progress: "_Progress"):
    self.first = start + PROFILE_SKIP + 1
    self.last = min(spec.total_steps, start + PROFILE_SKIP + spec.profile_steps)
    self.dir, self.progress, self.on, self.name = spec.profile_dir, progress, False, spec.name
    self.train_step = spec.train_step
    if jax.process_count() > 1:
      self.dir = f"{self.dir}/process_{jax.process_index()}"
    if spec.profile_steps and self.last < self.first:
      progress.write(f"[{spec.name}] no profile: {spec.total_steps - start} steps left, the trace "
                     f"starts after {PROFILE_SKIP}")

  def before(self, step: int) -> None:
    if step == self.first and self.last >= self.first:
      jax.profiler.start_trace(self.dir)
      self.on = True

  def after(self, step: int, state: Any, teacher_params: Any, batch: dict) -> None:
    """After the step that made `state` from `batch`."""
    if self.on and step == self.last:
      jax.block_until_ready(state)  # the trace holds the traced steps' device work
      self.stop()
      self.progress.write(f"profile of steps {self.first}-{self.last} in {self.dir} "
                          "(tensorboard --logdir, or xprof)")
      self.summarize(state, teacher_params, batch)

  def summarize(self, state: Any, teacher_params: Any, batch: dict) -> None:
    """Device time per step by kind of operation, logged and written to `summary.{md,json}`
    beside the trace, the ops read against the compiled step's HLO (compiled again for its text:
    a hit in the compilation cache). The trace is the profile; a summary that cannot be made is
    reported, not raised."""
    try:
      hlo_text = self.train_step.lower(state, teacher_params, batch).compile().as_text()
      summary = profiling.jax_summary(self.dir, hlo_text, self.last - self.first + 1)
    except Exception as e:  # noqa: BLE001 - the run must go on
      self.progress.write(f"[{self.name}] no profile summary: {type(e).__name__}: {e}")
      return
    Path(self.dir, "summary.md").write_text(profiling.table({self.name: summary}) + "\n")
    Path(self.dir, "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    total = summary["device_ms"] or 1.0
    shares = sorted(summary["categories"].items(), key=lambda kv: -kv[1])
    self.progress.write(
        f"[{self.name}] device time {summary['device_ms']:.2f} ms per step: " + ", ".join(
            f"{c} {100 * ms / total:.0f}%" for c, ms in shares if ms > 0) +
        f"; costliest ops in {self.dir}/summary.md")

  def stop(self) -> None:
    if self.on:
      jax.profiler.stop_trace()
      self.on = False


class _StopSignals:
  """Turns SIGTERM and SIGINT during training into a request to stop after the current step.

  One process: Python handlers set a flag (a second Ctrl-C interrupts at once). Several
  processes must stop at the same step to write one checkpoint together, so SIGTERM is left to
  JAX's preemption service (started by `jax.distributed.initialize`): any process's notice is
  spread to all, and `reached_preemption_sync_point` names the same step everywhere. Ctrl-C
  there keeps its default (KeyboardInterrupt; resume from the last periodic checkpoint)."""

  def __init__(self):
    self.signum: int | None = None
    self.multi = jax.process_count() > 1
    self.previous: dict[int, Any] = {}

  def __enter__(self) -> _StopSignals:
    if threading.current_thread() is threading.main_thread() and not self.multi:
      for s in (signal.SIGTERM, signal.SIGINT):
        self.previous[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for s, handler in self.previous.items():
      signal.signal(s, handler)

  def _handle(self, signum: int, frame) -> None:
    if self.signum == signal.SIGINT and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.signum = signum

  def due(self, step: int) -> bool:
    """Whether to stop after `step` (called at every step, by every process)."""
    if self.multi:
      from jax.experimental import multihost_utils
      if multihost_utils.reached_preemption_sync_point(step):
        self.signum = signal.SIGTERM
    return self.signum is not None


def _fmt_time(seconds: float) -> str:
  seconds = int(seconds)
  return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _in_notebook() -> bool:
  """Whether this process is a Jupyter kernel (Colab's included), whose stderr is no terminal."""
  ipython = sys.modules.get("IPython")
  shell = ipython.get_ipython() if ipython is not None else None
  return shell is not None and type(shell).__name__ in ("ZMQInteractiveShell", "Shell")


class _Progress:
  """tqdm on a terminal or in a notebook, a plain line every `log_every` steps otherwise;
  process 0 only."""

  def __init__(self, spec: LoopSpec, start: int):
    self.enabled = spec.progress and jax.process_index() == 0
    self.total, self.name = spec.total_steps, spec.name
    self.bar = None
    self.t0, self.s0 = time.perf_counter(), start
    if self.enabled and (sys.stderr.isatty() or _in_notebook()):
      from tqdm.auto import tqdm  # a notebook widget in Jupyter / Colab, text on a terminal
      self.bar = tqdm(total=spec.total_steps, initial=start, desc=spec.name, unit="step",
                      dynamic_ncols=True, smoothing=0.1)

  def update(self, step: int, metrics: dict | None):
    if self.bar is not None:
      self.bar.update(step - self.bar.n)
      if metrics:
        self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", **_accuracy(metrics))
    elif self.enabled and metrics is not None:
      rate = (step - self.s0) / max(time.perf_counter() - self.t0, 1e-9)
      eta = (self.total - step) / rate if rate > 0 else float("nan")
      acc = "".join(f" acc {v}" for v in _accuracy(metrics).values())
      print(f"[{self.name}] step {step}/{self.total} loss {metrics['loss']:.4f}{acc} "
            f"| {rate:.2f} steps/s, ETA {_fmt_time(eta)}", flush=True)

  def write(self, line: str):
    if not self.enabled:
      return
    if self.bar is not None:
      self.bar.write(line)
    else:
      print(line, flush=True)

  def close(self):
    if self.bar is not None:
      self.bar.close()


def _check_finite(step: int, metrics: dict, spec: LoopSpec) -> None:
  bad = [k for k in ("loss", "grad_norm") if not math.isfinite(metrics[k])]
  if metrics.get("nonfinite_steps", 0) > 0 and not bad:
    bad, metrics = ["loss"], dict(metrics, loss=float("nan"))  # an earlier, unlogged step
  if bad:
    last = spec.checkpointer.latest_step()
    kept = f"checkpoint step {last} in {spec.checkpointer.directory} is kept" if last is not None \
        else "no checkpoint was written"
    lr = f" at learning rate {spec.lr_at(step - 1):.3g}" if spec.lr_at else ""  # step's own, as logged
    raise WdjaxError(f"{spec.name}: {bad[0]} became {metrics[bad[0]]} by step {step}{lr}; {kept}; "
                     "lower the learning rate or check the data")


def _accuracy(metrics: dict) -> dict[str, str]:
  """The training batch's accuracy for the progress line (regression steps have none)."""
  return {"acc": f"{metrics['accuracy']:.3f}"} if "accuracy" in metrics else {}


def initial_best(params: Any) -> dict:
  """The `best` record before any evaluation: `params` with a score below every real one."""
  return {"params": params, "val_score": np.float32(-np.inf), "step": np.int32(0)}


def fit(state: Any, best: dict, teacher_params: Any, spec: LoopSpec) -> tuple[Any, dict]:
  """Train from `state` (fresh or restored) to `spec.total_steps`.

  Returns the final state and `best`: the dense model of the evaluation with the highest
  validation `spec.best_metric` (or of the last evaluation when `spec.keep_best` is off), with its score
  and step. Both are checkpointed together, so a resumed run selects exactly as an uninterrupted one.
  """
  start = int(jax.device_get(state["step"]))
  spec.writer.resume(start)
  eval_every = spec.eval_every or spec.steps_per_epoch
  progress = _Progress(spec, start)
  profiler = _Profiler(spec, start, progress)
  t_last, s_last = time.perf_counter(), start
  stop = _StopSignals()
  try:
    stop.__enter__()
    for step in range(start + 1, spec.total_steps + 1):
      profiler.before(step)
      batch = spec.get_batch(step - 1)
      state, metrics = spec.train_step(state, teacher_params, batch)
      profiler.after(step, state, teacher_params, batch)
      due_log = step % spec.log_every == 0 or step == spec.total_steps
      due_ckpt = step == spec.total_steps or (spec.checkpointer.every > 0
                                                and step % spec.checkpointer.every == 0)
      stopping = stop.due(step)
      host = None
      if due_log or due_ckpt or stopping:
        host = {k: float(v) for k, v in jax.device_get(metrics).items()}
        _check_finite(step, host, spec)
        now = time.perf_counter()
        host["steps_per_s"] = (step - s_last) / max(now - t_last, 1e-9)
        t_last, s_last = now, step
        if spec.lr_at:
          host["lr"] = spec.lr_at(step - 1)
        spec.writer.write(step, spec.name, host)
      progress.update(step, host)
      if step % eval_every == 0 or step == spec.total_steps:
        scores, model = spec.evaluate(state)
        score = scores["val_" + spec.best_metric]
        if not spec.keep_best or score > float(best["val_score"]):
          best = {"params": model, "val_score": np.float32(score), "step": np.int32(step)}
        spec.writer.write(step, spec.name + "/eval", dict(scores, best_step=int(best["step"])))
        progress.write(f"[{spec.name}] step {step}: " + ", ".join(
            f"{k} {v:.4f}" for k, v in scores.items()))
      if due_ckpt or stopping:
        spec.checkpointer.save(step, {"train": state, "best": best}, dict(spec.meta, step=step),
                               force=step == spec.total_steps or stopping)
      if stopping:
        spec.checkpointer.wait()
        name = signal.Signals(stop.signum).name
        raise Stopped(f"{spec.name}: stopped by {name} after step {step} of {spec.total_steps}, "
                      f"checkpoint saved in {spec.checkpointer.directory}; rerun the same command "
                      "to continue", stop.signum)
  finally:
    stop.__exit__()
    profiler.stop()
    progress.close()
    spec.writer.close()
    spec.checkpointer.wait()
  return state, best
