"""Intermediate-layer distillation: the hidden-state fit, the attention-map KL, the layer pairs,
and a run that trains them."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from wdjax import generators, losses
from wdjax.config import KDConfig
from wdjax.models import bert
from wdjax.models.layers import activations
from wdjax.train.intermediate import IntermediateLoss


def _states(seed=0, shape=(3, 10, 6)):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def test_hidden_mismatch_is_one_minus_r2_of_the_affine_fit_over_real_tokens():
  rng = np.random.default_rng(0)
  x = _states(0)
  mask = np.ones((3, 10), np.float32)
  mask[1, 7:] = 0
  a, b = rng.normal(size=(6, 9)), rng.normal(size=9)
  exact = x @ a + b  # wider than the student: any affine image is fitted exactly
  assert float(losses.hidden_mismatch(x, exact, mask)) < 1e-5

  y = exact + 2.0 * rng.normal(size=exact.shape)
  real = mask.reshape(-1) > 0
  xs, ys = x.reshape(-1, 6)[real], y.reshape(-1, 9)[real]
  design = np.c_[xs, np.ones(len(xs))]
  fit, *_ = np.linalg.lstsq(design, ys, rcond=None)
  want = np.sum((ys - design @ fit) ** 2) / np.sum((ys - ys.mean(0)) ** 2)
  got = float(losses.hidden_mismatch(x, y, mask))
  assert 0.05 < want < 0.95 and got == pytest.approx(want, rel=1e-3)
  y[1, 8] += 100.0  # a padding token changes nothing
  assert float(losses.hidden_mismatch(x, y, mask)) == pytest.approx(got, rel=1e-6)
  assert float(losses.hidden_mismatch(x, rng.normal(size=y.shape), mask)) > 0.5  # unrelated states


def test_attention_kl_matches_per_head_softmaxes_and_ignores_padding_keys():
  rng = np.random.default_rng(1)
  b, t, heads = 2, 5, 2
  qs, ks = rng.normal(size=(b, t, 8)), rng.normal(size=(b, t, 8))  # student: 2 heads of 4
  qt, kt = rng.normal(size=(b, t, 12)), rng.normal(size=(b, t, 12))  # teacher: 2 heads of 6
  mask = np.ones((b, t), np.float32)
  mask[0, 3:] = 0

  def probs(q, k):
    d = q.shape[-1] // heads
    out = np.zeros((b, heads, t, t))
    for h in range(heads):
      s = q[..., h * d:(h + 1) * d] @ np.swapaxes(k[..., h * d:(h + 1) * d], 1, 2) / np.sqrt(d)
      s = np.where(mask[:, None, :] > 0, s, -np.inf)
      e = np.exp(s - s.max(-1, keepdims=True))
      out[:, h] = e / e.sum(-1, keepdims=True)
    return out

  p, r = probs(qt, kt), probs(qs, ks)
  with np.errstate(divide="ignore", invalid="ignore"):
    kl = np.nansum(np.where(p > 0, p * (np.log(p) - np.log(r)), 0.0), -1).mean(1)  # [b, rows]
  want = np.sum(kl * mask) / mask.sum()
  got = float(losses.attention_kl(qs, ks, qt, kt, mask, heads))
  assert got == pytest.approx(want, rel=1e-4)
  assert float(losses.attention_kl(qt, kt, qt, kt, mask, heads)) == pytest.approx(0.0, abs=1e-6)
  # a last layer that computes its first row only is compared at that row
  one = float(losses.attention_kl(qs[:, :1], ks, qt, kt, mask, heads))
  assert one == pytest.approx(float(np.mean(kl[:, 0])), rel=1e-4)


def test_an_encoder_sows_what_the_terms_read_and_a_copy_of_the_teacher_scores_zero():
  """The sown queries and keys of every layer (the last at its first row only) and the residual
  stream: a student equal to the teacher has zero KL and zero hidden loss; one whose first
  layer attends differently, and whose states differ, has neither."""
  from wdjax import trees
  cfg = bert.EncoderConfig(vocab_size=50, hidden_size=16, num_layers=2, num_heads=4,
                           intermediate_size=32, max_position_embeddings=16, num_labels=2,
                           hidden_dropout=0.0, attention_dropout=0.0)
  model = bert.build(cfg, seed=0)
  ids = np.random.default_rng(0).integers(5, 50, (8, 12)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[2, 5:] = 0
  _, acts = activations(model, ids, mask)
  assert acts["query/layer_0"].shape == (8, 12, 16) and acts["query/layer_1"].shape == (8, 1, 16)
  assert acts["key/layer_1"].shape == (8, 12, 16)
  loss = IntermediateLoss(teacher_layers=2, student_layers=2, hidden_weight=1.0,
                          attention_weight=1.0, heads=4)
  m = jnp.asarray(mask, jnp.float32)
  total, parts = loss(acts, acts, m)
  assert parts.keys() == {"hidden", "attention"} and float(total) < 1e-5

  flat = {k: np.array(v) for k, v in trees.flatten(nnx.to_pure_dict(nnx.state(bert.build(cfg, seed=1)))).items()}
  flat["encoder/layer_0/attn/q/kernel"] *= 50.0  # peaked attention instead of near-uniform
  other = nnx.merge(nnx.split(bert.build(cfg))[0], trees.unflatten(flat))
  _, acts2 = activations(other, ids, mask)
  _, parts2 = loss(acts2, acts, m)
  assert float(parts2["attention"]) > 1e-2 and float(parts2["hidden"]) > 1e-2


def test_layer_pairs_follow_every_k_or_uniform():
  pairs = lambda t, s: IntermediateLoss(t, s, 1.0, 0.0, 4).pairs
  assert pairs(6, 3) == [(0, 1), (1, 3), (2, 5)]
  assert pairs(6, 6) == [(l, l) for l in range(6)]
  assert pairs(5, 2) == [(0, 0), (1, 4)]


def test_kd_with_intermediate_terms_trains_them_and_logs_them(tiny):
  """A KD run with both terms: they are logged, the hidden term falls, and the teacher's targets
  are not cached (the teacher runs in every step)."""
  from wdjax.train import run
  cfg = tiny(kd=KDConfig(alpha=0.9, hidden_weight=1.0, attention_weight=1.0))
  cfg = dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, steps=16, log_every=1))
  lines = []
  result = run.distill(cfg, log=lines.append)
  assert np.isfinite(result["test_loss"])
  rows = [json.loads(l) for l in (Path(cfg.workdir) / "distill" / "metrics.jsonl").read_text().splitlines()
          if '"hidden"' in l]
  assert len(rows) >= 8 and all(0 <= r["hidden"] <= 1 and r["attention"] >= 0 for r in rows)
  first, last = np.mean([r["hidden"] for r in rows[:3]]), np.mean([r["hidden"] for r in rows[-3:]])
  assert last < first
  assert not any("teacher" in l and "targets" in l for l in lines)


def test_intermediate_terms_are_refused_where_the_objective_has_no_activations(tiny):
  from wdjax import validate
  from wdjax.errors import WdjaxError
  cfg = tiny(kd=KDConfig(hidden_weight=1.0), method=generators.section("wid", objective="mlm"))
  with pytest.raises(WdjaxError, match="kd.hidden_weight=1.0 .intermediate-layer distillation"):
    validate.check(cfg)
  with pytest.raises(WdjaxError, match="kd.attention_heads=5 .must divide student.hidden_size=64"):
    validate.check(tiny(kd=KDConfig(attention_weight=1.0, attention_heads=5)))
