"""Causal language modelling: packing, the top-k KD loss, depth importance, a sharded step, and
distillation end to end on a tiny random Llama teacher and text files made in the test."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import tree_allclose
from wdjax import generators, losses, trees
from wdjax.config import (CheckpointConfig, Config, DataConfig, KDConfig, LogConfig, OptimConfig,
                          StudentConfig, TeacherConfig, TrainConfig)
from wdjax.data import lm
from wdjax.errors import WdjaxError
from wdjax.generators import Identity, StudentSpec
from wdjax.generators.importance import block_influence, top_layers
from wdjax.models import llama
from wdjax.models.layers import activations
from wdjax.tasks.causal_lm import CausalLMConfig
from wdjax.train import mesh as mesh_lib, run as run_lib, step as step_lib

TEACHER = llama.LlamaConfig(vocab_size=300, hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2,
                            head_dim=8, intermediate_size=48, tie_embeddings=False, eos_token_id=0)
WORDS = ("the light shines in the darkness and the darkness has not overcome it while the word "
         "was with god in the beginning all things were made through him").split()


def test_packing_predicts_every_token_once():
  docs = [[5, 6, 7], [8, 9], [10, 11, 12, 13, 14]]
  split = lm.pack(docs, 4, eos_id=0, pad_id=0, keep_last=True)
  stream = [5, 6, 7, 0, 8, 9, 0, 10, 11, 12, 13, 14, 0]
  b = split.batch(np.arange(len(split)), 4)
  predicted = [int(t) for row, w in zip(b["labels"], b["weights"]) for t, wi in zip(row, w) if wi]
  assert predicted == stream[1:] and split.tokens == len(stream) - 1
  inputs = [int(t) for row, w in zip(b["input_ids"], b["weights"]) for t, wi in zip(row, w) if wi]
  assert inputs == stream[:-1]
  train = lm.pack(docs, 4, eos_id=0, pad_id=0, keep_last=False)
  assert len(train) == 3 and (train.lengths == 5).all()  # the short last row is dropped


def test_topk_kd_over_the_whole_vocabulary_is_kd():
  rng = np.random.default_rng(0)
  zs, zt = jnp.asarray(rng.normal(size=(2, 3, 7))), jnp.asarray(2 * rng.normal(size=(2, 3, 7)))
  w = jnp.asarray([[1, 1, 0], [1, 0, 0]], jnp.float32)
  values, ids = jax.lax.top_k(zt, 7)
  np.testing.assert_allclose(float(losses.topk_kd(zs, values, ids, 2.0, w)),
                             float(losses.kd_kl(zs, zt, 2.0, w)), rtol=1e-6)
  v3, i3 = jax.lax.top_k(zt, 3)
  assert float(losses.topk_kd(zs, v3, i3, 2.0, w)) != pytest.approx(float(losses.kd_kl(zs, zt, 2.0, w)))


def test_block_influence_drops_blocks_that_leave_the_stream_unchanged():
  """Blocks 1 and 2 write nothing to the residual stream (their output projections are zero):
  their influence is 0 and a 2-layer student keeps blocks 0 and 3."""
  params = nnx.to_pure_dict(nnx.state(llama.build(TEACHER, seed=0)))
  flat = trees.flatten(params)
  for l in (1, 2):
    for leaf in ("attn/o/kernel", "mlp/down/kernel"):
      flat[f"decoder/layer_{l}/{leaf}"] = np.zeros_like(flat[f"decoder/layer_{l}/{leaf}"])
  model = nnx.merge(nnx.graphdef(llama.build(TEACHER)), trees.unflatten(flat))
  ids = jnp.asarray(np.random.default_rng(1).integers(1, 300, (2, 9)))
  mask = jnp.ones((2, 9), jnp.int32).at[1, 6:].set(0)
  _, acts = activations(model, ids, mask)  # the residual stream entering each block and leaving the last
  states = [acts["hidden/embeddings"]] + [acts[f"hidden/layer_{l}"] for l in range(4)]
  bi = np.asarray(block_influence(states, mask))
  assert bi[1] == pytest.approx(0, abs=1e-6) and bi[2] == pytest.approx(0, abs=1e-6)
  assert bi[0] > 0.01 and bi[3] > 0.01
  assert top_layers(bi, 2).tolist() == [0, 3]
  student = nnx.to_pure_dict(nnx.state(llama.build(dataclasses.replace(TEACHER, num_layers=2))))
  kept = generators.select(trees.unflatten(flat), student, indices={"depth": top_layers(bi, 2)})
  np.testing.assert_array_equal(kept["decoder"]["layer_1"]["mlp"]["up"]["kernel"],
                                flat["decoder/layer_3/mlp/up/kernel"])


def test_a_narrower_llama_keeps_the_most_active_residual_channels_and_ffn_neurons():
  """Width importance on the Llama family: a planted residual channel (the embedding's) and a
  planted SwiGLU neuron of the layer the student keeps are kept; every-other selection keeps
  neither."""
  from wdjax.generators import importance
  from wdjax.generators.select import SelectionPlan
  flat = {k: np.array(v) for k, v in trees.flatten(nnx.to_pure_dict(nnx.state(llama.build(TEACHER, seed=0)))).items()}
  channel, neuron = 13, 41
  flat["decoder/embed/embedding"][:, channel] *= 30.0  # pre-norm: the stream carries it to the end
  flat["decoder/layer_1/mlp/up/kernel"][:, neuron] *= 30.0
  teacher = trees.unflatten(flat)
  s_cfg = dataclasses.replace(TEACHER, num_layers=4, hidden_size=16, intermediate_size=24)
  student = nnx.to_pure_dict(nnx.state(llama.build(s_cfg, seed=1)))
  acts, w = llama.activation_fn(TEACHER)(teacher, _tiny_batch(np.random.default_rng(0)))
  squares = {k: np.einsum("btd,bt->d", np.square(np.asarray(x)), np.asarray(w)) for k, x in acts.items()}
  assert {"hidden/embeddings", "hidden/layer_3", "attn/layer_0", "ffn/layer_3"} <= set(squares)
  scores = importance.unit_scores(squares)
  keep = importance.keep_indices(scores, SelectionPlan(teacher, student), TEACHER.num_heads, s_cfg.num_heads)
  assert channel in keep["hidden"] and neuron in keep["ffn/layer_1"]
  uniform = SelectionPlan(teacher, student)
  assert channel not in uniform.index["hidden"] and neuron not in uniform.index["ffn"]


def _tiny_batch(rng, b=8, t=12):
  ids = rng.integers(1, 300, (b, t + 1))
  mask = np.ones((b, t), np.float32)
  mask[-1, 7:] = 0
  return {"input_ids": ids[:, :-1].astype(np.int32), "attention_mask": mask.astype(np.int32),
          "labels": ids[:, 1:].astype(np.int32), "weights": mask}


def test_sharded_llama_step_equals_single_device_step():
  """A KD step (full next-token distributions) on 8 devices, 4 (data) x 2 (model: the query, KV
  and FFN spaces) with FSDP, equals the 1-device step."""
  assert jax.device_count() == 8
  student_cfg = dataclasses.replace(TEACHER, num_layers=2)
  t_params = nnx.to_pure_dict(nnx.state(llama.build(TEACHER, seed=3)))
  init = nnx.to_pure_dict(nnx.state(llama.build(student_cfg, seed=1)))
  batches = [_tiny_batch(np.random.default_rng(i)) for i in range(2)]

  def run(mesh, fsdp):
    tx = step_lib.make_optimizer(OptimConfig(lr=1e-3, warmup_ratio=0.0), 10, init)
    step = step_lib.make_train_step(
        generator=Identity(), student_apply=llama.apply_fn(nnx.graphdef(llama.build(student_cfg))),
        teacher_apply=llama.apply_fn(nnx.graphdef(llama.build(TEACHER))), tx=tx,
        kd=KDConfig(temperature=2.0, alpha=0.5), seed=0)
    state = jax.jit(lambda p: step_lib.init_state(Identity(), tx, 0, None, StudentSpec(student_cfg, p)))(init)
    state_sh = mesh_lib.param_shardings(state, mesh)
    teacher_sh = mesh_lib.param_shardings(t_params, mesh, fsdp)
    jitted = jax.jit(step, in_shardings=(state_sh, teacher_sh, mesh_lib.batch_sharding(mesh)),
                     out_shardings=(state_sh, mesh_lib.replicated(mesh)), donate_argnums=0)
    state, teacher = jax.device_put(state, state_sh), jax.device_put(t_params, teacher_sh)
    for b in batches:
      state, metrics = jitted(state, teacher, mesh_lib.put_batch(b, mesh))
    return jax.device_get(state), jax.device_get(metrics)

  one, m1 = run(mesh_lib.make_mesh(1, 1, jax.devices()[:1]), False)
  many, m8 = run(mesh_lib.make_mesh(4, 2), True)
  sh = mesh_lib.param_shardings(init, mesh_lib.make_mesh(4, 2))
  assert "model" in str(sh["decoder"]["layer_0"]["attn"]["k"]["kernel"].spec)  # the KV space is split
  assert tree_allclose(one["params"], many["params"], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(m1["loss"], m8["loss"], rtol=1e-5)
  assert not tree_allclose(one["params"], init)


@pytest.fixture(scope="module")
def lm_files(tmp_path_factory):
  """A tiny random `transformers` Llama teacher with a byte-level BPE trained here, and text
  files of random sentences (train, validation, test)."""
  transformers = pytest.importorskip("transformers")
  torch = pytest.importorskip("torch")
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  root = tmp_path_factory.mktemp("lm")
  rng = np.random.default_rng(0)
  sentence = lambda: " ".join(rng.choice(WORDS, rng.integers(5, 14))) + "."
  paragraphs = lambda n: "\n\n".join(" ".join(sentence() for _ in range(3)) for _ in range(n))
  for name, n in (("train", 120), ("validation", 12), ("test", 12)):
    (root / f"{name}.txt").write_text(paragraphs(n))
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  # the vocabulary also covers text the task never shows (what vocabulary compression drops)
  (root / "elsewhere.txt").write_text(" ".join("".join(rng.choice(list("qxzjkvwy"), rng.integers(3, 7)))
                                               for _ in range(3000)))
  tok.train([str(root / "train.txt"), str(root / "elsewhere.txt")], trainers.BpeTrainer(
      vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  torch.manual_seed(0)
  hf_cfg = transformers.LlamaConfig(
      vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=48, num_hidden_layers=4,
      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, bos_token_id=0,
      eos_token_id=0, max_position_embeddings=64)
  teacher = root / "teacher"
  transformers.LlamaForCausalLM(hf_cfg).save_pretrained(teacher)
  tok.save(str(teacher / "tokenizer.json"))
  return root


def _lm_config(root, workdir, **changes) -> Config:
  cfg = Config(
      workdir=str(workdir), teacher=TeacherConfig(model=str(root / "teacher")),
      data=DataConfig(dataset="text", train_file=str(root / "train.txt"),
                      validation_file=str(root / "validation.txt"), test_file=str(root / "test.txt"),
                      max_length=16, pad_to_multiple=16, length_grouping=0),
      task=CausalLMConfig(kd_top_k=8),
      student=StudentConfig(num_layers=2, hidden_size=32, num_heads=4, intermediate_size=48,
                            hidden_dropout=0.0, attention_dropout=0.0),
      distill=TrainConfig(batch_size=8, steps=12, eval_every=6, eval_batch_size=8, log_every=6,
                          optim=OptimConfig(lr=3e-3)),
      kd=KDConfig(temperature=1.0, alpha=0.9), checkpoint=CheckpointConfig(every=6, async_save=False),
      log=LogConfig(progress=False), method=generators.section("kd", init="importance", calibration_batches=2))
  return dataclasses.replace(cfg, **changes)


def test_distilled_student_exports_a_transformers_model_with_the_same_perplexity(lm_files, tmp_path):
  """importance + KD on cached top-8 logits: the perplexity wdjax reports is exp of the mean
  next-token CE `transformers` computes on the exported model over the same test rows; the
  export carries the teacher's tokenizer; `evaluate` reads the export back; KD with the teacher's
  full distribution in the step trains too."""
  import torch
  import transformers
  from tokenizers import Tokenizer
  from wdjax.tasks import causal_lm
  cfg = _lm_config(lm_files, tmp_path / "run")
  results = run_lib.distill(cfg)
  assert results["steps"] == 12 and np.isfinite(results["test_perplexity"])
  assert results["test_perplexity"] == pytest.approx(np.exp(results["test_loss"]), rel=1e-6)
  model_dir = tmp_path / "run" / "distill_kd_importance" / "model"
  cached = list((tmp_path / "run" / "cache").glob("teacher_targets_*.npz"))
  assert len(cached) == 1 and set(np.load(cached[0]).files) == {"teacher_topk_logits", "teacher_topk_ids"}
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
  assert hf_model.config.num_hidden_layers == 2
  tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
  data = causal_lm.load_data(cfg, model_dir, 0, 400)
  b = data.test.batch(np.arange(len(data.test)), 16)
  with torch.no_grad():
    logits = hf_model(torch.tensor(b["input_ids"]), attention_mask=torch.tensor(b["attention_mask"])).logits
  nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                          torch.tensor(b["labels"]).long().reshape(-1), reduction="none").numpy()
  w = b["weights"].reshape(-1)
  assert results["test_perplexity"] == pytest.approx(float(np.exp((nll * w).sum() / w.sum())), rel=1e-4)
  assert (model_dir / "tokenizer.json").read_text() == (lm_files / "teacher" / "tokenizer.json").read_text()
  assert tok.decode(tok.encode("the word was with god").ids) == "the word was with god"
  assert run_lib.evaluate(cfg, model_dir, ("test",))["test"] == pytest.approx(results["test_perplexity"], rel=1e-5)

  full = run_lib.distill(dataclasses.replace(cfg, task=CausalLMConfig(kd_top_k=0),
                                             method=generators.section("kd", init="selection")))
  assert np.isfinite(full["test_perplexity"]) and full["steps"] == 12


@pytest.mark.parametrize("method", ["ws", "gws-importance", "wd", "opdf"])
def test_weight_transfer_methods_distil_a_llama(lm_files, tmp_path, method):
  """WS, GWS (from the layers of highest block influence), WD (two phases) and OPDF train through
  the decoder's roles and tags and export a student `transformers` loads with wdjax's logits."""
  import torch
  import transformers
  sets = {"wd": dict(init="identity"), "gws-importance": dict(init="importance")}.get(method, {})
  cfg = _lm_config(lm_files, tmp_path / "run", method=generators.section(method.split("-")[0], **sets),
                   distill=TrainConfig(batch_size=8, steps=6, eval_every=6, eval_batch_size=8, log_every=6,
                                       optim=OptimConfig(lr=1e-3)))
  results = run_lib.distill(cfg)
  assert np.isfinite(results["test_perplexity"]) and results["trainable_params"] > 0
  model_dir = next((tmp_path / "run").glob("distill*/model")) if method != "wd" else \
      next((tmp_path / "run").glob("distill*_phase2/model"))
  s_cfg, params = llama.load_hf(model_dir)
  ids = np.random.default_rng(0).integers(1, 300, (2, 10))
  ours = np.asarray(nnx.merge(nnx.graphdef(llama.build(s_cfg)), params)(jnp.asarray(ids)))
  with torch.no_grad():
    theirs = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()(torch.tensor(ids)).logits.numpy()
  np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)


def test_wid_cuts_a_llama_to_a_narrower_student_that_transformers_computes(lm_files, tmp_path):
  """WID on the decoder: compactors on every kernel, the residual stream and the FFN masked
  (RMSNorm statistics over the kept units), the heads and their KV space kept whole; the cut
  student is exported and `transformers` computes its logits as wdjax does."""
  import torch
  import transformers
  cfg = _lm_config(lm_files, tmp_path / "run", method=generators.section("wid"),
                   distill=TrainConfig(batch_size=8, steps=40, eval_every=20, eval_batch_size=8,
                                       log_every=20, optim=OptimConfig(lr=1e-3)))
  cfg = dataclasses.replace(cfg, student=dataclasses.replace(cfg.student, hidden_size=16, intermediate_size=24))
  results = run_lib.distill(cfg)
  phase1 = results["phase1"]
  assert phase1["trainable_params"] > results["model_params"] and np.isfinite(results["test_perplexity"])
  assert phase1["generator"]["at_target"] == 1.0  # every mask at the student's width before the cut
  model_dir = tmp_path / "run" / "distill_wid_phase2" / "model"
  s_cfg, params = llama.load_hf(model_dir)
  assert (s_cfg.hidden_size, s_cfg.intermediate_size, s_cfg.num_heads, s_cfg.head_dim) == (16, 24, 4, 8)
  ids = np.random.default_rng(0).integers(1, 300, (2, 10))
  ours = np.asarray(nnx.merge(nnx.graphdef(llama.build(s_cfg)), params)(jnp.asarray(ids)))
  with torch.no_grad():
    theirs = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()(torch.tensor(ids)).logits.numpy()
  np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)


def test_wid_cut_of_a_llama_equals_its_masked_training_network():
  """The decoder's exact cut: perturbed compactors, every mask at its target, the masked entries
  zeroed: the cut 16-wide student computes the 32-wide masked network's logits (pre-norm blocks,
  RMSNorm over the kept units, an untied output projection, the KV space whole)."""
  from test_wid import _zero_masked
  t_params = nnx.to_pure_dict(nnx.state(llama.build(TEACHER, seed=0)))
  s_cfg = dataclasses.replace(TEACHER, hidden_size=16, intermediate_size=24)
  init = nnx.to_pure_dict(nnx.state(llama.build(s_cfg, seed=1)))
  gen = generators.make("wid", init, t_params, teacher_heads=4, student_heads=4, w_step=1)
  gp, gs = gen.init(jax.random.key(0), t_params, StudentSpec(s_cfg, init))
  key = iter(jax.random.split(jax.random.key(5), 400))
  gp = jax.tree_util.tree_map(lambda c: c + 0.05 * jax.random.normal(next(key), c.shape), gp)
  gs = gen.update_state(gp, gs, jnp.asarray(16))
  assert float(gen.diagnostics(gp, t_params, gs)["at_target"]) == 1.0
  assert int(np.sum(np.asarray(trees.flatten(gs["masks"])["kv/layer_0"]))) == 16  # kept whole
  gp = _zero_masked(gen, gp, gs)
  ids = jnp.asarray(np.random.default_rng(0).integers(1, 300, (2, 9)))
  run = lambda cfg, p, **kw: np.asarray(nnx.merge(nnx.graphdef(llama.build(cfg)), p)(ids, **kw))
  want = run(gen.training_config(s_cfg), gen.generate(gp, t_params, gs), **gen.model_kwargs(gs))
  np.testing.assert_allclose(run(s_cfg, gen.materialize(gp, t_params, gs)), want, rtol=1e-4, atol=1e-5)


def test_masked_rms_norm_is_the_cut_networks_norm():
  """With the dropped units at zero, the RMSNorm over the kept units equals the narrower
  network's RMSNorm of the kept units (what makes WID's cut exact)."""
  from wdjax.models.layers import masked_norm
  norm = llama.rms_norm(TEACHER, 6, nnx.Rngs(0))
  norm.scale[...] = np.arange(1.0, 7.0, dtype=np.float32)
  keep = np.array([1, 0, 1, 1, 0, 1], np.float32)
  x = np.random.default_rng(0).normal(size=(2, 3, 6)).astype(np.float32) * keep
  small = llama.rms_norm(TEACHER, 4, nnx.Rngs(0))
  small.scale[...] = norm.scale[...][keep > 0]
  np.testing.assert_allclose(np.asarray(masked_norm(norm, x, keep))[..., keep > 0],
                             np.asarray(small(x[..., keep > 0])), rtol=1e-6)


def test_a_student_with_fewer_heads_keeps_whole_kv_groups():
  """4 query heads over 2 KV heads -> 2 over 1: selection keeps KV head 0 with query heads 0 and
  1, intact. With the other group silenced in the teacher (its rows of the output projection
  zero), the student computes the teacher's logits; importance keeps the group whose values
  are largest, here the other one."""
  from wdjax.generators import importance
  from wdjax.generators.select import SelectionPlan, uniform_group_indices
  flat = {k: np.array(v) for k, v in trees.flatten(nnx.to_pure_dict(nnx.state(llama.build(TEACHER, seed=0)))).items()}
  for l in range(TEACHER.num_layers):
    flat[f"decoder/layer_{l}/attn/o/kernel"][16:] = 0.0  # query heads 2, 3 (KV head 1) write nothing
  teacher = trees.unflatten(flat)
  s_cfg = dataclasses.replace(TEACHER, num_heads=2, num_kv_heads=1)
  student = nnx.to_pure_dict(nnx.state(llama.build(s_cfg, seed=1)))
  plan = SelectionPlan(teacher, student)
  indices = uniform_group_indices(plan, TEACHER.num_heads)
  np.testing.assert_array_equal(indices["attn/layer_0"], np.arange(16))
  np.testing.assert_array_equal(indices["kv/layer_3"], np.arange(8))
  selected = generators.select(teacher, student, indices=indices)
  batch = _tiny_batch(np.random.default_rng(0))
  logits = lambda cfg, p: np.asarray(nnx.merge(nnx.graphdef(llama.build(cfg)), p)(
      batch["input_ids"], batch["attention_mask"]))
  np.testing.assert_allclose(logits(s_cfg, selected), logits(TEACHER, teacher), rtol=1e-5, atol=1e-5)

  for l in range(TEACHER.num_layers):
    flat[f"decoder/layer_{l}/attn/v/kernel"][:, 8:] *= 30.0  # KV head 1's values dominate
  acts, w = llama.activation_fn(TEACHER)(trees.unflatten(flat), batch)
  squares = {k: np.einsum("btd,bt->d", np.square(np.asarray(x)), np.asarray(w)) for k, x in acts.items()}
  keep = importance.keep_indices(importance.unit_scores(squares), plan, TEACHER.num_heads, 2)
  np.testing.assert_array_equal(keep["attn/layer_2"], np.arange(16, 32))
  np.testing.assert_array_equal(keep["kv/layer_2"], np.arange(8, 16))


@pytest.mark.parametrize("name,options,layer_map", [
    ("ws", dict(init="identity"), "every_k"), ("gws", dict(init="identity"), "every_k"),
    ("wd", dict(init="identity", mode="lean"), "contiguous"),
    ("opdf", dict(start="selection", n_cores=3, constraint_lambda=0.0), "first_n")])
def test_the_generators_start_a_student_with_fewer_heads_at_whole_kv_groups(name, options, layer_map):
  """4 query heads over 2 KV heads -> 2 over 1: the head structure the task gives
  (`generator_options`: uniform whole KV groups) is where WS's and WD's identity maps and OPDF's
  cores start, so step 0 generates the weight-selection student of those groups."""
  from wdjax.config import StudentConfig
  from wdjax.tasks import causal_lm
  from wdjax.train.phase import Model
  teacher = nnx.to_pure_dict(nnx.state(llama.build(TEACHER, seed=0)))
  s_cfg = dataclasses.replace(TEACHER, num_layers=2, num_heads=2, num_kv_heads=1)
  student = nnx.to_pure_dict(nnx.state(llama.build(s_cfg, seed=1)))
  cfg = Config(method=generators.section(name), student=StudentConfig(num_layers=2, num_heads=2))
  got = causal_lm.TASK.generator_options(cfg, Model(TEACHER, teacher, None), None, student, print)
  np.testing.assert_array_equal(got["indices"]["attn/layer_1"], np.arange(16))
  np.testing.assert_array_equal(got["indices"]["kv/layer_0"], np.arange(8))
  want = trees.flatten(generators.select(teacher, student, layer_map, got["indices"]))
  gen = generators.make(name, student, teacher, layer_map=layer_map, indices=got["indices"], **options)
  gen_params, gen_state = gen.init(jax.random.key(0), teacher, StudentSpec(s_cfg, student))
  out = trees.flatten(gen.generate(gen_params, teacher, gen_state))
  assert out.keys() == want.keys()
  for k in want:
    np.testing.assert_allclose(out[k], want[k], rtol=1e-4, atol=1e-5, err_msg=k)


def test_narrower_students_inherit_the_teachers_heads(lm_files, tmp_path):
  """hidden_size 32 -> 16 and FFN 48 -> 24 with the teacher's 4 heads of 8: the attention spaces
  are kept whole, the residual stream and the FFN are selected; with 2 heads, whole KV groups."""
  cfg = _lm_config(lm_files, tmp_path / "run", method=generators.section("kd", init="selection"),
                   distill=TrainConfig(batch_size=8, steps=4, eval_every=4, eval_batch_size=8, log_every=4,
                                       optim=OptimConfig(lr=1e-3)))
  cfg = dataclasses.replace(cfg, student=dataclasses.replace(cfg.student, hidden_size=16, intermediate_size=24))
  results = run_lib.distill(cfg)
  s_cfg, params = llama.load_hf(tmp_path / "run" / "distill_kd_selection" / "model")
  assert (s_cfg.hidden_size, s_cfg.num_heads, s_cfg.head_dim, s_cfg.intermediate_size) == (16, 4, 8, 24)
  assert params["decoder"]["layer_0"]["attn"]["q"]["kernel"].shape == (16, 32)
  assert np.isfinite(results["test_perplexity"])

  # 2 query heads over 1 KV head, by importance: one of the teacher's KV groups, exported as a
  # Llama that transformers computes as wdjax does
  import torch
  import transformers
  fewer = dataclasses.replace(cfg, method=generators.section("kd", init="importance", calibration_batches=2),
                              student=dataclasses.replace(cfg.student, num_heads=2))
  assert np.isfinite(run_lib.distill(fewer)["test_perplexity"])
  model_dir = tmp_path / "run" / "distill_kd_importance" / "model"
  s_cfg, params = llama.load_hf(model_dir)
  assert (s_cfg.num_heads, s_cfg.num_kv_heads, s_cfg.head_dim) == (2, 1, 8)
  ids = np.random.default_rng(0).integers(1, 300, (2, 10)).astype(np.int32)
  ours = np.asarray(nnx.merge(nnx.graphdef(llama.build(s_cfg)), params)(ids))
  with torch.no_grad():
    theirs = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()(torch.tensor(ids)).logits.numpy()
  np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)


def test_a_vocabulary_compressed_student_tokenizes_and_predicts_in_transformers_as_in_wdjax(lm_files, tmp_path):
  """student.vocabulary=corpus: the student keeps the tokens its training text uses; the export's
  tokenizer (loaded by `transformers`' AutoTokenizer) gives wdjax's ids and its model wdjax's logits."""
  import torch
  import transformers
  from tokenizers import Tokenizer
  cfg = _lm_config(lm_files, tmp_path / "run",
                   distill=TrainConfig(batch_size=8, steps=4, eval_every=4, eval_batch_size=8, log_every=4,
                                       optim=OptimConfig(lr=1e-3)))
  cfg = dataclasses.replace(cfg, student=dataclasses.replace(cfg.student, vocabulary="corpus"))
  results = run_lib.distill(cfg)
  model_dir = tmp_path / "run" / "distill_kd_importance" / "model"
  s_cfg, params = llama.load_hf(model_dir)
  teacher_vocab = Tokenizer.from_file(str(lm_files / "teacher" / "tokenizer.json")).get_vocab_size()
  assert 256 < s_cfg.vocab_size < teacher_vocab and np.isfinite(results["test_perplexity"])
  assert results["model_params"] < teacher_vocab * 32 * 2 + 2 * 32 * 4 * 32 * 4  # both tables shrank
  text = (lm_files / "test.txt").read_text().split("\n\n")[0]
  ours = Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(text).ids
  hf_tok = transformers.AutoTokenizer.from_pretrained(model_dir)
  assert hf_tok(text)["input_ids"] == ours
  logits = np.asarray(nnx.merge(nnx.graphdef(llama.build(s_cfg)), params)(jnp.asarray([ours])))
  with torch.no_grad():
    theirs = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()(torch.tensor([ours])).logits.numpy()
  np.testing.assert_allclose(logits, theirs, rtol=1e-4, atol=1e-4)


def test_pipeline_scores_the_pretrained_teacher_as_it_is_beside_its_students(lm_files, tmp_path, capsys):
  """`wdjax pipeline` on a language model: no finetune phase; the teacher's own perplexity heads
  the table (printed as it is, not x 100), then the transfer, KD and CE students."""
  from wdjax import cli
  cfg = _lm_config(lm_files, tmp_path / "run", method=generators.section("kd"))
  path = tmp_path / "lm_cfg.py"
  path.write_text("from wdjax.config import *\nfrom wdjax.tasks.causal_lm import CausalLMConfig\n\n\n"
                  f"def get_config():\n  return {cfg!r}\n")
  assert cli.run(["pipeline", str(path), "--set", "pipeline.transfer=importance"]) == 0
  table = capsys.readouterr().out
  teacher = run_lib.score_teacher(cfg, log=lambda _: None)
  assert teacher["trainable_params"] == 0 and teacher["model_params"] > 0
  row = f"| teacher ({lm_files / 'teacher'}, as it is) | none | {teacher['test_perplexity']:.2f} |"
  assert row in table
  for name, phase in (("importance selection + KD (weight transfer)", "distill_kd_importance"),
                      ("kd (T=1.0, alpha=0.9)", "distill"), ("CE only, same steps", "distill_ce")):
    ppl = json.loads((tmp_path / "run" / phase / "results.json").read_text())["test_perplexity"]
    assert f"| student 2x32, {name} | " in table and f"| {ppl:.2f} |" in table, name
  assert (tmp_path / "run" / "results.md").read_text().strip() == table.strip().split("\n\n")[-1].strip()


def test_bad_lm_settings_get_one_clear_error(lm_files, tmp_path):
  cfg = _lm_config(lm_files, tmp_path / "run")
  for change, message in [
      (dict(student=dataclasses.replace(cfg.student, attention_dropout=0.1)), "student.attention_dropout"),
      (dict(method=generators.section("wid", objective="mlm")), "method 'wid_mlm' .its phase 1 is an encoder's masked LM"),
      (dict(task=CausalLMConfig(kd_top_k=-1)), "task.kd_top_k=-1"),
      (dict(student=dataclasses.replace(cfg.student, vocabulary="tiny")), "student.vocabulary='tiny'"),
      (dict(student=dataclasses.replace(cfg.student, num_heads=3)), "multiple of the teacher's 2"),
      (dict(student=dataclasses.replace(cfg.student, num_heads=2), method=generators.section("wid")),
       "method 'wid' keeps the teacher's 4 heads"),
  ]:
    with pytest.raises(WdjaxError, match=message):
      run_lib.distill(dataclasses.replace(cfg, **change))
  with pytest.raises(WdjaxError, match="no finetune phase"):
    run_lib.finetune(cfg)
  with pytest.raises(WdjaxError, match="neither an asset"):
    run_lib.distill(dataclasses.replace(cfg, teacher=TeacherConfig(model=str(tmp_path / "none"))))
  (tmp_path / "empty.txt").write_text("\n\n")
  with pytest.raises(WdjaxError, match="holds no text"):
    run_lib.distill(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, train_file=str(tmp_path / "empty.txt"))))


def test_bible_lm_splits_by_book(bible_db):
  books = lm.bible_books(bible_db, "en")
  assert len(books["validation"]) == 2 and len(books["test"]) == 2 and len(books["train"]) == 62
  assert books["train"][0].startswith("In the beginning God created the heavens and the earth.")
  with pytest.raises(WdjaxError, match="task.language='xx'"):
    lm.bible_books(bible_db, "xx")
