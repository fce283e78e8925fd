"""Typed experiment configs: frozen dataclasses, Python config files, `--set` overrides.

A config file is a Python module with `get_config() -> Config` (the flax-examples / big_vision
convention); its docstring says how to run it, how long it takes and what it reaches.
`--set distill.optim.lr=3e-4` replaces one field; the value is parsed as a Python literal and
checked against the field's type, and an unknown key is rejected with the closest valid names.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import json
import os
import typing
from pathlib import Path

from wdjax.errors import WdjaxError


@dataclasses.dataclass(frozen=True)
class TeacherConfig:
  model: str = "all-MiniLM-L6-v2"  # pretrained model to fine-tune: asset name or HF directory
  path: str = ""  # task teacher for `distill`: HF directory; "" = <workdir>/finetune/model
  dtype: str = "float32"  # compute dtype of the teacher (forward pass and fine-tuning)
  hidden_dropout: float = 0.1  # dropout while fine-tuning: embeddings, residual branches, head
  attention_dropout: float = 0.1  # dropout on attention probabilities while fine-tuning


@dataclasses.dataclass(frozen=True)
class StudentConfig:
  num_layers: int = 3  # Transformer blocks
  hidden_size: int = 192  # d_model
  num_heads: int = 12  # attention heads (head size = hidden_size / num_heads)
  intermediate_size: int = 768  # FFN width
  hidden_dropout: float = 0.1  # dropout on embeddings, residual branches, head
  attention_dropout: float = 0.1  # dropout on attention probabilities
  dtype: str = "float32"  # compute dtype; "bfloat16" for mixed precision (params stay fp32)
  # "teacher": the teacher's vocabulary | "corpus": only the tokens the training text uses
  # (the teacher narrowed to them, a renumbered tokenizer exported with the student: models/vocab.py)
  vocabulary: str = "teacher"


@dataclasses.dataclass(frozen=True)
class DataConfig:
  # "rotten-tomatoes" | "files" (your own CSV / JSON lines) | "bible" (translation) |
  # "fashion-mnist" | "digits" (images, ViT); the task serving each: wdjax/tasks/
  dataset: str = "rotten-tomatoes"
  train_file: str = ""  # dataset="files": path of the training file
  validation_file: str = ""  # optional; carved from train by hash when empty
  test_file: str = ""  # optional; carved from train by hash when empty
  text_column: str = "text"  # column holding the text
  text_pair_column: str = ""  # column holding a second text (sentence-pair tasks; "" = single texts)
  label_column: str = "label"  # column holding the class label or the score
  # "auto": a label column of numbers with fractions (3.7) is a regression target, any other a
  # set of classes; or "classes" | "regression"
  label_kind: str = "auto"
  # the validation score that picks the exported checkpoint: "auto" (accuracy for classes,
  # pearson for regression; the task's own for translation and images) | "accuracy" |
  # "macro_f1" | "mcc" | "pearson" | "spearman"
  best_metric: str = "auto"
  group_column: str = ""  # optional column whose values never straddle two carved splits
  max_length: int = 64  # tokens per example, [CLS]/[SEP] included; longer texts are truncated
  pad_to_multiple: int = 16  # batches pad to the longest example rounded up to this
  length_grouping: int = 16  # sort windows of this many batches by length (0 = off)
  max_train_examples: int = 0  # use only the first N training examples (0 = all)
  max_eval_examples: int = 0  # use only the first N validation / test examples (0 = all)
  augment: int = 0  # KD only: perturbed, teacher-labelled copies per training example (data/augment.py)


@dataclasses.dataclass(frozen=True)
class TaskConfig:
  """The `task` section: the options of the task that serves `data.dataset`.

  A task with options defines its section as a subclass in its own module (`wdjax/tasks/`),
  naming the datasets it serves in `datasets`; a task without options has this empty one.
  Setting `data.dataset` switches the section to the new dataset's, with its defaults; a key of
  another task's section is refused, naming the datasets it belongs to. A config built in Python
  that leaves the section out gets its task's defaults (`wdjax.validate.check`).
  """

  datasets: typing.ClassVar[tuple[str, ...]] = ()

  @staticmethod
  def sections() -> dict[str, type[TaskConfig]]:
    """Every defined section by the dataset it serves (the task modules define them:
    `wdjax.tasks.datasets()` imports every one)."""
    out, todo = {}, list(TaskConfig.__subclasses__())
    while todo:
      cls = todo.pop(0)
      todo += cls.__subclasses__()
      for name in cls.datasets:
        out.setdefault(name, cls)
    return out


def task_section(dataset: str) -> type[TaskConfig]:
  """The section class of the task that serves `dataset` (TaskConfig: a task without options)."""
  return TaskConfig.sections().get(dataset, TaskConfig)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  lr: float = 5e-5  # peak learning rate
  schedule: str = "linear"  # "linear" | "cosine" | "constant" decay after warm-up
  warmup_ratio: float = 0.06  # fraction of the steps spent warming up from 0
  weight_decay: float = 0.01  # AdamW decay, on matrices only (not biases or LayerNorm)
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  clip_norm: float = 1.0  # global gradient-norm clipping (0 = off)
  frozen: tuple[str, ...] = ()  # regexes of parameter paths kept fixed, e.g. "embeddings/word"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  batch_size: int = 32  # global batch (all processes and devices together)
  epochs: float = 1.0  # training length in passes over the train split
  steps: int = 0  # training length in steps; overrides epochs when > 0
  eval_every: int = 0  # validation every N steps (0 = once per epoch); always at the end
  eval_batch_size: int = 128
  keep_best: bool = True  # export the model of the best validation evaluation (else the last)
  log_every: int = 25  # metrics line every N steps
  optim: OptimConfig = OptimConfig()


@dataclasses.dataclass(frozen=True)
class KDConfig:
  temperature: float = 2.0  # softmax temperature of the soft targets
  alpha: float = 0.9  # weight of the KD term; 1 - alpha weighs the label CE; 0 = no teacher
  cache_teacher_logits: bool = True  # run the teacher once over the train split, not every step
  # intermediate-layer distillation (train/intermediate.py; the teacher then runs every step):
  hidden_weight: float = 0.0  # weight of the hidden-state term (1 - R^2 of the student's states' fit)
  attention_weight: float = 0.0  # weight of the attention-map KL
  attention_heads: int = 0  # heads the attention maps are split into (0: the student's)

  @property
  def intermediate(self) -> bool:
    return self.hidden_weight > 0 or self.attention_weight > 0


@dataclasses.dataclass(frozen=True)
class MethodConfig:
  """The `method` section: `name` picks the method, the other fields are that method's own.

  Each method defines its section as a subclass, with its name as the default of `name`, in its
  own module (`wdjax/generators/`; KD's is here, being the default). `--set method=wd` (or
  `method.name=wd`) switches the section to WD's with its defaults; a key of another method's
  section is refused, naming the method it belongs to.
  """

  name: str
  layer_map: str = ""  # teacher layers per student layer: every_k | contiguous | first_n | uniform ("" = the method's own)

  @property
  def label(self) -> str:
    """Short name of the method as configured (its distill phase is `distill_<label>`)."""
    return self.name

  @property
  def student_start(self) -> str:
    """The weights the student's own parameters start from when the method trains them directly:
    "random" (its initialisation), or the teacher's by weight selection: "selection" (uniform)
    or "importance" (its most active units, `generators.importance`)."""
    return "random"

  @property
  def ranks_units(self) -> bool:
    """Whether the method starts from the teacher's units ranked on the task's data
    (`Task.unit_ranking`), which the task must then be able to rank."""
    return False

  @property
  def task_agnostic(self) -> bool:
    """Whether phase 1 trains on the teacher's pretraining objective (masked LM) instead of the
    task, the task coming in phase 2."""
    return False

  @staticmethod
  def sections() -> dict[str, type[MethodConfig]]:
    """Every defined section by method name: the subclasses that give `name` a default, depth
    first in definition order (a base's methods beside one another)."""
    out, todo = {}, list(MethodConfig.__subclasses__())
    while todo:
      cls = todo.pop(0)
      todo[:0] = cls.__subclasses__()
      if "name" in cls.__dict__:  # a dataclass field redefined with a default sets the attribute
        out.setdefault(cls.name, cls)
    return out


# method.depth_score: how importance selection picks a shallower student's layers
# (generators/importance.py): each layer's block influence, or the kept layers' output distance
DEPTH_SCORES = ("influence", "output")


@dataclasses.dataclass(frozen=True)
class RankedStartMethod(MethodConfig):
  """The fields of a method that can start from importance selection (`init="importance"`,
  `generators/importance.py`); each such method gives `init` its own default and other values.
  `generators.check` validates `calibration_batches` and `depth_score` for all of them."""

  init: str = "selection"
  calibration_batches: int = 16  # init=importance: training batches whose activations rank the units
  depth_score: str = "influence"  # init=importance, a shallower student: its layers by "influence" or "output" distance

  @property
  def ranks_units(self) -> bool:
    return self.init == "importance"


@dataclasses.dataclass(frozen=True)
class KDMethod(RankedStartMethod):
  """Logit KD (plain CE when `kd.alpha` is 0): the student's own weights are trained."""

  name: str = "kd"
  init: str = "random"  # the student's starting weights: "random", or the teacher's by uniform
  #                       "selection" or by "importance" (its most active units)

  @property
  def label(self) -> str:
    return {"selection": "kd_selection", "importance": "kd_importance"}.get(self.init, "kd")

  @property
  def student_start(self) -> str:
    return self.init


@dataclasses.dataclass(frozen=True)
class TwoPhaseMethod(MethodConfig):
  """A method that trains its generator in phase 1 and the materialised student in phase 2,
  splitting the distill steps between them."""

  phase1_fraction: float = 0.5  # share of the distill steps for phase 1; phase 2 gets the rest
  phase2_lr: float = 0.0  # phase-2 peak learning rate (0 = distill.optim.lr)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  data: int = -1  # devices on the 'data' axis (-1 = all that the 'model' axis leaves)
  model: int = 1  # devices on the 'model' axis (tensor parallelism of heads and FFN)
  fsdp: bool = False  # also shard parameters over 'data' (large teachers)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  every: int = 200  # save every N steps (and always at the end)
  keep: int = 2  # keep the last K checkpoints
  async_save: bool = True  # write in the background while training goes on


@dataclasses.dataclass(frozen=True)
class LogConfig:
  tensorboard: bool = False  # also write TensorBoard event files (needs tensorboardX)
  wandb: bool = False  # also log to Weights & Biases, one run per phase (needs wandb; WANDB_MODE=offline works)
  wandb_project: str = "wdjax"  # its project
  progress: bool = True  # progress bar with steps/s and ETA (on a terminal; lines otherwise)
  profile_steps: int = 0  # trace this many steps (from the 6th of the run) into <phase>/profile (+ summary.md)


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  """`wdjax pipeline`: besides the config's own student (`method`) and the CE-only one, a
  weight-transfer student of the same shape and steps."""

  transfer: str = "selection"  # "selection" or "importance" (that selection + KD), a method name (wd, ws, ...), or "" (none)
  transfer_lr: float = 1e-4  # its distill learning rate (0 = distill.optim.lr)


@dataclasses.dataclass(frozen=True)
class Config:
  workdir: str = "runs/default"  # everything a run writes goes here; rerunning resumes
  seed: int = 0  # seeds parameter init, data order and dropout
  cache_dir: str = ""  # asset cache ("" = $WDJAX_CACHE or ~/.cache/wdjax)
  compilation_cache: bool = True  # keep compiled XLA programs in <cache_dir>/xla: reruns skip compiling
  distributed: bool = False  # call jax.distributed.initialize() (multi-host)
  teacher: TeacherConfig = TeacherConfig()
  student: StudentConfig = StudentConfig()
  data: DataConfig = DataConfig()
  finetune: TrainConfig = TrainConfig()
  distill: TrainConfig = TrainConfig(epochs=3.0, optim=OptimConfig(lr=3e-4))
  kd: KDConfig = KDConfig()
  method: MethodConfig = KDMethod()
  task: TaskConfig = TaskConfig()  # the options of data.dataset's task (its own section type)
  mesh: MeshConfig = MeshConfig()
  checkpoint: CheckpointConfig = CheckpointConfig()
  log: LogConfig = LogConfig()
  pipeline: PipelineConfig = PipelineConfig()

  @property
  def teacher_dir(self) -> str:
    return self.teacher.path or str(Path(self.workdir) / "finetune" / "model")


def _field_names(obj, prefix: str = "") -> list[str]:
  """Dotted names of the leaf fields of the dataclass instance `obj` (a section's fields are
  those of the section it holds: `method`'s are its method's)."""
  names = []
  for f in dataclasses.fields(obj):
    value = getattr(obj, f.name)
    if dataclasses.is_dataclass(value):
      names += _field_names(value, prefix + f.name + ".")
    else:
      names.append(prefix + f.name)
  return names


def _coerce(key: str, raw: str, typ) -> object:
  try:
    value = ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    value = raw  # bare words are strings: --set method.name=kd
  origin = typing.get_origin(typ)
  if typ is bool:
    if isinstance(value, str) and value.lower() in ("true", "false"):
      value = value.lower() == "true"
    ok = isinstance(value, bool)
  elif typ is float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    value = float(value) if ok else value
  elif typ is int:
    ok = isinstance(value, int) and not isinstance(value, bool)
  elif typ is str:
    value, ok = str(raw), True
  elif origin is tuple:
    if isinstance(value, (str, int, float)):
      value = (value,)
    ok = isinstance(value, (tuple, list))
    value = tuple(value) if ok else value
  else:
    ok = True
  if not ok:
    raise WdjaxError(f"--set {key}={raw}: expected a value of type {getattr(typ, '__name__', typ)}")
  return value


def _close_matches(key: str, names: list[str]) -> list[str]:
  """Siblings with a similar last component first (lrr -> lr), else similar full paths."""
  parent, _, leaf = key.rpartition(".")
  siblings = {n.rpartition(".")[2]: n for n in names if n.rpartition(".")[0] == parent}
  close = [siblings[m] for m in difflib.get_close_matches(leaf, list(siblings), n=3, cutoff=0.6)]
  return close or difflib.get_close_matches(key, names, n=3, cutoff=0.8)


def override(cfg, key: str, raw: str, full_key: str = ""):
  """A copy of `cfg` with dotted `key` set from the string `raw` (`full_key`: the key as the
  user wrote it, for messages, when `cfg` is a nested part). `method=NAME` and `method.name=NAME`
  switch the method section."""
  full_key = full_key or key
  head, _, rest = key.partition(".")
  section = getattr(cfg, head, None) if dataclasses.is_dataclass(cfg) else None
  if isinstance(section, MethodConfig) and rest in ("", "name"):
    return dataclasses.replace(cfg, **{head: switch_method(section, raw.strip())})
  if isinstance(cfg, Config) and key == "data.dataset":  # the task section follows the dataset
    cfg = dataclasses.replace(cfg, data=override(cfg.data, rest, raw, full_key))
    wanted = task_section(cfg.data.dataset)
    return cfg if type(cfg.task) is wanted else dataclasses.replace(cfg, task=wanted())
  if rest and dataclasses.is_dataclass(section):  # the section checks its own keys
    return dataclasses.replace(cfg, **{head: override(section, rest, raw, full_key)})
  names = _field_names(cfg)
  if key not in names:
    raise WdjaxError(f"unknown config key {full_key!r}{_key_hint(cfg, key, full_key, names)}")
  typ = typing.get_type_hints(type(cfg))[head]
  return dataclasses.replace(cfg, **{head: _coerce(full_key, raw, typ)})


def switch_method(section: MethodConfig, name: str) -> MethodConfig:
  """`section` if it is already `name`'s, else `name`'s section with its defaults."""
  if section.name == name:
    return section
  sections = MethodConfig.sections()
  if name not in sections:
    raise WdjaxError(f"unknown method {name!r}; available: {', '.join(sections)}")
  return sections[name]()


def _key_hint(cfg, key: str, full_key: str, names: list[str]) -> str:
  if isinstance(cfg, MethodConfig):  # an option of another method's section?
    owners = [n for n, cls in MethodConfig.sections().items()
              if key in (f.name for f in dataclasses.fields(cls))]
    if owners:
      return (f": the {cfg.name} section has {', '.join(_field_names(cfg))}; {key} is an option of "
              f"{' and '.join(owners)} (--set {full_key.rpartition('.')[0] or 'method'}={owners[0]} first)")
  if isinstance(cfg, TaskConfig):  # an option of another task's section?
    owners = [d for d, cls in TaskConfig.sections().items()
              if key in (f.name for f in dataclasses.fields(cls))]
    if owners:
      own = ", ".join(_field_names(cfg)) or "no options"
      return (f": the task section of {' and '.join(cfg.datasets) or 'this dataset'} has {own}; "
              f"{key} is an option of data.dataset={' or '.join(owners)} (set that first)")
  prefix = full_key[:len(full_key) - len(key)]  # the section's own path, as the user wrote it
  close = [prefix + c for c in _close_matches(key, names)]
  return f"; did you mean {' or '.join(close)}?" if close else "; see `wdjax config CONFIG`"


def apply_overrides(cfg: Config, assignments: list[str]) -> Config:
  """`cfg` with each `KEY=VALUE` of `assignments` set; a method switch (`method=NAME` or
  `method.name=NAME`) and a dataset (`data.dataset=NAME`) go first wherever they are, so that the
  method's and the task's own keys reach their sections."""
  parsed = []
  for item in assignments:
    key, eq, raw = item.partition("=")
    if not eq:
      raise WdjaxError(f"--set expects KEY=VALUE, got {item!r}")
    parsed.append((key.strip(), raw.strip()))
  parsed.sort(key=lambda kv: kv[0] not in ("method", "method.name", "data.dataset"))  # stable
  for key, raw in parsed:
    cfg = override(cfg, key, raw)
  return cfg


def presets() -> list[str]:
  """The names of the presets that ship with wdjax (`wdjax/configs/<name>.py`)."""
  return sorted(p.stem for p in Path(__file__).with_name("configs").glob("*.py")
                if not p.stem.startswith("_"))


def _config_module(p: Path, preset: bool):
  """The module of a config: the preset named `p` or the file at `p`."""
  if preset:
    if str(p) not in presets():
      raise WdjaxError(f"no preset {str(p)!r} (presets: {', '.join(presets())}; a config file "
                       "of your own is named by its path, ending in .py)")
    return importlib.import_module(f"wdjax.configs.{p}")
  if not p.is_file():
    hint = f" (the preset is named without .py: {p.stem})" if p.stem in presets() else ""
    raise WdjaxError(f"config file {p} does not exist{hint}")
  spec = importlib.util.spec_from_file_location(f"wdjax_config_{p.stem}", p)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except TypeError as e:  # an unknown keyword in the file's own dataclass calls
    raise WdjaxError(f"{p}: {e}") from None
  return module


def load(path: str | os.PathLike, assignments: list[str] = ()) -> Config:
  """`get_config()` of a config, with `--set` assignments applied (parsed and typed;
  `wdjax.validate.load` also checks every value).

  `path` is the name of a preset (`wdjax/configs/`: `quickstart`, `wd`, ...) or the path of a
  Python config file (ending in `.py`), and may end in `:ARG` (`ws:gpu`, `my_config.py:gpu`),
  which calls `get_config("gpu")`.
  """
  name, sep, arg = str(path).partition(".py:")
  if sep:
    name += ".py"
  preset = not name.endswith(".py") and os.sep not in name and "/" not in name
  if preset:  # a preset's name, perhaps with its argument
    name, _, arg = name.partition(":")
  p = Path(name)
  module = _config_module(p, preset)
  if not hasattr(module, "get_config"):
    raise WdjaxError(f"{p} has no get_config() function")
  try:
    cfg = module.get_config(arg) if arg else module.get_config()
  except TypeError as e:
    raise WdjaxError(f"{p}: get_config({arg!r}) failed ({e})") from None
  except ValueError as e:  # an unknown variant name, say
    raise WdjaxError(f"{p}: {e}") from None
  if not isinstance(cfg, Config):
    raise WdjaxError(f"{p}: get_config() returned {type(cfg).__name__}, not wdjax.config.Config")
  return apply_overrides(cfg, list(assignments))


def to_dict(cfg) -> dict:
  return dataclasses.asdict(cfg)


def dumps(cfg) -> str:
  return json.dumps(to_dict(cfg), indent=2)
