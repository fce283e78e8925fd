"""BERT-family parity with transformers (BERT, RoBERTa, XLM-R, ELECTRA, DistilBERT, MPNet), bf16, HF export, and bad weight files."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from wdjax.errors import WdjaxError
from wdjax.models import bert, hf, layers

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _rel(a, b, mask=None):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if mask is not None:
    a, b = a[mask], b[mask]
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def _batch(vocab, pad_id, seed=0, lengths=(12, 7, 3)):
  rng = np.random.default_rng(seed)
  t = max(lengths)
  ids = np.full((len(lengths), t), pad_id, np.int64)
  mask = np.zeros((len(lengths), t), np.int64)
  for i, n in enumerate(lengths):
    ids[i, :n] = rng.integers(3, vocab, n)
    mask[i, :n] = 1
  return ids, mask


def _apply(model_dir, head, ids, mask, **overrides):
  cfg, params, fresh = hf.load(model_dir, head=head, **overrides)
  assert fresh == []
  model = nnx.merge(nnx.split(bert.build(cfg, head))[0], params)
  return cfg, np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))


SMALL = dict(vocab_size=99, hidden_size=48, num_hidden_layers=2, num_attention_heads=6,
             intermediate_size=80, max_position_embeddings=64, num_labels=3)


ARCHS = ("bert", "roberta", "xlm-roberta", "electra", "distilbert", "mpnet")


def _hf_config(arch: str):
  """A small random config of `arch` as transformers builds it."""
  if arch == "distilbert":
    return transformers.DistilBertConfig(
        vocab_size=99, dim=48, n_layers=2, n_heads=6, hidden_dim=80, max_position_embeddings=64,
        num_labels=3)
  extra = {"bert": dict(type_vocab_size=2), "roberta": dict(type_vocab_size=1),
           "xlm-roberta": dict(type_vocab_size=1), "electra": dict(embedding_size=48),
           "mpnet": dict(relative_attention_num_buckets=32)}[arch]
  return transformers.AutoConfig.for_model(arch, **SMALL, **extra)


def _hf_class(arch: str, head: str):
  return getattr(transformers, hf.DIALECTS[arch].classes[head])


@pytest.mark.parametrize("head", ["classifier", "mlm"])
@pytest.mark.parametrize("arch", ARCHS)
def test_random_transformers_models_match(tmp_path, arch, head):
  """Small random models that transformers itself saves: same logits to 1e-5 relative."""
  torch.manual_seed(0)
  conf = _hf_config(arch)
  ref = _hf_class(arch, head)(conf).eval()
  ref.save_pretrained(tmp_path)
  ids, mask = _batch(SMALL["vocab_size"], conf.pad_token_id, lengths=(40, 7, 3))  # 40 > MPNet's 16 exact buckets
  with torch.no_grad():
    want = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
  cfg, got = _apply(tmp_path, head, ids, mask)
  assert cfg.arch == arch
  assert got.shape == want.shape
  valid = mask.astype(bool) if head == "mlm" else None
  assert _rel(got, want, valid) < 1e-5


@pytest.mark.parametrize("arch", ["roberta", "bert"])
def test_token_types_of_a_pair_match_transformers(tmp_path, arch):
  # a second segment's token types (BERT's two rows; RoBERTa's single row takes type 0 only)
  torch.manual_seed(1)
  ref = _hf_class(arch, "classifier")(_hf_config(arch)).eval()
  ref.save_pretrained(tmp_path)
  ids, mask = _batch(SMALL["vocab_size"], ref.config.pad_token_id, lengths=(20, 9))
  types = np.zeros_like(ids)
  if arch == "bert":
    types[0, 8:20], types[1, 4:9] = 1, 1
  with torch.no_grad():
    want = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
               token_type_ids=torch.tensor(types)).logits.numpy()
  cfg, params, _ = hf.load(tmp_path)
  model = nnx.merge(nnx.split(bert.build(cfg))[0], params)
  got = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types)))
  assert _rel(got, want) < 1e-5


@pytest.mark.parametrize("arch,change,message", [
    ("electra", dict(embedding_size=16), "embedding_size 16 differs from hidden_size 48"),
    ("distilbert", dict(sinusoidal_pos_embds=True), "sinusoidal_pos_embds"),
    ("roberta", dict(hidden_act="relu"), "hidden_act 'relu'"),
    ("distilbert", dict(activation="relu"), "activation 'relu'")])
def test_unsupported_variants_are_refused_by_name(arch, change, message):
  hf_dict = {**_hf_config(arch).to_dict(), **change}
  with pytest.raises(WdjaxError, match=message):
    hf.config_from_hf(hf_dict)


def test_real_minilm_hidden_state_matches_transformers(minilm_dir):
  from tokenizers import Tokenizer
  tok = Tokenizer.from_file(str(minilm_dir / "tokenizer.json"))
  tok.no_truncation()
  tok.enable_padding(pad_id=0, pad_token="[PAD]")
  enc = tok.encode_batch(["A small movie with a big impact.", "hi",
                          "The new movie is awesome, truly one of the great films of the decade"])
  ids = np.array([e.ids for e in enc])
  mask = np.array([e.attention_mask for e in enc])
  cfg, params, _ = hf.load(minilm_dir)
  model = nnx.merge(nnx.split(bert.build(cfg))[0], params)
  got = np.asarray(model.encoder(jnp.asarray(ids), jnp.asarray(mask)))
  ref = transformers.BertModel.from_pretrained(minilm_dir).eval()
  with torch.no_grad():
    want = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
  assert _rel(got, want, mask.astype(bool)) < 1e-5


def test_minilm_reproduces_published_sentence_similarities(minilm_dir):
  """The sentence-transformers documentation's scores for all-MiniLM-L6-v2 (mean pooling)."""
  from tokenizers import Tokenizer
  tok = Tokenizer.from_file(str(minilm_dir / "tokenizer.json"))
  tok.enable_padding(pad_id=0, pad_token="[PAD]")
  tok.enable_truncation(128)
  first = ["The cat sits outside", "A man is playing guitar", "The new movie is awesome"]
  second = ["The dog plays in the garden", "A woman watches TV", "The new movie is so great"]
  enc = tok.encode_batch(first + second)
  ids = jnp.asarray([e.ids for e in enc])
  mask = jnp.asarray([e.attention_mask for e in enc])
  cfg, params, _ = hf.load(minilm_dir)
  model = nnx.merge(nnx.split(bert.build(cfg))[0], params)
  h = model.encoder(ids, mask)
  emb = jnp.sum(h * mask[..., None], 1) / jnp.sum(mask, 1, keepdims=True)
  emb = emb / jnp.linalg.norm(emb, axis=-1, keepdims=True)
  scores = np.asarray(jnp.sum(emb[:3] * emb[3:], -1))
  np.testing.assert_allclose(scores, [0.2838, -0.0327, 0.8939], atol=5e-5)


def test_bf16_compute_stays_close_to_fp32(minilm_dir):
  ids, mask = _batch(30522, 0, lengths=(20, 9))
  cfg, params, _ = hf.load(minilm_dir)
  out = {}
  for dtype in ("float32", "bfloat16"):
    c = hf.config_from_hf(json.loads((minilm_dir / "config.json").read_text()), dtype=dtype)
    model = nnx.merge(nnx.split(bert.build(c))[0], params)
    out[dtype] = np.asarray(model.encoder(jnp.asarray(ids), jnp.asarray(mask)), np.float32)
  assert out["bfloat16"].dtype == np.float32
  assert 1e-4 < _rel(out["bfloat16"], out["float32"], mask.astype(bool)) < 3e-2


@pytest.mark.parametrize("head", ["classifier", "mlm"])
@pytest.mark.parametrize("arch", ARCHS)
def test_export_loads_in_transformers_with_matching_logits(tmp_path, arch, head):
  cfg = hf.config_from_hf(_hf_config(arch).to_dict(), vocab_size=120, hidden_size=32, num_heads=4,
                          intermediate_size=64)
  model = bert.build(cfg, head, seed=3)
  params = nnx.to_pure_dict(nnx.state(model))
  if head == "mlm":  # a fresh MLM bias is zero: make it count
    params["mlm_bias"] = np.random.default_rng(0).normal(size=120).astype(np.float32)
    nnx.update(model, params)
  out = hf.export(tmp_path / "student", cfg, params, head=head)
  ids, mask = _batch(120, cfg.pad_token_id)
  got = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
  auto = {"classifier": transformers.AutoModelForSequenceClassification,
          "mlm": transformers.AutoModelForMaskedLM}[head]
  ref = auto.from_pretrained(out).eval()
  assert type(ref).__name__ == hf.DIALECTS[arch].classes[head]
  with torch.no_grad():
    want = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
  assert _rel(got, want, mask.astype(bool) if head == "mlm" else None) < 1e-5
  # and back into wdjax, bit for bit
  _, again, fresh = hf.load(out, head=head)
  assert fresh == [] and all(np.array_equal(a, b) for a, b in zip(
      jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(again)))
  # and as transformers shards it (several safetensors files and their index, as on the Hub)
  ref.save_pretrained(tmp_path / "sharded", max_shard_size="20KB", safe_serialization=True)
  assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
  _, sharded, fresh = hf.load(tmp_path / "sharded", head=head)
  assert fresh == [] and all(np.array_equal(a, b) for a, b in zip(
      jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(sharded)))


def test_corrupt_safetensors_is_one_clear_error(tmp_path, minilm_dir):
  bad = tmp_path / "bad"
  bad.mkdir()
  (bad / "config.json").write_text((minilm_dir / "config.json").read_text())
  data = (minilm_dir / "model.safetensors").read_bytes()[:4096]  # truncated download
  (bad / "model.safetensors").write_bytes(data)
  with pytest.raises(WdjaxError, match="not a readable safetensors file"):
    hf.load(bad)


def test_weights_that_do_not_fit_the_config_are_rejected(tmp_path, minilm_dir):
  bad = tmp_path / "bad"
  bad.mkdir()
  conf = json.loads((minilm_dir / "config.json").read_text())
  conf["hidden_size"] = 768
  (bad / "config.json").write_text(json.dumps(conf))
  (bad / "model.safetensors").symlink_to(minilm_dir / "model.safetensors")
  with pytest.raises(WdjaxError, match=r"has shape \[30522, 384\] but the config needs \[30522, 768\]"):
    hf.load(bad)


def test_a_task_head_for_another_label_count_is_named_as_such(tmp_path, task_teacher):
  """A 2-label task model asked for 3 labels: the message is about the head, in the file's own
  orientation, not about config.json and the weights not belonging together."""
  with pytest.raises(WdjaxError, match=r"its task head classifier.weight has shape \[2, 384\], "
                                       r"this task needs \[3, 384\] \(another number of labels\)"):
    hf.load(task_teacher, num_labels=3)


def _grads_close(f, g, model, rtol=2e-5):
  """f(model) and g(model) (arrays) agree, and so do the gradients of sum(sin(.)) of them.
  Absolute tolerance: float32 rounding of a sum scales with its terms, not its result, so a small
  entry of an array of large ones may differ by 1e-6 of the array's scale between two orders of
  summation (an entry of -0.0064 beside ones of 9 moved 1.6e-6 under jax 0.11.2's XLA)."""
  np.testing.assert_allclose(np.asarray(f(model)), np.asarray(g(model)), rtol=rtol, atol=1e-6)
  grads = [nnx.grad(lambda m: jnp.sum(jnp.sin(h(m))))(model) for h in (f, g)]
  for got, want in zip(*map(jax.tree.leaves, grads)):
    want = np.asarray(want)
    np.testing.assert_allclose(np.asarray(got), want, rtol=rtol, atol=1e-6 * max(1.0, np.abs(want).max()))


@pytest.mark.parametrize("arch", ["bert", "mpnet"])
def test_mlm_logits_at_positions_equal_the_full_logits_there(arch):
  # the last layer computes the masked rows only (`rows`): the same logits and gradients as the
  # full network's logits taken at those rows
  cfg = bert.EncoderConfig(arch=arch, vocab_size=99, hidden_size=48, num_layers=2, num_heads=6,
                           intermediate_size=80, max_position_embeddings=64,
                           type_vocab_size=2 if arch == "bert" else 0)
  model = bert.build(cfg, "mlm", seed=3)
  ids, mask = map(jnp.asarray, _batch(99, 0, lengths=(12, 7, 3)))
  pos = jnp.asarray([[0, 5, 11], [1, 2, 6], [0, 1, 2]], jnp.int32)
  _grads_close(lambda m: m(ids, mask, positions=pos),
               lambda m: jnp.take_along_axis(m(ids, mask), pos[..., None], axis=1), model)


@pytest.mark.parametrize("arch", ["bert", "mpnet"])
def test_classifier_computes_only_the_first_token_of_the_last_layer(arch):
  # the head reads the first token, so the last layer computes that row only: the same logits
  # and gradients as the full last layer, with padding, and with WID's masked LayerNorms
  cfg = bert.EncoderConfig(arch=arch, vocab_size=99, hidden_size=48, num_layers=3, num_heads=6,
                           intermediate_size=80, max_position_embeddings=64, num_labels=3,
                           type_vocab_size=2 if arch == "bert" else 0, pad_token_id=1)
  model = bert.build(cfg, "classifier", seed=4)
  ids, mask = map(jnp.asarray, _batch(99, 1, lengths=(12, 7, 3)))

  def full(m, **kw):
    h = m.encoder(ids, mask, **kw)  # [batch, seq, hidden]: every row of the last layer
    assert h.shape == (3, 12, 48)
    return m.classifier(jnp.tanh(m.pooler(h[:, 0]))).astype(jnp.float32)

  _grads_close(lambda m: m(ids, mask), full, model)
  keep = jnp.ones(48).at[jnp.asarray([3, 17, 40])].set(0.0)
  _grads_close(lambda m: m(ids, mask, hidden_keep=keep), lambda m: full(m, hidden_keep=keep), model)
  # and the work is left out: of the 3 layers' FFN products over [batch, seq], 2 remain
  ffn_up = [e for e in jax.make_jaxpr(lambda i, m: model(i, m))(ids, mask).jaxpr.eqns
            if e.primitive.name == "dot_general" and e.outvars[0].aval.shape[-1] == 80]
  assert sorted(e.outvars[0].aval.shape for e in ffn_up) == [(3, 1, 80), (3, 12, 80), (3, 12, 80)]


def test_gelu_is_the_exact_gelu_torch_computes():
  x = np.random.default_rng(0).normal(0.0, 3.0, 20000).astype(np.float32)
  want = torch.nn.functional.gelu(torch.tensor(x)).numpy()  # erf form, as BERT's "gelu"
  np.testing.assert_allclose(np.asarray(layers.gelu(jnp.asarray(x))), want, rtol=1e-5, atol=2e-6)
  np.testing.assert_allclose(np.asarray(layers.gelu(jnp.asarray(x))),
                             np.asarray(jax.nn.gelu(jnp.asarray(x), approximate=False)), atol=2e-6)
  # bf16 in, bf16 out, computed in f32 and rounded once, as torch's bf16 gelu is: at most one
  # bf16 step (at most 2^-7 relative) apart where erf's two approximations round differently
  xb = torch.tensor(x).bfloat16()
  got = layers.gelu(jnp.asarray(xb.float().numpy()).astype(jnp.bfloat16))
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got.astype(jnp.float32)),
                             torch.nn.functional.gelu(xb).float().numpy(), rtol=2 ** -7, atol=1e-6)


def test_bert_embeddings_equal_table_lookups_and_their_gradients():
  # positions are a slice of their table and token types a one-hot product (gradients without
  # scatter-adds): the same values and gradients as looking every token's rows up
  cfg = bert.EncoderConfig(vocab_size=100, hidden_size=32, num_layers=1, num_heads=4,
                           intermediate_size=64, max_position_embeddings=16, type_vocab_size=2)
  emb = bert.Embeddings(cfg, nnx.Rngs(0))
  rng = np.random.default_rng(0)
  ids, types = jnp.asarray(rng.integers(0, 100, (3, 10))), jnp.asarray(rng.integers(0, 2, (3, 10)))
  mask = jnp.ones_like(ids)

  def looked_up(e):
    x = e.word(ids) + e.position(jnp.broadcast_to(jnp.arange(10), ids.shape)) + e.token_type(types)
    return layers.masked_norm(e.ln, x, None)

  np.testing.assert_array_equal(np.asarray(emb(ids, mask, types, None)), np.asarray(looked_up(emb)))
  grads = [nnx.grad(lambda e: jnp.sum(jnp.sin(f(e))))(emb)
           for f in (lambda e: e(ids, mask, types, None), looked_up)]
  for got, want in zip(*map(jax.tree.leaves, grads)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  with pytest.raises(WdjaxError, match="longer than the model's 16 positions"):
    emb(jnp.zeros((1, 17), jnp.int32), jnp.ones((1, 17), jnp.int32), None, None)


def test_mpnet_refuses_sequences_past_its_positions():
  """MPNet's positions start after its pad id: a table of 18 rows holds 16 tokens. One more
  gave NaN logits (an out-of-range embedding lookup), not an error."""
  cfg = bert.EncoderConfig(arch="mpnet", type_vocab_size=0, pad_token_id=1, vocab_size=100,
                           hidden_size=32, num_layers=1, num_heads=4, intermediate_size=64,
                           max_position_embeddings=18)
  emb = bert.Embeddings(cfg, nnx.Rngs(0))
  ids = jnp.full((1, 16), 7, jnp.int32)
  assert np.isfinite(np.asarray(emb(ids, jnp.ones_like(ids), None, None))).all()
  with pytest.raises(WdjaxError, match="17 tokens are longer than the model's 16 positions"):
    emb(jnp.full((1, 17), 7, jnp.int32), jnp.ones((1, 17), jnp.int32), None, None)
