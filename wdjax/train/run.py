"""The phases a user runs, for any family x task x method: fine-tune (or train) a teacher, distil
a student, evaluate, export.

Written once on the task contract (`wdjax/tasks/base.py`) and the generator contract
(`wdjax/generators/base.py`); each phase runs in `phase.train_phase`. Two-phase methods (WD,
WID) train their generator in `<phase>/`, then fine-tune the materialised student in
`<phase>_phase2/` on the rest of the same step budget.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from collections.abc import Callable
from typing import Any

from flax import nnx

from wdjax import distributed, generators, tasks, validate, xla_cache
from wdjax.config import Config
from wdjax.errors import WdjaxError
from wdjax.generators import Generator, Identity, StudentSpec
from wdjax.models import vocab
from wdjax.train import checkpoint as ckpt_lib
from wdjax.train.phase import Model, phase_dir, total_steps, train_phase

Params = Any

PHASE2 = "_phase2"  # a two-phase method's second phase runs in `<phase>_phase2`


def finetune(cfg: Config, log=distributed.log, export_only: bool = False) -> dict:
  """Fine-tune the pretrained `teacher.model` on the task (or train the task's teacher from
  scratch: translation, vision); writes `<workdir>/finetune/model`."""
  cfg = start(cfg)
  task = tasks.for_dataset(cfg.data.dataset)
  begin = task.finetune_start(cfg, log)
  results = train_phase(cfg, phase="finetune", train=cfg.finetune, task=begin.data, spec=begin.spec,
                        generator=Identity(), teacher=None, tokenizer_dir=begin.tokenizer_dir,
                        objective=task.objective(cfg), log=log, export_only=export_only)
  return task.finish(cfg, phase_dir(cfg, "finetune"), results, begin.data, log)


def distill(cfg: Config, phase: str = "", log=distributed.log, export_only: bool = False) -> dict:
  """Distil the task teacher into the student with `method`; writes `<workdir>/<phase>/model`
  (a two-phase method: phase 1 there, then `<phase>_phase2/model`)."""
  cfg = start(cfg)
  task = tasks.for_dataset(cfg.data.dataset)
  method = cfg.method
  phase = first_phase(cfg, phase)
  teacher = task.load_teacher(cfg)
  data = task.load_data(cfg, teacher, log)
  if cfg.student.vocabulary == "corpus":  # the teacher narrowed to the training text's tokens
    teacher = vocab.compress_teacher(teacher, data.train, Path(cfg.workdir) / "cache", log)
    data = task.load_data(cfg, teacher, log)
  objective = task.objective(cfg)
  # phase 1's teacher and objective: the task's, or a task-agnostic one (WID on masked-LM)
  teacher1, objective1, agnostic = teacher, objective, None
  if method.task_agnostic:
    agnostic = task.agnostic_start(cfg, teacher, data, log)
    teacher1, objective1 = agnostic.teacher, agnostic.objective
  s_cfg = task.student_config(cfg, teacher1.config)
  init = initial_student(cfg, objective1.build(s_cfg, cfg.seed), teacher1.params,
                         rank=lambda shapes: task.unit_ranking(cfg, teacher1, data, shapes, log),
                         structure=lambda shapes: task.selection_indices(cfg, teacher1, shapes))
  # WD, WID: phase 1 trains the generator, phase 2 fine-tunes the materialised student (same
  # total budget); WID's mask schedule is laid out over phase 1's length.
  steps, steps1 = phase_steps(cfg, data)
  generator = make_generator(cfg, task, init, teacher1, data, steps1, log)
  train1 = dataclasses.replace(cfg.distill, steps=steps1) if generators.is_two_phase(method.name) else cfg.distill
  results = train_phase(cfg, phase=phase, train=train1, task=data, spec=StudentSpec(s_cfg, init),
                        generator=generator, teacher=teacher1, tokenizer_dir=teacher1.tokenizer_dir,
                        objective=objective1, log=log, export_only=export_only)
  final = phase
  if continues_to_phase2(cfg, phase, steps1, steps, export_only):
    model_dir = phase_dir(cfg, phase) / "model"
    if agnostic is None:
      spec2 = StudentSpec(s_cfg, task.load_model(model_dir)[1])
    else:
      spec2 = agnostic.phase2_spec(model_dir, s_cfg, export_only, phase + PHASE2)
    results = phase2(cfg, phase, results, spec2, teacher, data, steps - steps1, log, objective,
                     export_only=export_only)
    final = phase + PHASE2
  elif agnostic is not None:
    return results  # a task-agnostic phase 1 has no task metric to add
  return task.finish(cfg, phase_dir(cfg, final), results, data, log)


def evaluate(cfg: Config, model_dir: str | Path, splits=("validation", "test")) -> dict:
  """`{split: score}` of an exported model directory on the config's data (the task's metric:
  `data.best_metric`, or BLEU for translation)."""
  cfg = start(cfg)
  return tasks.for_dataset(cfg.data.dataset).evaluate(cfg, Path(model_dir), tuple(splits))


def score_teacher(cfg: Config, log=distributed.log) -> dict:
  """The teacher of a task that uses it as it is (a pretrained LM), scored on the config's
  validation and test data like a phase's results."""
  cfg = start(cfg)
  return tasks.for_dataset(cfg.data.dataset).score_teacher(cfg, log)


def initial_student(cfg: Config, model: nnx.Module, teacher_params: Params,
                    rank: Callable[[Params], dict] | None = None,
                    structure: Callable[[Params], dict | None] | None = None) -> Params:
  """The student's starting parameters: `model`'s random initialisation, or the teacher's
  weights by selection when the method starts from them (KD with `method.init=selection`:
  uniform, within the head structure `structure(student_shapes)` gives, if any; or
  `importance`: the units `rank(student_shapes)` keeps)."""
  method = cfg.method
  init = nnx.to_pure_dict(nnx.state(model))
  if method.student_start in ("selection", "importance"):
    indices = (rank(init) if method.student_start == "importance"
               else structure(init) if structure is not None else None)
    return generators.select(teacher_params, init, method.layer_map or "every_k", indices)
  return init


def phase_steps(cfg: Config, data) -> tuple[int, int]:
  """(total distill steps, phase-1 steps): two-phase methods split the one budget."""
  steps = total_steps(cfg.distill, len(data.train) // cfg.distill.batch_size)
  if not generators.is_two_phase(cfg.method.name):
    return steps, steps
  return steps, max(1, int(round(cfg.method.phase1_fraction * steps)))


def make_generator(cfg: Config, task: tasks.Task, init: Params, teacher: Model, data,
                   steps1: int, log=distributed.log) -> Generator:
  """The method's generator, planned for this student and teacher."""
  context = generators.Context(teacher_heads=teacher.config.num_heads,
                               student_heads=cfg.student.num_heads, phase1_steps=steps1)
  options = generators.options_for(cfg.method, context)
  options.update(task.generator_options(cfg, teacher, data, init, log))
  try:
    return generators.make(cfg.method.name, init, teacher.params, **options)
  except ValueError as e:  # a layer map or option that does not fit these shapes
    raise WdjaxError(f"method {cfg.method.name}: {e}") from None


def phase2(cfg: Config, phase: str, first: dict, spec: StudentSpec, teacher: Model, data,
           steps: int, log, objective, export_only: bool = False) -> dict:
  """Fine-tune phase 1's student on the task (KD from the task teacher if kd.alpha > 0)."""
  optim2 = dataclasses.replace(cfg.distill.optim, lr=cfg.method.phase2_lr or cfg.distill.optim.lr)
  second = train_phase(cfg, phase=phase + PHASE2,
                       train=dataclasses.replace(cfg.distill, steps=steps, optim=optim2),
                       task=data, spec=spec, generator=Identity(), teacher=teacher,
                       tokenizer_dir=teacher.tokenizer_dir, objective=objective, log=log,
                       export_only=export_only)
  return dict(second, phase1=first, trainable_params=max(first["trainable_params"],
                                                          second["trainable_params"]))


def default_phase(cfg: Config) -> str:
  """`distill` for plain KD, `distill_<method>` for the others (one teacher, many students)."""
  return "distill" if cfg.method.label == "kd" else f"distill_{cfg.method.label}"


def first_phase(cfg: Config, phase: str) -> str:
  """The phase a distill run starts from: `phase` or the config's default; a two-phase method's
  `<phase>_phase2` names the same run (it is reached through its phase 1)."""
  phase = phase or default_phase(cfg)
  if generators.is_two_phase(cfg.method.name) and phase.endswith(PHASE2):
    return phase[:-len(PHASE2)]
  return phase


def final_model_dir(cfg: Config, phase: str = "") -> Path:
  """The model a distill run ends with: phase 2's for a two-phase method once it has one."""
  phase = first_phase(cfg, phase)
  second = phase_dir(cfg, phase + PHASE2) / "model"
  return second if generators.is_two_phase(cfg.method.name) and second.is_dir() else phase_dir(cfg, phase) / "model"


def continues_to_phase2(cfg: Config, phase: str, steps1: int, steps: int, export_only: bool) -> bool:
  """After phase 1 of a two-phase method: train phase 2 (when it has steps), or, exporting,
  export it too when it has a checkpoint."""
  if not generators.is_two_phase(cfg.method.name) or steps1 >= steps:
    return False
  return not export_only or ckpt_lib.has_checkpoint(phase_dir(cfg, phase + PHASE2) / "checkpoints")


def start(cfg: Config) -> Config:
  """Before any JAX computation: check the config (one built in Python skips `validate.load`);
  join the other processes; turn on the compilation cache. Returns the checked config (its task
  section that of data.dataset's task)."""
  cfg = validate.check(cfg)
  if cfg.distributed:
    distributed.initialize()
  if cfg.compilation_cache:
    xla_cache.enable(cfg.cache_dir)
  return cfg
