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
  impls = ["wdjax", "jax-handwritten", "torch-eager"]
  assert speed.main(["--preset", "cpu", "--methods", "kd", "wd", "--batches", "4", "--impls", *impls,
                     "--out", str(tmp_path), "--no-plot"]) == 0
  result = json.loads((tmp_path / "speed_cpu.json").read_text())
  assert not result["skipped"]
  rows = {(r["method"], r["impl"]): r for r in result["rows"]}
  assert set(rows) == {("kd", "wdjax"), ("kd", "jax-handwritten"), ("kd", "torch-eager"),
                       ("wd", "wdjax"), ("wd", "torch-eager")}
  for method in ("kd", "wd"):
    want = rows[(method, "wdjax")]["first_loss"]
    for (m, impl), r in rows.items():
      if m == method:
        assert r["first_loss"] == pytest.approx(want, rel=1e-4), (method, impl)
        assert r["step_ms"] > 0 and r["tokens_per_step"] == 4 * speed.PRESETS["cpu"]["seq"]
  # WD's student (random maps of the teacher) is not KD's (its own draw): two computations
  assert abs(rows[("wd", "wdjax")]["first_loss"] - rows[("kd", "wdjax")]["first_loss"]) > 1e-4
  assert rows[("wd", "wdjax")]["hlo_kernels"] > rows[("kd", "wdjax")]["hlo_kernels"] > 0
  table = (tmp_path / "speed_cpu.md").read_text()
  wd = next(line for line in table.splitlines() if line.startswith("| wd | 128 | wdjax |"))
  cells = [c.strip() for c in wd.strip("|").split("|")]
  assert cells[9].endswith("x")  # step / KD, this run's ratio
  assert float(cells[-1]) == pytest.approx(rows[("wd", "wdjax")]["first_loss"], abs=1e-5)
