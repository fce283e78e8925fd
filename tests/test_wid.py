"""WID (docs/methods.md §3): compactors, mask schedule, gradient surgery, exact cut-and-merge."""

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from wdjax import generators
from wdjax.config import OptimConfig
from wdjax import trees
from wdjax.generators import OptimizerHooks, StudentSpec
from wdjax.models import bert, hf
from wdjax.train import step as step_lib

# A random teacher with a head layout unlike BERT-base's: 4 heads of 12, FFN 96.
SMALL = bert.EncoderConfig(vocab_size=300, hidden_size=48, num_layers=2, num_heads=4,
                           intermediate_size=96, max_position_embeddings=64, hidden_dropout=0.0,
                           attention_dropout=0.0)
# dim: 4 heads of 12 -> 4 heads of 6; head: 4 heads of 12 -> 2 heads of 12.
STUDENTS = {"dim": dict(hidden_size=24, num_heads=4, intermediate_size=40),
            "head": dict(hidden_size=24, num_heads=2, intermediate_size=40)}


def _params(cfg, seed, head="classifier"):
  return nnx.to_pure_dict(nnx.state(bert.build(cfg, head, seed=seed)))


def _wid(t_cfg, t_params, s_cfg, head="classifier", **options):
  init = _params(s_cfg, 1, head)
  gen = generators.make("wid", init, t_params, teacher_heads=t_cfg.num_heads,
                        student_heads=s_cfg.num_heads, **options)
  gen_params, gen_state = gen.init(jax.random.key(0), t_params, StudentSpec(s_cfg, init))
  return gen, gen_params, gen_state


def _forward(cfg, params, ids, head="classifier", **kwargs):
  model = nnx.merge(nnx.split(bert.build(cfg, head))[0], params)
  return model(ids, jnp.ones_like(ids), **kwargs)


def _ids(vocab=300, shape=(3, 10), seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(5, vocab, shape), jnp.int32)


def test_step_zero_reproduces_the_real_teacher(task_teacher):
  t_cfg, t_params, _ = hf.load(task_teacher)
  s_cfg = dataclasses.replace(t_cfg, hidden_size=192, num_heads=12, intermediate_size=768)
  gen, gp, gs = _wid(t_cfg, t_params, s_cfg)
  net = gen.generate(gp, t_params, gs)
  for got, want in zip(jax.tree_util.tree_leaves(net), jax.tree_util.tree_leaves(t_params)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))  # identity compactors
  ids = _ids(30000)
  want = _forward(t_cfg, t_params, ids)
  got = _forward(gen.training_config(s_cfg), net, ids, **gen.model_kwargs(gs))
  np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("strategy", ["dim", "head"])
def test_mask_sizes_follow_the_schedule(strategy):
  t_params = _params(SMALL, 0)
  s_cfg = dataclasses.replace(SMALL, **STUDENTS[strategy])
  gen, gp, gs = _wid(SMALL, t_params, s_cfg, strategy=strategy, w_step=10)
  # Perturb the compactors so the norms differ and the ranking is not by index.
  key = iter(jax.random.split(jax.random.key(3), 100))
  gp = {"weights": gp["weights"], "compactors": jax.tree_util.tree_map(
      lambda c: c + 0.1 * jax.random.normal(next(key), c.shape), gp["compactors"])}
  cut_dim, cut_heads = (48 - 24) // 4, (48 - 24) // 12
  update = jax.jit(gen.update_state)
  for step in range(1, 200):
    new = update(gp, gs, jnp.asarray(step))
    masks = trees.flatten(new["masks"])
    if step % 10 or step < 10:
      assert all(np.array_equal(masks[s], trees.flatten(gs["masks"])[s]) for s in masks)
      gs = new
      continue
    gs, k = new, step // 10
    for space, m in masks.items():
      m = np.asarray(m)
      dropped = int((m == 0).sum())
      if space == "hidden" or space.startswith("attn"):
        chunks = (m.reshape(4, 12) == 0).sum(axis=1)
        if strategy == "dim":
          want = min(k * max(1, cut_dim // 8), cut_dim)
          assert (chunks == want).all(), (space, step, chunks)
        else:
          want_heads = min(step // 20, cut_heads)
          assert sorted(chunks.tolist()) == [0] * (4 - want_heads) + [12] * want_heads
      else:
        delta = 96 - 40 if space.startswith("ffn") else 48 - 24
        assert dropped == min((k * delta) // 16, delta), (space, step)
  assert float(gs["active"]) == 1.0


@pytest.mark.parametrize("strategy", ["dim", "head"])
@pytest.mark.parametrize("phase1,reach", [(64, 0.5), (200, 0.3), (1000, 0.5), (333, 1.0)])
def test_the_schedule_reaches_every_target_by_the_configured_fraction(strategy, phase1, reach):
  t_params = _params(SMALL, 0)
  s_cfg = dataclasses.replace(SMALL, **STUDENTS[strategy])
  at = round(reach * phase1)
  gen, gp, gs = _wid(SMALL, t_params, s_cfg, strategy=strategy, targets_at=at)
  # dim: 6 units of each head of 12 in 6 boundaries, the FFN in 16; head: 2 heads in 4
  boundaries = 16
  assert gen.boundaries_to_targets() == boundaries
  assert gen.w_step == at // boundaries  # the widest spacing that is done by `at`
  update = jax.jit(gen.update_state)
  at_target = []
  for k in range(1, boundaries + 1):
    gs = update(gp, gs, jnp.asarray(k * gen.w_step))
    at_target.append(float(gen.diagnostics(gp, t_params, gs)["at_target"]))
  assert at_target[-1] == 1.0 and at_target[-2] < 1.0  # done at the last boundary, not before
  assert at - boundaries < boundaries * gen.w_step <= at
  for space, m in trees.flatten(gs["masks"]).items():
    assert int(np.sum(np.asarray(m))) == gen.space_size(space)[1], space


def _zero_masked(gen, gp, gs):
  """What long training with the penalty converges to: masked entries exactly zero."""
  keep = gen.keep_tree(gp, trees.flatten(gs["masks"]))
  return jax.tree_util.tree_map(lambda p, k: p * k, gp, keep)


@pytest.mark.parametrize("strategy,layers,head", [("dim", 2, "classifier"), ("head", 2, "classifier"),
                                                  ("dim", 1, "classifier"), ("dim", 2, "mlm")])
def test_cut_student_equals_the_masked_training_network(strategy, layers, head):
  """Also for the masked-LM network of task-agnostic WID (its head's dense and LayerNorm live in
  the hidden space: the decoder is tied to the cut word embeddings)."""
  t_params = _params(SMALL, 0, head)
  s_cfg = dataclasses.replace(SMALL, num_layers=layers, **STUDENTS[strategy])
  gen, gp, gs = _wid(SMALL, t_params, s_cfg, head, strategy=strategy, w_step=1)
  key = iter(jax.random.split(jax.random.key(5), 200))
  gp = jax.tree_util.tree_map(lambda c: c + 0.05 * jax.random.normal(next(key), c.shape), gp)
  gs = gen.update_state(gp, gs, jnp.asarray(16))  # k = 16: every space at its target size
  for space, m in trees.flatten(gs["masks"]).items():
    assert int(np.sum(np.asarray(m))) == gen.space_size(space)[1], space
  before = gen.diagnostics(gp, t_params, gs)
  assert float(before["masked_norm"]) > 0.1 and float(before["at_target"]) == 1.0
  gp = _zero_masked(gen, gp, gs)
  assert float(gen.diagnostics(gp, t_params, gs)["masked_norm"]) == 0.0  # the cut will be exact
  ids = _ids()
  train_out = _forward(gen.training_config(s_cfg), gen.generate(gp, t_params, gs), ids, head,
                       **gen.model_kwargs(gs))
  student = gen.materialize(gp, t_params, gs)
  shapes = jax.tree_util.tree_map(jnp.shape, _params(s_cfg, 0, head))
  assert jax.tree_util.tree_map(jnp.shape, student) == shapes
  np.testing.assert_allclose(_forward(s_cfg, student, ids, head), train_out, atol=1e-5, rtol=1e-5)


def test_qkv_share_their_masks_and_surgery_replaces_masked_gradients():
  t_params = _params(SMALL, 0)
  s_cfg = dataclasses.replace(SMALL, **STUDENTS["dim"])
  gen, gp, gs = _wid(SMALL, t_params, s_cfg, w_step=1, l2_lambda=20.0, surgery="clean")
  tx = gen.gradient_surgery()
  grads = jax.tree_util.tree_map(jnp.ones_like, gp)
  # Before the first boundary: plain L2 (g + C) on every compactor, weights untouched.
  out, _ = tx.update(grads, tx.init(gp), gp, gen_state=gs)
  c = gen.flat_params(out)["compactors/encoder/layer_0/attn/q/kernel/col"]
  np.testing.assert_array_equal(c, 1.0 + np.eye(48))
  gs = gen.update_state(gp, gs, jnp.asarray(16))
  keep = gen.flat_params(gen.keep_tree(gp, trees.flatten(gs["masks"])))  # per layer
  rows = [np.asarray(keep[f"compactors/encoder/layer_1/attn/{m}/kernel/row"]) for m in "qkv"]
  assert all(np.array_equal(rows[0], r) for r in rows[1:])
  np.testing.assert_array_equal(rows[0][0], trees.flatten(gs["masks"])["attn/layer_1"])
  out, _ = tx.update(grads, tx.init(gp), gp, gen_state=gs)
  q = np.asarray(gen.flat_params(out)["compactors/encoder/layer_1/attn/q/kernel/row"])
  p = np.asarray(gen.flat_params(gp)["compactors/encoder/layer_1/attn/q/kernel/row"])
  masked = rows[0][0] == 0
  np.testing.assert_array_equal(q[:, masked], 20.0 * p[:, masked])
  np.testing.assert_array_equal(q[:, ~masked], 1.0)
  ln = np.asarray(gen.flat_params(out)["weights/encoder/layer_0/mlp_ln/scale"])
  hidden = np.asarray(trees.flatten(gs["masks"])["hidden"])
  np.testing.assert_array_equal(ln[hidden == 1], 1.0)
  np.testing.assert_array_equal(ln[hidden == 0], 20.0 * np.asarray(
      gen.flat_params(gp)["weights/encoder/layer_0/mlp_ln/scale"])[hidden == 0])


def _surgery_only(tx, params, gen_state, steps):
  """`steps` optimizer updates with a zero task gradient: only the surgery moves anything."""
  zero = jax.tree_util.tree_map(jnp.zeros_like, params)

  def body(_, carry):
    p, st = carry
    u, st = tx.update(zero, st, p, gen_state=gen_state)
    return optax.apply_updates(p, u), st

  return jax.jit(lambda p: jax.lax.fori_loop(0, steps, body, (p, tx.init(p)))[0])(params)


def test_momentum_surgery_drives_masked_entries_to_zero_much_faster_than_clean():
  """Under Adam the clean form's lambda cancels (masked entries move ~lr per step); the
  reference's momentum injection moves them ~lambda lr per step. Zero task gradient, so only the
  surgery acts: unmasked entries must not move at all."""
  t_params = _params(SMALL, 0)
  s_cfg = dataclasses.replace(SMALL, **STUDENTS["dim"])
  largest = {}
  for surgery in ("clean", "momentum"):
    gen, gp, gs = _wid(SMALL, t_params, s_cfg, w_step=1, l2_lambda=20.0, surgery=surgery)
    gs = gen.update_state(gp, gs, jnp.asarray(16))
    optim = OptimConfig(lr=1e-3, warmup_ratio=0.0, schedule="constant", weight_decay=0.0)
    # the surgery alone: no lr factors, so every compactor trains at one rate
    tx = step_lib.make_optimizer(optim, 100, gp, OptimizerHooks(surgery=gen.gradient_surgery(),
                                                                inject=gen.moment_injection()))
    trained = _surgery_only(tx, gp, gs, steps=100)
    name = "encoder/layer_1/attn/q/kernel/row"
    masked = np.asarray(trees.flatten(gs["masks"])["attn/layer_1"]) == 0
    before = np.asarray(gen.flat_params(gp)["compactors/" + name])
    after = np.asarray(gen.flat_params(trained)["compactors/" + name])
    np.testing.assert_array_equal(after[:, ~masked], before[:, ~masked])
    largest[surgery] = np.abs(after[:, masked]).max()
  assert largest["clean"] > 0.85  # identity diagonal 1 -> ~0.9 after 100 steps of 1e-3
  assert largest["momentum"] < 0.3


def test_head_layouts_that_do_not_fit_are_refused():
  t_params = _params(SMALL, 0)
  with pytest.raises(ValueError, match="keeps the teacher's 4 heads"):
    _wid(SMALL, t_params, dataclasses.replace(SMALL, hidden_size=24, num_heads=2,
                                              intermediate_size=40))
  with pytest.raises(ValueError, match="needs 2 heads"):
    _wid(SMALL, t_params, dataclasses.replace(SMALL, hidden_size=24, num_heads=4,
                                              intermediate_size=40), strategy="head")


def test_task_agnostic_wid_fits_an_mlm_head_then_cuts_and_fine_tunes(tiny, minilm_dir):
  """MiniLM ships no MLM head: one is fitted on the frozen encoder (only the head trains), WID
  compresses the MLM network, and the cut student (an MLM model transformers loads with the
  same logits) is fine-tuned with a new classifier head."""
  import torch
  import transformers

  from wdjax import assets
  from wdjax import generators
  from wdjax.config import StudentConfig
  from wdjax.data import mlm, text
  from wdjax.tasks import text_classification
  from wdjax.train import run
  cfg = tiny(method=generators.section("wid", objective="mlm", mlm_head_steps=12),
             student=StudentConfig(num_layers=2, hidden_size=96, num_heads=12, intermediate_size=256))
  cfg = dataclasses.replace(cfg, kd=dataclasses.replace(cfg.kd, alpha=0.0))
  result = run.distill(cfg)
  work = Path(cfg.workdir)
  head = json.loads((work / "mlm_head" / "results.json").read_text())
  assert head["trainable_params"] == 384 * 384 + 384 + 2 * 384 + 30522  # the head alone
  first = result["phase1"]
  assert first["phase"] == "distill_wid_mlm" and result["phase"] == "distill_wid_mlm_phase2"
  assert first["model_params"] > result["model_params"]  # the MLM student carries its head
  # where the masked entries stood when phase 1 ended: its few steps are fewer than the
  # schedule's 16 boundaries, so no mask is at its target and the cut completes them by norm
  at_cut = first["generator"]
  assert at_cut["at_target"] == 0.0 and 0.0 < at_cut["masked_share"] < 1.0
  assert "generator" not in result  # phase 2 trains a plain student
  # The exported cut MLM student is a plain 2x96 BertForMaskedLM with our logits.
  s_cfg, s_params, fresh = hf.load(work / "distill_wid_mlm" / "model", head="mlm")
  assert fresh == [] and (s_cfg.hidden_size, s_cfg.num_heads) == (96, 12)
  ids = _ids(30522, (2, 9))
  ours = np.asarray(_forward(s_cfg, s_params, ids, "mlm"))
  ref = transformers.BertForMaskedLM.from_pretrained(work / "distill_wid_mlm" / "model").eval()
  with torch.no_grad():
    want = ref(input_ids=torch.tensor(np.asarray(ids))).logits.numpy()
  np.testing.assert_allclose(ours, want, rtol=1e-4, atol=1e-4)
  c_cfg, _, fresh = hf.load(work / "distill_wid_mlm_phase2" / "model")
  assert fresh == [] and c_cfg.hidden_size == 96 and c_cfg.num_labels == 2
  # one head per workdir: a run of another seed (the quality benchmark's seeds 1, 2) finds it
  # instead of clashing with its settings (its masks were drawn with the run's seed)
  teacher, _ = text_classification.load_model(cfg.teacher_dir, require_head=True)
  task = text.load(cfg.data, cfg.teacher_dir, teacher.config.pad_token_id, cfg.cache_dir)
  seed1 = dataclasses.replace(cfg, seed=1)
  masking = mlm.masking_for(teacher.tokenizer_dir, teacher.config.vocab_size, seed=1)
  again = text_classification.mlm_teacher(seed1, task, masking, log=lambda *_: None)
  assert again.sha256 == assets.sha256_file(work / "mlm_head" / "model" / "model.safetensors")
