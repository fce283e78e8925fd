"""The built wheel alone: installed in a fresh virtual environment, outside the repository, it
carries the presets and runs the quickstart by name (short steps)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# A fresh environment installs jax, flax, orbax, TFDS, ... from the package index: a minute or
# more, and the index must be reachable.
pytestmark = pytest.mark.network


def _run(*cmd, cwd, env=None):
  env = {k: v for k, v in (env or os.environ).items() if k != "PYTHONPATH"}  # no checkout on the path
  proc = subprocess.run(list(map(str, cmd)), cwd=cwd, env=env, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


def test_the_wheel_runs_the_quickstart_outside_the_repository(tmp_path, minilm_dir, rt_csv):
  wheels = tmp_path / "wheels"
  _run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", wheels, ROOT, cwd=tmp_path)
  wheel, = wheels.glob("wdjax-*.whl")
  venv = tmp_path / "venv"
  _run(sys.executable, "-m", "venv", venv, cwd=tmp_path)
  # no pip cache: the dependencies' wheels would otherwise sit on CI's disk twice
  _run(venv / "bin/pip", "install", "-q", "--no-cache-dir", wheel, cwd=tmp_path)
  away = tmp_path / "elsewhere"
  away.mkdir()
  # the asset cache the test suite filled (the run itself may not fetch: its index may differ)
  env = dict(os.environ, WDJAX_CACHE=str(Path(minilm_dir).parents[0]))
  where = _run(venv / "bin/python", "-c", "import wdjax; print(wdjax.__file__)", cwd=away, env=env)
  assert where.startswith(str(venv))  # the installed copy, not the checkout
  from wdjax import notebook
  sets = [a for kv in notebook.TINY for a in ("--set", kv)]
  out = _run(venv / "bin/wdjax", "pipeline", "quickstart", *sets, "--set", f"workdir={away / 'runs'}",
             cwd=away, env=env)
  assert "| student 2x96, weight selection + KD (weight transfer) |" in out, out[-2000:]
  assert (away / "runs/distill_kd_selection/model/model.safetensors").is_file()
