"""Image classification with ViTs: the teacher trained from scratch, students by every method.

The same phases, generators, step, loop and checkpoints as the text classifier (`run.py`), with
the `ImageClassification` objective (a `models/vit.py` network, logit KD from the teacher):

  wdjax finetune configs/vit.py         the ViT teacher (shape from `vit`), from scratch -> finetune/
  wdjax distill  configs/vit.py         a student (shape from `student`) by `method`    -> distill*/
  --set method.name=select|ws|gws|wd|wid|opdf, --set method.init=selection (weight selection + KD)
  wdjax eval     configs/vit.py --model DIR

Models are saved as `transformers` ViTForImageClassification directories.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from flax import nnx

from wdjax import distributed
from wdjax.config import Config
from wdjax.data import images
from wdjax.data.tasks import Task
from wdjax.errors import WdjaxError
from wdjax.generators import Identity, StudentSpec
from wdjax.models import vit
from wdjax.models.vit import ViTConfig
from wdjax.train import run as run_lib
from wdjax.train.evaluate import Predictor
from wdjax.train.objectives import Classification


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


OBJECTIVE = ImageClassification()


def load_task(cfg: Config) -> Task:
  d = cfg.data
  return images.load(d.dataset, cfg.cache_dir, d.max_train_examples, d.max_eval_examples)


def teacher_config(cfg: Config, task: Task) -> ViTConfig:
  v, t = cfg.vit, cfg.teacher
  try:
    return ViTConfig(image_size=images.image_size(task), patch_size=v.patch_size, hidden_size=v.hidden_size,
                     num_layers=v.num_layers, num_heads=v.num_heads,
                     intermediate_size=v.intermediate_size, num_labels=len(task.label_names),
                     pooling=v.pooling, hidden_dropout=t.hidden_dropout,
                     attention_dropout=t.attention_dropout, dtype=t.dtype)
  except ValueError as e:
    raise WdjaxError(f"vit: {e}") from None


def student_config(cfg: Config, teacher: ViTConfig) -> ViTConfig:
  """The teacher's patches, pooling and labels with the student's shape."""
  s = cfg.student
  try:
    return dataclasses.replace(
        teacher, num_layers=s.num_layers, hidden_size=s.hidden_size, num_heads=s.num_heads,
        intermediate_size=s.intermediate_size, hidden_dropout=s.hidden_dropout,
        attention_dropout=s.attention_dropout, dtype=s.dtype)
  except ValueError as e:
    raise WdjaxError(f"student: {e}") from None


def train_teacher(cfg: Config, log=distributed.log, export_only: bool = False) -> dict:
  """Train the ViT teacher from scratch; writes `<workdir>/finetune/model`."""
  task = load_task(cfg)
  t_cfg = teacher_config(cfg, task)
  init = nnx.to_pure_dict(nnx.state(vit.build(t_cfg, cfg.seed)))
  return run_lib.train_phase(cfg, phase="finetune", train=cfg.finetune, task=task,
                             spec=StudentSpec(t_cfg, init), generator=Identity(), teacher=None,
                             tokenizer_dir=Path(cfg.workdir), log=log, export_only=export_only,
                             objective=OBJECTIVE)


def load_teacher(cfg: Config) -> run_lib.Model:
  return run_lib.load_trained_teacher(cfg, "ViT", vit.load)


def distill(cfg: Config, phase: str = "", log=distributed.log, export_only: bool = False) -> dict:
  """A ViT student of the teacher by `method`; writes `<workdir>/<phase>/model` (two-phase
  methods: phase 1 then `<phase>_phase2`)."""
  method = cfg.method
  if method.name in ("ws", "gws") and method.map_init == "pca":
    raise WdjaxError("method.map_init=pca is computed from text-encoder activations; use identity "
                     "or xavier for ViTs")
  if method.name == "wid" and method.wid_objective != "task":
    raise WdjaxError("ViT students support method.wid_objective='task' only (there is no MLM)")
  phase = run_lib.first_phase(cfg, phase)
  teacher = load_teacher(cfg)
  task = load_task(cfg)
  if images.image_size(task) != teacher.config.image_size or len(task.label_names) != teacher.config.num_labels:
    raise WdjaxError(f"the teacher at {teacher.tokenizer_dir} was trained on {teacher.config.image_size}px "
                     f"images with {teacher.config.num_labels} labels; data.dataset={cfg.data.dataset!r} has "
                     f"{images.image_size(task)}px and {len(task.label_names)}")
  s_cfg = student_config(cfg, teacher.config)
  init = run_lib.initial_student(method, vit.build(s_cfg, cfg.seed), teacher.params)
  steps, steps1 = run_lib._phase_steps(cfg, task)
  generator = run_lib._generator(method, init, teacher, task, cfg, steps1)
  spec = StudentSpec(s_cfg, init)
  two_phase = method.name in run_lib.TWO_PHASE
  train = dataclasses.replace(cfg.distill, steps=steps1) if two_phase else cfg.distill
  first = run_lib.train_phase(cfg, phase=phase, train=train, task=task, spec=spec, generator=generator,
                              teacher=teacher, tokenizer_dir=teacher.tokenizer_dir, log=log,
                              export_only=export_only, objective=OBJECTIVE)
  if not run_lib.continues_to_phase2(cfg, phase, steps1, steps, export_only):
    return first
  _, generated = vit.load(run_lib.phase_dir(cfg, phase) / "model")
  return run_lib._phase2(cfg, phase, first, StudentSpec(s_cfg, generated), teacher, task,
                         steps - steps1, log, objective=OBJECTIVE, export_only=export_only)


def evaluate(cfg: Config, model_dir: str | Path, splits=("validation", "test")) -> dict:
  """Accuracy of a saved ViT on the config's image data."""
  import jax
  from wdjax.train import mesh as mesh_lib
  m_cfg, params = vit.load(model_dir)
  task = load_task(cfg)
  mesh = mesh_lib.make_mesh(cfg.mesh.data, cfg.mesh.model)
  sh = mesh_lib.param_shardings(params, mesh)
  predictor = Predictor(vit.apply_fn(nnx.split(vit.build(m_cfg))[0]), mesh, sh,
                        cfg.distill.eval_batch_size, cfg.data.pad_to_multiple)
  params = jax.device_put(params, sh)
  return {split: predictor.scores(params, task.split(split))["accuracy"] for split in splits}
