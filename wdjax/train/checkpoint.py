"""Checkpoints through Orbax: the only module in wdjax that imports it.

What is saved: the training state (step, generator parameters, optimizer state, generator state)
and a small JSON record (config, data position, teacher path and sha256). What is not: the teacher,
which training never modifies, so it is recorded by reference and checked on resume. The RNG is
not saved either because every random draw is `fold_in(key(seed), step)`: resuming at step s
draws what an uninterrupted run draws.

Orbax's V0 `CheckpointManager` writes asynchronously into a temporary directory and renames it
when complete, so a kill during a save leaves the previous checkpoints intact. Restores always
pass an abstract target with the *current* mesh's shardings, so a checkpoint written on a 4x2
mesh restores onto 2x4 or 8x1.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from wdjax import errors
from wdjax.errors import WdjaxError


class _DiskFailures(logging.Filter):
  """Drops Orbax's own reports of a write the disk refused (one traceback per writer thread):
  the run reports it once, as one line."""

  def filter(self, record: logging.LogRecord) -> bool:
    exc = record.exc_info[1] if record.exc_info else None
    return errors.disk_cause(exc) is None and errors.disk_cause(Exception(record.getMessage())) is None


logging.getLogger("absl").setLevel(logging.WARNING)
logging.getLogger("absl").addFilter(_DiskFailures())

def _quiet_abandoned_writers() -> None:
  """When a save fails, the writer threads' pending tensorstore callbacks find their event loop
  closed, and Python reports each as an unraisable exception (a traceback apiece, hundreds per
  save, possibly before the run itself sees the failure): drop those reports, which say nothing
  the run's one line does not; other unraisable exceptions still print."""
  previous = sys.unraisablehook
  if getattr(previous, "wdjax_quiet", False):
    return

  def hook(unraisable):
    exc = unraisable.exc_value
    if not (isinstance(exc, RuntimeError) and "Event loop is closed" in str(exc)) \
        and errors.disk_cause(exc) is None:
      previous(unraisable)

  hook.wdjax_quiet = True
  sys.unraisablehook = hook


ASIDE = "checkpoints.unrestorable"  # sibling of `checkpoints/` where unreadable steps are moved


class Unrestorable(WdjaxError):
  """A checkpoint whose files cannot be read back (truncated, missing, corrupt)."""


def has_checkpoint(directory: str | Path) -> bool:
  """Whether `directory` holds a finished checkpoint (Orbax's step directories are named by
  their step; one being written has a temporary suffix)."""
  d = Path(directory)
  return d.is_dir() and any(p.name.isdigit() for p in d.iterdir())


class Checkpointer:
  """Save every `every` steps (and when forced), keep the last `keep`, restore the latest."""

  def __init__(self, directory: str | Path, *, every: int, keep: int, async_save: bool = True):
    self.directory = Path(directory).absolute()
    self.every = every
    self._saving = 0  # the step of the latest save started (what a failed wait names)
    _quiet_abandoned_writers()
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save),
        item_names=("state", "meta"),
    )

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: Any, meta: dict, force: bool = False) -> bool:
    """Start saving (asynchronously) if `step` is due or `force`; True if a save started."""
    if not force and (self.every <= 0 or step % self.every):
      return False
    if step in self.manager.all_steps():
      return False
    self._saving = step
    self._check_room(step, state)
    with self._writing(step):
      return self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

  def _check_room(self, step: int, state: Any) -> None:
    """Refuse a save the disk has no room for before it starts. Orbax's writer threads, when
    the disk fills under them, each print their own tracebacks; this says it once, and nothing
    is half-written. The room a save takes is the newest checkpoint's size on disk (the same
    tree, compressed alike), or the state's raw size before the first. (A disk that fills
    during the save is still reported as one line, by `_writing`.)"""
    import shutil
    steps = self.all_steps()
    if steps:
      newest = self.directory / str(max(steps))
      needed = sum(f.stat().st_size for f in newest.rglob("*") if f.is_file())
    else:
      needed = sum(x.nbytes for x in jax.tree_util.tree_leaves(state) if hasattr(x, "nbytes"))
    free = shutil.disk_usage(self.directory).free
    if free < needed + (1 << 20):  # + room for metadata
      raise WdjaxError(
          f"cannot write checkpoint {self.directory / str(step)}: No space left on device "
          f"({needed / 2**20:.1f} MiB needed, {free / 2**20:.1f} MiB free); free space (or use a "
          "writable workdir) and rerun the same command: earlier checkpoints and exports are intact")

  @contextlib.contextmanager
  def _writing(self, step: int | str):
    """Disk failures of a save, which Orbax may raise at any later call, as one line. The
    half-written step stays under Orbax's temporary name, never a step's."""
    with errors.writing("checkpoint", self.directory / str(step)):
      yield

  def set_aside(self, step: int) -> Path:
    """Move checkpoint `step` out of the manager's sight into `checkpoints.unrestorable/`
    (renamed, never deleted: the files may matter to whoever investigates)."""
    aside = self.directory.parent / ASIDE
    aside.mkdir(parents=True, exist_ok=True)
    dest = aside / str(step)
    if dest.exists():
      dest = aside / f"{step}.{time.strftime('%Y%m%d-%H%M%S')}"
    (self.directory / str(step)).rename(dest)
    self.manager.reload()
    return dest

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """(state, meta) of `step`, laid out as `abstract_state` (ShapeDtypeStructs with shardings)."""
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    except Exception as e:  # Orbax raises many types for missing, truncated or mismatched files
      msg = str(e).splitlines()[0] if str(e) else type(e).__name__
      if "structure" in msg:  # intact files of another tree: nothing to move away
        raise WdjaxError(
            f"checkpoint {self.directory / str(step)} holds another model than this config builds "
            f"({msg[:200]}); use the config (and phase) that wrote it, or a new workdir") from None
      raise Unrestorable(
          f"checkpoint {self.directory / str(step)} cannot be restored ({type(e).__name__}: "
          f"{msg[:200]})") from None
    return restored.state, dict(restored.meta)

  def read_meta(self, step: int) -> dict:
    try:
      return dict(self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta)
    except Exception as e:
      msg = str(e).splitlines()[0] if str(e) else type(e).__name__
      raise Unrestorable(f"checkpoint {self.directory / str(step)} has no readable metadata "
                         f"({msg[:200]})") from None

  def wait(self) -> None:
    with self._writing(self._saving):
      self.manager.wait_until_finished()

  def close(self) -> None:
    try:
      self.wait()
    finally:
      try:
        self.manager.close()
      except Exception:  # noqa: BLE001 - a failed save was reported by wait(); closing must not mask it
        pass


def abstract_like(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `tree` carrying `shardings` (the restore target)."""
  return jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


class PhaseLock:
  """One process per phase directory: a second `wdjax` run on the same directory (a benchmark
  queued twice, a resume started while the first run still trains) is refused with one line
  instead of both writing checkpoints there. An `flock` on `<dir>/.lock`, so the OS releases it
  when the holder exits, even when killed; only process 0 of a multi-host run takes it."""

  def __init__(self, directory: str | Path):
    self.path = Path(directory) / ".lock"
    self._file = None

  def acquire(self) -> PhaseLock:
    import fcntl
    import os
    if jax.process_index() != 0:
      return self
    self.path.parent.mkdir(parents=True, exist_ok=True)
    f = open(self.path, "a+")  # noqa: SIM115  (held open while the run lasts)
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      holder = f.read().strip() or "another process"
      f.close()
      raise WdjaxError(f"{self.path.parent} is in use by {holder}; wait for it to finish or "
                       "train into another --phase or workdir") from None
    f.seek(0)
    f.truncate()
    f.write(f"wdjax pid {os.getpid()}\n")
    f.flush()
    self._file = f
    return self

  def release(self) -> None:
    if self._file is not None:
      self._file.close()  # closing drops the flock
      self._file = None
