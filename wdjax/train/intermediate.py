"""Intermediate-layer distillation: the student's hidden states and attention maps follow the
teacher's, beside the logit KD (TinyBERT, Jiao et al. 2020; MiniLM, Wang et al. 2020). Off by
default (`kd.hidden_weight = kd.attention_weight = 0`); an option of every method, since it reads
the states of whatever network the method trains.

    loss = task/KD loss + kd.hidden_weight * hidden + kd.attention_weight * attention

- `hidden`: the mean over layer pairs of `losses.hidden_mismatch`, 1 - R^2 of the best affine map
  from the student's residual stream to the teacher's (the embedding outputs, then student layer
  l against its teacher layer; a classifier's last layer, computed at its first token only, is
  left out: its logits are distilled already). TinyBERT trains that projection as a parameter; here it is the
  batch's least-squares fit, so it adds no parameters, fits any widths, and its scale does not
  depend on the teacher's (a share of variance, in [0, 1]).
- `attention`: the mean over the paired layers of `losses.attention_kl`, KL(teacher || student)
  of the attention distributions from the layers' queries and keys, split into
  `kd.attention_heads` heads (0: the student's), as MiniLM transfers them.

Student layer l is paired with the last teacher layer of its `every_k` group (layers 1, 3, 5 of 6
for 3: TinyBERT's g(m) = m N / M), or by `uniform` when the depths do not divide.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from wdjax import losses
from wdjax.generators import paths


@dataclasses.dataclass(frozen=True)
class IntermediateLoss:
  """The intermediate terms for a student of `student_layers` and a teacher of `teacher_layers`."""

  teacher_layers: int
  student_layers: int
  hidden_weight: float
  attention_weight: float
  heads: int  # attention heads of the relation (the student's, unless `kd.attention_heads`)

  @property
  def pairs(self) -> list[tuple[int, int]]:
    """(student layer, teacher layer) of every student layer."""
    kind = "every_k" if self.teacher_layers % self.student_layers == 0 else "uniform"
    groups = paths.layer_map(kind, self.teacher_layers, self.student_layers)
    return [(l, group[-1]) for l, group in enumerate(groups)]

  def __call__(self, student: dict[str, jax.Array], teacher: dict[str, jax.Array],
               mask: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(weighted sum, its parts) from the two networks' `layers.activations` and `mask
    [batch, seq]` (1 on real tokens)."""
    total, parts = jnp.zeros((), jnp.float32), {}
    if self.hidden_weight > 0:
      names = [("hidden/embeddings", "hidden/embeddings")] + [
          (f"hidden/layer_{s}", f"hidden/layer_{t}") for s, t in self.pairs]
      # a layer computed at its first rows only (a classifier's last) is left out: one row per
      # example is fewer points than the fit has unknowns, which it would match exactly
      whole = lambda x: x.shape[1] == mask.shape[1]
      terms = [losses.hidden_mismatch(student[s], teacher[t], mask) for s, t in names
               if whole(student[s]) and whole(teacher[t])]
      parts["hidden"] = sum(terms) / len(terms)
      total = total + self.hidden_weight * parts["hidden"]
    if self.attention_weight > 0:
      terms = [losses.attention_kl(student[f"query/layer_{s}"], student[f"key/layer_{s}"],
                                   teacher[f"query/layer_{t}"], teacher[f"key/layer_{t}"],
                                   mask, self.heads) for s, t in self.pairs]
      parts["attention"] = sum(terms) / len(terms)
      total = total + self.attention_weight * parts["attention"]
    return total, parts


def token_mask(batch: dict, activations: dict[str, jax.Array]) -> jax.Array:
  """`[batch, seq]` 1 on real tokens: the text batch's attention mask, or every token (images)."""
  if "attention_mask" in batch:
    return batch["attention_mask"].astype(jnp.float32)
  return jnp.ones(activations["hidden/embeddings"].shape[:2], jnp.float32)
