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

import logging
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from wdjax.errors import WdjaxError

logging.getLogger("absl").setLevel(logging.WARNING)


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
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

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
      raise WdjaxError(
          f"checkpoint {self.directory / str(step)} cannot be restored ({type(e).__name__}: "
          f"{msg[:200]}); move it away to resume from an earlier one, or use a new workdir") from None
    return restored.state, dict(restored.meta)

  def read_meta(self, step: int) -> dict:
    try:
      return dict(self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta)
    except Exception as e:
      raise WdjaxError(f"checkpoint {self.directory / str(step)} has no readable metadata ({e})") from None

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


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
