"""Typed configs, --set overrides and their errors."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from wdjax import config as config_lib, validate
from wdjax.errors import WdjaxError

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = "quickstart"  # a preset, by name


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


def test_wrong_type_is_rejected_naming_the_whole_key():
  with pytest.raises(WdjaxError, match=r"--set student\.num_layers=three: expected a value of type int"):
    config_lib.load(QUICKSTART, ["student.num_layers=three"])


@pytest.mark.parametrize("assignments, message", [
    (["distill.batch_size=0"], r"distill\.batch_size=0 \(must be at least 1\)"),
    (["distill.steps=-5"], r"distill\.steps=-5 \(must be >= 0"),
    (["checkpoint.keep=0"], r"checkpoint\.keep=0 \(must be at least 1"),
    (["distill.optim.frozen=["], r"distill\.optim\.frozen='\[' \(must be regular expressions"),
    (["finetune.optim.frozen=[1]"], r"finetune\.optim\.frozen=1 "),
    (["student.dtype=float8"], r"student\.dtype='float8' \(one of float32, bfloat16, float16\)"),
    (["distill.optim.schedule=step"], r"distill\.optim\.schedule='step'"),
    (["method.name=foo"], r"unknown method 'foo'; available: kd, .*wd"),
    (["method=foo"], r"unknown method 'foo'; available: kd, .*wd"),
    (["method=opdf", "method.cores=1"], r"method\.cores=1 \(an MPO needs at least 2 cores\)"),
    (["method=wid", "method.w_step=-1"], r"method\.w_step=-1 \(must be >= 0"),
    (["method=wd", "method.phase1_fraction=0"], r"method\.phase1_fraction=0\.0 \(must be in \(0, 1\]\)"),
    (["data.dataset=glue/sst2"], r"data\.dataset='glue/sst2' \(one of "),
    (["method.name=ws", "method.init=svd"], r"method\.init='svd' \(one of identity, xavier, pca, importance\)"),
    (["method.layer_map=every_2"], r"method\.layer_map='every_2' \(one of '', contiguous, every_k"),
    (["data.dataset=bible", "method.name=wid"], r"method\.name='wid' \(translation supports kd, select"),
    (["data.dataset=bible", "method.init=importance"],
     r"method\.init='importance' \(translation cannot rank its teacher's units yet"),
    (["data.dataset=bible", "kd.attention_weight=1"],
     r"kd\.attention_weight=1\.0 \(intermediate-layer distillation is offered for text and image"),
    (["method.init=importance", "method.calibration_batches=0"],
     r"method\.calibration_batches=0 \(must be at least 1\)"),
    (["data.dataset=digits", "method.name=wid", "method.objective=mlm"],
     r"method 'wid_mlm' \(its phase 1 trains on masked LM, which ViT students have not"),
    # every bad key in one message
    (["distill.log_every=0", "kd.alpha=2"], r"distill\.log_every=0 .*; kd\.alpha=2\.0 \(must be in \[0, 1\]\)"),
])
def test_values_no_run_can_use_are_refused_at_load(assignments, message):
  """Before anything runs: a zero batch would divide by zero after the teacher's logits were
  computed, and `checkpoint.keep=0` would delete every checkpoint, so a rerun would start over."""
  with pytest.raises(WdjaxError, match=message):
    validate.load(QUICKSTART, assignments)


def test_the_method_section_is_the_methods_own():
  """`method=NAME` switches to NAME's section (its defaults), before the other assignments
  wherever it stands; each key is checked against that section's fields, and a key of another
  method's section names its owner."""
  from wdjax import generators
  from wdjax.generators.wd import WDMethod
  cfg = validate.load(QUICKSTART, ["method.init=identity", "method=wd", "method.mode=lean"])
  assert cfg.method == WDMethod(init="identity", mode="lean") == generators.section("wd", init="identity", mode="lean")
  assert config_lib.to_dict(cfg)["method"] == {"name": "wd", "layer_map": "", "phase1_fraction": 0.5,
                                               "phase2_lr": 0.0, "mode": "lean", "init": "identity",
                                               "calibration_batches": 16, "depth_score": "influence"}
  assert validate.load(QUICKSTART, ["method.name=wd"]).method == WDMethod()
  assert config_lib.apply_overrides(cfg, ["method=wd"]).method is cfg.method  # already WD's: kept
  with pytest.raises(WdjaxError, match=r"'method\.mode': the kd section has name, layer_map, init, "
                                       r"calibration_batches, depth_score; mode is an option of wd \(--set method=wd first\)"):
    validate.load(QUICKSTART, ["method.mode=lean"])
  with pytest.raises(WdjaxError, match=r"did you mean method\.init\?"):
    validate.load(QUICKSTART, ["method.inti=selection"])
  # every registered method has a section that checks clean with its defaults
  assert set(config_lib.MethodConfig.sections()) == set(generators.METHODS)
  for name in generators.METHODS:
    assert generators.check(generators.section(name)) == []
  # a section of one method named as another is refused
  mislabelled = dataclasses.replace(generators.section("ws"), name="gws")
  assert "the section is a WSMethod; gws's is GWSMethod" in generators.check(mislabelled)[0]


def test_task_section_follows_the_dataset():
  """`task` holds the options of data.dataset's task: setting the dataset switches the section
  (before the other assignments), a key of another task's section names its datasets, and a
  config built in Python without the section gets the task's defaults."""
  from wdjax.config import Config, DataConfig, TaskConfig
  from wdjax.tasks.image_classification import VisionConfig
  from wdjax.tasks.translation import TranslationConfig
  cfg = validate.load(QUICKSTART, ["task.beam=7", "data.dataset=bible"])
  assert cfg.task == TranslationConfig(beam=7)
  assert config_lib.to_dict(validate.load(QUICKSTART))["task"] == {}
  vit = validate.load("vit", ["task.pooling=mean", "data.dataset=digits"])
  assert vit.task == dataclasses.replace(validate.load("vit").task, pooling="mean")  # same task: kept
  assert type(validate.load("vit", ["data.dataset=bible"]).task) is TranslationConfig
  with pytest.raises(WdjaxError, match=r"'task\.beam': .* beam is an option of data\.dataset=bible"):
    validate.load(QUICKSTART, ["task.beam=3"])
  with pytest.raises(WdjaxError, match=r"did you mean task\.patch_size\?"):
    validate.load("vit", ["task.patch=8"])
  assert validate.check(Config(data=DataConfig(dataset="digits"))).task == VisionConfig()
  assert validate.check(Config()).task == TaskConfig()
  with pytest.raises(WdjaxError, match=r"task='TranslationConfig' \(data\.dataset='digits' takes a VisionConfig"):
    validate.check(Config(data=DataConfig(dataset="digits"), task=TranslationConfig()))
  with pytest.raises(WdjaxError, match=r"task\.seq_kd='both'"):
    validate.load("mt", ["task.seq_kd=both"])


def test_every_shipped_config_passes_the_checks():
  for name in config_lib.presets():
    for arg in ([""] if name == "quickstart" else ["cpu", "gpu"]):
      validate.load(f"{name}:{arg}" if arg else name)


def test_a_preset_is_named_without_a_path_and_a_file_by_its_path(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # outside the repository: the presets come from the package
  assert config_lib.load("ws:gpu") == config_lib.load(ROOT / "wdjax/configs/ws.py:gpu")
  assert config_lib.load("ws:gpu").teacher.model == "all-mpnet-base-v2"
  # a file of the user's own, even one named like a preset, is named by its path
  (tmp_path / "ws.py").write_text(
      "from wdjax.configs import ws\n"
      "import dataclasses\n"
      "def get_config(hardware='cpu'):\n"
      "  return dataclasses.replace(ws.get_config(hardware), seed=7)\n")
  assert config_lib.load("ws.py:gpu").seed == 7 and config_lib.load("ws:gpu").seed == 0
  with pytest.raises(WdjaxError, match=r"no preset 'nope' \(presets: gws, kd, .*wd, wid, ws; a "
                                       r"config file of your own is named by its path"):
    config_lib.load("nope:cpu")
  with pytest.raises(WdjaxError, match=r"config file sub/ws.py does not exist \(the preset is "
                                       r"named without .py: ws\)"):
    config_lib.load("sub/ws.py:cpu")


def test_cli_prints_one_line_and_exits_2_on_unknown_key():
  proc = subprocess.run([sys.executable, "-m", "wdjax", "distill", str(QUICKSTART),
                         "--set", "distill.optim.lrr=1"], capture_output=True, text=True)
  assert proc.returncode == 2
  assert proc.stderr.strip().count("\n") == 0
  assert "unknown config key 'distill.optim.lrr'; did you mean distill.optim.lr?" in proc.stderr


@pytest.mark.parametrize("assignments", [["method.name=foo"], ["data.dataset=glue/sst2"],
                                         ["method.name=wd", "method.init=zeros"]])
def test_wdjax_config_refuses_unknown_values_in_one_line(assignments):
  """`wdjax config` checks what a run would: an unknown method, dataset or choice is one line,
  exit 2, not a config printed as if it could run."""
  args = [a for kv in assignments for a in ("--set", kv)]
  proc = subprocess.run([sys.executable, "-m", "wdjax", "config", str(ROOT / "wdjax/configs/kd.py") + ":cpu",
                         *args], capture_output=True, text=True)
  assert proc.returncode == 2 and proc.stdout == ""
  assert proc.stderr.startswith(("wdjax: error: invalid config: ", "wdjax: error: unknown method"))
  assert proc.stderr.count("\n") == 1


def test_the_pipelines_transfer_student_may_start_from_importance_selection():
  from wdjax import cli, generators
  cfg = validate.load(QUICKSTART, ["pipeline.transfer=importance"])
  transfer = cli.transfer_config(cfg)
  assert transfer.method == generators.section("kd", init="importance")
  assert transfer.method.label == "kd_importance" and transfer.distill.optim.lr == 1e-4
