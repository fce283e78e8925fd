"""Vision: the image data, the ViT and its HF export, every generator on ViT shapes, the sharded
step, and a teacher -> students run on scikit-learn's digits."""

from __future__ import annotations

import dataclasses
import gzip

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import assert_same_shapes, run_generator_steps, tree_allclose
from wdjax import generators
from wdjax.config import Config, DataConfig, OptimConfig, StudentConfig, TeacherConfig, TrainConfig
from wdjax.tasks.image_classification import VisionConfig
from wdjax.data import images
from wdjax.errors import WdjaxError
from wdjax import trees
from wdjax.generators import StudentSpec
from wdjax.models import vit
from wdjax.train import mesh as mesh_lib

TEACHER = vit.ViTConfig(image_size=8, patch_size=2, hidden_size=32, num_layers=2, num_heads=4,
                        intermediate_size=64)
STUDENT = dataclasses.replace(TEACHER, hidden_size=16, intermediate_size=32)


def _params(cfg, seed):
  return nnx.to_pure_dict(nnx.state(vit.build(cfg, seed)))


def _logits(cfg, params, x, **kwargs):
  return nnx.merge(nnx.split(vit.build(cfg))[0], params)(x, **kwargs)


def _images(n=6, seed=0):
  return np.random.default_rng(seed).normal(size=(n, 8, 8, 1)).astype(np.float32)


# ---------------------------------------------------------------- data


def test_digits_and_fashion_mnist_splits(tmp_path):
  d = images.load("digits")
  assert (len(d.train), len(d.validation), len(d.test)) == (1437, 180, 180)
  b = d.train.batch(np.arange(len(d.train)))
  assert b["image"].shape == (1437, 8, 8, 1) and b["image"].dtype == np.float32
  assert abs(b["image"].mean()) < 1e-4 and abs(b["image"].std() - 1) < 1e-4  # train statistics
  pad = d.test.batch(np.array([3, -1]))
  assert pad["weights"].tolist() == [1.0, 0.0]

  f = images.load("fashion-mnist")  # the real 70,000 images of the Debian package
  assert (len(f.train), len(f.validation), len(f.test)) == (55000, 5000, 10000)
  assert f.train.images.shape[1:] == (28, 28) and f.train.images.dtype == np.uint8
  assert np.bincount(f.test.labels).tolist() == [1000] * 10
  # The idx files' own order (TFDS writes records shuffled): the first training labels of
  # Fashion-MNIST, and validation is the file's last 5,000 images.
  assert f.train.labels[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
  assert np.bincount(np.concatenate([f.train.labels, f.validation.labels])).tolist() == [6000] * 10

  bad = tmp_path / "x.gz"
  bad.write_bytes(gzip.compress(b"\x00\x00\x09\x99" + b"\x00" * 8))
  with pytest.raises(WdjaxError, match="not an idx file"):
    images.read_idx(bad)
  bad.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + (5).to_bytes(4, "big") + b"\x01\x02"))
  with pytest.raises(WdjaxError, match="truncated"):
    images.read_idx(bad)


# ---------------------------------------------------------------- model and export


def test_vit_saves_as_transformers_vit_with_matching_logits(tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  params, x = _params(TEACHER, 0), _images()
  vit.save(tmp_path / "m", TEACHER, params, tuple("abcdefghij"))
  hf = transformers.ViTForImageClassification.from_pretrained(tmp_path / "m").eval()
  with torch.no_grad():
    theirs = hf(pixel_values=torch.tensor(x).permute(0, 3, 1, 2)).logits.numpy()
  np.testing.assert_allclose(np.asarray(_logits(TEACHER, params, x)), theirs, atol=2e-5, rtol=1e-4)
  cfg, back = vit.load(tmp_path / "m")
  assert cfg == TEACHER and tree_allclose(back, params, rtol=0, atol=0)

  mean = dataclasses.replace(TEACHER, pooling="mean")  # no HF counterpart: wdjax round-trips it
  p_mean = _params(mean, 1)
  vit.save(tmp_path / "mean", mean, p_mean)
  cfg, back = vit.load(tmp_path / "mean")
  assert cfg.pooling == "mean" and "cls" not in back["embeddings"]
  np.testing.assert_allclose(_logits(cfg, back, x), _logits(mean, p_mean, x), rtol=1e-6)

  # with the training split's statistics: transformers' image processor turns raw pixels into
  # exactly the inputs wdjax trains on (the export carries the statistics, not only the loader)
  digits = images.load("digits")
  vit.save(tmp_path / "p", TEACHER, params, tuple("abcdefghij"),
           normalization=(digits.train.mean, digits.train.std))
  processor = transformers.AutoImageProcessor.from_pretrained(tmp_path / "p")
  pixels = processor(images=list(digits.test.images[:6, :, :, None]), return_tensors="pt")["pixel_values"]
  np.testing.assert_allclose(pixels.permute(0, 2, 3, 1).numpy(),
                             digits.test.batch(np.arange(6))["image"], rtol=1e-6, atol=1e-6)

  (tmp_path / "m" / "model.safetensors").write_bytes(b"not safetensors")
  with pytest.raises(WdjaxError, match="unreadable or incomplete ViT"):
    vit.load(tmp_path / "m")


def test_vit_last_layer_computes_only_the_class_token():
  # the head reads the class token, so the last block computes that row only (its keys and values
  # still read every token): the same logits and gradients as the full last block
  model = vit.build(TEACHER, 2)
  x = jnp.asarray(_images())

  def full(m):
    h = m.encoder(m.embeddings(x, None), None)  # [batch, tokens, hidden]: every row
    return m.head(h[:, 0]).astype(jnp.float32)

  np.testing.assert_allclose(np.asarray(model(x)), np.asarray(full(model)), rtol=2e-5, atol=1e-6)
  grads = [nnx.grad(lambda m: jnp.sum(jnp.sin(f(m))))(model) for f in (lambda m: m(x), full)]
  for got, want in zip(*map(jax.tree.leaves, grads)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=1e-6)
  ffn = [e.outvars[0].aval.shape for e in jax.make_jaxpr(lambda i: model(i))(x).jaxpr.eqns
         if e.primitive.name == "dot_general" and e.outvars[0].aval.shape[-1] == 64]
  assert sorted(ffn) == [(6, 1, 64), (6, 17, 64)]


# ---------------------------------------------------------------- generators on ViT shapes

VIT_METHODS = {"select": {}, "ws": {}, "gws": {}, "wd": {}, "wd-identity": dict(init="identity"),
               "wid": dict(teacher_heads=4, student_heads=4, w_step=1), "opdf": dict(n_cores=3)}


@pytest.mark.parametrize("variant", list(VIT_METHODS))
def test_every_generator_on_vit_shapes(variant):
  """The exported student has the student's tree, and computes what the training network did."""
  method = variant.split("-")[0]
  t_params, init = _params(TEACHER, 0), _params(STUDENT, 1)
  gen = generators.make(method, init, t_params, **VIT_METHODS[variant])
  gp, gs = gen.init(jax.random.key(0), t_params, StudentSpec(STUDENT, init))
  if method == "wd":  # the classifier head is WD's output projection: linear, as BERT's classifier
    assert "head" not in gp["affine"] and "head" in gp["maps"]
  key = iter(jax.random.split(jax.random.key(3), 1000))  # off the initial values
  gp = jax.tree_util.tree_map(lambda p: p + 0.02 * jax.random.normal(next(key), p.shape, p.dtype), gp)
  if method == "wid":  # every space at its target size, the masked entries converged to zero
    gs = gen.update_state(gp, gs, jnp.asarray(16))
    gp = jax.tree_util.tree_map(lambda p, k: p * k, gp, gen.keep_tree(gp, trees.flatten(gs["masks"])))
  student = jax.jit(gen.materialize)(gp, t_params, gs)
  assert_same_shapes(student, init)
  x = _images()
  trained = _logits(gen.training_config(STUDENT), gen.generate(gp, t_params, gs), x, **gen.model_kwargs(gs))
  np.testing.assert_allclose(_logits(STUDENT, student, x), trained, atol=1e-5, rtol=1e-5)
  if variant in ("ws", "wd-identity"):  # identity maps at init: exactly weight selection
    gp0, gs0 = gen.init(jax.random.key(0), t_params, StudentSpec(STUDENT, init))
    assert tree_allclose(gen.materialize(gp0, t_params, gs0), generators.select(t_params, init),
                         rtol=1e-6, atol=1e-7)


def test_selection_on_vit_slices_patches_tokens_and_head_consistently():
  t_params, init = _params(TEACHER, 0), _params(STUDENT, 1)
  t, s = trees.flatten(t_params), trees.flatten(generators.select(t_params, init))
  np.testing.assert_array_equal(s["embeddings/patch/kernel"], t["embeddings/patch/kernel"][:, ::2])
  np.testing.assert_array_equal(s["embeddings/cls"], t["embeddings/cls"][::2])
  np.testing.assert_array_equal(s["embeddings/position/embedding"], t["embeddings/position/embedding"][:, ::2])
  np.testing.assert_array_equal(s["head/kernel"], t["head/kernel"][::2])
  np.testing.assert_array_equal(s["encoder/final_ln/scale"], t["encoder/final_ln/scale"][::2])


def test_vit_sharded_step_equals_single_device():
  t_params, init = _params(TEACHER, 0), _params(STUDENT, 1)
  gen = generators.make("ws", init, t_params)
  data = images.load("digits").train
  batches = [{k: v for k, v in data.batch(np.arange(16) + 16 * i).items() if k != "index"} for i in range(2)]
  apply = vit.apply_fn(nnx.split(vit.build(STUDENT))[0])
  teacher_apply = vit.apply_fn(nnx.split(vit.build(TEACHER))[0])
  # with intermediate-layer distillation too: its batch-wide fits and maps shard like the loss
  from wdjax.train.intermediate import IntermediateLoss
  single = []
  for intermediate in (None, IntermediateLoss(2, 2, hidden_weight=1.0, attention_weight=1.0, heads=4)):
    run = lambda mesh: run_generator_steps(gen, STUDENT, init, t_params, mesh, batches, student_apply=apply,
                                           teacher_apply=teacher_apply, intermediate=intermediate)[0]
    one, many = run(mesh_lib.make_mesh(1, 1, jax.devices()[:1])), run(mesh_lib.make_mesh(4, 2))
    a, b = trees.flatten(one["params"]), trees.flatten(many["params"])
    compared = [k for k in a if "attn/k/bias" not in k]  # exactly-zero gradients: see test_translation
    for k in compared:
      np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-5, err_msg=k)
    single.append(a)
  assert any(not np.allclose(single[0][k], single[1][k]) for k in single[0])  # the terms train


# ---------------------------------------------------------------- end to end


def test_digits_teacher_and_students_end_to_end(tmp_path):
  """`wdjax finetune` trains the ViT teacher; `wdjax distill` with WD (phase 1, phase 2) exports
  an HF ViT directory whose `transformers` logits match wdjax's."""
  from wdjax.train import run as run_lib
  optim = OptimConfig(lr=3e-3, schedule="cosine", warmup_ratio=0.05)
  cfg = Config(workdir=str(tmp_path / "run"),
               data=DataConfig(dataset="digits", pad_to_multiple=1, length_grouping=0),
               task=VisionConfig(patch_size=4, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64),
               teacher=TeacherConfig(hidden_dropout=0.0, attention_dropout=0.0),
               student=StudentConfig(num_layers=2, hidden_size=16, num_heads=4, intermediate_size=32,
                                     hidden_dropout=0.0, attention_dropout=0.0),
               finetune=TrainConfig(batch_size=64, steps=300, eval_every=300, eval_batch_size=96, optim=optim),
               distill=TrainConfig(batch_size=64, steps=100, eval_every=100, eval_batch_size=96, optim=optim))
  teacher = run_lib.finetune(cfg)
  assert teacher["test_accuracy"] > 0.9  # 0.97 measured
  wd = run_lib.distill(dataclasses.replace(cfg, method=generators.section("wd", init="identity")))
  assert wd["test_accuracy"] > 0.85  # 0.97 measured
  assert wd["phase1"]["trainable_params"] > wd["model_params"]  # the maps train in phase 1
  lines = []  # importance selection + KD: the ViT teacher's units ranked on training images
  imp = run_lib.distill(dataclasses.replace(
      cfg, method=generators.section("kd", init="importance", calibration_batches=2)), log=lines.append)
  assert imp["phase"] == "distill_kd_importance" and imp["test_accuracy"] > 0.85
  assert any("ranking the teacher's units on 2 training batches" in l for l in lines)
  model = tmp_path / "run" / "distill_wd_phase2" / "model"
  assert run_lib.evaluate(cfg, model)["test"] == pytest.approx(wd["test_accuracy"])
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  s_cfg, params = vit.load(model)
  x = images.load("digits").test.batch(np.arange(20))["image"]
  hf = transformers.ViTForImageClassification.from_pretrained(model).eval()
  with torch.no_grad():
    theirs = hf(pixel_values=torch.tensor(x).permute(0, 3, 1, 2)).logits.numpy()
  np.testing.assert_allclose(_logits(s_cfg, params, x), theirs, atol=2e-5, rtol=1e-4)
