"""The phases a user runs: fine-tune a teacher, distil a student, evaluate, export.

Each phase writes into `<workdir>/<phase>/`: `checkpoints/` (Orbax), `metrics.jsonl`,
`results.json` and `model/` (an HF-format directory `transformers` loads). Rerunning a phase
resumes from its latest checkpoint; a finished phase is not trained again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from wdjax import assets, config as config_lib, distributed, xla_cache
from wdjax.config import Config, TrainConfig
from wdjax.data import mlm, pipeline, tasks
from wdjax.data.mlm import MlmMasking
from wdjax.errors import WdjaxError
from wdjax import generators
from wdjax.generators import Generator, Identity, StudentSpec, param_count
from wdjax.models import bert, hf
from wdjax.train import checkpoint as ckpt_lib, loop, mesh as mesh_lib, step as step_lib
from wdjax.train.evaluate import Predictor
from wdjax.train.objectives import Classification, MaskedLanguageModel

Objective = Classification | MaskedLanguageModel
CLASSIFICATION = Classification()
IMAGE_DATASETS = ("fashion-mnist", "digits")  # wdjax/data/images.py
from wdjax.train.metrics import MetricWriter

Params = Any


@dataclasses.dataclass
class Model:
  """A loaded or generated model: its config, params and where its tokenizer lives."""

  config: bert.EncoderConfig
  params: Params
  tokenizer_dir: Path
  sha256: str = ""


def phase_dir(cfg: Config, phase: str) -> Path:
  return Path(cfg.workdir) / phase


def load_model(model_dir: str | Path, *, require_head: bool, **overrides) -> tuple[Model, list[str]]:
  cfg, params, fresh = hf.load(model_dir, **overrides)
  if require_head and any(p.startswith("classifier") for p in fresh):
    raise WdjaxError(f"{model_dir} has no trained classifier head; fine-tune it first "
                     "(`wdjax finetune CONFIG`) or point teacher.path at a task model")
  sha = assets.sha256_file(Path(model_dir) / "model.safetensors")
  return Model(cfg, params, Path(model_dir), sha), fresh


def load_trained_teacher(cfg: Config, what: str, load) -> Model:
  """The teacher `wdjax finetune` trained from scratch (translation, vision) at `cfg.teacher_dir`,
  read by `load(dir, dtype=...) -> (config, params)`; `what` names the kind in the error."""
  d = Path(cfg.teacher_dir)
  if not (d / "config.json").exists():
    raise WdjaxError(f"no {what} teacher at {d}; run `wdjax finetune CONFIG` first "
                     f"or set teacher.path to a trained {what} directory")
  t_cfg, params = load(d, dtype=cfg.teacher.dtype)
  return Model(t_cfg, params, d, assets.sha256_file(d / "model.safetensors"))


def student_config(cfg: Config, teacher: bert.EncoderConfig) -> bert.EncoderConfig:
  """The teacher's vocabulary, positions and numerics with the student's shape."""
  s = cfg.student
  if s.hidden_size % s.num_heads:
    raise WdjaxError(f"student.hidden_size {s.hidden_size} is not divisible by "
                     f"student.num_heads {s.num_heads}")
  return dataclasses.replace(
      teacher, num_layers=s.num_layers, hidden_size=s.hidden_size, num_heads=s.num_heads,
      intermediate_size=s.intermediate_size, hidden_dropout=s.hidden_dropout,
      attention_dropout=s.attention_dropout, dtype=s.dtype)


def total_steps(train: TrainConfig, steps_per_epoch: int) -> int:
  return train.steps if train.steps > 0 else max(1, math.ceil(train.epochs * steps_per_epoch))


def _fingerprint(cfg: Config, phase_train: TrainConfig, distilling: bool) -> dict:
  """The settings a resumed run must share with the run that wrote the checkpoints."""
  d = config_lib.to_dict(cfg)
  out = {"seed": d["seed"], "teacher": d["teacher"], "data": d["data"],
         "train": dataclasses.asdict(phase_train)}
  if distilling:
    out.update(student=d["student"], kd=d["kd"], method=d["method"])
  if cfg.data.dataset == "bible":
    out["mt"] = d["mt"]
  if cfg.data.dataset in IMAGE_DATASETS:
    out["vit"] = d["vit"]
  return out


def _diff(saved: dict, now: dict, prefix: str = "") -> list[str]:
  """Settings that differ between a saved fingerprint and the current one. Keys the saved one
  lacks are config fields added after that run started: they had their defaults then, so they
  do not count."""
  out = []
  for k in sorted(saved):
    va, vb = saved[k], now.get(k)
    if isinstance(va, dict) and isinstance(vb, dict):
      out += _diff(va, vb, f"{prefix}{k}.")
    elif va != vb and not (isinstance(va, (list, tuple)) and list(va) == list(vb or [])):
      out.append(f"{prefix}{k}: {va!r} -> {vb!r}")
  return out


def train_phase(cfg: Config, *, phase: str, **kwargs) -> dict:
  """`_train_phase` holding the phase directory's lock (one process per phase directory)."""
  lock = ckpt_lib.PhaseLock(phase_dir(cfg, phase)).acquire()
  try:
    return _train_phase(cfg, phase=phase, **kwargs)
  finally:
    lock.release()


def _train_phase(cfg: Config, *, phase: str, train: TrainConfig, task: tasks.Task,
                spec: StudentSpec, generator: Generator, teacher: Model | None,
                tokenizer_dir: Path, log=distributed.log, export_only: bool = False,
                objective: Objective = CLASSIFICATION) -> dict:
  """Train `generator`'s parameters for one phase, export the dense model, report accuracies.

  With `export_only`, training is skipped: the latest checkpoint is materialised and exported.
  `objective` picks the head and loss (classification, or masked-LM on the task's text).
  """
  out = phase_dir(cfg, phase)
  results_path = out / "results.json"
  mesh = mesh_lib.make_mesh(cfg.mesh.data, cfg.mesh.model)
  n_data = mesh.shape["data"]
  for name, bs in (("batch_size", train.batch_size), ("eval_batch_size", train.eval_batch_size)):
    if bs % n_data:
      raise WdjaxError(f"{phase}.{name}={bs} is not divisible by the {n_data} devices of the 'data' axis")
  batches = pipeline.TrainBatches(
      task.train, train.batch_size, seed=cfg.seed, pad_to_multiple=cfg.data.pad_to_multiple,
      length_grouping=cfg.data.length_grouping, process_index=jax.process_index(),
      process_count=jax.process_count())
  steps = total_steps(train, batches.steps_per_epoch)

  teacher_params = None
  teacher_sh = None
  if teacher is not None:
    teacher_sh = mesh_lib.param_shardings(teacher.params, mesh, cfg.mesh.fsdp)
    teacher_params = jax.device_put(teacher.params, teacher_sh)
  student_graph = nnx.split(objective.build(generator.training_config(spec.config)))[0]
  export_apply = objective.apply(nnx.split(objective.build(spec.config))[0])
  student_apply = objective.apply(student_graph)
  teacher_apply = None
  if teacher is not None and cfg.kd.alpha > 0 and objective.logit_kd:
    teacher_cfg = dataclasses.replace(teacher.config, dtype=cfg.teacher.dtype)
    teacher_apply = objective.apply(nnx.split(objective.build(teacher_cfg))[0])

  gen_shapes, gen_state_shapes = jax.eval_shape(
      lambda p, t: generator.init(jax.random.key(cfg.seed), t, StudentSpec(spec.config, p)),
      spec.init_params, teacher_params)
  tx = step_lib.make_optimizer(train.optim, steps, gen_shapes,
                               generator.gradient_transform(gen_state_shapes),
                               generator.lr_multipliers(gen_shapes),
                               generator.moment_injection())

  def init_state(init_params, t_params):
    return step_lib.init_state(generator, tx, cfg.seed, t_params, StudentSpec(spec.config, init_params))

  state_shapes = jax.eval_shape(init_state, spec.init_params, teacher_params)
  trainable = step_lib.trainable_count(gen_shapes, train.optim.frozen)
  state_sh = mesh_lib.param_shardings(state_shapes, mesh)
  student_sh = mesh_lib.param_shardings(spec.init_params, mesh)
  batch_sh = mesh_lib.batch_sharding(mesh)
  train_step = jax.jit(
      step_lib.make_train_step(generator=generator, student_apply=student_apply,
                               teacher_apply=teacher_apply, tx=tx, kd=cfg.kd, seed=cfg.seed,
                               frozen=train.optim.frozen, label_smoothing=objective.label_smoothing,
                               products=step_lib.generator_products(spec.config.dtype)),
      in_shardings=(state_sh, teacher_sh, batch_sh),
      out_shardings=(state_sh, mesh_lib.replicated(mesh)), donate_argnums=0)
  materialize = jax.jit(lambda p, t, s: generator.materialize(p, t, s), out_shardings=student_sh)
  student_predictor = objective.predictor(export_apply, mesh, student_sh, train.eval_batch_size,
                                         cfg.data.pad_to_multiple)

  checkpointer = ckpt_lib.Checkpointer(out / "checkpoints", every=cfg.checkpoint.every,
                                       keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save)
  meta = {"phase": phase, "fingerprint": dict(_fingerprint(cfg, train, distilling=teacher is not None),
                                              objective=repr(objective)),
          "teacher": {"path": str(teacher.tokenizer_dir), "sha256": teacher.sha256} if teacher else None,
          "total_steps": steps}
  latest = checkpointer.latest_step()
  try:
    if latest is not None:
      saved = checkpointer.read_meta(latest)
      changed = _diff(saved.get("fingerprint", {}), json.loads(json.dumps(meta["fingerprint"])))
      if changed:
        raise WdjaxError(f"{out} holds a run with other settings ({'; '.join(changed[:3])}); "
                         "use a new workdir (--set workdir=...) or delete that directory")
      if teacher and saved.get("teacher") and saved["teacher"]["sha256"] != teacher.sha256:
        raise WdjaxError(f"the teacher at {teacher.tokenizer_dir} changed since {out} was started "
                         "(sha256 differs); use a new workdir")
      if latest >= steps and results_path.exists() and not export_only:
        log(f"[{phase}] already complete; results in {results_path}")
        return json.loads(results_path.read_text())
    elif export_only:
      raise WdjaxError(f"nothing to export: {checkpointer.directory} has no checkpoint; "
                       f"run the {phase} phase first")
    if latest is None:
      state = jax.jit(init_state, out_shardings=state_sh)(spec.init_params, teacher_params)
      best = loop.initial_best(materialize(state["params"], teacher_params, state["gen_state"]))
    else:
      rep = mesh_lib.replicated(mesh)
      target = {"train": ckpt_lib.abstract_like(state_shapes, state_sh),
                "best": {"params": ckpt_lib.abstract_like(spec.init_params, student_sh),
                         "val_accuracy": jax.ShapeDtypeStruct((), jnp.float32, sharding=rep),
                         "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)}}
      restored, _ = checkpointer.restore(latest, target)
      state, best = restored["train"], restored["best"]
      log(f"[{phase}] resuming from step {latest} of {steps} ({checkpointer.directory})")

    log(f"[{phase}] {trainable / 1e6:.2f}M trainable parameters, "
        f"{param_count(spec.init_params) / 1e6:.2f}M in the model, {steps} steps of "
        f"{train.batch_size} ({steps / batches.steps_per_epoch:.2f} epochs), mesh "
        f"{dict(mesh.shape)}")

    def evaluate(st):
      student = materialize(st["params"], teacher_params, st["gen_state"])
      scores = student_predictor.scores(student, task.validation)
      return {"val_" + k: v for k, v in scores.items()}, student

    logits_cache = None
    if teacher_apply is not None and cfg.kd.cache_teacher_logits and not export_only:
      logits_cache = teacher_train_logits(
          cfg, teacher, task, lambda: Predictor(teacher_apply, mesh, teacher_sh, train.eval_batch_size,
                                                cfg.data.pad_to_multiple).logits(teacher_params, task.train),
          log=lambda m: log(f"[{phase}] {m}"))

    def get_batch(i):
      batch = objective.prepare(batches.batch(i), i)
      if logits_cache is not None:
        batch["teacher_logits"] = logits_cache[batch["index"]]
      return mesh_lib.put_batch({k: v for k, v in batch.items() if k != "index"}, mesh)

    spec_loop = loop.LoopSpec(
        name=phase, total_steps=steps, steps_per_epoch=batches.steps_per_epoch,
        train_step=train_step,
        get_batch=get_batch,
        evaluate=evaluate, checkpointer=checkpointer,
        writer=MetricWriter(out, tensorboard=cfg.log.tensorboard), meta=meta,
        log_every=train.log_every, eval_every=train.eval_every, progress=cfg.log.progress,
        lr_at=lambda s: float(step_lib.schedule(train.optim, steps)(s)), keep_best=train.keep_best,
        profile_steps=cfg.log.profile_steps, profile_dir=str(out / "profile"))
    if not export_only:
      state, best = loop.fit(state, best, teacher_params, spec_loop)
    student = jax.device_get(best["params"])
  finally:
    checkpointer.close()

  results = {"phase": phase, "steps": int(jax.device_get(state["step"])), "total_steps": steps,
             "exported_step": int(best["step"]),
             "trainable_params": trainable,
             "model_params": param_count(spec.init_params)}
  for split in ("validation", "test"):
    scores = student_predictor.scores(student, task.split(split))
    results[f"{split}_accuracy"] = scores["accuracy"]
    results[f"{split}_loss"] = scores["loss"]
  if jax.process_index() == 0:
    objective.export(out / "model", spec.config, student, tokenizer_dir, task)
    write_results(results_path, results)
  distributed.barrier(f"{phase} exported")  # phase 2 and resumes read what process 0 wrote
  log(f"[{phase}] validation accuracy {results['validation_accuracy']:.4f}, "
      f"test accuracy {results['test_accuracy']:.4f}; model in {out / 'model'}")
  return results


def write_results(path: Path, results: dict) -> None:
  """`results.json`, atomically (a temporary sibling renamed into place)."""
  tmp = path.with_suffix(".tmp")
  tmp.write_text(json.dumps(results, indent=2) + "\n")
  tmp.replace(path)


def teacher_train_logits(cfg: Config, teacher: Model, task: tasks.Task, compute, log) -> np.ndarray:
  """The teacher's `[n_train, classes]` logits, computed once per teacher and data and kept in
  `<workdir>/cache/` (every phase and seed of a workdir distils from the same numbers). The key
  holds the data's content, not only its config: a CSV edited in place is other data."""
  key = hashlib.sha256(json.dumps([teacher.sha256, config_lib.to_dict(cfg.data), cfg.teacher.dtype,
                                   task.train.digest()]).encode()).hexdigest()[:16]
  path = Path(cfg.workdir) / "cache" / f"teacher_logits_{key}.npy"
  if path.exists():
    logits = np.load(path)
    if logits.shape[0] == len(task.train):
      return logits
  log(f"computing the teacher's logits on the {len(task.train)} training examples")
  logits = compute()
  if jax.process_index() == 0:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, logits)
    tmp.replace(path)
  return logits


def finetune(cfg: Config, log=distributed.log, export_only: bool = False) -> dict:
  """Fine-tune the pretrained `teacher.model` on the task (translation: train the teacher from
  scratch); writes `<workdir>/finetune/model`."""
  _start(cfg)
  if cfg.data.dataset == "bible":
    from wdjax.train import translate
    return translate.train_teacher(cfg, log, export_only)
  if cfg.data.dataset in IMAGE_DATASETS:
    from wdjax.train import vision
    return vision.train_teacher(cfg, log, export_only)
  model_dir = distributed.process0_first(
      "teacher asset", lambda: assets.path(cfg.teacher.model, cfg.cache_dir))
  probe = hf.config_from_hf(hf.read_config(model_dir))
  task = tasks.load(cfg.data, model_dir, probe.pad_token_id, cfg.cache_dir)
  model, fresh = load_model(model_dir, require_head=False, num_labels=len(task.label_names),
                            dtype=cfg.teacher.dtype, hidden_dropout=cfg.teacher.hidden_dropout,
                            attention_dropout=cfg.teacher.attention_dropout)
  if fresh:
    log(f"[finetune] new task head: {', '.join(fresh)}")
  spec = StudentSpec(model.config, model.params)
  return train_phase(cfg, phase="finetune", train=cfg.finetune, task=task, spec=spec,
                     generator=Identity(), teacher=None, tokenizer_dir=model_dir, log=log,
                     export_only=export_only)


def distill(cfg: Config, phase: str = "", log=distributed.log, export_only: bool = False) -> dict:
  """Distil the task teacher into the student with `method`; writes `<workdir>/<phase>/model`."""
  _start(cfg)
  if cfg.data.dataset == "bible":
    from wdjax.train import translate
    return translate.distill(cfg, phase, log, export_only)
  if cfg.data.dataset in IMAGE_DATASETS:
    from wdjax.train import vision
    return vision.distill(cfg, phase, log, export_only)
  phase = first_phase(cfg, phase)
  teacher_dir = Path(cfg.teacher_dir)
  if not (teacher_dir / "config.json").exists():
    raise WdjaxError(f"no task teacher at {teacher_dir}; run `wdjax finetune CONFIG` first "
                     "or set teacher.path to a fine-tuned HF model directory")
  teacher, _ = load_model(teacher_dir, require_head=True)
  task = tasks.load(cfg.data, teacher_dir, teacher.config.pad_token_id, cfg.cache_dir)
  if len(task.label_names) != teacher.config.num_labels:
    raise WdjaxError(f"the teacher at {teacher_dir} has {teacher.config.num_labels} labels, the data "
                     f"{len(task.label_names)}; they must match")
  method = cfg.method
  if method.name == "wid" and method.wid_objective not in ("task", "mlm"):
    raise WdjaxError(f"method.wid_objective must be 'task' or 'mlm', got {method.wid_objective!r}")
  if method.name == "wid" and method.wid_objective == "mlm":
    return _distill_wid_mlm(cfg, phase, teacher, task, log, export_only)
  s_cfg = student_config(cfg, teacher.config)
  init = initial_student(method, bert.build(s_cfg, seed=cfg.seed), teacher.params)
  # WD, WID: phase 1 trains the generator, phase 2 fine-tunes the materialised student (same
  # total budget); WID's mask schedule is laid out over phase 1's length.
  steps, steps1 = _phase_steps(cfg, task)
  generator = _generator(method, init, teacher, task, cfg, steps1)
  spec = StudentSpec(s_cfg, init)
  if method.name not in TWO_PHASE:
    return train_phase(cfg, phase=phase, train=cfg.distill, task=task, spec=spec,
                       generator=generator, teacher=teacher, tokenizer_dir=teacher_dir, log=log,
                       export_only=export_only)
  first = train_phase(cfg, phase=phase, train=dataclasses.replace(cfg.distill, steps=steps1),
                      task=task, spec=spec, generator=generator, teacher=teacher,
                      tokenizer_dir=teacher_dir, log=log, export_only=export_only)
  if not continues_to_phase2(cfg, phase, steps1, steps, export_only):
    return first
  _, generated, _ = hf.load(phase_dir(cfg, phase) / "model")
  return _phase2(cfg, phase, first, StudentSpec(s_cfg, generated), teacher, task, steps - steps1, log,
                 export_only=export_only)


def initial_student(method, model: nnx.Module, teacher_params: Params) -> Params:
  """The student's starting parameters: `model`'s random initialisation, or the teacher's weight
  selection for KD with `method.init=selection`."""
  init = nnx.to_pure_dict(nnx.state(model))
  if method.name == "kd" and method.init == "selection":
    return generators.select(teacher_params, init, method.layer_map or "every_k")
  if method.init != "random":
    raise WdjaxError(f"method.init={method.init!r} applies to method kd only ('random' or 'selection')")
  return init


def _phase_steps(cfg: Config, task: tasks.Task) -> tuple[int, int]:
  """(total distill steps, phase-1 steps): two-phase methods split the one budget."""
  steps = total_steps(cfg.distill, len(task.train) // cfg.distill.batch_size)
  if cfg.method.name not in TWO_PHASE:
    return steps, steps
  return steps, max(1, int(round(cfg.method.phase1_fraction * steps)))


def _generator(method, init: Params, teacher: Model, task: tasks.Task, cfg: Config,
               steps1: int) -> Generator:
  try:
    return generators.make(method.name, init, teacher.params,
                           **generator_options(method, teacher, task, cfg, steps1))
  except ValueError as e:  # a layer map or option that does not fit these shapes
    raise WdjaxError(f"method {method.name}: {e}") from None


def _phase2(cfg: Config, phase: str, first: dict, spec: StudentSpec, teacher: Model,
            task: tasks.Task, steps: int, log, objective: Objective = CLASSIFICATION,
            export_only: bool = False) -> dict:
  """Fine-tune phase 1's student on the task (KD from the task teacher if kd.alpha > 0)."""
  optim2 = dataclasses.replace(cfg.distill.optim, lr=cfg.method.phase2_lr or cfg.distill.optim.lr)
  second = train_phase(cfg, phase=phase + PHASE2,
                       train=dataclasses.replace(cfg.distill, steps=steps, optim=optim2),
                       task=task, spec=spec, generator=Identity(), teacher=teacher,
                       tokenizer_dir=teacher.tokenizer_dir, log=log, objective=objective,
                       export_only=export_only)
  return dict(second, phase1=first, trainable_params=max(first["trainable_params"],
                                                          second["trainable_params"]))


def mlm_teacher(cfg: Config, task: tasks.Task, masking: MlmMasking, log) -> Model:
  """The *pretrained* teacher (`teacher.model`) with a masked-LM head.

  sentence-transformers checkpoints (MiniLM, MPNet) ship none, so the head (dense, GELU,
  LayerNorm, bias; the decoder is tied to the word embeddings) is trained alone on the frozen
  encoder, on the task's text, once per workdir (phase `mlm_head`, `method.mlm_head_steps` at
  lr 1e-3). Frozen, because WID must start from the teacher's own encoder: the head only has to
  read it out, and a head fitted to a fixed encoder is what the pretrained model would have had.
  """
  model_dir = distributed.process0_first(
      "teacher asset", lambda: assets.path(cfg.teacher.model, cfg.cache_dir))
  t_cfg, params, fresh = hf.load(model_dir, head="mlm")
  if not fresh:  # the checkpoint has its MLM head
    return Model(t_cfg, params, model_dir, assets.sha256_file(model_dir / "model.safetensors"))
  head_cfg = dataclasses.replace(cfg, seed=0)  # one head per workdir, whatever the run's seed
  optim = dataclasses.replace(cfg.distill.optim, lr=1e-3, frozen=(r"^encoder/",))
  train = dataclasses.replace(cfg.distill, steps=cfg.method.mlm_head_steps, optim=optim)
  # the head's masks drawn with the head's seed too: a run of another seed finds it, not a clash
  head_masking = dataclasses.replace(masking, seed=head_cfg.seed)
  result = train_phase(head_cfg, phase="mlm_head", train=train, task=task,
                       spec=StudentSpec(t_cfg, params), generator=Identity(), teacher=None,
                       tokenizer_dir=model_dir, log=log, objective=MaskedLanguageModel(head_masking))
  log(f"[mlm_head] masked-token accuracy of the pretrained teacher: validation "
      f"{result['validation_accuracy']:.3f}")
  t_cfg, params, _ = hf.load(phase_dir(head_cfg, "mlm_head") / "model", head="mlm")
  return Model(t_cfg, params, model_dir,
               assets.sha256_file(phase_dir(head_cfg, "mlm_head") / "model" / "model.safetensors"))


def _distill_wid_mlm(cfg: Config, phase: str, task_teacher: Model, task: tasks.Task, log,
                     export_only: bool) -> dict:
  """Task-agnostic WID (methods.md §3.4): phase 1 trains the compactors of the *pretrained*
  teacher on masked-LM alone (the task's text, no labels, no teacher outputs); the cut student
  (encoder + MLM head) is then fine-tuned on the task with a fresh classifier head."""
  method = cfg.method
  masking = mlm.masking_for(task_teacher.tokenizer_dir, task_teacher.config.vocab_size,
                            seed=cfg.seed)
  teacher = mlm_teacher(cfg, task, masking, log)
  s_cfg = student_config(cfg, teacher.config)
  init = nnx.to_pure_dict(nnx.state(bert.build(s_cfg, "mlm", seed=cfg.seed)))
  steps, steps1 = _phase_steps(cfg, task)
  generator = _generator(method, init, teacher, task, cfg, steps1)
  first = train_phase(cfg, phase=phase, train=dataclasses.replace(cfg.distill, steps=steps1),
                      task=task, spec=StudentSpec(s_cfg, init), generator=generator,
                      teacher=teacher, tokenizer_dir=teacher.tokenizer_dir, log=log,
                      export_only=export_only, objective=MaskedLanguageModel(masking))
  if not continues_to_phase2(cfg, phase, steps1, steps, export_only):
    return first
  s_cls = dataclasses.replace(s_cfg, num_labels=task_teacher.config.num_labels)
  _, encoder, fresh = hf.load(phase_dir(cfg, phase) / "model", seed=cfg.seed,
                              num_labels=task_teacher.config.num_labels)
  if fresh and not export_only:
    log(f"[{phase}{PHASE2}] new task head: {', '.join(fresh)}")
  return _phase2(cfg, phase, first, StudentSpec(s_cls, encoder), task_teacher, task,
                 steps - steps1, log, export_only=export_only)


TWO_PHASE = ("wd", "wid")  # methods whose phase 1 trains a generator and phase 2 the student


def default_phase(cfg: Config) -> str:
  """`distill` for plain KD, `distill_<method>` for the others (one teacher, many students)."""
  return "distill" if cfg.method.label == "kd" else f"distill_{cfg.method.label}"


PHASE2 = "_phase2"  # a two-phase method's second phase runs in `<phase>_phase2`


def first_phase(cfg: Config, phase: str) -> str:
  """The phase a distill run starts from: `phase` or the config's default; a two-phase method's
  `<phase>_phase2` names the same run (it is reached through its phase 1)."""
  phase = phase or default_phase(cfg)
  if cfg.method.name in TWO_PHASE and phase.endswith(PHASE2):
    return phase[:-len(PHASE2)]
  return phase


def final_model_dir(cfg: Config, phase: str = "") -> Path:
  """The model a distill run ends with: phase 2's for a two-phase method once it has one."""
  phase = first_phase(cfg, phase)
  second = phase_dir(cfg, phase + PHASE2) / "model"
  return second if cfg.method.name in TWO_PHASE and second.is_dir() else phase_dir(cfg, phase) / "model"


def continues_to_phase2(cfg: Config, phase: str, steps1: int, steps: int, export_only: bool) -> bool:
  """After phase 1 of a two-phase method: train phase 2 (when it has steps), or, exporting,
  export it too when it has a checkpoint."""
  if cfg.method.name not in TWO_PHASE or steps1 >= steps:
    return False
  return not export_only or ckpt_lib.has_checkpoint(phase_dir(cfg, phase + PHASE2) / "checkpoints")


def generator_options(method, teacher: Model, task: tasks.Task, cfg: Config,
                      phase1_steps: int) -> dict:
  """The keyword options of `generators.make` for this method config."""
  if method.name == "select":
    return {"layer_map": method.layer_map or "every_k"}
  if method.name in ("ws", "gws"):
    opts = dict(layer_map=method.layer_map or "every_k", layer_mix=method.layer_mix,
                sharing=method.sharing, init=method.map_init, gate=method.gate,
                gate_init=method.gate_init)
    if method.name == "ws":
      opts.pop("gate"), opts.pop("gate_init")
    if method.map_init == "pca":
      from wdjax.generators.pca import pca_maps
      opts["pca"] = pca_maps(teacher.config, teacher.params, task.train, cfg, method)
    return opts
  if method.name == "wd":
    return {"mode": method.wd_mode, "init": method.wd_init,
            "layer_map": method.layer_map or "contiguous"}
  if method.name == "wid":
    return {"teacher_heads": teacher.config.num_heads, "student_heads": cfg.student.num_heads,
            "strategy": method.wid_strategy,
            "w_step": method.wid_w_step or max(1, phase1_steps // 20),
            "l2_lambda": method.wid_lambda, "surgery": method.wid_surgery,
            "teacher_lr_scale": method.wid_teacher_lr_scale,
            "layer_map": method.layer_map or "every_k"}
  if method.name == "opdf":
    return {"n_cores": method.opdf_cores, "start": method.opdf_start,
            "constraint_lambda": None if method.opdf_lambda < 0 else method.opdf_lambda,
            "layer_map": method.layer_map or "first_n"}  # the paper's start (methods.md §2.3)
  return {}


def evaluate(cfg: Config, model_dir: str | Path, splits=("validation", "test")) -> dict:
  """Accuracy of an exported HF model directory on the config's data (translation: BLEU)."""
  _start(cfg)
  if cfg.data.dataset == "bible":
    from wdjax.train import translate
    return translate.evaluate(cfg, model_dir, splits)
  if cfg.data.dataset in IMAGE_DATASETS:
    from wdjax.train import vision
    return vision.evaluate(cfg, model_dir, splits)
  model, _ = load_model(model_dir, require_head=True)
  task = tasks.load(cfg.data, model_dir, model.config.pad_token_id, cfg.cache_dir)
  mesh = mesh_lib.make_mesh(cfg.mesh.data, cfg.mesh.model)
  sh = mesh_lib.param_shardings(model.params, mesh)
  apply = step_lib.classifier_apply(nnx.split(bert.build(model.config))[0])
  predictor = Predictor(apply, mesh, sh, cfg.distill.eval_batch_size, cfg.data.pad_to_multiple)
  params = jax.device_put(model.params, sh)
  return {split: predictor.scores(params, task.split(split))["accuracy"] for split in splits}


def _start(cfg: Config) -> None:
  """Before any JAX computation: check the config (one built in Python skips `config.load`);
  join the other processes; turn on the compilation cache."""
  config_lib.check(cfg)
  if cfg.distributed:
    distributed.initialize()
  if cfg.compilation_cache:
    xla_cache.enable(cfg.cache_dir)
