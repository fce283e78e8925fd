"""Typed configs, --set overrides and their errors."""

import subprocess
import sys
from pathlib import Path

import pytest

from wdjax import config as config_lib
from wdjax.errors import WdjaxError

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.py"


def test_overrides_are_typed():
  cfg = config_lib.load(QUICKSTART, ["distill.optim.lr=1e-3", "student.num_layers=2",
                                     "log.tensorboard=true", "method.name=kd",
                                     "finetune.optim.frozen=('embeddings/word', 'pooler')",
                                     "distill.epochs=2"])
  assert cfg.distill.optim.lr == 1e-3 and isinstance(cfg.distill.optim.lr, float)
  assert cfg.student.num_layers == 2
  assert cfg.log.tensorboard is True
  assert cfg.finetune.optim.frozen == ("embeddings/word", "pooler")
  assert cfg.distill.epochs == 2.0 and isinstance(cfg.distill.epochs, float)
  assert cfg.finetune.optim.lr != 1e-3  # other sections untouched


def test_unknown_key_names_close_matches():
  with pytest.raises(WdjaxError, match=r"unknown config key 'distill.optim.learning_rate'"):
    config_lib.load(QUICKSTART, ["distill.optim.learning_rate=1e-3"])
  with pytest.raises(WdjaxError, match=r"did you mean distill\.optim\.lr"):
    config_lib.load(QUICKSTART, ["distill.optim.lrr=1e-3"])


def test_wrong_type_is_rejected():
  with pytest.raises(WdjaxError, match="expected a int"):
    config_lib.load(QUICKSTART, ["student.num_layers=three"])


def test_cli_prints_one_line_and_exits_2_on_unknown_key():
  proc = subprocess.run([sys.executable, "-m", "wdjax", "distill", str(QUICKSTART),
                         "--set", "distill.optim.lrr=1"], capture_output=True, text=True)
  assert proc.returncode == 2
  assert proc.stderr.strip().count("\n") == 0
  assert "unknown config key 'distill.optim.lrr'; did you mean distill.optim.lr?" in proc.stderr
