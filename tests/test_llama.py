"""The Llama family: logits and generation equal `transformers`' on tiny random Llama and Qwen2
models it saves itself and on the real SmolLM2-135M GGUF; exports load back in `transformers`."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from wdjax.errors import WdjaxError
from wdjax.models import gguf_io, llama

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def _save_tiny(tmp_path, kind: str, tie: bool, **extra):
  """A random `transformers` model of `kind` saved by `save_pretrained` (its own layout)."""
  torch.manual_seed(0)
  cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
         "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[kind]
  model = cls[1](cls[0](**TINY, tie_word_embeddings=tie, **extra)).eval()
  with torch.no_grad():  # norms away from 1, so that a misplaced gain shows
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_(1 + 0.2 * torch.randn_like(p))
  out = tmp_path / f"{kind}_{'tied' if tie else 'untied'}"
  model.save_pretrained(out)
  return out, model


def _logits(cfg, params, ids, mask=None):
  model = nnx.merge(nnx.graphdef(llama.build(cfg)), params)
  return np.asarray(model(jnp.asarray(ids), None if mask is None else jnp.asarray(mask)))


def _relative(ours, ref, where=None):
  diff = np.abs(ours - ref) if where is None else np.abs(ours - ref)[where]
  return float(diff.max() / np.abs(ref).max())


@pytest.mark.parametrize("kind, tie, extra", [
    ("llama", False, {}),
    ("llama", True, dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
                         rope_theta=500000.0)),
    ("qwen2", True, {}),
    ("qwen2", False, {}),
])
def test_tiny_models_match_transformers(tmp_path, kind, tie, extra):
  """GQA (4 query heads on 2 KV heads), tied and untied outputs, Qwen2's q/k/v biases, Llama-3
  RoPE scaling; right padding; greedy generation token for token; the export loads back in
  `transformers` with the same logits."""
  d, ref_model = _save_tiny(tmp_path, kind, tie, **extra)
  cfg, params = llama.load_hf(d)
  assert (cfg.model_type, cfg.tie_embeddings, cfg.attention_bias) == (kind, tie, kind == "qwen2")
  assert cfg.num_kv_heads == 2 and cfg.head_dim == 8
  ids = np.random.RandomState(1).randint(3, TINY["vocab_size"], (2, 13))
  mask = np.ones_like(ids)
  mask[1, 9:] = 0
  with torch.no_grad():
    ref = ref_model(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
  assert _relative(_logits(cfg, params, ids, mask), ref, mask.astype(bool)) < 1e-5

  prompt = ids[:1, :6]
  ours = np.asarray(llama.generate(cfg, params, prompt, 10))
  with torch.no_grad():
    theirs = ref_model.generate(torch.tensor(prompt), attention_mask=torch.ones(1, 6, dtype=torch.long),
                                max_new_tokens=10, do_sample=False, eos_token_id=None).numpy()[:, 6:]
  assert ours.tolist() == theirs.tolist()

  out = llama.save_hf(tmp_path / "export", cfg, params)
  back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  with torch.no_grad():
    again = back(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
  assert _relative(again, ref, mask.astype(bool)) < 1e-6
  assert llama.load_hf(out)[0] == cfg


def test_left_padded_batch_generates_as_each_prompt_alone(tmp_path):
  """A batch of prompts of different lengths, left-padded, gives each row the tokens it gets
  alone; sampling with a key is reproducible and top_k=1 is greedy."""
  d, _ = _save_tiny(tmp_path, "llama", False)
  cfg, params = llama.load_hf(d)
  rng = np.random.RandomState(2)
  long, short = rng.randint(3, 96, 7), rng.randint(3, 96, 4)
  batch = np.stack([long, np.concatenate([[0, 0, 0], short])])
  mask = np.stack([np.ones(7), np.r_[0, 0, 0, 1, 1, 1, 1]]).astype(bool)
  together = np.asarray(llama.generate(cfg, params, batch, 6, prompt_mask=mask))
  assert together[0].tolist() == np.asarray(llama.generate(cfg, params, long[None], 6))[0].tolist()
  assert together[1].tolist() == np.asarray(llama.generate(cfg, params, short[None], 6))[0].tolist()
  key = jax.random.key(3)
  sampled = [np.asarray(llama.generate(cfg, params, long[None], 6, temperature=1.0, key=key)) for _ in range(2)]
  assert sampled[0].tolist() == sampled[1].tolist()
  top1 = np.asarray(llama.generate(cfg, params, long[None], 6, temperature=0.7, top_k=1, key=key))
  assert top1.tolist() == together[:1].tolist()


def test_eos_ends_a_row(tmp_path):
  d, _ = _save_tiny(tmp_path, "qwen2", True)
  cfg, params = llama.load_hf(d)
  free = np.asarray(llama.generate(cfg, params, np.array([[5, 6, 7]]), 8))[0]
  eos = int(free[2])
  stopped = np.asarray(llama.generate(cfg, params, np.array([[5, 6, 7]]), 8, eos_id=eos))[0]
  first = free.tolist().index(eos)
  assert stopped[:first + 1].tolist() == free[:first + 1].tolist()
  assert set(stopped[first:].tolist()) == {eos}


def test_bad_checkpoints_are_refused_by_name(tmp_path):
  d, _ = _save_tiny(tmp_path, "llama", False)
  hf = json.loads((d / "config.json").read_text())
  with pytest.raises(WdjaxError, match="hidden_act 'gelu'"):
    llama.config_from_hf(dict(hf, hidden_act="gelu"))
  with pytest.raises(WdjaxError, match="model_type 'bert'"):
    llama.config_from_hf(dict(hf, model_type="bert"))
  with pytest.raises(WdjaxError, match="RoPE scaling 'yarn'"):
    llama.config_from_hf(dict(hf, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}))
  (d / "config.json").write_text(json.dumps(dict(hf, intermediate_size=64)))
  with pytest.raises(WdjaxError, match="config and the weights do not belong together"):
    llama.load_hf(d)


def test_unpermuting_llama_cpp_rows_inverts_its_converter():
  """llama.cpp writes q/k rows as `reshape(h, 2, hd/2, in).swapaxes(1, 2)`; unpermuting undoes it."""
  w = np.arange(4 * 8 * 3, dtype=np.float32).reshape(4 * 8, 3)
  written = w.reshape(4, 2, 4, 3).swapaxes(1, 2).reshape(w.shape)
  assert np.array_equal(llama.unpermute_rope_rows(written, 4), w)


def test_real_smollm2_gguf_matches_transformers(smollm_gguf):
  """The real teacher (4-bit Q4_1 weights, dequantised): logits within 1e-4 of `transformers`'
  LlamaForCausalLM read from the same file, the same token ids from both tokenizers, and the
  same greedy answer."""
  cfg, params = llama.load_gguf(smollm_gguf)
  assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size) == (30, 576, 9, 3, 49152)
  assert cfg.tie_embeddings and cfg.rope_theta == 1e5
  meta = gguf_io.metadata(gguf_io.open_file(smollm_gguf))
  tok = gguf_io.tokenizer(meta)
  ref_tok = transformers.AutoTokenizer.from_pretrained(smollm_gguf.parent, gguf_file=smollm_gguf.name)
  texts = ["In the beginning God created the heavens and the earth.",
           "<|im_start|>user\nHow many apples? 1234, or 56!<|im_end|>\n", "  two  spaces\tand a tab"]
  for text in texts:
    assert tok.encode(text).ids == ref_tok(text)["input_ids"], text
  ref = transformers.AutoModelForCausalLM.from_pretrained(
      smollm_gguf.parent, gguf_file=smollm_gguf.name, dtype=torch.float32).eval()
  ids = np.asarray([tok.encode(texts[0]).ids])
  with torch.no_grad():
    want = ref(torch.tensor(ids)).logits.numpy()
  assert _relative(_logits(cfg, params, ids), want) < 1e-4
  chat = tok.encode("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n").ids
  ours = np.asarray(llama.generate(cfg, params, np.asarray([chat]), 8, eos_id=cfg.eos_token_id))[0]
  with torch.no_grad():
    theirs = ref.generate(torch.tensor([chat]), attention_mask=torch.ones(1, len(chat), dtype=torch.long),
                          max_new_tokens=8, do_sample=False).numpy()[0, len(chat):]
  assert ours[:len(theirs)].tolist() == theirs.tolist()
  assert tok.decode(ours.tolist(), skip_special_tokens=True) == "The capital of France is Paris."


def test_a_sharded_checkpoint_loads_whole_and_every_shard_identifies_the_teacher(tmp_path):
  """A `save_pretrained` directory split into shards loads to the same parameters as the
  single-file one, and the teacher's sha256 (what resumed runs and cached rankings are keyed on)
  changes when only its last shard does."""
  from safetensors.numpy import load_file, save_file
  from wdjax import config
  from wdjax.models import hf
  from wdjax.tasks import causal_lm
  single, model = _save_tiny(tmp_path, "llama", False)
  sharded = tmp_path / "sharded"
  model.save_pretrained(sharded, max_shard_size="20KB")
  shards = hf.safetensors_files(sharded)
  assert len(shards) >= 3
  (_, whole), (_, split) = llama.load_hf(single), llama.load_hf(sharded)
  assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda a, b: np.array_equal(a, b), whole, split))
  (sharded / "tokenizer.json").write_text("{}")  # load_teacher requires one; nothing here reads it
  cfg = config.load("lm:cpu", [f"teacher.path={sharded}"])
  before = causal_lm.load_teacher(cfg).sha256
  last = load_file(str(shards[-1]))
  save_file({k: v * 2 for k, v in last.items()}, str(shards[-1]), metadata={"format": "pt"})
  assert causal_lm.load_teacher(cfg).sha256 != before
