"""Every check of a config, in one place, before anything runs: `load` (what the CLI calls) and
`check` (what the pipeline calls on a config built in Python).

An invalid config ends in one error naming each bad key, value and rule (the CLI prints it as one
line and exits 2): a zero batch would divide by zero minutes later, `checkpoint.keep=0` would
delete every checkpoint, an unknown dataset or method would fail after the teacher loaded.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

from wdjax import config as config_lib, generators, tasks
from wdjax.config import Config
from wdjax.errors import WdjaxError


def load(path: str | os.PathLike, assignments: list[str] = ()) -> Config:
  """`config.load(path, assignments)`, checked."""
  return check(config_lib.load(path, assignments))


def check(cfg: Config) -> Config:
  """`cfg` if every value is one a run can use (a config without a task section gets its task's
  defaults); else a `WdjaxError` naming each bad one."""
  bad: list[str] = []
  known = tasks.datasets()  # imports every task module, so that their sections are defined
  section = config_lib.task_section(cfg.data.dataset)
  if type(cfg.task) is config_lib.TaskConfig and section is not config_lib.TaskConfig:
    cfg = dataclasses.replace(cfg, task=section())

  def need(ok: bool, key: str, value, rule: str) -> None:
    if not ok:
      bad.append(f"{key}={value!r} ({rule})")

  check_fields(cfg, need)
  need(type(cfg.task) is section, "task", type(cfg.task).__name__,
       f"data.dataset={cfg.data.dataset!r} takes a {section.__name__} section")
  need(cfg.data.dataset in known, "data.dataset", cfg.data.dataset, f"one of {', '.join(known)}")
  bad += generators.check(cfg.method)
  transfers = ("", "selection", "importance") + tuple(m for m in generators.METHODS if m != "kd")
  need(cfg.pipeline.transfer in transfers, "pipeline.transfer", cfg.pipeline.transfer,
       f"one of {', '.join(repr(t) if t == '' else t for t in transfers)}")
  need(cfg.pipeline.transfer_lr >= 0, "pipeline.transfer_lr", cfg.pipeline.transfer_lr, "must be >= 0")
  if cfg.data.dataset in known and type(cfg.task) is section:
    task = tasks.for_dataset(cfg.data.dataset)
    if task.methods is not None:
      need(cfg.method.name in task.methods, "method.name", cfg.method.name,
           f"{task.name} supports {', '.join(task.methods)}")
    need(not cfg.method.ranks_units or task.ranks_units, "method.init",
         "importance", f"{task.name} cannot rank its teacher's units yet; use selection")
    need(not cfg.kd.intermediate or (task.distils_intermediate and not cfg.method.task_agnostic),
         "kd.hidden_weight" if cfg.kd.hidden_weight else "kd.attention_weight",
         cfg.kd.hidden_weight or cfg.kd.attention_weight,
         "intermediate-layer distillation is offered for text and image classification, with the "
         "task's own objective; set it to 0")
    if cfg.student.vocabulary == "corpus":
      need(task.compresses_vocabulary, "student.vocabulary", "corpus",
           f"{task.name} does not compress vocabularies")
      need(not cfg.method.task_agnostic, "student.vocabulary", "corpus",
           f"method {cfg.method.label!r} trains on the pretrained teacher's own vocabulary")
    bad += task.check(cfg)
  if bad:
    raise WdjaxError("invalid config: " + "; ".join(dict.fromkeys(bad)))
  return cfg


DTYPES = ("float32", "bfloat16", "float16")  # compute dtypes of teacher and student
SCHEDULES = ("linear", "cosine", "constant")


def check_fields(cfg: Config, need) -> None:
  """The sections every run shares: training lengths, optimizers, dtypes, dropout, KD."""
  for phase in ("finetune", "distill"):
    t = getattr(cfg, phase)
    for name in ("batch_size", "eval_batch_size", "log_every"):
      need(getattr(t, name) >= 1, f"{phase}.{name}", getattr(t, name), "must be at least 1")
    need(t.steps >= 0, f"{phase}.steps", t.steps, "must be >= 0; 0 trains for `epochs`")
    need(t.steps > 0 or t.epochs > 0, f"{phase}.epochs", t.epochs, "must be > 0 when steps is 0")
    need(t.eval_every >= 0, f"{phase}.eval_every", t.eval_every, "must be >= 0; 0 = once per epoch")
    o = t.optim
    need(math.isfinite(o.lr) and o.lr >= 0, f"{phase}.optim.lr", o.lr, "must be a finite number >= 0")
    need(o.schedule in SCHEDULES, f"{phase}.optim.schedule", o.schedule, f"one of {', '.join(SCHEDULES)}")
    need(0 <= o.warmup_ratio <= 1, f"{phase}.optim.warmup_ratio", o.warmup_ratio, "must be in [0, 1]")
    need(o.clip_norm >= 0, f"{phase}.optim.clip_norm", o.clip_norm, "must be >= 0; 0 = off")
    for pattern in o.frozen:
      try:
        ok = isinstance(pattern, str) and re.compile(pattern) is not None
      except re.error:
        ok = False
      need(ok, f"{phase}.optim.frozen", pattern, "must be regular expressions of parameter paths")
  need(cfg.student.vocabulary in ("teacher", "corpus"), "student.vocabulary", cfg.student.vocabulary,
       "one of teacher, corpus")
  for who in ("teacher", "student"):
    m = getattr(cfg, who)
    need(m.dtype in DTYPES, f"{who}.dtype", m.dtype, f"one of {', '.join(DTYPES)}")
    for name in ("hidden_dropout", "attention_dropout"):
      need(0 <= getattr(m, name) < 1, f"{who}.{name}", getattr(m, name), "must be in [0, 1)")
  for name in ("num_layers", "hidden_size", "num_heads", "intermediate_size"):
    need(getattr(cfg.student, name) >= 1, f"student.{name}", getattr(cfg.student, name), "must be at least 1")
  need(cfg.kd.temperature > 0, "kd.temperature", cfg.kd.temperature, "must be > 0")
  need(0 <= cfg.kd.alpha <= 1, "kd.alpha", cfg.kd.alpha, "must be in [0, 1]")
  for name in ("hidden_weight", "attention_weight", "attention_heads"):
    need(getattr(cfg.kd, name) >= 0, f"kd.{name}", getattr(cfg.kd, name), "must be >= 0")
  heads = cfg.kd.attention_heads or cfg.student.num_heads
  need(cfg.kd.attention_weight == 0 or cfg.student.hidden_size % heads == 0, "kd.attention_heads",
       heads, f"must divide student.hidden_size={cfg.student.hidden_size}")
  need(cfg.checkpoint.keep >= 1, "checkpoint.keep", cfg.checkpoint.keep,
       "must be at least 1: the last checkpoint is what a run resumes and exports from")
  need(cfg.checkpoint.every >= 0, "checkpoint.every", cfg.checkpoint.every, "must be >= 0; 0 = only at the end")
  need(cfg.data.max_length >= 2, "data.max_length", cfg.data.max_length,
       "must be at least 2: the special tokens around every text")
  need(cfg.data.pad_to_multiple >= 1, "data.pad_to_multiple", cfg.data.pad_to_multiple, "must be at least 1")
