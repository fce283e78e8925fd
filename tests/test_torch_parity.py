"""wdjax's training loss and gradients equal the PyTorch reference's (benchmarks/torch_ref/), for
KD, Weight Squeezing (plain and gated), Weight Distillation and OPDF (with its constraint loss), from the same parameters and batch (float32,
dropout off): the two implementations share no code, so agreement checks both."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.torch_ref import generators as tgen  # noqa: E402
from benchmarks.torch_ref.model import BertShape, classifier_logits  # noqa: E402
from wdjax import generators, losses  # noqa: E402
from wdjax.config import KDConfig, OptimConfig  # noqa: E402
from wdjax import trees  # noqa: E402
from wdjax.generators import StudentSpec  # noqa: E402
from wdjax.models import bert, hf  # noqa: E402
from wdjax.train import step as step_lib  # noqa: E402

TEMPERATURE, ALPHA = 2.0, 0.5


@pytest.fixture(scope="module")
def setup(task_teacher):
  import dataclasses
  t_cfg, t_params, _ = hf.load(task_teacher)
  s_cfg = dataclasses.replace(t_cfg, num_layers=3, hidden_size=96, num_heads=12, intermediate_size=384,
                              hidden_dropout=0.0, attention_dropout=0.0)
  t_cfg = dataclasses.replace(t_cfg, hidden_dropout=0.0, attention_dropout=0.0)
  init = nnx.to_pure_dict(nnx.state(bert.build(s_cfg, seed=1)))
  rng = np.random.default_rng(0)
  batch = {"input_ids": rng.integers(1000, 5000, (4, 12)).astype(np.int32),
           "attention_mask": np.ones((4, 12), np.int32), "labels": rng.integers(0, 2, 4).astype(np.int32),
           "weights": np.ones(4, np.float32)}
  batch["attention_mask"][2, 8:] = 0
  return t_cfg, t_params, s_cfg, init, batch


def _torch(tree) -> dict:
  return {k: torch.tensor(np.asarray(v)) for k, v in trees.flatten(tree).items()}


def _shape(cfg) -> BertShape:
  return BertShape(cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.intermediate_size,
                   cfg.vocab_size, cfg.max_position_embeddings, cfg.num_labels, cfg.layer_norm_eps)


OPTIONS = {"kd": {}, "ws": {}, "gws": dict(gate="row"), "wd": {},
           # a student at the teacher's width (OPDF's setting), constraint on
           "opdf": dict(n_cores=3, constraint_lambda=0.5),
           # the training network at the teacher's width, with a hidden mask half-way down
           "wid": dict(teacher_heads=12, student_heads=12, w_step=100)}


def _perturb(tree, seed):
  rng = np.random.default_rng(seed)  # numpy: eager jax.random would compile once per leaf shape
  scale = lambda x: float(np.std(x)) or 1.0  # relative to the leaf's spread (constant leaves: 1)
  return jax.tree_util.tree_map(lambda x: jnp.asarray(
      np.asarray(x) + 0.1 * scale(np.asarray(x)) * rng.standard_normal(x.shape), x.dtype), tree)


@pytest.mark.parametrize("method", list(OPTIONS))
def test_loss_and_gradients_match_pytorch(setup, method):
  t_cfg, t_params, s_cfg, init, batch = setup
  if method == "opdf":
    import dataclasses
    # one layer keeps the test fast: the MPO maths is the same for every matrix
    s_cfg = dataclasses.replace(s_cfg, num_layers=1, hidden_size=t_cfg.hidden_size,
                                intermediate_size=t_cfg.intermediate_size)
    init = nnx.to_pure_dict(nnx.state(bert.build(s_cfg, seed=1)))
  gen = generators.make(method, init, t_params, **OPTIONS[method])
  gen_params, gen_state = gen.init(jax.random.key(0), t_params, StudentSpec(s_cfg, init))
  # perturbed away from their initial values, so every part of each map is exercised (identity
  # maps and A = 1, B = 0 hide mistakes; OPDF's cores would sit exactly on their targets)
  for part in {"wd": ["affine"], "gws": ["gate", "student"], "opdf": ["cores"],
               "wid": ["compactors"]}.get(method, []):
    gen_params[part] = _perturb(gen_params[part], 3)
  hidden_keep = None
  if method == "wid":  # drop every other residual unit (as a mask schedule would, part way)
    keep = np.ones(t_cfg.hidden_size, np.float32)
    keep[1::2] = 0
    gen_state["masks"]["hidden"] = jnp.asarray(keep)
    hidden_keep = keep
    s_cfg = gen.training_config(s_cfg)
  s_apply = step_lib.classifier_apply(nnx.split(bert.build(gen.training_config(s_cfg)))[0])
  t_apply = step_lib.classifier_apply(nnx.split(bert.build(t_cfg))[0])
  teacher_logits = t_apply(t_params, batch, None)

  def loss_fn(g):
    logits = s_apply(gen.generate(g, t_params, gen_state), batch, None, **gen.model_kwargs(gen_state))
    return losses.hinton(logits, teacher_logits, batch["labels"], batch["weights"],
                         temperature=TEMPERATURE, alpha=ALPHA)[0] + gen.aux_loss(g, t_params, gen_state)

  # jitted: op by op, JAX would compile each of the hundreds of distinct small ops on its own
  loss, grads = jax.jit(jax.value_and_grad(loss_fn))(gen_params)

  # the same through wdjax's own jitted training step (its reported loss)
  tx = step_lib.make_optimizer(OptimConfig(lr=0.0, warmup_ratio=0.0), 1, gen_params)
  step = step_lib.make_train_step(generator=gen, student_apply=s_apply, teacher_apply=t_apply, tx=tx,
                                  kd=KDConfig(temperature=TEMPERATURE, alpha=ALPHA), seed=0)
  state = step_lib.init_state(gen, tx, 0, t_params, StudentSpec(s_cfg, init))
  state["params"], state["gen_state"] = gen_params, gen_state
  _, metrics = jax.jit(step)(state, t_params, batch)

  teacher = _torch(t_params)
  tg = {k: v.clone().requires_grad_(True) for k, v in _torch(gen.flat_params(gen_params)).items()}
  student_shapes = {k: tuple(v.shape) for k, v in trees.flatten(init).items()}
  n_t, n_s = t_cfg.num_layers, s_cfg.num_layers
  if method == "kd":
    student = tg  # the student's own weights
  else:
    student = getattr(tgen, f"{method}_generate")(tg, teacher, student_shapes, n_t, n_s)
  ids, mask = torch.tensor(batch["input_ids"]).long(), torch.tensor(batch["attention_mask"])
  with torch.no_grad():
    t_logits = classifier_logits(teacher, _shape(t_cfg), ids, mask)
  np.testing.assert_allclose(t_logits.numpy(), teacher_logits, rtol=1e-4, atol=1e-5)
  keep = None if hidden_keep is None else torch.tensor(hidden_keep)
  t_loss = tgen.hinton_loss(classifier_logits(student, _shape(s_cfg), ids, mask, keep), t_logits,
                            torch.tensor(batch["labels"]).long(), TEMPERATURE, ALPHA)
  if method == "opdf":
    targets = {k: torch.tensor(np.asarray(v))
               for k, v in trees.unstack_layers(trees.flatten(gen_state["targets"])).items()}
    assert targets
    t_loss = t_loss + tgen.opdf_constraint(tg, targets, OPTIONS[method]["constraint_lambda"], len(gen.factors))
  t_loss.backward()
  assert t_loss.item() == pytest.approx(float(loss), rel=1e-5)
  assert float(metrics["loss"]) == pytest.approx(float(loss), rel=1e-5)
  jax_grads = gen.flat_params(grads)
  assert jax_grads.keys() == tg.keys()
  scale = max(float(np.abs(np.asarray(g)).max()) for g in jax_grads.values())
  for k, g in jax_grads.items():
    # 1e-4 relative to the largest gradient entry: float32 sums of thousands of terms
    np.testing.assert_allclose(tg[k].grad.numpy(), np.asarray(g), rtol=1e-4, atol=1e-4 * scale, err_msg=k)
