"""Every weight-transfer method on every architecture of the BERT family: a teacher that
transformers itself creates and saves, one generator step, and the student's export reloaded
by transformers with the same logits."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import run_generator_steps
from test_models import _hf_class, _hf_config
from wdjax import generators
from wdjax.generators import StudentSpec
from wdjax.models import bert, hf
from wdjax.train import mesh as mesh_lib, step as step_lib

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# test_models' small configs (2 layers x 48 wide, 6 heads, FFN 80) -> 1 x 24, 6 heads, FFN 40:
# every role shrinks
STUDENT = dict(num_layers=1, hidden_size=24, num_heads=6, intermediate_size=40)
METHODS = {
    "select": dict(),
    "ws": dict(),
    "gws": dict(gate="row"),
    "wd": dict(),
    "wid": dict(teacher_heads=6, student_heads=6, w_step=100),
    "opdf": dict(n_cores=3, constraint_lambda=0.0),
}


def _teacher_dir(tmp_path_factory, arch: str):
  torch.manual_seed(0)
  ref = _hf_class(arch, "classifier")(_hf_config(arch)).eval()
  with torch.no_grad():  # transformers starts biases at 0 and gains at 1: a trained model's are not
    for name, p in ref.named_parameters():
      if name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name:
        p.add_(0.05 * torch.randn_like(p))
  path = tmp_path_factory.mktemp(arch)
  ref.save_pretrained(path)
  return path


@pytest.fixture(scope="module")
def family(request, tmp_path_factory):
  path = _teacher_dir(tmp_path_factory, request.param)
  t_cfg, t_params, fresh = hf.load(path)
  assert fresh == [] and t_cfg.arch == request.param
  s_cfg = dataclasses.replace(t_cfg, **STUDENT)
  init = nnx.to_pure_dict(nnx.state(bert.build(s_cfg, seed=1)))
  return t_cfg, t_params, s_cfg, init


def _batches(pad_id: int, n: int = 2):
  rng = np.random.default_rng(0)
  out = []
  for _ in range(n):
    ids = rng.integers(3, 99, (8, 12)).astype(np.int32)
    mask = np.ones((8, 12), np.int32)
    ids[4:, 9:], mask[4:, 9:] = pad_id, 0
    out.append({"input_ids": ids, "attention_mask": mask,
                "labels": rng.integers(0, 3, 8).astype(np.int32), "weights": np.ones(8, np.float32)})
  return out


# RoBERTa (padded positions, one token type, the out_proj head) and DistilBERT (no token types,
# its own layer names, a ReLU head) differ most from BERT: every method on them; XLM-R shares
# RoBERTa's layout and ELECTRA BERT's, so two methods there.
CASES = ([(arch, m) for arch in ("roberta", "distilbert") for m in METHODS]
         + [(arch, m) for arch in ("xlm-roberta", "electra") for m in ("select", "wd")])


@pytest.mark.parametrize("family,method", CASES, indirect=["family"])
def test_a_generator_step_and_its_export_on_every_family(family, method, tmp_path):
  t_cfg, t_params, s_cfg, init = family
  gen = generators.make(method, init, t_params, **METHODS[method])
  batches = _batches(t_cfg.pad_token_id)
  state, teacher, before = run_generator_steps(
      gen, s_cfg, init, t_params, mesh_lib.make_mesh(1, 1, jax.devices()[:1]), batches,
      student_apply=step_lib.classifier_apply(nnx.split(bert.build(gen.training_config(s_cfg)))[0]),
      teacher_apply=step_lib.classifier_apply(nnx.split(bert.build(t_cfg))[0]))
  for got, want in zip(jax.tree_util.tree_leaves(teacher), jax.tree_util.tree_leaves(t_params)):
    np.testing.assert_array_equal(np.asarray(got), want)  # the teacher never moves
  if method != "select":  # selection has nothing to train
    moved = [not np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(state["params"]),
                                                      jax.tree_util.tree_leaves(before))]
    assert sum(moved) > 0.9 * len(moved)
  student = jax.device_get(gen.materialize(state["params"], t_params, state["gen_state"]))
  out = hf.export(tmp_path / "student", s_cfg, student)
  ids, mask = batches[0]["input_ids"], batches[0]["attention_mask"]
  got = np.asarray(nnx.merge(nnx.split(bert.build(s_cfg))[0], student)(jnp.asarray(ids), jnp.asarray(mask)))
  ref = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
  assert type(ref).__name__ == hf.DIALECTS[s_cfg.arch].classes["classifier"]
  assert ref.config.num_hidden_layers == 1 and ref.config.hidden_size == 24
  with torch.no_grad():
    want = ref(input_ids=torch.tensor(ids, dtype=torch.long),
               attention_mask=torch.tensor(mask, dtype=torch.long)).logits.numpy()
  assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5


@pytest.mark.parametrize("arch", ["roberta", "distilbert"])
def test_selection_student_inherits_the_teachers_tables_by_role(arch, tmp_path_factory):
  # the embedding tables keep every vocabulary row and position (axes without a role) and the
  # kept residual channels; RoBERTa's single token-type row and its padded positions come along
  t_cfg, t_params, _ = hf.load(_teacher_dir(tmp_path_factory, arch))
  s_cfg = dataclasses.replace(t_cfg, **STUDENT)
  init = nnx.to_pure_dict(nnx.state(bert.build(s_cfg, seed=1)))
  gen = generators.make("select", init, t_params)
  params, gen_state = gen.init(jax.random.key(0), t_params, StudentSpec(s_cfg, init))
  student = gen.materialize(params, t_params, gen_state)
  word = np.asarray(student["encoder"]["embeddings"]["word"]["embedding"])
  assert word.shape == (99, 24)
  teacher_word = t_params["encoder"]["embeddings"]["word"]["embedding"]
  kept = [np.flatnonzero(np.all(np.isclose(teacher_word, word[:, [j]]), axis=0))[0] for j in range(24)]
  assert len(set(kept)) == 24
  has_types = "token_type" in student["encoder"]["embeddings"]
  assert has_types == (arch == "roberta")
  if has_types:
    np.testing.assert_array_equal(student["encoder"]["embeddings"]["token_type"]["embedding"],
                                  t_params["encoder"]["embeddings"]["token_type"]["embedding"][:, kept])
