"""The Python API, for notebooks and scripts: what the CLI's commands do, as functions.

Each takes a config (a `wdjax.config.Config`, a preset's name such as `"wd:cpu"`, or the path of
a config file) and `--set`-style overrides, checks them as the CLI does, and returns what the run
wrote:

    import wdjax
    teacher = wdjax.finetune("kd:cpu")                       # {"test_accuracy": ..., ...}
    student = wdjax.distill("wd:cpu", ["distill.steps=200"])
    wdjax.evaluate("wd:cpu", model=wdjax.model_dir("wd:cpu"))  # {"validation": ..., "test": ...}

Runs resume and skip finished phases exactly as the CLI's do (they share the workdir layout).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from wdjax import config as config_lib, distributed, validate
from wdjax.config import Config


def load_config(cfg: Config | str, overrides: Sequence[str] = ()) -> Config:
  """The checked config: `cfg` (or the preset / file it names) with `overrides` applied."""
  if isinstance(cfg, Config):
    return validate.check(config_lib.apply_overrides(cfg, list(overrides)))
  return validate.load(cfg, list(overrides))


def finetune(cfg: Config | str, overrides: Sequence[str] = (), *,
             log: Callable[[str], None] = distributed.log) -> dict:
  """`wdjax finetune`: the task teacher, `<workdir>/finetune/model`; returns its results."""
  from wdjax.train import run
  return run.finetune(load_config(cfg, overrides), log=log)


def distill(cfg: Config | str, overrides: Sequence[str] = (), *, phase: str = "",
            log: Callable[[str], None] = distributed.log) -> dict:
  """`wdjax distill`: the student by the config's method (both phases of a two-phase method);
  returns the final phase's results."""
  from wdjax.train import run
  return run.distill(load_config(cfg, overrides), phase=phase, log=log)


def export(cfg: Config | str, overrides: Sequence[str] = (), *, phase: str = "") -> Path:
  """`wdjax export`: the model of a phase's latest checkpoint, written again; returns its
  directory (`phase="finetune"` for the teacher)."""
  from wdjax.train import run
  c = load_config(cfg, overrides)
  if phase == "finetune":
    run.finetune(c, export_only=True)
    return run.phase_dir(c, "finetune") / "model"
  result = run.distill(c, phase=phase, export_only=True)
  return run.phase_dir(c, result["phase"]) / "model"


def model_dir(cfg: Config | str, overrides: Sequence[str] = (), *, phase: str = "") -> Path:
  """Where the config's final student (of `phase`, if named) is exported: a two-phase
  method's phase 2."""
  from wdjax.train import run
  return Path(run.final_model_dir(load_config(cfg, overrides), phase))


def evaluate(cfg: Config | str, overrides: Sequence[str] = (), *, model: str | Path | None = None,
             splits: Sequence[str] = ("validation", "test")) -> dict[str, float]:
  """`wdjax eval`: `{split: score}` of an exported model (default: the config's final student)
  on the config's data, in the task's metric (`data.best_metric`: accuracy, Pearson for
  regression, ...; BLEU for translation)."""
  from wdjax.train import run
  c = load_config(cfg, overrides)
  return run.evaluate(c, model if model is not None else run.final_model_dir(c), tuple(splits))


__all__ = ["load_config", "distill", "evaluate", "export", "finetune", "model_dir"]
