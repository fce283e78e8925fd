"""Vocabulary compression: the rewritten tokenizer gives the teacher's tokens (renumbered) on the
training text, the narrowed teacher computes the same outputs there, and new text stays
encodable. Tokenizers are trained in the test (byte-level BPE and WordPiece)."""

import json
import types

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from wdjax.data.tokenize import TextEncoder
from wdjax.models import bert, llama, vocab
from wdjax.train.phase import Model

TEXT = ["the light shines in the darkness", "and the darkness has not overcome it",
        "in the beginning was the word", "all things were made through him"]
OTHER = ["a quite different sentence, with 42 numbers!"]


def _bpe(tmp_path):
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  (tmp_path / "corpus.txt").write_text("\n".join(TEXT * 3 + OTHER * 3))
  tok.train([str(tmp_path / "corpus.txt")], trainers.BpeTrainer(
      vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  return tok


def _wordpiece(tmp_path):
  tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
  tok.normalizer = normalizers.BertNormalizer(lowercase=True)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  (tmp_path / "corpus.txt").write_text("\n".join(TEXT * 3 + OTHER * 3))
  tok.train([str(tmp_path / "corpus.txt")], trainers.WordPieceTrainer(
      vocab_size=200, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
  tok.post_processor = processors.TemplateProcessing(
      single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
      special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
  return tok


@pytest.mark.parametrize("kind", ["bpe", "wordpiece"])
def test_compressed_tokenizer_renumbers_the_training_text(tmp_path, kind):
  tok = _bpe(tmp_path) if kind == "bpe" else _wordpiece(tmp_path)
  spec = json.loads(tok.to_str())
  old = [tok.encode(t).ids for t in TEXT]
  used = np.unique(np.concatenate(old))
  kept = vocab.kept_ids(spec, used)
  assert set(used) <= set(kept.tolist()) and len(kept) < tok.get_vocab_size()
  new_tok = Tokenizer.from_str(json.dumps(vocab.compress_tokenizer(spec, kept)))
  assert new_tok.get_vocab_size() == len(kept)
  for text, ids in zip(TEXT, old):  # the same tokens, renumbered
    assert new_tok.encode(text).ids == np.searchsorted(kept, ids).tolist()
    assert new_tok.decode(new_tok.encode(text).ids) == tok.decode(ids)
  other = new_tok.encode(OTHER[0])  # new text: smaller pieces (BPE) or [UNK] (WordPiece), never an error
  assert len(other.ids) > 0 and max(other.ids) < len(kept)
  if kind == "bpe":
    assert new_tok.decode(other.ids) == OTHER[0]


def test_narrowed_bert_teacher_gives_the_same_logits_on_the_training_text(tmp_path):
  tok = _wordpiece(tmp_path)
  tok.save(str(tmp_path / "tokenizer.json"))
  cfg = bert.EncoderConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_layers=2, num_heads=4,
                           intermediate_size=64, num_labels=2, hidden_dropout=0.0, attention_dropout=0.0)
  params = nnx.to_pure_dict(nnx.state(bert.build(cfg, seed=0)))
  teacher = Model(cfg, params, tmp_path, "t" * 64)
  split = TextEncoder(tmp_path, 16, 0).encode(TEXT, [0, 1, 0, 1])
  narrow = vocab.compress_teacher(teacher, split, tmp_path / "cache", lambda *_: None)
  assert narrow.config.vocab_size < cfg.vocab_size
  assert narrow.params["encoder"]["embeddings"]["word"]["embedding"].shape == (narrow.config.vocab_size, 32)
  new_split = TextEncoder(narrow.tokenizer_dir, 16, narrow.config.pad_token_id).encode(TEXT, [0, 1, 0, 1])
  run = lambda c, p, s: np.asarray(nnx.merge(nnx.graphdef(bert.build(c)), p)(
      jnp.asarray(s.ids), jnp.asarray((np.arange(16)[None] < s.lengths[:, None]).astype(np.int32)), None))
  np.testing.assert_allclose(run(narrow.config, narrow.params, new_split), run(cfg, params, split),
                             rtol=1e-6, atol=1e-6)
  assert (narrow.tokenizer_dir / "vocab.txt").read_text().splitlines()[:2] == ["[PAD]", "[UNK]"]


def test_narrowed_llama_logits_are_the_teachers_at_the_kept_ids(tmp_path):
  tok = _bpe(tmp_path)
  tok.save(str(tmp_path / "tokenizer.json"))
  cfg = llama.LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_layers=2, num_heads=4,
                          num_kv_heads=2, head_dim=8, intermediate_size=48, tie_embeddings=False,
                          eos_token_id=tok.token_to_id("<|endoftext|>"))
  params = nnx.to_pure_dict(nnx.state(llama.build(cfg, seed=0)))
  ids = [tok.encode(t).ids for t in TEXT]
  split = types.SimpleNamespace(ids=np.array([i + [0] * (12 - len(i)) for i in ids]),
                                lengths=np.array([len(i) for i in ids]))
  teacher = Model(cfg, params, tmp_path, "t" * 64)
  narrow = vocab.compress_teacher(teacher, split, tmp_path / "cache", lambda *_: None)
  kept = vocab.kept_ids(json.loads(tok.to_str()), np.unique(np.concatenate(ids)))
  assert narrow.config.eos_token_id == int(np.searchsorted(kept, cfg.eos_token_id))
  x = jnp.asarray([ids[0]])
  full = np.asarray(nnx.merge(nnx.graphdef(llama.build(cfg)), params)(x))
  small = np.asarray(nnx.merge(nnx.graphdef(llama.build(narrow.config)), narrow.params)(
      jnp.asarray(np.searchsorted(kept, [ids[0]]))))
  np.testing.assert_allclose(small, full[..., kept], rtol=1e-6, atol=1e-6)
