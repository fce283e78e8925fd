"""One training phase, whatever the family, task and method: the engine under `run.py`.

`train_phase` trains a generator's parameters (the student's own for KD and fine-tuning) on a
task's data with an objective, checkpoints and resumes, keeps the best validation model, and
exports the dense student. A phase writes into `<workdir>/<phase>/`: `checkpoints/` (Orbax),
`metrics.jsonl`, `results.json` and `model/` (a `transformers` directory). Rerunning a phase
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

from wdjax import assets, config as config_lib, distributed, errors
from wdjax.config import Config, TrainConfig
from wdjax.data import pipeline
from wdjax.errors import WdjaxError
from wdjax.generators import Generator, StudentSpec, param_count
from wdjax.train import checkpoint as ckpt_lib, loop, mesh as mesh_lib, step as step_lib
from wdjax.train.intermediate import IntermediateLoss
from wdjax.train.metrics import MetricWriter

Params = Any


@dataclasses.dataclass
class Model:
  """A loaded or generated model: its config, params and where its tokenizer lives."""

  config: Any  # the family's config dataclass (EncoderConfig, ViTConfig, TransformerConfig)
  params: Params
  tokenizer_dir: Path
  sha256: str = ""


def phase_dir(cfg: Config, phase: str) -> Path:
  return Path(cfg.workdir) / phase


def load_trained_teacher(cfg: Config, what: str, load) -> Model:
  """The teacher `wdjax finetune` trained from scratch (translation, vision) at `cfg.teacher_dir`,
  read by `load(dir, dtype=...) -> (config, params)`; `what` names the kind in the error."""
  d = Path(cfg.teacher_dir)
  if not (d / "config.json").exists():
    raise WdjaxError(f"no {what} teacher at {d}; run `wdjax finetune CONFIG` first "
                     f"or set teacher.path to a trained {what} directory")
  t_cfg, params = load(d, dtype=cfg.teacher.dtype)
  return Model(t_cfg, params, d, assets.sha256_file(d / "model.safetensors"))


def total_steps(train: TrainConfig, steps_per_epoch: int) -> int:
  return train.steps if train.steps > 0 else max(1, math.ceil(train.epochs * steps_per_epoch))


def fingerprint(cfg: Config, phase_train: TrainConfig, distilling: bool) -> dict:
  """The settings a resumed run must share with the run that wrote the checkpoints."""
  d = config_lib.to_dict(cfg)
  out = {"seed": d["seed"], "teacher": d["teacher"], "data": d["data"], "task": d["task"],
         "train": dataclasses.asdict(phase_train)}
  if distilling:
    out.update(student=d["student"], kd=d["kd"], method=d["method"])
  return out


def intermediate_loss(kd, teacher_config, student_config, student_apply) -> IntermediateLoss:
  """The intermediate-distillation terms of `kd` for these networks (`train/intermediate.py`)."""
  if not hasattr(student_apply, "with_activations"):
    raise WdjaxError("kd.hidden_weight / kd.attention_weight: this objective's network does not "
                     "report its activations; set both to 0")
  return IntermediateLoss(teacher_layers=teacher_config.num_layers,
                          student_layers=student_config.num_layers, hidden_weight=kd.hidden_weight,
                          attention_weight=kd.attention_weight,
                          heads=kd.attention_heads or student_config.num_heads)


def settings_diff(saved: dict, now: dict, prefix: str = "") -> list[str]:
  """Settings that differ between a saved fingerprint and the current one. Keys the saved one
  lacks are config fields added after that run started: they had their defaults then, so they
  do not count; keys the current one lacks are fields since removed (or moved), which no setting
  of this version can contradict."""
  out = []
  for k in sorted(saved):
    if k not in now:
      continue
    va, vb = saved[k], now[k]
    if isinstance(va, dict) and isinstance(vb, dict):
      out += settings_diff(va, vb, f"{prefix}{k}.")
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


def _train_phase(cfg: Config, *, phase: str, train: TrainConfig, task: Any,
                spec: StudentSpec, generator: Generator, teacher: Model | None,
                tokenizer_dir: Path, objective, log=distributed.log, export_only: bool = False) -> dict:
  """Train `generator`'s parameters for one phase, export the dense model, report accuracies.

  With `export_only`, training is skipped: the latest checkpoint is materialised and exported.
  `objective` builds the network and gives its loss inputs, predictor and export
  (`train/objectives.py`).
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
  intermediate = None
  if teacher is not None and (cfg.kd.alpha > 0 or cfg.kd.intermediate) and objective.logit_kd:
    teacher_cfg = dataclasses.replace(teacher.config, dtype=cfg.teacher.dtype)
    teacher_apply = objective.apply(nnx.split(objective.build(teacher_cfg))[0])
    if cfg.kd.intermediate:
      intermediate = intermediate_loss(cfg.kd, teacher.config, generator.training_config(spec.config),
                                       student_apply)

  gen_shapes, gen_state_shapes = jax.eval_shape(
      lambda p, t: generator.init(jax.random.key(cfg.seed), t, StudentSpec(spec.config, p)),
      spec.init_params, teacher_params)
  tx = step_lib.make_optimizer(train.optim, steps, gen_shapes,
                               generator.optimizer_hooks(gen_shapes, gen_state_shapes))

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
                               products=step_lib.generator_products(spec.config.dtype),
                               loss=objective.loss, intermediate=intermediate),
      in_shardings=(state_sh, teacher_sh, batch_sh),
      out_shardings=(state_sh, mesh_lib.replicated(mesh)), donate_argnums=0)
  materialize = jax.jit(lambda p, t, s: generator.materialize(p, t, s), out_shardings=student_sh)
  student_predictor = objective.predictor(export_apply, mesh, student_sh, train.eval_batch_size,
                                         cfg.data.pad_to_multiple)

  rep = mesh_lib.replicated(mesh)
  diagnose = jax.jit(lambda p, t, s: generator.diagnostics(p, t, s), out_shardings=rep)
  checkpointer = ckpt_lib.Checkpointer(out / "checkpoints", every=cfg.checkpoint.every,
                                       keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save)
  meta = {"phase": phase, "fingerprint": dict(fingerprint(cfg, train, distilling=teacher is not None),
                                              objective=repr(objective)),
          "teacher": {"path": str(teacher.tokenizer_dir), "sha256": teacher.sha256} if teacher else None,
          "total_steps": steps}
  try:
    restored = _restore_newest(checkpointer, phase, out, meta, teacher, log, target=lambda: {
        "train": ckpt_lib.abstract_like(state_shapes, state_sh),
        "best": {"params": ckpt_lib.abstract_like(spec.init_params, student_sh),
                 "val_score": jax.ShapeDtypeStruct((), jnp.float32, sharding=rep),
                 "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)}},
        complete=lambda step: step >= steps and results_path.exists() and not export_only)
    if restored == "complete":
      log(f"[{phase}] already complete; results in {results_path}")
      return json.loads(results_path.read_text())
    if restored is None and export_only:
      raise WdjaxError(f"nothing to export: {checkpointer.directory} has no checkpoint; "
                       f"run the {phase} phase first")
    if restored is None:
      state = jax.jit(init_state, out_shardings=state_sh)(spec.init_params, teacher_params)
      best = loop.initial_best(materialize(state["params"], teacher_params, state["gen_state"]))
    else:
      state, best = restored["train"], restored["best"]
      log(f"[{phase}] resuming from step {int(jax.device_get(state['step']))} of {steps} "
          f"({checkpointer.directory})")

    log(f"[{phase}] {trainable / 1e6:.2f}M trainable parameters, "
        f"{param_count(spec.init_params) / 1e6:.2f}M in the model, {steps} steps of "
        f"{train.batch_size} ({steps / batches.steps_per_epoch:.2f} epochs), mesh "
        f"{dict(mesh.shape)}")

    def evaluate(st):
      student = materialize(st["params"], teacher_params, st["gen_state"])
      scores = student_predictor.scores(student, task.validation)
      scores = {"val_" + k: v for k, v in scores.items()}
      scores.update({f"{generator.name}_{k}": float(v) for k, v in
                     diagnose(st["params"], teacher_params, st["gen_state"]).items()})
      return scores, student

    targets = None
    if (teacher_apply is not None and cfg.kd.cache_teacher_logits and objective.caches_targets
        and intermediate is None and not export_only):  # the intermediate terms run the teacher anyway
      targets = teacher_train_targets(
          cfg, teacher, task, objective, lambda: objective.teacher_targets(
              teacher_apply, teacher_params, task.train, mesh, teacher_sh, train.eval_batch_size,
              cfg.data.pad_to_multiple), log=lambda m: log(f"[{phase}] {m}"))

    def get_batch(i):
      batch = objective.prepare(batches.batch(i), i)
      for name, values in (targets or {}).items():  # per-example rows, cut to the batch's length
        rows = values[batch["index"]]
        batch[name] = rows[:, :batch["input_ids"].shape[1]] if rows.ndim > 2 else rows
      return mesh_lib.put_batch({k: v for k, v in batch.items() if k != "index"}, mesh)

    spec_loop = loop.LoopSpec(
        name=phase, total_steps=steps, steps_per_epoch=batches.steps_per_epoch,
        train_step=train_step,
        get_batch=get_batch,
        evaluate=evaluate, best_metric=objective.best_metric, checkpointer=checkpointer,
        writer=MetricWriter(out, tensorboard=cfg.log.tensorboard,
                            wandb=cfg.log.wandb_project if cfg.log.wandb else "",
                            config=config_lib.to_dict(cfg)), meta=meta,
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
  end = {k: float(v) for k, v in diagnose(state["params"], teacher_params, state["gen_state"]).items()}
  if end:  # where the generator stands when the phase ends (WID: at the cut)
    results["generator"] = end
    log(f"[{phase}] at the end of the phase: " + ", ".join(f"{k} {v:.4g}" for k, v in end.items()))
  for split in ("validation", "test"):
    scores = student_predictor.scores(student, task.split(split))
    results.update({f"{split}_{k}": v for k, v in scores.items()})  # accuracy, loss, macro_f1, ...
  if jax.process_index() == 0:
    with errors.writing("the exported model", out / "model"):
      objective.export(out / "model", spec.config, student, tokenizer_dir, task)
    write_results(results_path, results)
  distributed.barrier(f"{phase} exported")  # phase 2 and resumes read what process 0 wrote
  metric = objective.best_metric
  log(f"[{phase}] validation {metric} {results['validation_' + metric]:.4f}, "
      f"test {metric} {results['test_' + metric]:.4f}; model in {out / 'model'}")
  return results


def _restore_newest(checkpointer: ckpt_lib.Checkpointer, phase: str, out: Path, meta: dict,
                    teacher: Model | None, log, target, complete) -> Any:
  """The newest checkpoint that restores, as `{"train", "best"}` laid out as `target()`; None
  when the phase has none; "complete" when the newest one is the finished run (`complete(step)`),
  which is then not read. A checkpoint that cannot be read back is set aside (renamed, with a
  log line) and the next newest is tried; when none is left of those there were, one line says so.
  A checkpoint of other settings or another teacher stops the run: it is intact, just not this run's."""
  aside = []
  while (latest := checkpointer.latest_step()) is not None:
    try:
      saved = checkpointer.read_meta(latest)
      changed = settings_diff(saved.get("fingerprint", {}), json.loads(json.dumps(meta["fingerprint"])))
      if changed:
        raise WdjaxError(f"{out} holds a run with other settings ({'; '.join(changed[:3])}); "
                         "use a new workdir (--set workdir=...) or delete that directory")
      if teacher and saved.get("teacher") and saved["teacher"]["sha256"] != teacher.sha256:
        raise WdjaxError(f"the teacher at {teacher.tokenizer_dir} changed since {out} was started "
                         "(sha256 differs); use a new workdir")
      if complete(latest):
        return "complete"
      restored, _ = checkpointer.restore(latest, target())
      return restored
    except ckpt_lib.Unrestorable as e:
      distributed.barrier(f"{phase} checkpoint {latest} read")  # every process failed to read it
      moved = checkpointer.set_aside(latest) if jax.process_index() == 0 else None
      distributed.barrier(f"{phase} checkpoint {latest} set aside")
      checkpointer.manager.reload()
      aside.append(latest)
      log(f"[{phase}] {e}; set aside as {moved or ckpt_lib.ASIDE}, trying the one before")
  if aside:
    raise WdjaxError(f"no checkpoint of {out} restores (steps {', '.join(map(str, aside))} could not "
                     f"be read and are in {out / ckpt_lib.ASIDE}); delete {out} to start the phase over")
  return None


def write_results(path: Path, results: dict) -> None:
  """`results.json`, atomically (a temporary sibling renamed into place)."""
  tmp = path.with_suffix(".tmp")
  with errors.writing("results", path):
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(path)


def teacher_train_targets(cfg: Config, teacher: Model, task: Any, objective, compute, log
                          ) -> dict[str, np.ndarray]:
  """The objective's KD targets over the training split (`compute()`: the teacher's logits
  `[n_train, classes]`, or a language model's top-k per token), computed once per teacher, data
  and objective and kept in `<workdir>/cache/` (every phase and seed of a workdir distils from
  the same numbers). The key holds the data's content, not only its config: a CSV edited in
  place is other data."""
  key = hashlib.sha256(json.dumps([teacher.sha256, config_lib.to_dict(cfg.data), cfg.teacher.dtype,
                                   task.train.digest(), repr(objective)]).encode()).hexdigest()[:16]
  path = Path(cfg.workdir) / "cache" / f"teacher_targets_{key}.npz"
  if path.exists():
    with np.load(path) as saved:
      targets = {k: saved[k] for k in saved.files}
    if targets and all(v.shape[0] == len(task.train) for v in targets.values()):
      return targets
  log(f"computing the teacher's targets on the {len(task.train)} training examples")
  targets = compute()
  if jax.process_index() == 0:
    tmp = path.with_suffix(".tmp.npz")
    with errors.writing("the teacher-target cache", path):
      path.parent.mkdir(parents=True, exist_ok=True)
      np.savez(tmp, **targets)
      tmp.replace(path)
  return targets
