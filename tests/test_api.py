"""The Python API (`wdjax.finetune / distill / export / evaluate`) on a tiny real run."""

import sys

import pytest

import wdjax
from wdjax.errors import WdjaxError


def test_import_is_light_and_configs_are_checked():
  import subprocess
  out = subprocess.run([sys.executable, "-c", "import sys, wdjax; print('jax' in sys.modules)"],
                       capture_output=True, text=True, check=True).stdout
  assert out.strip() == "False"  # `import wdjax` costs nothing until a function is called
  cfg = wdjax.load_config("kd:cpu", ["seed=3"])
  assert cfg.seed == 3 and wdjax.load_config(cfg, ["seed=4"]).seed == 4
  with pytest.raises(WdjaxError, match="unknown method 'foo'"):
    wdjax.load_config(cfg, ["method.name=foo"])


def test_distill_export_and_evaluate_agree(tiny):
  cfg = tiny()
  result = wdjax.distill(cfg, log=lambda *_: None)
  model = wdjax.model_dir(cfg)
  assert model.name == "model" and model.parent.name == result["phase"]
  scores = wdjax.evaluate(cfg, model=model)
  assert scores["test"] == pytest.approx(result["test_accuracy"])
  assert scores["validation"] == pytest.approx(result["validation_accuracy"])
  # export writes the phase's latest checkpoint's model again, to the same place
  assert wdjax.export(cfg) == model and wdjax.evaluate(cfg)["test"] == pytest.approx(scores["test"])
