"""The training step, sharding, checkpoints, resume, and errors during training."""

import dataclasses
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P
import pytest
from flax import nnx

from conftest import tree_allclose
from wdjax import generators, losses
from wdjax.config import KDConfig, OptimConfig
from wdjax.data import pipeline
from wdjax.data.tokenize import TextEncoder
from wdjax.generators import Identity, OptimizerHooks, StudentSpec
from wdjax.models import bert, hf
from wdjax.train import checkpoint as ckpt_lib, mesh as mesh_lib, run as run_lib, step as step_lib

STUDENT = bert.EncoderConfig(vocab_size=30522, hidden_size=64, num_layers=2, num_heads=4,
                             intermediate_size=128)


def test_hinton_loss_matches_numpy():
  rng = np.random.default_rng(0)
  zs, zt = rng.normal(size=(5, 3)), rng.normal(size=(5, 3)) * 2
  y, w, t, a = np.array([0, 2, 1, 1, 0]), np.array([1, 1, 1, 1, 0.0]), 2.0, 0.7
  soft = lambda z: np.exp(z - z.max(1, keepdims=True)) / np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True)
  ps, pt = soft(zs / t), soft(zt / t)
  kl = (pt * (np.log(pt) - np.log(ps))).sum(1)
  ce = -np.log(soft(zs)[np.arange(5), y])
  want = a * t * t * (kl * w).sum() / w.sum() + (1 - a) * (ce * w).sum() / w.sum()
  got, parts = losses.hinton(jnp.asarray(zs), jnp.asarray(zt), jnp.asarray(y), jnp.asarray(w),
                             temperature=t, alpha=a)
  np.testing.assert_allclose(float(got), want, rtol=1e-6)


@pytest.fixture(scope="module")
def kd_setup(task_teacher):
  """Real teacher (MiniLM + head), a 2x64 student, two real batches of Rotten Tomatoes text."""
  t_cfg, t_params, _ = hf.load(task_teacher)
  texts = ["a gorgeous, witty, seductive movie.", "the plot is nothing but boilerplate clichés",
           "an unforgettable performance", "dull and overlong", "it works", "i hated it",
           "a triumph of style over substance, and the style is not much", "wonderful"] * 2
  split = TextEncoder(task_teacher, 32, 0).encode(texts, [1, 0, 1, 0, 1, 0, 0, 1] * 2)
  batches = [pipeline.make_batch(split, np.arange(i, i + 8), 32) for i in (0, 8)]
  init = nnx.to_pure_dict(nnx.state(bert.build(STUDENT, seed=1)))
  return t_cfg, t_params, init, batches


def _run_steps(kd_setup, mesh, fsdp=False, n_steps=2):
  t_cfg, t_params, init, batches = kd_setup
  gen = Identity()
  tx = step_lib.make_optimizer(OptimConfig(lr=1e-3, warmup_ratio=0.0), 10, init)
  step = step_lib.make_train_step(
      generator=gen, student_apply=step_lib.classifier_apply(nnx.split(bert.build(STUDENT))[0]),
      teacher_apply=step_lib.classifier_apply(nnx.split(bert.build(t_cfg))[0]),
      tx=tx, kd=KDConfig(temperature=2.0, alpha=0.5), seed=0)
  # jitted, so that the donated state owns fresh buffers (never the fixture's arrays)
  state0 = jax.jit(lambda p: step_lib.init_state(gen, tx, 0, None, StudentSpec(STUDENT, p)))(init)
  state_sh = mesh_lib.param_shardings(state0, mesh)
  teacher_sh = mesh_lib.param_shardings(t_params, mesh, fsdp)
  state = jax.device_put(state0, state_sh)
  teacher = jax.device_put(t_params, teacher_sh)
  jitted = jax.jit(step, in_shardings=(state_sh, teacher_sh, mesh_lib.batch_sharding(mesh)),
                   out_shardings=(state_sh, mesh_lib.replicated(mesh)), donate_argnums=0)
  for i in range(n_steps):
    batch = mesh_lib.put_batch({k: v for k, v in batches[i % 2].items() if k != "index"}, mesh)
    state, metrics = jitted(state, teacher, batch)
  return jax.device_get(state), jax.device_get(metrics), teacher


def test_sharded_step_equals_single_device_step(kd_setup):
  assert jax.device_count() == 8
  one, m1, _ = _run_steps(kd_setup, mesh_lib.make_mesh(1, 1, jax.devices()[:1]))
  for data, model, fsdp in [(8, 1, False), (4, 2, True)]:
    many, m8, _ = _run_steps(kd_setup, mesh_lib.make_mesh(data, model), fsdp)
    assert tree_allclose(one["params"], many["params"], rtol=1e-4, atol=1e-5), (data, model)
    np.testing.assert_allclose(m1["loss"], m8["loss"], rtol=1e-5)
  # the step moved the student: equality is not trivially true
  assert not tree_allclose(one["params"], kd_setup[2])


def test_tensor_parallel_rules_shard_each_layer_of_a_stacked_leaf():
  mesh = mesh_lib.make_mesh(4, 2)
  tree = {"student": {"encoder": {"layers": {"attn": {"q": {"kernel": np.zeros((3, 8, 8), np.float32)}}},
                                  "layer_0": {"mlp": {"down": {"kernel": np.zeros((8, 4), np.float32)}}}}}}
  sh = mesh_lib.param_shardings(tree, mesh)
  assert sh["student"]["encoder"]["layers"]["attn"]["q"]["kernel"].spec == P(None, None, "model")
  assert sh["student"]["encoder"]["layer_0"]["mlp"]["down"]["kernel"].spec == P("model", None)


def test_teacher_is_neither_donated_nor_changed(kd_setup):
  _, _, teacher = _run_steps(kd_setup, mesh_lib.make_mesh(4, 2), fsdp=True, n_steps=3)
  for got, want in zip(jax.tree_util.tree_leaves(teacher), jax.tree_util.tree_leaves(kd_setup[1])):
    assert not got.is_deleted()
    np.testing.assert_array_equal(np.asarray(got), want)


def test_checkpoint_written_on_4x2_restores_on_2x4_and_8x1(kd_setup, tmp_path):
  mesh = mesh_lib.make_mesh(4, 2)
  state, _, _ = _run_steps(kd_setup, mesh, n_steps=1)
  state_sh = mesh_lib.param_shardings(state, mesh)
  ck = ckpt_lib.Checkpointer(tmp_path, every=1, keep=2)
  ck.save(1, jax.device_put(state, state_sh), {"note": "4x2"})
  ck.close()
  kernel = ("params", "encoder", "layer_0", "attn", "q", "kernel")
  for shape in [(2, 4), (8, 1)]:
    new_mesh = mesh_lib.make_mesh(*shape)
    target = ckpt_lib.abstract_like(state, mesh_lib.param_shardings(state, new_mesh))
    restored, meta = ckpt_lib.Checkpointer(tmp_path, every=1, keep=2).restore(1, target)
    assert meta["note"] == "4x2"
    assert tree_allclose(restored, state, rtol=0, atol=0)
    leaf = restored
    for k in kernel:
      leaf = leaf[k]
    assert leaf.sharding.mesh.shape == dict(zip(("data", "model"), shape))
    if shape == (2, 4):
      assert leaf.sharding.spec == jax.sharding.PartitionSpec(None, "model")


def test_distill_trains_resumes_and_exports(tiny):
  cfg = tiny()
  cfg = dataclasses.replace(cfg, log=dataclasses.replace(cfg.log, profile_steps=2))
  first = run_lib.distill(cfg, log=lambda *_: None)
  out = Path(cfg.workdir) / "distill"
  assert first["steps"] == 8 and (out / "model" / "model.safetensors").exists()
  # the profile of steps 6-7: a trace of the jitted training step
  (trace,) = (out / "profile").rglob("*.trace.json.gz")
  events = json.loads(gzip.decompress(trace.read_bytes()))["traceEvents"]
  names = [e.get("name", "") for e in events]  # "PjitFunction(step)" on a CPU host
  assert sum("jit" in n.lower() and "(step)" in n for n in names) >= 2
  # and its summary: device time per step by kind of operation, every costly op found in the
  # compiled step (its shape known), the matrix products among them
  summary = json.loads((out / "profile" / "summary.json").read_text())
  assert summary["steps"] == 2 and summary["device_ms"] > 0
  assert sum(summary["categories"].values()) == pytest.approx(summary["device_ms"])
  assert summary["categories"]["matmul"] > 0 and all(r["shape"] for r in summary["top"])
  assert "| distill |" in (out / "profile" / "summary.md").read_text()
  assert sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == [4, 8]
  rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows if r["phase"] == "distill"] == [2, 4, 6, 8]
  assert all(np.isfinite(r["loss"]) and r["kd"] > 0 for r in rows if r["phase"] == "distill")
  again = run_lib.distill(cfg, log=lambda *_: None)  # a finished phase is not trained again
  assert again == first
  # as if killed after step 8 was logged but before its checkpoint: the rerun trains 5-8 again
  # from checkpoint 4, to the same result, and the log holds each step once
  shutil.rmtree(out / "checkpoints" / "8")
  resumed = run_lib.distill(cfg, log=lambda *_: None)
  assert resumed == first
  steps = [(r["phase"], r["step"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]
  assert steps == [(p, s) for p, s in steps if p == "distill/eval" or s in (2, 4, 6, 8)]
  assert len(steps) == len(set(steps)) and [s for p, s in steps if p == "distill"] == [2, 4, 6, 8]


def test_changed_settings_do_not_resume_silently(tiny):
  from wdjax.errors import WdjaxError
  cfg = tiny()
  run_lib.distill(dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, steps=4)),
                  log=lambda *_: None)
  changed = dataclasses.replace(cfg, distill=dataclasses.replace(
      cfg.distill, steps=4, optim=dataclasses.replace(cfg.distill.optim, lr=5e-3)))
  with pytest.raises(WdjaxError, match=r"holds a run with other settings \(train.optim.lr: 0.001 -> 0.005\)"):
    run_lib.distill(changed, log=lambda *_: None)


def _cli(args, workdir_cfg: Path, env=None):
  return subprocess.Popen([sys.executable, "-m", "wdjax", *args], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=env)


def _write_config(path: Path, cfg) -> Path:
  """A config file whose get_config() returns exactly `cfg`."""
  section = type(cfg.method)  # defined by its method's module (KD's: wdjax.config)
  path.write_text(f"from wdjax.config import *\nfrom {section.__module__} import {section.__name__}\n\n\n"
                  f"def get_config():\n  return {cfg!r}\n")
  return path


def _final_params(workdir: Path):
  from safetensors.numpy import load_file
  (model,) = workdir.glob("distill*/model/model.safetensors")
  return load_file(str(model))


# KD's run is the same loop and checkpoints without generator state: `slow` keeps CI under 15 min
@pytest.mark.parametrize("method", [pytest.param("kd", marks=pytest.mark.slow), "ws"])
def test_kill_and_rerun_resumes_to_the_same_parameters(tiny, tmp_path, method):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  cfg = tiny(checkpoint=dataclasses.replace(tiny().checkpoint, every=2),
             method=generators.section(method))
  cfg = dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, steps=12))
  straight = _write_config(tmp_path / "straight.py", dataclasses.replace(cfg, workdir=str(tmp_path / "a")))
  killed = _write_config(tmp_path / "killed.py", dataclasses.replace(cfg, workdir=str(tmp_path / "b")))
  assert _cli(["distill", str(straight)], tmp_path, env).wait() == 0

  proc = _cli(["distill", str(killed)], tmp_path, env)
  ckdir = tmp_path / "b" / run_lib.default_phase(cfg) / "checkpoints"
  deadline = time.time() + 300
  while not (ckdir.exists() and any(p.name.isdigit() and int(p.name) >= 4 for p in ckdir.iterdir())):
    assert proc.poll() is None and time.time() < deadline, proc.communicate()
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  steps_left = sorted(int(p.name) for p in ckdir.iterdir() if p.name.isdigit())
  assert steps_left and steps_left[-1] < 12  # really interrupted

  rerun = _cli(["distill", str(killed)], tmp_path, env)
  out, err = rerun.communicate()
  assert rerun.returncode == 0, err
  assert f"resuming from step {steps_left[-1]}" in out
  a, b = _final_params(tmp_path / "a"), _final_params(tmp_path / "b")
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  # the log reads as one run's: the steps trained twice (after the last checkpoint) appear once,
  # with the uninterrupted run's numbers
  logs = [[{k: v for k, v in json.loads(l).items() if k not in ("time", "steps_per_s")}
           for l in (tmp_path / d / run_lib.default_phase(cfg) / "metrics.jsonl").read_text().splitlines()]
          for d in ("a", "b")]
  assert [(r["phase"], r["step"]) for r in logs[1]] == [(r["phase"], r["step"]) for r in logs[0]]
  assert logs[1] == logs[0]


def test_nan_loss_stops_with_one_line_and_keeps_checkpoints(tiny, tmp_path):
  cfg = tiny(checkpoint=dataclasses.replace(tiny().checkpoint, every=1))
  # lr warms up from 0 to 1e30: step 1 is harmless and checkpointed, then the weights explode.
  cfg = dataclasses.replace(cfg, distill=dataclasses.replace(
      cfg.distill, optim=OptimConfig(lr=1e30, warmup_ratio=0.5, clip_norm=0.0)))
  path = _write_config(tmp_path / "nan.py", cfg)
  proc = _cli(["distill", str(path)], tmp_path)
  _, err = proc.communicate()
  assert proc.returncode == 2
  lines = [l for l in err.splitlines() if l.strip()]
  assert len(lines) == 1 and "became nan" in lines[0] and "is kept" in lines[0], err
  ckdir = Path(cfg.workdir) / "distill" / "checkpoints"
  steps = sorted(int(p.name) for p in ckdir.iterdir() if p.name.isdigit())
  assert steps and steps[0] == 1
  ck = ckpt_lib.Checkpointer(ckdir, every=1, keep=3)
  meta = ck.read_meta(steps[-1])
  assert meta["step"] == steps[-1]
  ck.close()


def test_a_second_process_on_the_same_phase_directory_is_refused(tmp_path):
  from wdjax.errors import WdjaxError
  from wdjax.train.checkpoint import PhaseLock
  first = PhaseLock(tmp_path / "distill").acquire()
  # flock is per open file: a second opener conflicts as another process would.
  with pytest.raises(WdjaxError, match=r"distill is in use by wdjax pid \d+"):
    PhaseLock(tmp_path / "distill").acquire()
  PhaseLock(tmp_path / "other").acquire().release()  # other phases are free
  first.release()
  PhaseLock(tmp_path / "distill").acquire().release()  # released: free again


def test_weight_decay_reaches_matrices_only_stacked_or_not():
  """AdamW decays kernels and embeddings, never biases or LayerNorm vectors, also when a
  generator stores them stacked over the layers ([L, d], rank 2: they were decayed)."""
  from wdjax.errors import WdjaxError
  ones = lambda *s: jnp.ones(s, jnp.float32)
  params = {"encoder": {"layers": {"attn": {"q": {"kernel": ones(2, 4, 4), "bias": ones(2, 4)}},
                                   "attn_ln": {"scale": ones(2, 4), "bias": ones(2, 4)}},
                        "embeddings": {"word": {"embedding": ones(10, 4)}, "ln": {"scale": ones(4)}}},
            "pooler": {"kernel": ones(4, 4), "bias": ones(4)}}
  optim = OptimConfig(lr=0.1, schedule="constant", warmup_ratio=0.0, weight_decay=0.5, clip_norm=0.0)
  tx = step_lib.make_optimizer(optim, 10, params)
  updates, _ = tx.update(jax.tree_util.tree_map(jnp.zeros_like, params), tx.init(params), params)
  decayed = {k: bool(np.any(np.asarray(u) != 0)) for k, u in
             ((mesh_lib.path_str(p), u) for p, u in jax.tree_util.tree_leaves_with_path(updates))}
  assert decayed == {"encoder/layers/attn/q/kernel": True, "encoder/layers/attn/q/bias": False,
                     "encoder/layers/attn_ln/scale": False, "encoder/layers/attn_ln/bias": False,
                     "encoder/embeddings/word/embedding": True, "encoder/embeddings/ln/scale": False,
                     "pooler/kernel": True, "pooler/bias": False}
  # frozen paths with a generator's own gradient surgery or lr groups: refused, not a crash
  frozen = dataclasses.replace(optim, frozen=("embeddings/word",))
  with pytest.raises(WdjaxError, match="cannot be combined with this generator's own"):
    step_lib.make_optimizer(frozen, 10, params, OptimizerHooks(lr_factors=jax.tree_util.tree_map(lambda x: 1.0, params)))


def test_macro_f1_is_scikit_learns_and_exposes_a_majority_class_model():
  from sklearn.metrics import f1_score

  from wdjax.train.evaluate import macro_f1, scores
  rng = np.random.default_rng(0)
  for n_classes in (2, 3, 5):
    labels, predicted = rng.integers(0, n_classes, 200), rng.integers(0, n_classes, 200)
    assert macro_f1(predicted, labels) == pytest.approx(f1_score(labels, predicted, average="macro"))
  # 62.6% majority, as the imbalanced task that accuracy alone misjudged: always "0"
  labels = np.array([0] * 626 + [1] * 374)
  logits = np.stack([np.ones(1000), np.zeros(1000)], axis=1)
  got = scores(logits, labels)
  assert got["accuracy"] == pytest.approx(0.626) and got["macro_f1"] == pytest.approx(0.3849, abs=1e-4)


def test_resume_settings_ignore_fields_added_or_removed_since_the_run_started():
  from wdjax.train.phase import settings_diff
  saved = {"data": {"dataset": "bible", "pair": "en-de"}, "mt": {"beam": 4}, "seed": 0}
  now = {"data": {"dataset": "bible", "max_length": 64}, "task": {"beam": 4}, "seed": 0}
  assert settings_diff(saved, now) == []  # pair and mt were removed, max_length and task added
  assert settings_diff(saved, dict(now, seed=1)) == ["seed: 0 -> 1"]
  assert settings_diff(saved, dict(now, data={"dataset": "files"})) == ["data.dataset: 'bible' -> 'files'"]
