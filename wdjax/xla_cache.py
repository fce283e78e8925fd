"""JAX's persistent compilation cache, kept beside the assets (`<asset cache>/xla`).

A rerun, a resumed run, another seed or another phase with the same shapes then loads its
compiled programs instead of compiling them again (MaxText's `jax_cache_dir`, on by default here).
Each program is stored under a hash of its HLO, compile options and backend, so a changed model,
shape, sharding, jax version or device never reads a stale entry.
"""

from __future__ import annotations

from pathlib import Path

import jax

from wdjax import assets


def enable(cache_dir: str = "") -> Path:
  """Keep compiled programs in `<asset cache>/xla`; returns the directory in use.

  A directory set already (`JAX_COMPILATION_CACHE_DIR`, or `jax.config` in a notebook) is left
  as it is. Every program is kept, however fast it compiled: JAX's default threshold (1 s) skips
  most of a CPU run's programs, whose compiles add up to most of a short run's start-up. Call it
  before the first compilation (JAX reads the setting once).

  The size is not capped: JAX's cap (`jax_compilation_cache_max_size`) makes every write lock the
  directory and read every entry's metadata (this repository's test suite from a clean clone:
  16 min 07 s with a 1 GiB cap, 12 min 33 s without). Deleting the directory at any time is
  safe: it only costs the next run its compiles."""
  current = jax.config.jax_compilation_cache_dir
  if current:
    return Path(current)
  directory = assets.cache_dir(cache_dir) / "xla"
  jax.config.update("jax_compilation_cache_dir", str(directory))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  return directory
