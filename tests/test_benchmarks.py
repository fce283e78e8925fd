"""The speed harness (benchmarks/speed.py) on its cpu preset: every implementation of a method
times the same computation, and the table says so. Timings are not asserted (benchmarks report
them); what the harness must not lose is that its rows are comparable."""

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import speed  # noqa: E402


def test_speed_harness_rows_start_from_the_same_loss_in_every_implementation(tmp_path):
  impls = ["wdjax", "jax-handwritten", "torch-eager", "wdjax-cached"]
  assert speed.main(["--preset", "cpu", "--methods", "kd", "wd", "--batches", "4", "--impls", *impls,
                     "--out", str(tmp_path), "--no-plot", "--trace", str(tmp_path / "trace")]) == 0
  result = json.loads((tmp_path / "speed_cpu.json").read_text())
  assert not result["skipped"]
  rows = {(r["method"], r["impl"]): r for r in result["rows"]}
  assert set(rows) == {("kd", "wdjax"), ("kd", "jax-handwritten"), ("kd", "torch-eager"),
                       ("kd", "wdjax-cached"), ("wd", "wdjax"), ("wd", "torch-eager")}
  for method in ("kd", "wd"):
    want = rows[(method, "wdjax")]["first_loss"]
    for (m, impl), r in rows.items():
      if m == method:
        assert r["first_loss"] == pytest.approx(want, rel=1e-4), (method, impl)
        assert r["step_ms"] > 0 and r["tokens_per_step"] == 4 * speed.PRESETS["cpu"]["seq"]
  # WD's student (random maps of the teacher) is not KD's (its own draw): two computations
  assert abs(rows[("wd", "wdjax")]["first_loss"] - rows[("kd", "wdjax")]["first_loss"]) > 1e-4
  assert rows[("wd", "wdjax")]["hlo_kernels"] > rows[("kd", "wdjax")]["hlo_kernels"] > 0
  # KD on teacher logits computed once (wdjax's default): the same loss without the teacher's
  # forward pass in the step, whose FLOPs its row no longer counts
  cached, kd = rows[("kd", "wdjax-cached")], rows[("kd", "wdjax")]
  assert cached["hlo_kernels"] < kd["hlo_kernels"] and cached["flops_per_step"] < kd["flops_per_step"] / 2
  table = (tmp_path / "speed_cpu.md").read_text()
  wd = next(line for line in table.splitlines() if line.startswith("| wd | 128 | wdjax |"))
  cells = [c.strip() for c in wd.strip("|").split("|")]
  assert cells[9].endswith("x")  # step / KD, this run's ratio
  assert float(cells[-1]) == pytest.approx(rows[("wd", "wdjax")]["first_loss"], abs=1e-5)

  # --trace: every job's profiled step by kind of operation, JAX's ops found in the compiled step
  profiles = json.loads((tmp_path / "speed_cpu_profile.json").read_text())
  assert set(profiles) == {f"{m} {i} 128" for m, i in rows}
  for job, p in profiles.items():
    assert sum(p["categories"].values()) == pytest.approx(p["device_ms"]) and p["device_ms"] > 0
    assert p["categories"]["matmul"] > 0, job
    if "torch" not in job:  # XLA's attention on a CPU is matrix products and reductions
      assert all(r["shape"] for r in p["top"]) and p["categories"]["attention"] == 0, job
  assert profiles["kd torch-eager 128"]["categories"]["attention"] > 0  # SDPA
  assert rows[("kd", "wdjax")]["profile_ms"] == profiles["kd wdjax 128"]["categories"]
  summary = (tmp_path / "speed_cpu_profile.md").read_text()
  assert "| kd wdjax 128 |" in summary
  gap = next(line for line in summary.splitlines() if line.startswith("| kd | 128 | torch-eager |"))
  total = float(gap.split("|")[4])  # wdjax's device time minus torch's, per step
  want = profiles["kd wdjax 128"]["device_ms"] - profiles["kd torch-eager 128"]["device_ms"]
  assert total == pytest.approx(want, abs=0.01)


def test_speed_harness_with_dropout_times_the_training_step_with_its_draws(tmp_path):
  import torch
  from benchmarks.torch_ref.model import BertShape, classifier_logits, init_params
  # torch_ref's dropout: off by default, at every site with dropout=p (train mode, new draws)
  shape = BertShape(2, 32, 4, 64, vocab_size=100, max_positions=16)
  p = init_params(shape, torch.Generator().manual_seed(0))
  ids, mask = torch.randint(3, 100, (4, 16)), torch.ones(4, 16, dtype=torch.int64)
  plain = classifier_logits(p, shape, ids, mask)
  torch.testing.assert_close(classifier_logits(p, shape, ids, mask, dropout=0.0), plain)
  torch.manual_seed(0)
  one, two = (classifier_logits(p, shape, ids, mask, dropout=0.1) for _ in range(2))
  assert (one - plain).abs().max() > 1e-3 and (one - two).abs().max() > 1e-3

  assert speed.main(["--preset", "cpu", "--methods", "kd", "--batches", "4", "--dropout", "0.1",
                     "--impls", "wdjax", "jax-handwritten", "torch-eager", "--out", str(tmp_path),
                     "--no-plot"]) == 0
  result = json.loads((tmp_path / "speed_cpu.json").read_text())
  assert result["info"]["dropout"] == 0.1 and not result["skipped"]
  rows = {r["impl"]: r for r in result["rows"]}
  # the library-overhead reference draws the same dropout masks (the same key per step)
  assert rows["jax-handwritten"]["first_loss"] == pytest.approx(rows["wdjax"]["first_loss"], rel=1e-6)
  assert "dropout 0.1" in (tmp_path / "speed_cpu.md").read_text()
  # on a GPU the teacher keeps cuDNN's fused attention and the student's dropout runs in XLA
  gpu = dict(speed.PRESETS["gpu"], dropout=0.1)
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(speed.layers, "attention_implementation", lambda cfg: "cudnn")
    assert speed.attention_of("wdjax", gpu) == "cudnn, student xla"
    assert speed.attention_of("wdjax", speed.PRESETS["gpu"]) == "cudnn"


def test_torch_gpu_profile_counts_kernels_not_the_labels_spanning_them():
  # key_averages() rows as torch.profiler gives them on a GPU: the optimizer's record_function
  # label carries the device time of the fused AdamW kernel it launched, which has its own row
  from types import SimpleNamespace as Row
  cuda = "DeviceType.CUDA"
  rows = [Row(key="nvjet_sm90_tst_256x128", self_device_time_total=500.0, count=2, device_type=cuda),
          Row(key="multi_tensor_apply_kernel<FusedAdamMathFunctor>", self_device_time_total=100.0,
              count=2, device_type=cuda),
          Row(key="Optimizer.step#AdamW.step", self_device_time_total=100.0, count=2, device_type=cuda),
          Row(key="ProfilerStep#1", self_device_time_total=600.0, count=1, device_type=cuda),
          Row(key="aten::mm", self_device_time_total=0.0, count=2, device_type="DeviceType.CPU")]
  summary = speed.torch_summary(rows, steps=2)
  assert summary["device_ms"] == pytest.approx(0.3)  # (500 + 100) µs over 2 steps
  assert summary["categories"]["matmul"] == pytest.approx(0.25) and summary["categories"]["other"] == 0
  assert summary["calls"] == 2


def test_xla_flags_sweep_times_each_variant_in_its_own_process(tmp_path):
  from benchmarks import xla_flags
  assert xla_flags.flags_of("xla_a=1 --xla_b=2") == "--xla_a=1 --xla_b=2"
  assert xla_flags.main(["--preset", "cpu", "--batches", "4", "--out", str(tmp_path),
                         "--variants", "", "xla_cpu_use_xnnpack=false", "xla_no_such_flag=1"]) == 0
  results = json.loads((tmp_path / "xla_flags_cpu.json").read_text())["results"]
  assert [r["variant"] for r in results] == ["", "--xla_cpu_use_xnnpack=false", "--xla_no_such_flag=1"]
  base, other = (r["rows"][0] for r in results[:2])
  assert base["method"] == "kd" and base["step_ms"] > 0 and other["step_ms"] > 0
  assert other["first_loss"] == pytest.approx(base["first_loss"], rel=1e-5)  # the same maths
  # the variant reached its process's XLA, which refused an unknown flag; the sweep went on
  assert "xla_no_such_flag" in results[2]["error"]
  table = (tmp_path / "xla_flags_cpu.md").read_text()
  assert "| (baseline) | kd | 128 |" in table and "1.00x" in table and "failed: " in table


def test_quality_update_replaces_only_the_rows_run(tmp_path):
  """`quality/run.py --update`: the re-run rows replace theirs, in the task's row order, the
  others and the file's info stay; another teacher or other seeds are refused."""
  from benchmarks.quality import run as quality
  row = lambda acc: {"test_mean": acc, "runs": []}
  path = tmp_path / "results_cpu.json"
  info = {"teacher_test": 82.58, "seeds": [0, 1, 2], "latency_ms": {"teacher": {"1": 6.1}}}
  path.write_text(json.dumps({"info": info, "rows": {"kd": row(77.3), "kd-384": row(81.6), "opdf": row(81.1)}}))
  rows, kept = quality.updated(path, {"opdf": row(80.0), "kd-384": row(81.0)}, quality.METHODS, 82.58, [0, 1, 2])
  assert list(rows) == ["kd", "kd-384", "opdf"] and kept == info
  assert [r["test_mean"] for r in rows.values()] == [77.3, 81.0, 80.0]
  for teacher, seeds in ((83.18, [0, 1, 2]), (82.58, [0])):
    with pytest.raises(SystemExit, match="re-run every row"):
      quality.updated(path, {"opdf": row(80.0)}, quality.METHODS, teacher, seeds)


def test_torch_can_compute_the_last_layer_at_the_pooled_token_as_wdjax(tmp_path):
  """`--torch-first-token`: torch_ref does wdjax's FLOPs (the last layer at the pooled token
  only) and still starts from wdjax's loss; the table says which work torch did."""
  import torch
  from benchmarks.torch_ref import model as tmodel
  shape = tmodel.BertShape(2, 32, 4, 64, 300, 16)
  p = tmodel.init_params(shape, torch.Generator().manual_seed(0))
  ids, mask = torch.randint(3, 300, (3, 16)), torch.ones(3, 16, dtype=torch.int32)
  mask[1, 9:] = 0
  full = tmodel.classifier_logits(p, shape, ids, mask)
  first = tmodel.classifier_logits(p, shape, ids, mask, first_token_last_layer=True)
  torch.testing.assert_close(first, full, rtol=1e-5, atol=1e-6)
  assert speed.main(["--preset", "cpu", "--methods", "kd", "--batches", "4", "--impls", "wdjax",
                     "torch-eager", "--torch-first-token", "--out", str(tmp_path), "--no-plot"]) == 0
  result = json.loads((tmp_path / "speed_cpu.json").read_text())
  losses = {r["impl"]: r["first_loss"] for r in result["rows"]}
  assert losses["torch-eager"] == pytest.approx(losses["wdjax"], rel=1e-4)
  assert result["info"]["torch_first_token"] is True
  assert "both sides do the same FLOPs" in (tmp_path / "speed_cpu.md").read_text()
