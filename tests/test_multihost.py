"""Multi-process training on localhost with `jax.distributed` (gloo collectives on CPU): 2 and 4
processes train what one process trains, and checkpoints move between process counts."""

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from wdjax.config import MeshConfig

DEVICES = 8  # in every run, split evenly over its processes


def _port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _write_config(path: Path, cfg) -> Path:
  path.write_text("from wdjax.config import *\n\n\ndef get_config():\n  return " + repr(cfg) + "\n")
  return path


def _launch(n: int, args: list[str]) -> list[str]:
  """Run `wdjax ARGS` in n processes (DEVICES // n CPU devices each); their stdouts."""
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES // n}")
  extra = [] if n == 1 else ["--coordinator", f"127.0.0.1:{_port()}", "--num-processes", str(n)]
  procs = [subprocess.Popen([sys.executable, "-m", "wdjax", *args, *extra,
                             *([] if n == 1 else ["--process-id", str(i)])],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
           for i in range(n)]
  outs = [p.communicate(timeout=900) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  return [out for out, _ in outs]


def _params(model_dir: Path) -> dict:
  return load_file(str(model_dir / "model.safetensors"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, task_teacher):
  """KD, 8 steps on 8 devices: by 1 process, 2 processes of 4 devices, 4 processes of 2."""
  from conftest import tiny_config
  tmp = tmp_path_factory.mktemp("multihost")
  cfg = tiny_config(tmp / "one", task_teacher, mesh=MeshConfig(data=-1))
  one = _write_config(tmp / "one.py", cfg)
  two = _write_config(tmp / "two.py", dataclasses.replace(  # with a profile of step 6
      cfg, workdir=str(tmp / "two"), log=dataclasses.replace(cfg.log, profile_steps=1)))
  four = _write_config(tmp / "four.py", dataclasses.replace(cfg, workdir=str(tmp / "four")))
  _launch(1, ["distill", str(one)])
  _launch(4, ["distill", str(four)])
  outs = _launch(2, ["distill", str(two)])
  return tmp, outs


def test_two_and_four_processes_train_what_one_process_trains(runs):
  tmp, outs = runs
  a = _params(tmp / "one" / "distill" / "model")
  for name in ("two", "four"):
    b = _params(tmp / name / "distill" / "model")
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_allclose(b[k], a[k], rtol=1e-4, atol=1e-5, err_msg=f"{name}: {k}")
  # Only process 0 logs and exports (gloo's own connection lines aside: its threads can split one
  # of them across two lines under load, so its fragments are recognised by their words too).
  gloo = lambda ln: "[Gloo]" in ln or "peer ranks" in ln
  ours = [[ln for ln in out.splitlines() if not gloo(ln)] for out in outs]
  assert any("test accuracy" in ln for ln in ours[0]) and ours[1] == []
  # each process traced its own host, into its own folder
  profile = tmp / "two" / "distill" / "profile"
  assert sorted(p.name for p in profile.iterdir()) == ["process_0", "process_1"]
  assert all(list((profile / p).rglob("*.xplane.pb")) for p in ("process_0", "process_1"))
  assert all(json.loads((profile / p / "summary.json").read_text())["device_ms"] > 0
             for p in ("process_0", "process_1"))  # and summarised it


@pytest.mark.parametrize("n", [4, 1])
def test_a_checkpoint_written_by_two_processes_restores_in_four_and_in_one(runs, n):
  tmp, _ = runs
  model = tmp / "two" / "distill" / "model"
  written = _params(model)
  shutil.rmtree(model)
  _launch(n, ["export", str(tmp / "two.py"), "--phase", "distill"])
  restored = _params(model)
  assert restored.keys() == written.keys()
  for k in written:
    np.testing.assert_array_equal(restored[k], written[k], err_msg=k)


def test_launchers_start_one_process_per_host_with_the_coordinator(tmp_path):
  root = Path(__file__).resolve().parents[1]
  hosts = tmp_path / "hosts.txt"
  hosts.write_text("# head node first\ngpu0.example\n\nuser@gpu1.example\ngpu2.example\n")
  out = subprocess.run(["bash", str(root / "scripts/gpu_hosts/launch.sh"), "--hosts", str(hosts),
                        "--dry-run", "--", "wdjax", "distill", "ws:gpu"],
                       capture_output=True, text=True, check=True).stdout.splitlines()
  assert len(out) == 3
  for i, (line, host) in enumerate(zip(out, ["gpu0.example", "user@gpu1.example", "gpu2.example"])):
    assert line.startswith(f"ssh {host} ") and line.endswith(f"--process-id\\ {i}")
    assert "--coordinator\\ gpu0.example:12355\\ --num-processes\\ 3" in line
  tpu = subprocess.run(["bash", str(root / "scripts/tpu_pod/launch.sh"), "--name", "pod", "--zone",
                        "us-central2-b", "--dry-run", "--", "wdjax", "distill", "ws:gpu"],
                       capture_output=True, text=True, check=True).stdout.splitlines()
  assert tpu[0].startswith("gcloud compute tpus tpu-vm create pod --zone us-central2-b")
  assert all("--worker=all" in line for line in tpu[1:]) and tpu[-1].endswith("--distributed ")
  bad = subprocess.run(["bash", str(root / "scripts/tpu_pod/launch.sh"), "--name", "pod", "--",
                        "rm", "-rf", "/"], capture_output=True, text=True)
  assert bad.returncode == 2 and "need --name, --zone" in bad.stderr
