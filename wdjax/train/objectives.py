"""What a phase trains for: sequence classification (the default), masked language modelling,
or translation (`wdjax/tasks/translation.py`).

An objective builds the network (`build`), the apply function the step differentiates, turns a
host batch into the batch that apply function and the loss expect, scores a split (accuracy
and mean loss; for MLM over the masked tokens; Pearson, Spearman and MSE for regression), and
exports the trained model (`export`). `loss` names the step's loss ("ce": cross-entropy, with
the teacher's softened logits under KD; "mse": squared error, with the teacher's scores under
KD) and `best_metric` the validation score that picks the exported checkpoint.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from wdjax.data import pipeline
from wdjax.data.mlm import MlmMasking
from wdjax.train import mesh as mesh_lib
from wdjax.train import step as step_lib
from wdjax.train.evaluate import Predictor, device_batch, regression_scores, scores


class _Encoder:
  """BERT-family networks exported as HF directories."""

  head = "classifier"
  label_smoothing = 0.0
  logit_kd = True  # the teacher's logits of the same batch are the KD targets
  loss = "ce"
  best_metric = "accuracy"

  def build(self, config, seed: int = 0):
    from wdjax.models import bert
    return bert.build(config, self.head, seed=seed)

  caches_targets = True  # `teacher_targets` computes the KD targets once (kd.cache_teacher_logits)

  def teacher_targets(self, teacher_apply, params, split, mesh, sharding, batch_size: int,
                      pad_to_multiple: int) -> dict[str, np.ndarray]:
    """The KD targets of every example of `split`, computed once (`kd.cache_teacher_logits`):
    the teacher's logits `[n, classes]` (regression: `[n, 1]`)."""
    predictor = Predictor(teacher_apply, mesh, sharding, batch_size, pad_to_multiple)
    return {"teacher_logits": predictor.logits(params, split)}

  def export(self, out: Path, config, params, tokenizer_dir: Path, task) -> None:
    from wdjax.models import hf
    labels = None
    if self.head == "classifier" and task.regression:
      labels = {"problem_type": "regression"}
    elif self.head == "classifier":
      labels = {"id2label": dict(enumerate(task.label_names)),
                "label2id": {n: i for i, n in enumerate(task.label_names)}}
    hf.export(out, config, params, self.head, tokenizer_dir=tokenizer_dir, extra=labels)


@dataclasses.dataclass(frozen=True)
class Classification(_Encoder):
  """Sequence classification, or regression (one output: a score) with `regression`."""

  # both follow from the data section, which a run's fingerprint holds already (not in repr)
  regression: bool = dataclasses.field(default=False, repr=False)
  best_metric: str = dataclasses.field(default="accuracy", repr=False)
  head = "classifier"

  @property
  def loss(self) -> str:
    return "mse" if self.regression else "ce"

  def apply(self, graphdef) -> step_lib.ApplyFn:
    return step_lib.classifier_apply(graphdef)

  def prepare(self, batch: dict, step: int) -> dict:
    del step
    return batch

  def predictor(self, apply_fn, mesh, params_sharding, batch_size: int, pad_to_multiple: int):
    score = regression_scores if self.regression else scores
    return Predictor(apply_fn, mesh, params_sharding, batch_size, pad_to_multiple, score=score)


@dataclasses.dataclass(frozen=True)
class MaskedLanguageModel(_Encoder):
  """BERT-style MLM on the task's text (labels unused); logits only at the masked positions."""

  masking: MlmMasking
  head = "mlm"
  logit_kd = False

  def apply(self, graphdef) -> step_lib.ApplyFn:
    from flax import nnx

    def apply(params, batch, dropout_key, **kwargs):
      model = nnx.merge(graphdef, params)
      return model(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"),
                   dropout_key=dropout_key,
                   positions=batch["mlm_positions"], **kwargs)  # [batch, k, vocab]

    return apply

  def prepare(self, batch: dict, step: int) -> dict:
    return self.masking(batch, step)

  def predictor(self, apply_fn, mesh, params_sharding, batch_size: int, pad_to_multiple: int):
    masking = dataclasses.replace(self.masking, seed=self.masking.seed + 1)  # not the training masks
    return TokenPredictor(apply_fn, mesh, params_sharding, batch_size, pad_to_multiple, prepare=masking)


class TokenPredictor:
  """Token accuracy and cross-entropy (no smoothing) over a split: masked-LM predictions
  (`label_weights [batch, k]`) or teacher-forced target tokens (`weights [batch, tgt]`).
  `prepare(batch, i)` turns eval batch i into the model's batch (MLM: the same masks every call)."""

  def __init__(self, apply_fn, mesh, params_sharding: Any, batch_size: int, pad_to_multiple: int,
               prepare=None):
    self.prepare = prepare or (lambda batch, i: batch)
    self.mesh, self.batch_size, self.pad_to_multiple = mesh, batch_size, pad_to_multiple

    def sums(params, batch):
      logits = apply_fn(params, batch, None)
      logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
      nll = -jnp.take_along_axis(logp, batch["labels"][..., None], axis=-1)[..., 0]
      w = batch.get("label_weights", batch["weights"])
      hit = (logits.argmax(-1) == batch["labels"]) * w
      return jnp.stack([jnp.sum(nll * w), jnp.sum(hit), jnp.sum(w)])

    self._sums = jax.jit(sums, in_shardings=(params_sharding, mesh_lib.batch_sharding(mesh)),
                         out_shardings=mesh_lib.replicated(mesh))

  def scores(self, params: Any, split) -> dict[str, float]:
    total = np.zeros(3)
    for i, batch in enumerate(pipeline.eval_batches(split, self.batch_size,
                                                    pad_to_multiple=self.pad_to_multiple)):
      total += np.asarray(self._sums(params, device_batch(self.prepare(batch, i), self.mesh)))
    n = max(total[2], 1.0)
    return {"accuracy": float(total[1] / n), "loss": float(total[0] / n)}
