"""Importance-based inheritance: units ranked by their activations on calibration data."""

import dataclasses

import numpy as np
import pytest
from flax import nnx

from wdjax import generators, trees
from wdjax.data.tokenize import TokenizedSplit
from wdjax.generators import importance
from wdjax.config import DataConfig, TrainConfig
from wdjax.generators.select import DEPTH, SelectionPlan
from wdjax.models import bert

TEACHER = bert.EncoderConfig(vocab_size=99, hidden_size=48, num_layers=2, num_heads=4,
                             intermediate_size=96, max_position_embeddings=64, num_labels=2,
                             hidden_dropout=0.0, attention_dropout=0.0)
# planted in teacher layer 1, the one `every_k` gives a 1-layer student, at units that
# uniform selection (every other unit; linspace for the FFN's 96 -> 40) keeps none of them
CHANNEL, NEURON, DIM = 37, 70, 2 * 12 + 5  # a residual channel, an FFN neuron, head 2's dim 5


def _planted_teacher(whole_head: bool = False):
  flat = trees.flatten(nnx.to_pure_dict(nnx.state(bert.build(TEACHER, seed=3))))
  flat = {k: np.array(v) for k, v in flat.items()}
  for k in flat:  # the channel is large wherever the residual stream is normalised
    if k.endswith("ln/scale"):
      flat[k][CHANNEL] *= 30.0
  flat["encoder/layer_1/mlp/up/kernel"][:, NEURON] *= 30.0
  flat["encoder/layer_1/mlp/up/bias"][NEURON] = 5.0
  v = flat["encoder/layer_1/attn/v/kernel"]
  if whole_head:
    v[:, 24:36] *= 5.0  # all of head 2
  else:
    v[:, DIM] *= 30.0
  return trees.unflatten(flat)


def _calibration_split(n=64, length=20, seed=0):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(5, length + 1, n).astype(np.int32)
  ids = rng.integers(5, TEACHER.vocab_size, (n, length)).astype(np.int32)
  ids[np.arange(length)[None] >= lengths[:, None]] = 0
  return TokenizedSplit(ids, lengths, np.zeros(n, np.int32), pad_id=0)


def _batches(split, n: int, batch_size: int, pad_to_multiple: int) -> list:
  """The first `n` calibration batches of `split` (seed 0), as importance selection draws them."""
  from wdjax.generators.pca import calibration_batches
  return list(calibration_batches(split, batches=n, batch_size=batch_size, seed=0,
                                  pad_to_multiple=pad_to_multiple))


def _student(**kw):
  cfg = dataclasses.replace(TEACHER, num_layers=1, **kw)
  return nnx.to_pure_dict(nnx.state(bert.build(cfg, seed=1)))


def _ranked(teacher_params, student, heads_s):
  squares, _, _ = importance.calibrate(bert.activation_fn(TEACHER), teacher_params,
                                       _batches(_calibration_split(), 4, 16, 16))
  scores = importance.unit_scores(squares)
  plan = SelectionPlan(teacher_params, student)
  return scores, importance.keep_indices(scores, plan, TEACHER.num_heads, heads_s)


def test_the_planted_channel_neuron_and_head_dimension_rank_first():
  teacher = _planted_teacher()
  student = _student(hidden_size=24, intermediate_size=40)  # 4 heads of 6
  scores, keep = _ranked(teacher, student, heads_s=4)
  assert int(np.argmax(scores["hidden"])) == CHANNEL
  assert int(np.argmax(scores["ffn/layer_1"])) == NEURON
  assert int(np.argmax(scores["attn/layer_1"])) == DIM
  assert sorted(keep) == ["attn/layer_0", "ffn/layer_0", "hidden", "pooled"]
  assert CHANNEL in keep["hidden"] and NEURON in keep["ffn/layer_0"] and DIM in keep["attn/layer_0"]
  assert len(keep["ffn/layer_0"]) == 40 and np.all(np.diff(keep["ffn/layer_0"]) > 0)
  # six dimensions of every head, so the student's 4 heads are the teacher's, narrowed
  assert (np.bincount(keep["attn/layer_0"] // 12, minlength=4) == 6).all()
  uniform = SelectionPlan(teacher, student)
  assert CHANNEL not in uniform.index["hidden"] and NEURON not in uniform.index["ffn"]

  # the selected student is the teacher's slice at those units, everywhere they are read
  got = trees.flatten(generators.select(teacher, student, indices=keep))
  t = trees.flatten(teacher)
  h, f, a = keep["hidden"], keep["ffn/layer_0"], keep["attn/layer_0"]
  np.testing.assert_array_equal(got["encoder/layer_0/mlp/up/kernel"],
                                t["encoder/layer_1/mlp/up/kernel"][np.ix_(h, f)])
  np.testing.assert_array_equal(got["encoder/layer_0/attn/q/kernel"],
                                t["encoder/layer_1/attn/q/kernel"][np.ix_(h, a)])
  np.testing.assert_array_equal(got["encoder/layer_0/attn/o/kernel"],
                                t["encoder/layer_1/attn/o/kernel"][np.ix_(a, h)])
  np.testing.assert_array_equal(got["encoder/embeddings/word/embedding"],
                                t["encoder/embeddings/word/embedding"][:, h])
  np.testing.assert_array_equal(got["pooler/kernel"], t["pooler/kernel"][np.ix_(h, keep["pooled"])])


def test_a_student_with_fewer_heads_keeps_the_most_active_whole_heads():
  teacher = _planted_teacher(whole_head=True)
  student = _student(hidden_size=24, num_heads=2, intermediate_size=40)  # 2 heads of 12
  _, keep = _ranked(teacher, student, heads_s=2)
  heads = sorted(set((keep["attn/layer_0"] // 12).tolist()))
  assert 2 in heads and len(heads) == 2 and len(keep["attn/layer_0"]) == 24


def test_indices_that_do_not_fit_the_space_are_refused_and_odd_head_layouts_rank_dimensions():
  teacher, student = _planted_teacher(), _student(hidden_size=24, intermediate_size=40)
  with pytest.raises(ValueError, match="indices of ffn/layer_0 must be 40 distinct units of 96"):
    SelectionPlan(teacher, student, indices={"ffn/layer_0": np.arange(39)})
  # 3 heads of 8 are neither the teacher's 4 heads narrowed nor whole heads of 12: top dimensions
  scores = np.arange(48.0)
  np.testing.assert_array_equal(importance.top_in_heads(scores, 4, 3, 24), np.arange(24, 48))


@pytest.mark.parametrize("method,sharing", [("ws", "role"), ("ws", "tensor"), ("gws", "role")])
def test_weight_squeezing_starts_at_the_importance_selected_student(method, sharing):
  import jax
  from wdjax.generators import StudentSpec
  teacher = _planted_teacher()
  s_cfg = dataclasses.replace(TEACHER, num_layers=1, hidden_size=24, intermediate_size=40)
  student = nnx.to_pure_dict(nnx.state(bert.build(s_cfg, seed=1)))
  _, keep = _ranked(teacher, student, heads_s=4)
  want = trees.flatten(generators.select(teacher, student, indices=keep))
  gen = generators.make(method, student, teacher, init="importance", indices=keep, sharing=sharing)
  gen_params, gen_state = gen.init(jax.random.key(0), teacher, StudentSpec(s_cfg, student))
  got = trees.flatten(gen.generate(gen_params, teacher, gen_state))
  assert got.keys() == want.keys()
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-5, err_msg=k)


@pytest.mark.parametrize("mode", ["faithful", "lean"])
def test_weight_distillation_starts_at_the_importance_selected_student(mode):
  """WD's `init="importance"`: maps at the kept units of each layer, one teacher layer per
  student layer (the ranked depth): step 0 generates the importance-selected student."""
  import jax
  from wdjax.generators import StudentSpec
  teacher = _planted_teacher()
  s_cfg = dataclasses.replace(TEACHER, num_layers=1, hidden_size=24, intermediate_size=40)
  student = nnx.to_pure_dict(nnx.state(bert.build(s_cfg, seed=1)))
  _, keep = _ranked(teacher, student, heads_s=4)
  keep[DEPTH] = np.array([0])  # not the `contiguous` group's last layer: the indices decide
  want = trees.flatten(generators.select(teacher, student, indices=keep))
  gen = generators.make("wd", student, teacher, init="importance", indices=keep, mode=mode)
  gen_params, gen_state = gen.init(jax.random.key(0), teacher, StudentSpec(s_cfg, student))
  got = trees.flatten(gen.generate(gen_params, teacher, gen_state))
  assert got.keys() == want.keys()
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-5, err_msg=k)


def test_kd_from_an_importance_selected_student_runs_end_to_end(tiny):
  """`method.init=importance` through the pipeline: the real teacher's units are ranked on the
  task's training batches and KD trains the selected student."""
  from wdjax.train import run
  cfg = tiny(method=generators.section("kd", init="importance", calibration_batches=2))
  lines = []
  result = run.distill(cfg, log=lines.append)
  assert result["phase"] == "distill_kd_importance" and np.isfinite(result["test_loss"])
  assert any("ranking the teacher's units on 2 training batches" in l for l in lines)


def test_a_shallower_student_keeps_the_layers_that_turn_the_residual_stream_most():
  """Block influence: a teacher layer whose attention and FFN write nothing leaves the stream as
  it was (post-LN of a LayerNorm output), so a student with one layer fewer drops it; an
  explicit layer map keeps its own layers."""
  teacher_cfg = dataclasses.replace(TEACHER, num_layers=3)
  flat = trees.flatten(nnx.to_pure_dict(nnx.state(bert.build(teacher_cfg, seed=3))))
  flat = {k: np.array(v) for k, v in flat.items()}
  for k in ("attn/o/kernel", "attn/o/bias", "mlp/down/kernel", "mlp/down/bias"):
    flat[f"encoder/layer_1/{k}"][...] = 0.0
  teacher = trees.unflatten(flat)
  student = nnx.to_pure_dict(nnx.state(bert.build(dataclasses.replace(teacher_cfg, num_layers=2), seed=1)))
  squares, influence, finals = importance.calibrate(bert.activation_fn(teacher_cfg), teacher,
                                                    _batches(_calibration_split(), 2, 16, 16))
  assert influence.shape == (3,) and influence[1] < 1e-4 < min(influence[0], influence[2])
  assert finals == []  # held only for depth_score=output

  class Cfg:  # what importance_indices reads of a config
    seed, distill, data = 0, TrainConfig(batch_size=16), DataConfig(pad_to_multiple=16)

  method = generators.section("kd", init="importance", calibration_batches=2)
  keep = importance.importance_indices(bert.activation_fn(teacher_cfg), teacher, student,
                                       _calibration_split(), Cfg, method, heads_t=4, heads_s=4)
  assert keep[DEPTH].tolist() == [0, 2]
  got = trees.flatten(generators.select(teacher, student, indices=keep))
  np.testing.assert_array_equal(got["encoder/layer_1/mlp/up/kernel"], flat["encoder/layer_2/mlp/up/kernel"])
  mapped = importance.importance_indices(bert.activation_fn(teacher_cfg), teacher, student,
                                         _calibration_split(), Cfg,
                                         dataclasses.replace(method, layer_map="first_n"),
                                         heads_t=4, heads_s=4)
  assert DEPTH not in mapped


def _silenced_teacher(num_layers: int, silent: tuple[int, ...]):
  """(config, params) of a BERT teacher whose `silent` layers' attention and FFN write nothing."""
  teacher_cfg = dataclasses.replace(TEACHER, num_layers=num_layers)
  flat = {k: np.array(v) for k, v in trees.flatten(nnx.to_pure_dict(nnx.state(bert.build(teacher_cfg, seed=3)))).items()}
  for layer in silent:
    for k in ("attn/o/kernel", "attn/o/bias", "mlp/down/kernel", "mlp/down/bias"):
      flat[f"encoder/layer_{layer}/{k}"][...] = 0.0
  return teacher_cfg, trees.unflatten(flat)


def _pooled(cfg, params, batch):
  """The pooler output `[batch, hidden]` of a BERT of `cfg`, merged here from `params`."""
  model = nnx.merge(nnx.graphdef(bert.build(cfg)), params)
  _, acts = bert.activations(model, batch["input_ids"], batch["attention_mask"], None, all_rows=True)
  return np.asarray(acts["pooled"])[:, 0]


@pytest.mark.parametrize("num_layers,silent,keep,greedy", [(3, (1,), 2, False), (4, (1, 2), 2, True)])
def test_output_distance_keeps_the_layers_whose_network_moves_the_output_least(
    monkeypatch, num_layers, silent, keep, greedy):
  """depth_score=output: the kept layers are the subset whose network's pooler output is closest
  (mean 1 - cos) to the teacher's, as computed here layer by layer from the teacher's own
  weights; a teacher's silent layers are the ones dropped, by the search over every subset and
  by the greedy one."""
  import itertools
  if greedy:
    monkeypatch.setattr(importance, "MAX_SUBSETS", 0)
  teacher_cfg, teacher = _silenced_teacher(num_layers, silent)
  flat = trees.flatten(teacher)
  batches = _batches(_calibration_split(), 2, 16, 16)
  targets = [_pooled(teacher_cfg, teacher, b) for b in batches]
  _, _, finals = importance.calibrate(bert.activation_fn(teacher_cfg), teacher, batches, keep_finals=True)
  assert len(finals) == 2
  np.testing.assert_allclose(np.asarray(finals[1]).reshape(targets[1].shape), targets[1], rtol=1e-5, atol=1e-6)

  def distance(layers):
    sub = {p: x for p, x in flat.items() if trees.layer_of(p) is None}
    for s, t in enumerate(layers):
      sub.update({trees.with_layer(p, s): x for p, x in flat.items() if trees.layer_of(p) == t})
    cfg = dataclasses.replace(teacher_cfg, num_layers=len(layers))
    cos = [np.sum(y * x, -1) / (np.linalg.norm(y, axis=-1) * np.linalg.norm(x, axis=-1))
           for y, x in zip(targets, (_pooled(cfg, trees.unflatten(sub), b) for b in batches))]
    return float(np.mean(1 - np.concatenate(cos)))

  costs = {c: distance(c) for c in itertools.combinations(range(num_layers), keep)}
  want = tuple(l for l in range(num_layers) if l not in silent)
  assert costs[want] < 1e-3 * min(v for c, v in costs.items() if c != want)

  class Cfg:  # what importance_indices reads of a config
    seed, distill, data = 0, TrainConfig(batch_size=16), DataConfig(pad_to_multiple=16)

  student = nnx.to_pure_dict(nnx.state(bert.build(dataclasses.replace(teacher_cfg, num_layers=keep), seed=1)))
  lines = []
  method = generators.section("kd", init="importance", calibration_batches=2, depth_score="output")
  at_depth = lambda n: bert.activation_fn(dataclasses.replace(teacher_cfg, num_layers=n))
  kept = importance.importance_indices(bert.activation_fn(teacher_cfg), teacher, student, _calibration_split(),
                                       Cfg, method, heads_t=4, heads_s=4, activation_fn_at=at_depth,
                                       log=lines.append)
  assert tuple(kept[DEPTH].tolist()) == want
  assert any(("greedy" in l) == greedy and "output distance" in l for l in lines)


def test_vit_units_are_ranked_on_images():
  """The same ranking on a ViT (every token is real): a planted residual channel and FFN neuron
  are kept by a half-width student."""
  from wdjax.data.images import ImageSplit
  from wdjax.models import vit
  cfg = vit.ViTConfig(image_size=8, patch_size=2, hidden_size=32, num_layers=2, num_heads=4,
                      intermediate_size=64)
  flat = {k: np.array(v) for k, v in trees.flatten(nnx.to_pure_dict(nnx.state(vit.build(cfg, seed=0)))).items()}
  channel, neuron = 13, 41  # neither kept by every-other selection
  flat["embeddings/patch/bias"][channel] = 20.0
  flat["encoder/layer_1/mlp/up/bias"][neuron] = 10.0
  teacher = trees.unflatten(flat)
  student = nnx.to_pure_dict(nnx.state(vit.build(dataclasses.replace(cfg, hidden_size=16,
                                                                     intermediate_size=32), seed=1)))
  rng = np.random.default_rng(0)
  split = ImageSplit(rng.integers(0, 255, (64, 8, 8), dtype=np.uint8), rng.integers(0, 3, 64),
                     mean=0.5, std=0.3)
  squares, _, _ = importance.calibrate(vit.activation_fn(cfg), teacher, _batches(split, 2, 32, 1))
  scores = importance.unit_scores(squares)
  assert int(np.argmax(scores["hidden"])) == channel and int(np.argmax(scores["ffn/layer_1"])) == neuron
  keep = importance.keep_indices(scores, SelectionPlan(teacher, student), 4, 4)
  assert channel in keep["hidden"] and neuron in keep["ffn/layer_1"] and "pooled" not in keep
  uniform = SelectionPlan(teacher, student)
  assert channel not in uniform.index["hidden"] and neuron not in uniform.index["ffn"]


def test_opdf_from_an_importance_selected_student_runs_end_to_end(tiny):
  from wdjax.train import run
  cfg = tiny(method=generators.section("opdf", init="importance", calibration_batches=2,
                                       constraint_lambda=0.0, cores=3))
  lines = []
  result = run.distill(cfg, log=lines.append)
  assert result["phase"] == "distill_opdf" and np.isfinite(result["test_loss"])
  assert any("ranking the teacher's units on 2 training batches" in l for l in lines)


def test_wid_keeps_the_layers_importance_ranks(tiny):
  """WID with `method.init=importance`: a shallower student's teacher layers are the most
  influential ones (the calibration's), its widths WID's own to cut; refused task-agnostic."""
  from wdjax import validate
  from wdjax.errors import WdjaxError
  from wdjax.train import run
  from wdjax.config import StudentConfig
  cfg = tiny(method=generators.section("wid", init="importance", calibration_batches=2),
             student=StudentConfig(num_layers=2, hidden_size=96, num_heads=12, intermediate_size=256))
  lines = []
  result = run.distill(cfg, log=lines.append)
  assert np.isfinite(result["test_loss"]) and result["phase1"]["trainable_params"] > 0
  assert any("the student keeps layers" in l for l in lines)
  with pytest.raises(WdjaxError, match="task-agnostic WID starts from the pretrained teacher"):
    validate.check(tiny(method=generators.section("wid", init="importance", objective="mlm")))


def test_a_ranking_is_computed_once_per_key_and_read_back(tmp_path):
  """`cached_indices`: the same key reads the written ranking back (equal arrays, no second
  computation); another key computes its own."""
  calls = []

  def compute():
    calls.append(1)
    return {"hidden": np.array([3, 1, 4]), DEPTH: np.array([0, 2])}

  first = importance.cached_indices(tmp_path, {"teacher": "a", "batches": 2}, compute)
  lines = []
  again = importance.cached_indices(tmp_path, {"batches": 2, "teacher": "a"}, compute, log=lines.append)
  assert len(calls) == 1 and any("read from" in l for l in lines)
  assert again.keys() == first.keys() and all(np.array_equal(again[k], first[k]) for k in first)
  importance.cached_indices(tmp_path, {"teacher": "b", "batches": 2}, compute)
  assert len(calls) == 2 and len(list(tmp_path.glob("importance_*.json"))) == 2
