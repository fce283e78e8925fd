"""Faults a long run meets, driven as a user meets them: a full disk, a checkpoint that cannot be
read back, SIGTERM. Each ends in one line, loses nothing, and the rerun of the same command ends
with the parameters of a run that met no fault."""

import dataclasses
import errno
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from test_train import _write_config
from wdjax import errors


def _wdjax(*args, **kw):
  return subprocess.run([sys.executable, "-m", "wdjax", *map(str, args)], capture_output=True,
                        text=True, **kw)


def _model(workdir: Path) -> dict:
  from safetensors.numpy import load_file
  return load_file(str(workdir / "distill" / "model" / "model.safetensors"))


def _assert_same(a: dict, b: dict) -> None:
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _steps(ckdir: Path) -> list[int]:
  return sorted(int(p.name) for p in ckdir.iterdir() if p.name.isdigit())


def _config(tiny, tmp_path, name, steps, every):
  cfg = tiny(checkpoint=dataclasses.replace(tiny().checkpoint, every=every, keep=3, async_save=True))
  cfg = dataclasses.replace(cfg, workdir=str(tmp_path / name),
                            distill=dataclasses.replace(cfg.distill, steps=steps))
  return cfg, _write_config(tmp_path / f"{name}.py", cfg)


def test_disk_causes_are_recognised_in_what_orbax_raises():
  assert errors.disk_cause(OSError(errno.ENOSPC, "x")) == "No space left on device"
  assert errors.disk_cause(OSError(errno.EROFS, "x")) == "Read-only file system"
  wrapped = ValueError('RESOURCE_EXHAUSTED: Error writing "a" in OCDBT database: Failed to write '
                       "4562944 bytes to file 5: No space left on device [os_error_code='28']")
  try:
    try:
      raise wrapped
    except ValueError as e:
      raise RuntimeError("save failed") from e
  except RuntimeError as e:
    assert errors.disk_cause(e) == "No space left on device"
  assert errors.disk_cause(ValueError("shapes differ")) is None
  with pytest.raises(errors.WdjaxError, match=r"^cannot write results /r: Permission denied"):
    with errors.writing("results", "/r"):
      raise PermissionError(errno.EACCES, "denied")
  with pytest.raises(KeyError):  # not the disk's: passes unchanged
    with errors.writing("results", "/r"):
      raise KeyError("x")


def _can_mount_tmpfs(where: Path) -> bool:
  probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                          f"mount -t tmpfs -o size=1m tmpfs {where}"], capture_output=True)
  return shutil.which("unshare") is not None and probe.returncode == 0


def test_a_full_disk_is_one_line_and_the_rerun_resumes(tiny, tmp_path):
  """The workdir on a 40 MiB tmpfs (in a user and mount namespace of its own) with room for two
  checkpoints (16 MiB each on disk): the third save is refused in one line, exit 2, the two
  kept; with the disk grown, the same command resumes from the second and ends where an
  uninterrupted run ends."""
  disk = tmp_path / "disk"
  disk.mkdir()
  if not shutil.which("unshare") or not _can_mount_tmpfs(disk):
    pytest.skip("this machine does not let a user namespace mount a tmpfs")
  straight, straight_path = _config(tiny, tmp_path, "straight", steps=6, every=2)
  assert _wdjax("distill", straight_path).returncode == 0
  cfg, path = _config(tiny, disk, "run", steps=6, every=2)
  out = tmp_path / "out"
  script = f"""
    mount -t tmpfs -o size=40m tmpfs {disk} || exit 99
    {sys.executable} -m wdjax distill {path} > {out}.1 2> {out}.1.err; echo $? > {out}.1.rc
    ls {disk}/run/distill/checkpoints > {out}.1.ls
    mount -o remount,size=500m {disk}
    {sys.executable} -m wdjax distill {path} > {out}.2 2> {out}.2.err; echo $? > {out}.2.rc
    cp {disk}/run/distill/model/model.safetensors {out}.safetensors
  """
  # the config file itself must live outside the tmpfs, which hides the directory's contents
  shutil.move(path, tmp_path / "run.py")
  script = script.replace(str(path), str(tmp_path / "run.py"))
  proc = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
                        capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr
  err = Path(f"{out}.1.err").read_text()
  assert Path(f"{out}.1.rc").read_text().strip() == "2"
  assert err.count("\n") == 1 and "No space left on device" in err, err
  assert "checkpoints/6" in err
  # the earlier ones intact; the one that failed only under Orbax's temporary name
  assert [n for n in Path(f"{out}.1.ls").read_text().split() if n.isdigit()] == ["2", "4"]
  assert Path(f"{out}.2.rc").read_text().strip() == "0", Path(f"{out}.2.err").read_text()
  assert "resuming from step 4" in Path(f"{out}.2").read_text()
  from safetensors.numpy import load_file
  _assert_same(_model(Path(straight.workdir)), load_file(f"{out}.safetensors"))


def test_an_unrestorable_checkpoint_is_set_aside_and_the_one_before_resumes(tiny, tmp_path):
  cfg, path = _config(tiny, tmp_path, "run", steps=6, every=2)
  assert _wdjax("distill", path).returncode == 0
  work = Path(cfg.workdir) / "distill"
  uninterrupted = _model(Path(cfg.workdir))
  # a run killed after writing its last checkpoint, whose files were then damaged
  shutil.rmtree(work / "model")
  (work / "results.json").unlink()
  for f in (work / "checkpoints" / "6" / "state").rglob("*"):
    if f.is_file() and f.stat().st_size > 1000:
      f.write_bytes(b"\0" * 64)
  proc = _wdjax("distill", path)
  assert proc.returncode == 0, proc.stderr
  assert "Traceback" not in proc.stderr
  assert "checkpoints/6 cannot be restored" in proc.stdout and "set aside" in proc.stdout
  assert "resuming from step 4" in proc.stdout
  assert (work / "checkpoints.unrestorable" / "6" / "state").is_dir()  # moved, not deleted
  _assert_same(uninterrupted, _model(Path(cfg.workdir)))

  # when none restores, one line says so and nothing is deleted
  for step in _steps(work / "checkpoints"):
    for f in (work / "checkpoints" / str(step) / "state").rglob("*"):
      if f.is_file() and f.stat().st_size > 1000:
        f.write_bytes(b"\0" * 64)
  proc = _wdjax("export", path)
  assert proc.returncode == 2
  assert proc.stderr.count("\n") == 1 and "no checkpoint of" in proc.stderr, proc.stderr
  assert len(list((work / "checkpoints.unrestorable").iterdir())) == 4


def test_sigterm_checkpoints_the_current_step_and_the_rerun_matches(tiny, tmp_path):
  # checkpoints only at the end: the one the signal writes is the only one mid-run
  straight, straight_path = _config(tiny, tmp_path, "straight", steps=60, every=0)
  assert _wdjax("distill", straight_path).returncode == 0
  cfg, path = _config(tiny, tmp_path, "run", steps=60, every=0)
  proc = subprocess.Popen([sys.executable, "-m", "wdjax", "distill", str(path)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics = Path(cfg.workdir) / "distill" / "metrics.jsonl"
  deadline = time.time() + 300
  while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
    assert proc.poll() is None and time.time() < deadline, proc.communicate()
    time.sleep(0.02)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate()
  assert proc.returncode == 128 + signal.SIGTERM, err
  lines = [l for l in err.splitlines() if l.strip()]
  assert len(lines) == 1 and "stopped by SIGTERM after step" in lines[0], err
  (saved,) = _steps(Path(cfg.workdir) / "distill" / "checkpoints")
  assert 2 <= saved < 60 and f"after step {saved} of 60" in lines[0]

  rerun = _wdjax("distill", path)
  assert rerun.returncode == 0, rerun.stderr
  assert f"resuming from step {saved}" in rerun.stdout
  _assert_same(_model(Path(straight.workdir)), _model(Path(cfg.workdir)))
