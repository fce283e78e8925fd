"""The generator contract for weight selection, WS, GWS, WD, WID and OPDF on the real MiniLM teacher."""

import dataclasses
import types

import jax
import jax.numpy as jnp
from jax.extend import core as jex_core
import numpy as np
import pytest
from flax import nnx

from conftest import assert_same_shapes, run_generator_steps, tree_allclose
from wdjax import generators
from wdjax.config import KDConfig, OptimConfig
from wdjax import trees
from wdjax.generators import StudentSpec, paths
from wdjax.models import bert, hf
from wdjax.train import mesh as mesh_lib, step as step_lib

# 2 of 6 layers, 384 -> 96 wide, 12 heads of 8, FFN 1536 -> 384: every role shrinks.
STUDENT = dict(num_layers=2, hidden_size=96, num_heads=12, intermediate_size=384)

VARIANTS = {
    "select": dict(),
    "ws": dict(),
    "ws-tensor-xavier": dict(sharing="tensor", init="xavier"),
    "ws-learned-mix": dict(layer_mix="learned"),
    "gws-row": dict(gate="row"),
    "gws-element": dict(gate="element"),
    "wd": dict(mode="faithful"),
    "wd-lean": dict(mode="lean"),
    "wd-identity": dict(init="identity"),
    # 384 -> 96 wide: OPDF's constraint is undefined across widths (test_opdf covers it).
    "opdf": dict(n_cores=3, constraint_lambda=0.0),
}
# Generators whose training-time network is not the student (WID trains at the teacher's width).
# w_step > the steps run: a boundary 1 step after an identity init ranks near-tied norms, and a
# different reduction order may break the ties differently (test_wid covers the masks).
OTHER_NETWORK = {"wid": dict(teacher_heads=12, student_heads=12, w_step=100)}


def _method(variant: str) -> str:
  return variant.split("-")[0]


def _options(variant: str) -> dict:
  return {**VARIANTS, **OTHER_NETWORK}[variant]


@pytest.fixture(scope="module")
def setup(task_teacher):
  t_cfg, t_params, _ = hf.load(task_teacher)
  s_cfg = dataclasses.replace(t_cfg, **STUDENT)
  init = nnx.to_pure_dict(nnx.state(bert.build(s_cfg, seed=1)))
  return t_cfg, t_params, s_cfg, init


def _make(setup, variant):
  _, t_params, s_cfg, init = setup
  gen = generators.make(_method(variant), init, t_params, **_options(variant))
  gen_params, gen_state = gen.init(jax.random.key(0), t_params, StudentSpec(s_cfg, init))
  return gen, gen_params, gen_state


def test_layer_maps():
  assert paths.layer_map("every_k", 6, 3) == [[1], [3], [5]]
  assert paths.layer_map("contiguous", 6, 3) == [[0, 1], [2, 3], [4, 5]]
  assert paths.layer_map("first_n", 6, 3) == [[0], [1], [2]]
  assert paths.layer_map("uniform", 6, 3) == [[0], [2], [5]]
  assert paths.uniform_indices(384, 192).tolist() == list(range(0, 384, 2))
  assert paths.uniform_indices(10, 4).tolist() == [0, 3, 6, 9]
  with pytest.raises(ValueError, match="divisible"):
    paths.layer_map("contiguous", 6, 4)



@pytest.mark.parametrize("layer_map", ["uniform", "first_n"])
def test_ws_learned_mix_refuses_one_layer_groups(setup, layer_map):
  """A learned mix over one teacher layer per student layer would train no mix at all (it did,
  silently): the generator says so instead."""
  _, t_params, _, init = setup
  with pytest.raises(ValueError, match="nothing to mix"):
    generators.make("ws", init, t_params, layer_mix="learned", layer_map=layer_map)
  gen = generators.make("ws", init, t_params, layer_mix="learned")  # every_k -> contiguous groups
  assert all(len(s) == 3 for p, s in gen.plan.sources.items() if "/layer_" in p)

def test_layer_stacks_round_trip_and_batched_projection_equals_per_layer():
  """Generators store per-layer leaves stacked ([L, ...] under `.../layers/...`): the round trip
  is exact, names are in layer order (layer_10 after layer_2), and one batched product with
  per-layer and shared maps equals L separate products."""
  rng = np.random.default_rng(0)
  flat = {f"encoder/layer_{l}/mlp/up/kernel": rng.normal(size=(8, 12)).astype(np.float32) for l in (0, 2, 10, 1)}
  flat["encoder/embeddings/word/embedding"] = rng.normal(size=(5, 8))
  stacked = trees.stack_layers(flat)
  assert set(stacked) == {"encoder/layers/mlp/up/kernel", "encoder/embeddings/word/embedding"}
  assert stacked["encoder/layers/mlp/up/kernel"].shape == (4, 8, 12)
  np.testing.assert_array_equal(stacked["encoder/layers/mlp/up/kernel"][3], flat["encoder/layer_10/mlp/up/kernel"])
  back = trees.unstack_layers(stacked)  # the 4 layers come back as layer_0..layer_3
  np.testing.assert_array_equal(back["encoder/layer_2/mlp/up/kernel"], flat["encoder/layer_2/mlp/up/kernel"])
  assert trees.layer_names("ffn/layers", 2) == ["ffn/layer_0", "ffn/layer_1"]
  assert paths.space_of("encoder/layers/mlp/up/kernel", "ffn") == "ffn/layers"
  assert paths.space_of("encoder/layers/mlp/up/kernel", "hidden") == "hidden"
  x = jnp.asarray(stacked["encoder/layers/mlp/up/kernel"], jnp.float32)
  shared, per_layer = jnp.asarray(rng.normal(size=(8, 3))), jnp.asarray(rng.normal(size=(4, 12, 5)))
  got = paths.project_stacked(x, (shared, per_layer))
  assert got.shape == (4, 3, 5)
  for l in range(4):
    np.testing.assert_allclose(got[l], paths.project(x[l], (shared, per_layer[l])), rtol=1e-5, atol=1e-5)


def test_selection_is_a_consistent_slice_of_the_teacher(setup):
  _, t_params, _, init = setup
  s = trees.flatten(generators.select(t_params, init))
  t = trees.flatten(t_params)
  # student layer 1 <- teacher layer 5 (every_k); hidden 384 -> 96 keeps every 4th unit
  np.testing.assert_array_equal(s["encoder/layer_1/attn/q/kernel"],
                                t["encoder/layer_5/attn/q/kernel"][::4, ::4])
  np.testing.assert_array_equal(s["encoder/layer_0/mlp/down/kernel"],
                                t["encoder/layer_2/mlp/down/kernel"][::4, ::4])
  np.testing.assert_array_equal(s["encoder/embeddings/word/embedding"],
                                t["encoder/embeddings/word/embedding"][:, ::4])
  np.testing.assert_array_equal(s["encoder/layer_0/mlp_ln/scale"], t["encoder/layer_2/mlp_ln/scale"][::4])
  np.testing.assert_array_equal(s["classifier/kernel"], t["classifier/kernel"][::4])
  np.testing.assert_array_equal(s["classifier/bias"], t["classifier/bias"])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_generated_leaves_have_the_student_shapes_and_dtypes(setup, variant):
  _, t_params, _, init = setup
  gen, gen_params, gen_state = _make(setup, variant)
  out = jax.jit(gen.generate)(gen_params, t_params, gen_state)
  assert_same_shapes(out, init)
  assert tree_allclose(jax.jit(gen.materialize)(gen_params, t_params, gen_state), out, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("variant", ["ws", "gws-row", "gws-element", "wd-identity"])
def test_identity_maps_generate_exactly_the_selection_student(setup, variant):
  _, t_params, _, init = setup
  gen, gen_params, gen_state = _make(setup, variant)
  got = trees.flatten(jax.jit(gen.generate)(gen_params, t_params, gen_state))
  want = trees.flatten(generators.select(t_params, init))
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-7, err_msg=k)


def test_selected_student_reproduces_the_selection_network(setup):
  """Function-level check: the WS student's logits equal the weight-selection model's."""
  t_cfg, t_params, s_cfg, init = setup
  gen, gen_params, gen_state = _make(setup, "ws")
  model = nnx.split(bert.build(s_cfg))[0]
  ids = jnp.asarray([[101, 1037, 2235, 3185, 2007, 1037, 2502, 4254, 1012, 102]])
  mask = jnp.ones_like(ids)
  a = nnx.merge(model, gen.generate(gen_params, t_params, gen_state))(ids, mask)
  b = nnx.merge(model, generators.select(t_params, init))(ids, mask)
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_wd_initialisation_follows_the_reference(setup):
  _, t_params, _, init = setup
  gen, gen_params, _ = _make(setup, "wd")
  flat = gen.flat_params(gen_params)  # per tensor, as the paper names them
  np.testing.assert_array_equal(flat["mix/encoder/layer_0/attn/q/kernel/w"],
                                np.full(3, 1 / 3, np.float32))  # groups of 3, w = 1/ts
  assert flat["mix/encoder/layer_0/attn/q/kernel/lam"].shape == (3, 3)
  assert (flat["affine/encoder/layer_1/mlp/up/kernel/a"] == 1).all()
  assert (flat["affine/encoder/layer_1/mlp/up/kernel/b"] == 0).all()
  assert "classifier" not in gen_params["affine"]  # the output projection is linear only
  q = flat["maps/encoder/layer_0/attn/q/kernel/axis_0"]
  assert q.shape == (384, 96) and abs(float(q.std()) - np.sqrt(2 / (384 + 96))) < 0.01
  # stored stacked over the 2 student layers, each layer's map drawn independently
  stacked = gen_params["maps"]["encoder"]["layers"]["attn"]["q"]["kernel"]["axis_0"]
  assert stacked.shape == (2, 384, 96) and not np.allclose(stacked[0], stacked[1])
  n_stacked = sum("/layers/" in k for k in trees.flatten(gen_params))
  assert len(flat) == len(trees.flatten(gen_params)) + n_stacked  # a stacked leaf is 2 tensors
  lean = _make(setup, "wd-lean")[1]
  n_faithful, n_lean = generators.param_count(gen_params), generators.param_count(lean)
  assert n_lean < 0.8 * n_faithful


def _steps(setup, variant, mesh, n=2):
  t_cfg, t_params, s_cfg, init = setup
  gen = generators.make(_method(variant), init, t_params, **_options(variant))
  rng = np.random.default_rng(0)
  batches = [{"input_ids": rng.integers(1000, 5000, (8, 16)).astype(np.int32),
              "attention_mask": np.ones((8, 16), np.int32),
              "labels": rng.integers(0, 2, 8).astype(np.int32), "weights": np.ones(8, np.float32)}
             for _ in range(n)]
  return run_generator_steps(
      gen, s_cfg, init, t_params, mesh, batches,
      student_apply=step_lib.classifier_apply(nnx.split(bert.build(gen.training_config(s_cfg)))[0]),
      teacher_apply=step_lib.classifier_apply(nnx.split(bert.build(t_cfg))[0]))


@pytest.mark.parametrize("variant", ["ws", "gws-row", "wd-lean", "wid", "opdf"])
def test_training_moves_only_generator_leaves_and_never_the_teacher(setup, variant):
  _, t_params, _, _ = setup
  state, teacher, before = _steps(setup, variant, mesh_lib.make_mesh(1, 1, jax.devices()[:1]))
  for got, want in zip(jax.tree_util.tree_leaves(teacher), jax.tree_util.tree_leaves(t_params)):
    np.testing.assert_array_equal(np.asarray(got), want)
  moved = [not np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(state["params"]),
                                                    jax.tree_util.tree_leaves(before))]
  assert sum(moved) > 0.9 * len(moved)  # (nearly) every generator leaf got a gradient and moved
  assert jax.tree_util.tree_structure(state["params"]) == jax.tree_util.tree_structure(before)


@pytest.mark.parametrize("variant", ["ws", "wd", "wid", "opdf"])
def test_sharded_generator_step_equals_single_device(setup, variant):
  one, _, _ = _steps(setup, variant, mesh_lib.make_mesh(1, 1, jax.devices()[:1]))
  many, _, _ = _steps(setup, variant, mesh_lib.make_mesh(4, 2))
  if variant != "wid":
    assert tree_allclose(one["params"], many["params"], rtol=1e-4, atol=1e-5)
    return
  # WID's compactors start as identities: their off-diagonal gradients are ~0, and Adam turns
  # the sign of a ~0 gradient (which a different reduction order may flip) into a full lr-sized
  # step. So a handful of the 16M compactor entries differ by up to 2 lr; all others agree.
  a = np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(one["params"])])
  b = np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(many["params"])])
  off = ~np.isclose(a, b, rtol=1e-4, atol=1e-5)
  assert off.sum() <= 1e-5 * a.size and np.abs(a - b).max() <= 2 * 1e-3 + 1e-5


def test_pca_maps_are_orthonormal_and_deterministic(setup, tiny):
  from wdjax.data import text
  from wdjax.generators.pca import pca_maps
  t_cfg, t_params, _, _ = setup
  cfg = tiny()
  cfg = dataclasses.replace(cfg, student=dataclasses.replace(cfg.student, **{
      k: v for k, v in STUDENT.items()}))
  task = text.load(cfg.data, cfg.teacher_dir, 0)
  method = generators.section("ws", init="pca", pca_batches=2)
  a = pca_maps(t_cfg, t_params, task.train, cfg, method)
  b = pca_maps(t_cfg, t_params, task.train, cfg, method)
  assert sorted(a) == ["attn/layer_0", "attn/layer_1", "ffn/layer_0", "ffn/layer_1", "hidden", "pooled"]
  for k, m in a.items():
    np.testing.assert_array_equal(m, b[k])
    np.testing.assert_allclose(m.T @ m, np.eye(m.shape[1]), atol=1e-4)
  assert a["ffn/layer_0"].shape == (1536, 384)
  # WS starts from them: each layer's space gets its own basis (stored stacked), per space or per tensor
  _, _, s_cfg, init = setup
  for sharing in ("role", "tensor"):
    gen = generators.make("ws", init, t_params, init="pca", pca=a, sharing=sharing)
    flat = gen.flat_params(gen.init(jax.random.key(0), t_params, StudentSpec(s_cfg, init))[0])
    if sharing == "role":
      assert {k[len("maps/"):] for k in flat} == set(a)
      for k, m in a.items():
        np.testing.assert_allclose(flat[f"maps/{k}"], m, rtol=1e-6, err_msg=k)
    else:
      np.testing.assert_allclose(flat["maps/encoder/layer_1/mlp/up/kernel/axis_1"], a["ffn/layer_1"], rtol=1e-6)
      np.testing.assert_allclose(flat["maps/encoder/layer_0/mlp/up/kernel/axis_0"], a["hidden"], rtol=1e-6)



def test_ws_pca_on_mpnet_selects_the_relative_bias_heads():
  """MPNet's relative-bias table has a heads axis, a space with no activations: PCA-initialised
  WS starts it at the heads' selection (it raised KeyError 'heads' before), every other space at
  its principal directions."""
  from wdjax.generators.pca import top_directions
  t_cfg = bert.EncoderConfig(arch="mpnet", type_vocab_size=0, pad_token_id=1, vocab_size=100,
                             hidden_size=48, num_layers=4, num_heads=4, intermediate_size=96,
                             max_position_embeddings=40)
  s_cfg = dataclasses.replace(t_cfg, hidden_size=24, num_layers=2, num_heads=2, intermediate_size=48)
  t_params = nnx.to_pure_dict(nnx.state(bert.build(t_cfg, seed=0)))
  init = nnx.to_pure_dict(nnx.state(bert.build(s_cfg, seed=1)))
  rng = np.random.default_rng(0)
  moment = lambda d: (x := rng.normal(size=(500, d))).T @ x
  pca = {"hidden": top_directions(moment(48), 24), "pooled": top_directions(moment(48), 24)}
  for l in range(2):
    pca[f"attn/layer_{l}"], pca[f"ffn/layer_{l}"] = top_directions(moment(48), 24), top_directions(moment(96), 48)
  gen = generators.make("ws", init, t_params, init="pca", pca=pca)
  gen_params, gen_state = gen.init(jax.random.key(0), t_params, StudentSpec(s_cfg, init))
  flat = gen.flat_params(gen_params)
  np.testing.assert_array_equal(flat["maps/heads"], paths.selection_matrix(4, 2))
  np.testing.assert_allclose(flat["maps/hidden"], pca["hidden"], rtol=1e-6)
  table = trees.flatten(gen.generate(gen_params, t_params, gen_state))
  bias = [k for k in table if k.endswith("relative_bias/embedding")]
  assert bias, sorted(table)
  t_table = trees.flatten(t_params)[bias[0]]
  np.testing.assert_allclose(table[bias[0]], t_table @ paths.selection_matrix(4, 2), rtol=1e-6)

def _dots(jaxpr) -> list:
  """Every dot_general equation of a jaxpr, nested ones (jit, custom_vjp, ...) included."""
  out = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      out.append(eqn)
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(sub, jex_core.ClosedJaxpr):
          out += _dots(sub.jaxpr)
        elif isinstance(sub, jex_core.Jaxpr):
          out += _dots(sub)
  return out


@pytest.mark.parametrize("variant", ["ws", "gws-row", "wd", "wid", "opdf"])
def test_mixed_precision_runs_the_generator_products_with_bf16_operands(setup, variant):
  # a bf16 student: the generator's float32 products, forward and backward, run with bf16
  # operands and float32 accumulation (as torch.autocast runs torch_ref's); the models' own
  # products are untouched (bf16 already, or the exact HIGHEST token-type lookup), and a float32
  # student's generator keeps JAX's default
  t_cfg, t_params, s_cfg, init = setup
  s_cfg, t_cfg = (dataclasses.replace(c, dtype="bfloat16") for c in (s_cfg, t_cfg))
  gen = generators.make(_method(variant), init, t_params, **_options(variant))
  gen_params, gen_state = gen.init(jax.random.key(0), t_params, StudentSpec(s_cfg, init))
  tx = step_lib.make_optimizer(OptimConfig(lr=1e-3), 10, gen_params, gen.optimizer_hooks(gen_params, gen_state))
  state = step_lib.init_state(gen, tx, 0, t_params, StudentSpec(s_cfg, init))
  batch = {"input_ids": jnp.full((2, 8), 1000, jnp.int32), "attention_mask": jnp.ones((2, 8), jnp.int32),
           "labels": jnp.zeros(2, jnp.int32), "weights": jnp.ones(2, jnp.float32)}
  preset = "BF16_BF16_F32"  # what `generator_products` gives a bf16 student on a GPU or TPU

  def precisions(products):
    step = step_lib.make_train_step(
        generator=gen, tx=tx, kd=KDConfig(alpha=0.5), seed=0, products=products,
        student_apply=step_lib.classifier_apply(nnx.split(bert.build(gen.training_config(s_cfg)))[0]),
        teacher_apply=step_lib.classifier_apply(nnx.split(bert.build(t_cfg))[0]))
    dots = _dots(jax.make_jaxpr(step)(state, t_params, batch).jaxpr)
    f32 = [str(e.params["precision"]) for e in dots
           if all(v.aval.dtype == jnp.float32 for v in e.invars)]
    bf16 = [str(e.params["precision"]) for e in dots
            if all(v.aval.dtype == jnp.bfloat16 for v in e.invars)]
    return f32, bf16

  with jax.default_matmul_precision(preset):
    n_forward = len(_dots(jax.make_jaxpr(gen.generate)(gen_params, t_params, gen_state).jaxpr))
  f32, bf16 = precisions(preset)
  generator_dots = [p for p in f32 if "HIGHEST" not in p]
  assert all(preset in p for p in generator_dots)
  assert len(generator_dots) > n_forward > 0  # the backward's products too
  f32_default, bf16_default = precisions(None)
  assert len(f32_default) == len(f32) and not any(preset in p for p in f32_default)
  assert bf16 and bf16 == bf16_default


def test_generator_products_follow_the_student_dtype_and_the_chip():
  chip = lambda platform, capability=None: types.SimpleNamespace(
      platform=platform, **({} if capability is None else {"compute_capability": capability}))
  products = step_lib.generator_products
  assert products("bfloat16", chip("gpu", "9.0")) == "BF16_BF16_F32"
  assert products("bfloat16", chip("gpu", "8.0")) == "BF16_BF16_F32"
  assert products("bfloat16", chip("gpu", "7.5")) is None  # a T4: no bf16 products, XLA refuses
  assert products("float16", chip("gpu", "7.5")) == "F16_F16_F32"
  assert products("bfloat16", chip("tpu")) == "BF16_BF16_F32"
  assert products("float16", chip("tpu")) is None
  assert products("bfloat16", chip("gpu")) is None  # no compute capability (ROCm): JAX's default
  assert products("float32", chip("gpu", "9.0")) is None
  assert products("bfloat16", chip("cpu")) is None and products("float16") is None  # this CPU


@pytest.mark.gpu
def test_bf16_generator_products_on_a_gpu_round_like_bf16():
  # on a GPU the algorithm is honoured (a CPU computes float32 regardless): WD's student differs
  # from the float32 one by about bf16's rounding of the operands. Random weights, so it runs
  # where the teacher asset cannot be fetched (the device machine).
  t_cfg = bert.EncoderConfig(num_layers=4, hidden_size=256, num_heads=4, intermediate_size=1024)
  s_cfg = dataclasses.replace(t_cfg, num_layers=2, hidden_size=128, intermediate_size=512)
  t_params = nnx.to_pure_dict(nnx.state(bert.build(t_cfg, seed=0)))
  init = nnx.to_pure_dict(nnx.state(bert.build(s_cfg, seed=1)))
  gen = generators.make("wd", init, t_params)
  gen_params, gen_state = gen.init(jax.random.key(0), t_params, StudentSpec(s_cfg, init))
  f32 = jax.jit(gen.generate)(gen_params, t_params, gen_state)
  products = step_lib.generator_products("bfloat16")
  assert products == "BF16_BF16_F32"  # an Ampere or newer GPU
  with jax.default_matmul_precision(products):
    bf16 = jax.jit(gen.generate)(gen_params, t_params, gen_state)
  a, b = (np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(t)]) for t in (f32, bf16))
  err = np.linalg.norm(a - b) / np.linalg.norm(a)
  assert 1e-5 < err < 1e-2
