"""The task contract: what the pipeline (`wdjax/train/run.py`) asks of a task.

A task owns its data, the objective a phase trains with (head, loss inputs, predictor, export:
`wdjax/train/objectives.py`), how its teacher comes to be (a pretrained model fine-tuned, or a
network trained from scratch), the student's config given the teacher's, and its metrics. The
pipeline is written once on top of it:

  finetune:  start = finetune_start(cfg)              -> phase `finetune` -> finish(...)
  distill:   teacher = load_teacher(cfg); data = load_data(cfg, teacher)
             student_config(cfg, teacher.config)      -> phase 1 (+ phase 2) -> finish(...)
  evaluate:  evaluate(cfg, model_dir, splits)         -> {split: metric}

A task module subclasses `Task`, names the `data.dataset` values it serves and registers an
instance with `wdjax.tasks.register`; nothing else needs to change to add one.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from wdjax import trees
from wdjax.config import Config
from wdjax.errors import WdjaxError
from wdjax.generators import StudentSpec
from wdjax.train import mesh as mesh_lib
from wdjax.train.phase import Model


@dataclasses.dataclass(frozen=True)
class FinetuneStart:
  """What the teacher's phase starts from: the data, the network's config and initial params
  (pretrained weights with a fresh head, or a random initialisation), and the directory whose
  tokenizer the exported teacher carries."""

  data: Any
  spec: StudentSpec
  tokenizer_dir: Path


@dataclasses.dataclass(frozen=True)
class AgnosticStart:
  """A task-agnostic phase 1 (WID on masked-LM): the teacher it trains the generator on, the
  objective, and `phase2_spec(phase1_model_dir, student_config) -> StudentSpec`, the student
  phase 2 fine-tunes on the task (phase 1's network with the task's head)."""

  teacher: Model
  objective: Any
  phase2_spec: Any


def student_shape(teacher_config, cfg: Config, **changes):
  """`teacher_config` with the student's depth, width, heads, FFN, dropout and dtype (and
  `changes`): every family's student keeps the rest (vocabulary, positions, numerics) of its
  teacher. A shape the family's config rejects is one line naming `student`."""
  s = cfg.student
  try:
    return dataclasses.replace(
        teacher_config, num_layers=s.num_layers, hidden_size=s.hidden_size, num_heads=s.num_heads,
        intermediate_size=s.intermediate_size, hidden_dropout=s.hidden_dropout,
        attention_dropout=s.attention_dropout, dtype=s.dtype, **changes)
  except ValueError as e:
    raise WdjaxError(f"student: {e}") from None


CLASS_METRICS = ("accuracy", "macro_f1", "mcc")
REGRESSION_METRICS = ("pearson", "spearman")


def best_metric(cfg: Config, regression: bool = False) -> str:
  """`data.best_metric`, with "auto" resolved: accuracy for classes, Pearson for scores."""
  if cfg.data.best_metric != "auto":
    return cfg.data.best_metric
  return "pearson" if regression else "accuracy"


def check_best_metric(cfg: Config, regression: bool = False) -> list[str]:
  allowed = REGRESSION_METRICS if regression else CLASS_METRICS
  if cfg.data.best_metric in ("auto",) + allowed:
    return []
  kind = "regression" if regression else "classification"
  return [f"data.best_metric={cfg.data.best_metric!r} (for {kind}: auto, {', '.join(allowed)})"]


class Task:
  """Defaults of the contract; a task overrides what it needs."""

  name = "task"
  datasets: tuple[str, ...] = ()  # the `data.dataset` values this task serves
  metric: str | None = None  # what `evaluate` reports per split (None: the objective's best_metric)
  methods: tuple[str, ...] | None = None  # the methods written for its families (None: all)
  ranks_units = False  # whether `unit_ranking` can rank the teacher's units (importance selection)
  compresses_vocabulary = False  # whether its data are token ids a narrowed vocabulary can renumber
  distils_intermediate = False  # whether its objective's apply reads activations (kd.hidden_weight)
  trains_teacher = True  # whether its teacher comes from `wdjax finetune` (else it is used as it is)

  def check(self, cfg: Config) -> list[str]:
    """Problems of `cfg` for this task, each as `key=value (rule)`; [] when it can run."""
    del cfg
    return []

  def objective(self, cfg: Config):
    raise NotImplementedError

  def finetune_start(self, cfg: Config, log) -> FinetuneStart:
    raise NotImplementedError

  def load_teacher(self, cfg: Config) -> Model:
    raise NotImplementedError

  def load_data(self, cfg: Config, teacher: Model, log) -> Any:
    """The distillation data, tokenised as the teacher's inputs (and checked against it)."""
    raise NotImplementedError

  def student_config(self, cfg: Config, teacher_config):
    raise NotImplementedError

  def load_model(self, model_dir: Path) -> tuple[Any, Any]:
    """(config, params) of a model this task exported."""
    raise NotImplementedError

  def generator_options(self, cfg: Config, teacher: Model, data: Any, student_shapes, log) -> dict:
    """Options of `generators.make` that depend on the task (e.g. PCA maps from its data); by
    default the importance-selected units (for WID: layers) WS, GWS, WD, WID and OPDF start from
    (`method.init=importance`), else the head structure uniform selection keeps
    (`selection_indices`), if the family has one for this student."""
    if cfg.method.name == "kd":  # KD's start is selected in run.initial_student
      return {}
    if cfg.method.ranks_units:
      return {"indices": self.unit_ranking(cfg, teacher, data, student_shapes, log)}
    structure = self.selection_indices(cfg, teacher, student_shapes)  # e.g. whole KV groups
    return {"indices": structure} if structure else {}

  def selection_indices(self, cfg: Config, teacher: Model, student_shapes) -> dict | None:
    """`SelectionPlan` indices that uniform weight selection must keep whole (a family's head
    structure), or None: every space is sliced by the uniform rule."""
    del cfg, teacher, student_shapes
    return None

  def activation_fn(self, teacher_config):
    """The teacher family's `fn(params, batch) -> (activations, weights)` (`bert.activation_fn`)
    that importance selection ranks units with; None where the family sows none."""
    del teacher_config
    return None

  def unit_ranking(self, cfg: Config, teacher: Model, data: Any, student_shapes, log) -> dict:
    """`{student space: kept teacher indices}` of importance selection, from the teacher's
    activations on the task's training data (`generators.importance`)."""
    activation_fn = self.activation_fn(teacher.config)
    if activation_fn is None:
      raise NotImplementedError(f"{self.name} cannot rank its teacher's units")
    from wdjax.generators.importance import cached_indices, importance_indices

    def rank():
      log(f"ranking the teacher's units on {cfg.method.calibration_batches} training batches")
      at_depth = lambda n: self.activation_fn(dataclasses.replace(teacher.config, num_layers=n))
      return importance_indices(activation_fn, teacher.params, student_shapes, data.train, cfg,
                                cfg.method, heads_t=teacher.config.num_heads,
                                heads_s=cfg.student.num_heads, activation_fn_at=at_depth, log=log)

    if not teacher.sha256:  # nothing identifies the teacher: rank it afresh
      return rank()
    # the ranking is a function of the teacher, the data, the student's shapes and the method's
    # calibration settings: a resumed or repeated run reads it back (the search may be long)
    return cached_indices(Path(cfg.workdir) / "cache", dict(
        teacher=teacher.sha256, data=dataclasses.asdict(cfg.data), train_rows=len(data.train),
        method=dataclasses.asdict(cfg.method), seed=cfg.seed, batch_size=cfg.distill.batch_size,
        student={k: list(np.shape(v)) for k, v in trees.flatten(student_shapes).items()}), rank, log)

  def agnostic_start(self, cfg: Config, teacher: Model, data: Any, log) -> AgnosticStart:
    raise NotImplementedError(f"{self.name} has no task-agnostic objective")

  def finish(self, cfg: Config, phase_path: Path, results: dict, data: Any, log) -> dict:
    """A finished phase's results, completed with metrics computed on its exported model."""
    del cfg, phase_path, data, log
    return results

  def metric_name(self, cfg: Config) -> str:
    return self.metric or self.objective(cfg).best_metric

  def evaluate(self, cfg: Config, model_dir: Path, splits: tuple[str, ...]) -> dict[str, float]:
    """`{split: metric_name(cfg)}` of an exported model on the config's data."""
    config, params = self.load_model(model_dir)
    scores = self.scores(cfg, config, params, self.eval_data(cfg, model_dir, config), splits)
    metric = self.metric_name(cfg)
    return {split: s[metric] for split, s in scores.items()}

  def score_teacher(self, cfg: Config, log) -> dict:
    """The teacher as it is, scored like a phase's results (`{split}_{score}` for validation and
    test, its parameter count, none trainable): the first row of `wdjax pipeline` for a task
    that does not train its teacher."""
    teacher = self.load_teacher(cfg)
    data = self.load_data(cfg, teacher, log)
    scores = self.scores(cfg, teacher.config, teacher.params, data, ("validation", "test"))
    from wdjax.generators import param_count
    return {"trainable_params": 0, "model_params": param_count(teacher.params),
            **{f"{split}_{k}": v for split, s in scores.items() for k, v in s.items()}}

  def scores(self, cfg: Config, config, params, data: Any, splits: tuple[str, ...]) -> dict[str, dict]:
    """`{split: the objective's scores}` of a model (`config`, `params`) on `data`'s splits."""
    objective = self.objective(cfg)
    mesh = mesh_lib.make_mesh(cfg.mesh.data, cfg.mesh.model)
    sh = mesh_lib.param_shardings(params, mesh)
    apply = objective.apply(nnx.split(objective.build(config))[0])
    predictor = objective.predictor(apply, mesh, sh, cfg.distill.eval_batch_size, cfg.data.pad_to_multiple)
    params = jax.device_put(params, sh)
    return {split: predictor.scores(params, data.split(split)) for split in splits}

  def eval_data(self, cfg: Config, model_dir: Path, config) -> Any:
    """The data `evaluate` scores `model_dir`'s model on."""
    raise NotImplementedError
