"""Image classification with ViTs: the teacher trained from scratch, students by every method.

  wdjax finetune vit         the ViT teacher (shape from `task`), from scratch -> finetune/
  wdjax distill  vit         a student (shape from `student`) by `method`    -> distill*/
  --set method.name=select|ws|gws|wd|wid|opdf, --set method.init=selection (weight selection + KD)
  wdjax eval     vit --model DIR

Data: Fashion-MNIST or scikit-learn's digits (`wdjax/data/images.py`); models are saved as
`transformers` ViTForImageClassification directories.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import ClassVar

from flax import nnx

from wdjax.config import Config, TaskConfig
from wdjax.data import images
from wdjax.data.splits import TaskData
from wdjax.errors import WdjaxError
from wdjax.generators import StudentSpec
from wdjax.models import vit
from wdjax.models.vit import ViTConfig
from wdjax.tasks import register
from wdjax.tasks.base import (FinetuneStart, Task, best_metric, check_best_metric,
                              student_shape)
from wdjax.train import phase as phase_lib
from wdjax.train.objectives import Classification
from wdjax.train.phase import Model


@dataclasses.dataclass(frozen=True)
class VisionConfig(TaskConfig):
  """The `task` section of data.dataset="fashion-mnist" | "digits": the ViT teacher trained from
  scratch (`wdjax finetune`); students take their shape from `student` and the rest (patches,
  pooling) from it."""

  datasets: ClassVar[tuple[str, ...]] = ("fashion-mnist", "digits")
  patch_size: int = 4  # square patches (28x28 Fashion-MNIST: 49 patches of 4x4)
  hidden_size: int = 192  # teacher width
  num_layers: int = 6  # teacher blocks
  num_heads: int = 3  # teacher attention heads
  intermediate_size: int = 768  # teacher FFN width
  pooling: str = "cls"  # "cls" (class token; HF ViT's) | "mean" (mean of the patch tokens)


@dataclasses.dataclass(frozen=True)
class ImageClassification(Classification):
  """Cross-entropy on the image's label, Hinton KD from the teacher's logits: the text
  classifier's objective (batches as they come, accuracy over a split) on a ViT."""

  head = "image"

  def build(self, config: ViTConfig, seed: int = 0):
    return vit.build(config, seed)

  def apply(self, graphdef):
    return vit.apply_fn(graphdef)

  def export(self, out: Path, config: ViTConfig, params, tokenizer_dir: Path, task) -> None:
    del tokenizer_dir  # images need none
    vit.save(out, config, params, task.label_names, normalization=(task.train.mean, task.train.std))


def load_data(cfg: Config) -> TaskData:
  d = cfg.data
  return images.load(d.dataset, cfg.cache_dir, d.max_train_examples, d.max_eval_examples)


def teacher_config(cfg: Config, data: TaskData) -> ViTConfig:
  v, t = cfg.task, cfg.teacher
  try:
    return ViTConfig(image_size=images.image_size(data), patch_size=v.patch_size, hidden_size=v.hidden_size,
                     num_layers=v.num_layers, num_heads=v.num_heads,
                     intermediate_size=v.intermediate_size, num_labels=len(data.label_names),
                     pooling=v.pooling, hidden_dropout=t.hidden_dropout,
                     attention_dropout=t.attention_dropout, dtype=t.dtype)
  except ValueError as e:
    raise WdjaxError(f"task (ViT teacher): {e}") from None


class ImageClassificationTask(Task):
  name = "image classification"
  datasets = ("fashion-mnist", "digits")
  ranks_units = True
  distils_intermediate = True

  def check(self, cfg: Config) -> list[str]:
    method, bad = cfg.method, []
    if method.name in ("ws", "gws") and method.init == "pca":
      bad.append("method.init='pca' (computed from text-encoder activations; use identity or "
                 "xavier for ViTs)")
    if method.task_agnostic:
      bad.append(f"method {method.label!r} (its phase 1 trains on masked LM, which ViT students "
                 "have not; train on the task)")
    if cfg.task.pooling not in ("cls", "mean"):
      bad.append(f"task.pooling={cfg.task.pooling!r} (one of cls, mean)")
    return bad + check_best_metric(cfg)

  def objective(self, cfg: Config) -> ImageClassification:
    return ImageClassification(best_metric=best_metric(cfg))

  def finetune_start(self, cfg: Config, log) -> FinetuneStart:
    data = load_data(cfg)
    t_cfg = teacher_config(cfg, data)
    init = nnx.to_pure_dict(nnx.state(vit.build(t_cfg, cfg.seed)))
    return FinetuneStart(data, StudentSpec(t_cfg, init), Path(cfg.workdir))

  def load_teacher(self, cfg: Config) -> Model:
    return phase_lib.load_trained_teacher(cfg, "ViT", vit.load)

  def load_data(self, cfg: Config, teacher: Model, log) -> TaskData:
    data = load_data(cfg)
    t = teacher.config
    if images.image_size(data) != t.image_size or len(data.label_names) != t.num_labels:
      raise WdjaxError(f"the teacher at {teacher.tokenizer_dir} was trained on {t.image_size}px "
                       f"images with {t.num_labels} labels; data.dataset={cfg.data.dataset!r} has "
                       f"{images.image_size(data)}px and {len(data.label_names)}")
    return data

  def activation_fn(self, teacher_config: ViTConfig):
    return vit.activation_fn(teacher_config)

  def student_config(self, cfg: Config, teacher_config: ViTConfig) -> ViTConfig:
    """The teacher's patches, pooling and labels with the student's shape."""
    return student_shape(teacher_config, cfg)

  def load_model(self, model_dir: Path):
    return vit.load(model_dir)

  def eval_data(self, cfg: Config, model_dir: Path, config: ViTConfig) -> TaskData:
    return load_data(cfg)


TASK = register(ImageClassificationTask())
