"""The metric writers: metrics.jsonl, and Weights & Biases (offline mode, no network)."""

import sys

import pytest

from wdjax.errors import WdjaxError
from wdjax.train.metrics import MetricWriter, read


def test_wandb_logs_each_phase_as_its_run_and_a_resumed_phase_reopens_it(tmp_path, monkeypatch):
  wandb = pytest.importorskip("wandb")
  monkeypatch.setenv("WANDB_MODE", "offline")
  monkeypatch.setenv("WANDB_SILENT", "true")
  phase = tmp_path / "run" / "distill"
  writer = MetricWriter(phase, wandb="wdjax-test", config={"seed": 3})
  run_id = writer.wandb.id
  for step in (2, 4):
    writer.write(step, "distill", {"loss": 1.0 / step, "accuracy": 0.5})
  writer.write(4, "distill/eval", {"val_accuracy": 0.75})
  assert writer.wandb.summary["distill/loss"] == 0.25
  assert writer.wandb.summary["distill/eval/val_accuracy"] == 0.75
  assert writer.wandb.config["seed"] == 3
  writer.close()
  assert [r["step"] for r in read(phase)] == [2, 4, 4]
  assert list((phase / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
  # the same phase directory is the same W&B run (resumed, not a second one)
  again = MetricWriter(phase, wandb="wdjax-test")
  assert again.wandb.id == run_id
  again.write(6, "distill", {"loss": 0.125})
  assert again.wandb.summary["distill/loss"] == 0.125
  again.close()
  del wandb


def test_wandb_without_the_package_is_one_clear_error(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
  with pytest.raises(WdjaxError, match=r"log.wandb=true needs the wandb package: pip install wandb"):
    MetricWriter(tmp_path, wandb="wdjax")
