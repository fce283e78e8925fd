"""Text classification and regression, of single texts or text pairs: a pretrained BERT-family
encoder fine-tuned on the task, students by every method (and WID's task-agnostic form:
compactors trained on masked-LM over the task's text).

  wdjax finetune kd:cpu      the teacher: all-MiniLM-L6-v2 with a new head -> finetune/
  wdjax distill  wd:cpu      a student by `method`                           -> distill*/

Data: Rotten Tomatoes or the user's CSV / TSV / JSON-lines files (`wdjax/data/text.py`): a text
column or two (`data.text_pair_column`: token types where the family has them), and class labels
or float scores (`data.label_kind`; regression trains one output with squared error, and KD
matches the teacher's score). Models are saved as `transformers` `*ForSequenceClassification`
directories (`problem_type: regression` for scores).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from wdjax import assets, distributed
from wdjax.config import Config
from wdjax.data import mlm, text
from wdjax.data.splits import TaskData
from wdjax.errors import WdjaxError
from wdjax.generators import Identity, StudentSpec
from wdjax.models import bert, hf
from wdjax.tasks import register
from wdjax.tasks.base import (AgnosticStart, FinetuneStart, Task, best_metric, check_best_metric,
                              student_shape)
from wdjax.train import phase as phase_lib
from wdjax.train.objectives import Classification, MaskedLanguageModel
from wdjax.train.phase import Model


def read_model(model_dir: str | Path, *, require_head: bool, **overrides):
  """(config, params, freshly initialised paths) of the HF model in `model_dir`."""
  cfg, params, fresh = hf.load(model_dir, **overrides)
  if require_head and any(p.startswith("classifier") for p in fresh):
    raise WdjaxError(f"{model_dir} has no trained classifier head; fine-tune it first "
                     "(`wdjax finetune CONFIG`) or point teacher.path at a task model")
  return cfg, params, fresh


def load_model(model_dir: str | Path, *, require_head: bool, **overrides) -> tuple[Model, list[str]]:
  """The HF model in `model_dir` with its file's sha256 (what a resumed run checks), and the
  paths its file lacks (freshly initialised)."""
  cfg, params, fresh = read_model(model_dir, require_head=require_head, **overrides)
  sha = assets.sha256_files(hf.safetensors_files(model_dir))
  return Model(cfg, params, Path(model_dir), sha), fresh


def student_config(cfg: Config, teacher: bert.EncoderConfig) -> bert.EncoderConfig:
  """The teacher's vocabulary, positions and numerics with the student's shape."""
  s = cfg.student
  if s.hidden_size % s.num_heads:
    raise WdjaxError(f"student.hidden_size {s.hidden_size} is not divisible by "
                     f"student.num_heads {s.num_heads}")
  return student_shape(teacher, cfg)


def pretrained_dir(cfg: Config) -> Path:
  """The pretrained `teacher.model` (an asset, fetched once, or an HF directory)."""
  return distributed.process0_first("teacher asset", lambda: assets.path(cfg.teacher.model, cfg.cache_dir))


def mlm_teacher(cfg: Config, data: TaskData, masking: mlm.MlmMasking, log) -> Model:
  """The *pretrained* teacher (`teacher.model`) with a masked-LM head.

  sentence-transformers checkpoints (MiniLM, MPNet) ship none, so the head (dense, GELU,
  LayerNorm, bias; the decoder is tied to the word embeddings) is trained alone on the frozen
  encoder, on the task's text, once per workdir (phase `mlm_head`, `method.mlm_head_steps` at
  lr 1e-3). Frozen, because WID must start from the teacher's own encoder: the head only has to
  read it out, and a head fitted to a fixed encoder is what the pretrained model would have had.
  """
  model_dir = pretrained_dir(cfg)
  t_cfg, params, fresh = hf.load(model_dir, head="mlm")
  if not fresh:  # the checkpoint has its MLM head
    return Model(t_cfg, params, model_dir, assets.sha256_file(model_dir / "model.safetensors"))
  head_cfg = dataclasses.replace(cfg, seed=0)  # one head per workdir, whatever the run's seed
  optim = dataclasses.replace(cfg.distill.optim, lr=1e-3, frozen=(r"^encoder/",))
  train = dataclasses.replace(cfg.distill, steps=cfg.method.mlm_head_steps, optim=optim)
  # the head's masks drawn with the head's seed too: a run of another seed finds it, not a clash
  head_masking = dataclasses.replace(masking, seed=head_cfg.seed)
  result = phase_lib.train_phase(head_cfg, phase="mlm_head", train=train, task=data,
                                 spec=StudentSpec(t_cfg, params), generator=Identity(), teacher=None,
                                 tokenizer_dir=model_dir, log=log,
                                 objective=MaskedLanguageModel(head_masking))
  log(f"[mlm_head] masked-token accuracy of the pretrained teacher: validation "
      f"{result['validation_accuracy']:.3f}")
  head_dir = phase_lib.phase_dir(head_cfg, "mlm_head") / "model"
  t_cfg, params, _ = hf.load(head_dir, head="mlm")
  return Model(t_cfg, params, model_dir, assets.sha256_file(head_dir / "model.safetensors"))


def num_outputs(data: TaskData) -> int:
  """The classifier's outputs: one per class, or one score."""
  return 1 if data.regression else len(data.label_names)


class TextClassification(Task):
  name = "text classification"
  datasets = ("rotten-tomatoes", "files")
  ranks_units = True
  compresses_vocabulary = True
  distils_intermediate = True

  def check(self, cfg: Config) -> list[str]:
    d, bad = cfg.data, []
    if d.label_kind not in ("auto", "classes", "regression"):
      bad.append(f"data.label_kind={d.label_kind!r} (one of auto, classes, regression)")
    if d.dataset != "files" and (d.text_pair_column or d.label_kind == "regression"):
      bad.append(f"data.dataset={d.dataset!r} (text pairs and regression need your own "
                 "data.dataset=files)")
    if d.augment and d.text_pair_column:
      bad.append(f"data.augment={d.augment} (perturbs single texts; not text pairs)")
    regression = text.is_regression(d)
    if regression and cfg.method.task_agnostic:
      bad.append(f"method {cfg.method.label!r} (its phase 2 fine-tunes a classifier head)")
    return bad + check_best_metric(cfg, regression)

  def objective(self, cfg: Config) -> Classification:
    regression = text.is_regression(cfg.data)
    return Classification(regression=regression, best_metric=best_metric(cfg, regression))

  def finetune_start(self, cfg: Config, log) -> FinetuneStart:
    model_dir = pretrained_dir(cfg)
    probe = hf.config_from_hf(hf.read_config(model_dir))
    data = text.load(cfg.data, model_dir, probe.pad_token_id, cfg.cache_dir)
    model, fresh = load_model(model_dir, require_head=False, num_labels=num_outputs(data),
                              dtype=cfg.teacher.dtype, hidden_dropout=cfg.teacher.hidden_dropout,
                              attention_dropout=cfg.teacher.attention_dropout)
    if fresh:
      log(f"[finetune] new task head: {', '.join(fresh)}")
    return FinetuneStart(data, StudentSpec(model.config, model.params), model_dir)

  def load_teacher(self, cfg: Config) -> Model:
    teacher_dir = Path(cfg.teacher_dir)
    if not (teacher_dir / "config.json").exists():
      raise WdjaxError(f"no task teacher at {teacher_dir}; run `wdjax finetune CONFIG` first "
                       "or set teacher.path to a fine-tuned HF model directory")
    return load_model(teacher_dir, require_head=True)[0]

  def load_data(self, cfg: Config, teacher: Model, log) -> TaskData:
    data = text.load(cfg.data, teacher.tokenizer_dir, teacher.config.pad_token_id, cfg.cache_dir)
    if num_outputs(data) != teacher.config.num_labels:
      what = "1 score (regression)" if data.regression else f"{len(data.label_names)} labels"
      raise WdjaxError(f"the teacher at {teacher.tokenizer_dir} has {teacher.config.num_labels} "
                       f"outputs, the data {what}; they must match")
    return data

  def student_config(self, cfg: Config, teacher_config: bert.EncoderConfig) -> bert.EncoderConfig:
    return student_config(cfg, teacher_config)

  def load_model(self, model_dir: Path):
    return read_model(model_dir, require_head=True)[:2]  # no hash: nothing resumes from it

  def generator_options(self, cfg: Config, teacher: Model, data: TaskData, student_shapes,
                        log) -> dict:
    method = cfg.method
    if method.name in ("ws", "gws") and method.init == "pca":
      from wdjax.generators.pca import pca_maps
      return {"pca": pca_maps(teacher.config, teacher.params, data.train, cfg, method)}
    return super().generator_options(cfg, teacher, data, student_shapes, log)

  def activation_fn(self, teacher_config: bert.EncoderConfig):
    return bert.activation_fn(teacher_config)

  def agnostic_start(self, cfg: Config, teacher: Model, data: TaskData, log) -> AgnosticStart:
    """Task-agnostic WID (docs/methods.md §3.4): phase 1 trains the compactors of the
    *pretrained* teacher on masked-LM alone (the task's text, no labels, no teacher outputs);
    the cut student (encoder + MLM head) is then fine-tuned on the task with a fresh head."""
    masking = mlm.masking_for(teacher.tokenizer_dir, teacher.config.vocab_size, seed=cfg.seed)
    pretrained = mlm_teacher(cfg, data, masking, log)
    num_labels = teacher.config.num_labels

    def phase2_spec(model_dir: Path, s_cfg: bert.EncoderConfig, export_only: bool, phase2: str) -> StudentSpec:
      _, encoder, fresh = hf.load(model_dir, seed=cfg.seed, num_labels=num_labels)
      if fresh and not export_only:
        log(f"[{phase2}] new task head: {', '.join(fresh)}")
      return StudentSpec(dataclasses.replace(s_cfg, num_labels=num_labels), encoder)

    return AgnosticStart(pretrained, MaskedLanguageModel(masking), phase2_spec)

  def eval_data(self, cfg: Config, model_dir: Path, config: bert.EncoderConfig) -> TaskData:
    return text.load(cfg.data, model_dir, config.pad_token_id, cfg.cache_dir)


TASK = register(TextClassification())
