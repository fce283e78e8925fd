"""The CLI as a user drives it: finetune -> distill -> export -> eval, and its errors."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from test_train import _write_config
from wdjax import generators

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _wdjax(*args, env=None):
  return subprocess.run([sys.executable, "-m", "wdjax", *map(str, args)], capture_output=True,
                        text=True, env=env)


def test_finetune_distill_export_eval(tiny, tmp_path):
  """A tiny pipeline; the exported student loads in transformers with wdjax's logits."""
  cfg = tiny()
  cfg = dataclasses.replace(cfg, teacher=dataclasses.replace(cfg.teacher, path=""),
                            log=dataclasses.replace(cfg.log, tensorboard=True))
  path = _write_config(tmp_path / "cfg.py", cfg)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  proc = _wdjax("pipeline", path, "--set", "mesh.data=2", env=env)
  assert proc.returncode == 0, proc.stderr
  assert "| student 2x64, CE only, same steps |" in proc.stdout
  # the weight-transfer student beside KD and CE, with its own phase and learning rate
  assert "| student 2x64, weight selection + KD (weight transfer) |" in proc.stdout
  transfer = json.loads((Path(cfg.workdir) / "distill_kd_selection" / "results.json").read_text())
  assert transfer["steps"] == json.loads((Path(cfg.workdir) / "distill" / "results.json").read_text())["steps"]
  work = Path(cfg.workdir)
  teacher = json.loads((work / "finetune" / "results.json").read_text())
  assert teacher["steps"] == 4 and teacher["trainable_params"] > 22e6
  assert list((work / "distill" / "tensorboard").iterdir())

  # twice: the second run loads every program it runs from the compilation cache
  logged = dict(os.environ, JAX_LOG_COMPILES="1")
  results = json.loads((work / "distill" / "results.json").read_text())
  for _ in range(2):
    proc = _wdjax("eval", path, "--split", "test", env=logged)
    assert proc.returncode == 0, proc.stderr
    scores = json.loads(proc.stdout)
    assert scores["test_accuracy"] == pytest.approx(results["test_accuracy"], abs=1e-6)
  assert "Persistent compilation cache hit" in proc.stderr
  assert "PERSISTENT COMPILATION CACHE MISS" not in proc.stderr

  before = (work / "distill" / "model" / "model.safetensors").read_bytes()
  assert _wdjax("export", path).returncode == 0
  assert (work / "distill" / "model" / "model.safetensors").read_bytes() == before

  model_dir = work / "distill" / "model"
  tok = transformers.AutoTokenizer.from_pretrained(model_dir)
  ref = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
  assert ref.config.id2label == {0: "rotten", 1: "fresh"}
  enc = tok(["a gorgeous, witty movie", "boring"], padding=True, return_tensors="pt")
  with torch.no_grad():
    want = ref(**enc).logits.numpy()
  import jax.numpy as jnp
  from flax import nnx
  from wdjax.models import bert, hf
  s_cfg, params, _ = hf.load(model_dir)
  got = nnx.merge(nnx.split(bert.build(s_cfg))[0], params)(
      jnp.asarray(enc["input_ids"].numpy()), jnp.asarray(enc["attention_mask"].numpy()))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)


def test_distill_without_a_teacher_explains_what_to_do(tiny, tmp_path):
  cfg = tiny()
  path = _write_config(tmp_path / "cfg.py", dataclasses.replace(
      cfg, teacher=dataclasses.replace(cfg.teacher, path=str(tmp_path / "nowhere"))))
  proc = _wdjax("distill", path)
  assert proc.returncode == 2
  assert proc.stderr.strip() == (f"wdjax: error: no task teacher at {tmp_path / 'nowhere'}; run "
                                 "`wdjax finetune CONFIG` first or set teacher.path to a "
                                 "fine-tuned HF model directory")


def test_corrupt_teacher_is_exit_2(tiny, tmp_path, task_teacher):
  bad = tmp_path / "teacher"
  bad.mkdir()
  for f in task_teacher.iterdir():
    (bad / f.name).write_bytes(f.read_bytes()[:1000] if f.name == "model.safetensors" else f.read_bytes())
  cfg = tiny()
  path = _write_config(tmp_path / "cfg.py", dataclasses.replace(
      cfg, teacher=dataclasses.replace(cfg.teacher, path=str(bad))))
  proc = _wdjax("distill", path)
  assert proc.returncode == 2
  assert proc.stderr.count("\n") == 1 and "not a readable safetensors file" in proc.stderr


def test_corrupt_checkpoint_is_exit_2_and_names_the_phase(tiny, tmp_path):
  cfg = tiny()
  path = _write_config(tmp_path / "cfg.py", dataclasses.replace(
      cfg, distill=dataclasses.replace(cfg.distill, steps=4)))
  assert _wdjax("distill", path).returncode == 0
  ckpt = Path(cfg.workdir) / "distill" / "checkpoints" / "4" / "state"
  for f in ckpt.rglob("*"):
    if f.is_file() and f.stat().st_size > 1000:
      f.write_bytes(b"\0" * 100)
  proc = _wdjax("export", path)
  assert proc.returncode == 2
  # The only checkpoint is set aside (renamed, not deleted); with none left, one line says so.
  phase = Path(cfg.workdir) / "distill"
  assert proc.stderr.count("\n") == 1 and "no checkpoint of" in proc.stderr
  assert str(phase) in proc.stderr and "steps 4" in proc.stderr
  assert not ckpt.parent.exists()
  assert (phase / "checkpoints.unrestorable" / "4" / "state").is_dir()


def test_two_phase_eval_and_export_reach_phase_2(tiny, tmp_path, capsys):
  """WD trains its generator in `distill_wd` and the student in `distill_wd_phase2`: `eval`
  scores the final student, not phase 1's, and `export` writes phase 2's model too, by default
  or by its name, without calling a healthy checkpoint corrupt."""
  import shutil
  from wdjax import cli
  from wdjax.train import run as run_lib
  cfg = tiny(method=generators.section("wd", mode="lean", init="identity"))
  path = _write_config(tmp_path / "cfg.py", cfg)
  result = run_lib.distill(cfg, log=lambda *_: None)
  work = Path(cfg.workdir)
  final = work / "distill_wd_phase2" / "model"
  assert cli.run(["eval", str(path), "--split", "test"]) == 0
  scores = json.loads(capsys.readouterr().out)
  assert scores["model"] == str(final)
  assert scores["test_accuracy"] == pytest.approx(result["test_accuracy"], abs=1e-6)
  want = {p: (work / p / "model" / "model.safetensors").read_bytes() for p in ("distill_wd", "distill_wd_phase2")}
  for phase in ([], ["--phase", "distill_wd_phase2"]):
    shutil.rmtree(final)
    assert cli.run(["export", str(path), *phase]) == 0
    for p, data in want.items():
      assert (work / p / "model" / "model.safetensors").read_bytes() == data, (phase, p)
