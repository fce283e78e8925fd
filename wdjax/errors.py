"""The exceptions the CLI turns into one line: `WdjaxError` for what a user can fix (exit 2;
disk failures are turned into it here, so that every writer says the same) and `Stopped` for a
run stopped on a signal after it saved a checkpoint."""

from __future__ import annotations

import contextlib
import errno
import os
from typing import Iterator


class WdjaxError(Exception):
  """A problem the user can fix (bad input, missing asset, corrupt file, diverged run).

  The message is one line that says what is wrong and what to do about it.
  """


class Stopped(Exception):
  """A run stopped on a signal (SIGTERM, SIGINT) after writing a checkpoint: the CLI prints the
  message on one line and exits 128 + the signal's number; the same command resumes."""

  def __init__(self, message: str, signum: int):
    super().__init__(message)
    self.signum = signum


# errno values that mean "the disk refused the write", and the words the OS gives for them
# (tensorstore, under Orbax, reports them as ValueError text, not as OSError)
_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG)
_DISK_WORDS = tuple(os.strerror(n) for n in _DISK_ERRNOS)


def disk_cause(e: BaseException | None) -> str | None:
  """Why the disk refused a write in `e` or the exceptions it was raised from ("No space left
  on device", "Read-only file system", ...); None when `e` is not a disk failure."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in _DISK_ERRNOS:
      return os.strerror(e.errno)
    text = str(e)
    for words in _DISK_WORDS:
      if words in text:
        return words
    e = e.__cause__ or e.__context__
  return None


def disk_error(what: str, path: str | os.PathLike, e: BaseException) -> WdjaxError | None:
  """The one-line error for a failed write of `what` at `path`, or None if `e` is not the disk's."""
  cause = disk_cause(e)
  if cause is None:
    return None
  return WdjaxError(f"cannot write {what} {path}: {cause}; free space (or use a writable "
                    "workdir) and rerun the same command: earlier checkpoints and exports are intact")


@contextlib.contextmanager
def writing(what: str, path: str | os.PathLike) -> Iterator[None]:
  """Turn a disk failure inside the block into `disk_error`'s one line; other errors pass."""
  try:
    yield
  except WdjaxError:
    raise
  except Exception as e:
    err = disk_error(what, path, e)
    if err is None:
      raise
    raise err from None
