"""OPDF (docs/methods.md §2): exact MPO decomposition, canonical form, constraint loss, contraction."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from wdjax import generators
from wdjax import trees
from wdjax.generators import StudentSpec, mpo
from wdjax.models import bert, hf

# A random teacher (2 layers, 4 heads of 12) and a half-depth student of the same width.
SMALL = bert.EncoderConfig(vocab_size=5000, hidden_size=48, num_layers=2, num_heads=4,
                           intermediate_size=96, max_position_embeddings=64, hidden_dropout=0.0,
                           attention_dropout=0.0)
HALF = dataclasses.replace(SMALL, num_layers=1)


def _params(cfg, seed):
  return nnx.to_pure_dict(nnx.state(bert.build(cfg, seed=seed)))


def _rel(a, b):
  return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


@pytest.mark.parametrize("n_cores", [2, 5, 7])
def test_contraction_reproduces_random_and_real_matrices(minilm_dir, n_cores):
  _, t_params, _ = hf.load(minilm_dir)
  flat = trees.flatten(t_params)
  rng = np.random.default_rng(n_cores)
  matrices = [rng.standard_normal((96, 160)).astype(np.float32),
              np.asarray(flat["encoder/layer_2/attn/q/kernel"]).T,  # [384, 384]
              np.asarray(flat["encoder/layer_4/mlp/up/kernel"]).T]  # [1536, 384]
  for w in matrices:
    factors = mpo.factorize(*w.shape, n_cores)
    cores = mpo.decompose(w, *factors)
    assert [c.shape for c in cores] == mpo.core_shapes(*factors)
    assert _rel(mpo.contract([jnp.asarray(c) for c in cores]), w) < 1e-5


def test_trainable_sizes_match_the_reference_table():
  """docs/methods.md §2.2: 768x768 and 3072x768 with the reference's 2-, 5- and 7-core layouts."""
  table = {(768, 768): (589_824, 921_600, 1_916_928, 2_580_480),
           (3072, 768): (2_359_296, 3_686_400, 7_667_712, 10_321_920)}
  for (rows, cols), (dense, *counts) in table.items():
    assert rows * cols == dense
    for n, want in zip((2, 5, 7), counts):
      assert mpo.param_count(*mpo.factorize(rows, cols, n)) == want
  assert mpo.factorize(768, 768, 5) == ((32, 1, 1, 1, 24), (32, 1, 1, 1, 24))
  assert mpo.factorize(3072, 768, 7) == ((64, 1, 1, 1, 1, 1, 48), (32, 1, 1, 1, 1, 1, 24))


def test_canonical_form_is_deterministic_orthonormal_and_sign_fixed():
  w = np.random.default_rng(0).standard_normal((96, 160)).astype(np.float32)
  factors = mpo.factorize(96, 160, 5)
  a, b = mpo.decompose(w, *factors), jax.jit(mpo.decompose, static_argnums=(1, 2))(w, *factors)
  a2 = mpo.decompose(w.copy(), *factors)
  assert all(np.array_equal(x, y) for x, y in zip(a, a2))  # the same cores twice
  assert all(np.allclose(x, y, atol=1e-5) for x, y in zip(a, b))  # and the same under jit
  a = [np.asarray(x, np.float64) for x in a]
  centre = 2
  for k, core in enumerate(a):
    d0, i, j, d1 = core.shape
    if k < centre:  # left-orthonormal, each column's largest entry positive
      m = core.reshape(d0 * i * j, d1)
      np.testing.assert_allclose(m.T @ m, np.eye(d1), atol=1e-5)
      assert (m[np.abs(m).argmax(0), np.arange(d1)] > 0).all()
    elif k > centre:  # right-orthonormal
      m = core.reshape(d0, i * j * d1)
      np.testing.assert_allclose(m @ m.T, np.eye(d0), atol=1e-5)
  # The centre carries the whole norm.
  np.testing.assert_allclose(np.linalg.norm(a[centre]), np.linalg.norm(w), rtol=1e-5)


def _opdf(t_params, s_cfg=HALF, **options):
  init = _params(s_cfg, 1)
  gen = generators.make("opdf", init, t_params, **options)
  gp, gs = gen.init(jax.random.key(0), t_params, StudentSpec(s_cfg, init))
  return gen, gp, gs, init


def test_constraint_pulls_the_first_layers_towards_the_aligned_ones():
  """The paper's setting (§2.3-2.4): the student starts as the teacher's first layers (here layer
  0) and its auxiliary cores are pulled towards teacher layer 2i+1's (here 1): at step 0 the
  loss is lambda x the mean over matrices of the cores' mean squared distance, computed here from
  the two layers' own decompositions. Started at the aligned layer, it is zero."""
  t_params = _params(SMALL, 0)
  gen, gp, gs, _ = _opdf(t_params, n_cores=5, constraint_lambda=1.0)
  flat, want = trees.flatten(t_params), []
  for p in gen.factors:  # encoder/layer_0/...: one student layer
    cores = [mpo.decompose(np.asarray(flat[p.replace("layer_0", l)]).T, *gen.factors[p])
             for l in ("layer_0", "layer_1")]
    want.append(sum(np.mean(np.square(np.asarray(cores[0][k], np.float64) - cores[1][k]))
                    for k in gen.constrained[p]))
    assert gen.constrained[p] == (0, 1, 3, 4)
  got = float(gen.aux_loss(gp, t_params, gs))
  assert got > 1e-4
  np.testing.assert_allclose(got, np.mean(want), rtol=1e-4)
  gen_at_target, gp_t, gs_t, _ = _opdf(t_params, n_cores=5, constraint_lambda=1.0, layer_map="every_k")
  assert float(gen_at_target.aux_loss(gp_t, t_params, gs_t)) < 1e-10


def test_relative_constraint_is_the_mean_relative_squared_distance_of_the_cores():
  """`constraint="relative"`: lambda x the mean over (matrix, auxiliary core) of
  ||T_s - T_t||^2 / ||T_t||^2, from the two layers' own decompositions; zero at the target."""
  t_params = _params(SMALL, 0)
  gen, gp, gs, _ = _opdf(t_params, n_cores=5, constraint_lambda=2.0, constraint="relative")
  flat, want = trees.flatten(t_params), []
  for p in gen.factors:
    a, b = [mpo.decompose(np.asarray(flat[p.replace("layer_0", l)]).T, *gen.factors[p])
            for l in ("layer_0", "layer_1")]
    want += [np.sum(np.square(np.asarray(a[k], np.float64) - b[k])) / np.sum(np.square(np.asarray(b[k], np.float64)))
             for k in gen.constrained[p]]
  got = float(gen.aux_loss(gp, t_params, gs))
  assert got > 0.1  # the scale of a relative distance, not of a core entry's square
  np.testing.assert_allclose(got, 2.0 * np.mean(want), rtol=1e-4)
  at, gp_t, gs_t, _ = _opdf(t_params, n_cores=5, constraint_lambda=1.0, layer_map="every_k",
                            constraint="relative")
  assert float(at.aux_loss(gp_t, t_params, gs_t)) < 1e-8
  with pytest.raises(ValueError, match="constraint must be one of"):
    _opdf(t_params, constraint="l1")


def test_constraint_loss_has_gradient_on_exactly_the_auxiliary_cores():
  t_params = _params(SMALL, 0)
  gen, gp, gs, _ = _opdf(t_params, n_cores=5, constraint_lambda=1.0)
  rng = np.random.default_rng(1)  # numpy and a jitted grad: eager JAX compiles every op shape
  gp = jax.tree_util.tree_map(lambda x: x + 0.01 * rng.standard_normal(x.shape, np.float32), gp)
  grads = gen.flat_params(jax.jit(jax.grad(lambda p: gen.aux_loss(p, t_params, gs)))(gp))  # per matrix
  for path, g in grads.items():
    nonzero = bool(np.any(np.asarray(g) != 0))
    core = path.rsplit("/core_", 1)
    want = path.startswith("cores/") and int(core[1]) != 2  # every core but the centre (k = 2)
    assert nonzero == want, path
  assert len([p for p in grads if p.startswith("cores/")]) == 6 * 5  # q k v o up down, 5 cores


def test_student_starts_as_the_selected_teacher_layers_and_exports_what_it_trains(tmp_path):
  """At init, the contracted student is the teacher's layer 0 (first_n, the paper's start) to
  1e-5; `materialize` is the training network, and the exported model computes it."""
  t_params = _params(SMALL, 0)
  gen, gp, gs, init = _opdf(t_params, n_cores=7)
  student = gen.materialize(gp, t_params, gs)
  selected = generators.select(t_params, init, "first_n")
  for (p, a), b in zip(trees.flatten(student).items(), trees.flatten(selected).values()):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=p)
  ids = jnp.asarray(np.random.default_rng(0).integers(5, 5000, (3, 10)), jnp.int32)
  model = nnx.merge(nnx.split(bert.build(HALF))[0], gen.generate(gp, t_params, gs))
  want = np.asarray(model(ids, jnp.ones_like(ids)))
  out = hf.export(tmp_path / "m", HALF, jax.device_get(student))
  cfg, params, _ = hf.load(out)
  got = np.asarray(nnx.merge(nnx.split(bert.build(cfg))[0], params)(ids, jnp.ones_like(ids)))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # Trainable size: 2.3-4.4x the dense matrices (here 48x48 and 96x48 at 7 cores).
  n_cores = sum(x.size for x in jax.tree_util.tree_leaves(gp["cores"]))
  n_dense = sum(np.size(trees.flatten(init)[p]) for p in gen.factors)
  assert 2.0 < n_cores / n_dense < 4.5


def test_an_importance_start_is_the_importance_selected_student():
  """`start="importance"`: the contracted student at init is the teacher selected at the given
  indices (here the teacher's last layer); without indices it is refused."""
  from wdjax.generators.select import DEPTH
  t_params = _params(SMALL, 0)
  init = nnx.to_pure_dict(nnx.state(bert.build(HALF, seed=1)))
  indices = {DEPTH: np.array([1])}  # the teacher's layer 1, where `first_n` starts at layer 0
  gen = generators.make("opdf", init, t_params, n_cores=5, constraint_lambda=0.0, start="importance",
                        indices=indices)
  gp, gs = gen.init(jax.random.key(0), t_params, StudentSpec(HALF, init))
  want = trees.flatten(generators.select(t_params, init, indices=indices))
  for p, a in trees.flatten(gen.materialize(gp, t_params, gs)).items():
    np.testing.assert_allclose(a, want[p], rtol=1e-5, atol=1e-5, err_msg=p)
  with pytest.raises(ValueError, match="needs the kept indices"):
    generators.make("opdf", init, t_params, start="importance")


def test_width_mismatch_refuses_the_undefined_constraint():
  t_params = _params(SMALL, 0)
  narrow = dataclasses.replace(HALF, hidden_size=24, intermediate_size=48)
  with pytest.raises(ValueError, match="constraint is undefined"):
    _opdf(t_params, narrow, constraint_lambda=1e-4)
  gen, gp, gs, _ = _opdf(t_params, narrow, constraint_lambda=0.0)
  assert float(gen.aux_loss(gp, t_params, gs)) == 0.0



def test_alignment_needs_a_whole_depth_ratio_only_with_the_constraint():
  """3 teacher layers -> 2: no layer 2i+1 alignment; refused with the constraint, fine without."""
  t_params = _params(dataclasses.replace(SMALL, num_layers=3), 0)
  two = dataclasses.replace(SMALL, num_layers=2)
  with pytest.raises(ValueError, match="aligns student layer i"):
    _opdf(t_params, two, n_cores=3)
  gen, gp, gs, _ = _opdf(t_params, two, n_cores=3, constraint_lambda=0.0)
  assert float(gen.aux_loss(gp, t_params, gs)) == 0.0 and not gs["targets"]

def test_sharded_step_with_the_constraint_equals_single_device(monkeypatch):
  import test_generators as contract
  from conftest import tree_allclose
  from wdjax.train import mesh as mesh_lib
  monkeypatch.setitem(contract.VARIANTS, "opdf", dict(n_cores=5, constraint_lambda=1.0))
  setup = (SMALL, _params(SMALL, 0), HALF, _params(HALF, 1))
  one, _, _ = contract._steps(setup, "opdf", mesh_lib.make_mesh(1, 1, jax.devices()[:1]), n=3)
  many, _, _ = contract._steps(setup, "opdf", mesh_lib.make_mesh(4, 2), n=3)
  assert tree_allclose(one["params"], many["params"], rtol=1e-4, atol=1e-5)
