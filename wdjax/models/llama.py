"""The Llama family of decoder-only language models (Flax NNX): Llama, Qwen2 and SmolLM-style
configs.

Pre-RMSNorm blocks of grouped-query self-attention with rotary positions (RoPE, with Llama-3 or
linear frequency scaling) and a SwiGLU FFN, a final RMSNorm and an output projection tied to the
token embedding or a matrix of its own. Qwen2 adds biases to the query, key and value
projections (`attention_bias`).

Parameter paths (string keys, Flax `[in, out]` kernels):

  decoder/embed/embedding [V, d]           decoder/final_ln/scale [d]     lm_head/kernel [d, V] (untied)
  decoder/layer_i/attn_ln/scale [d]        decoder/layer_i/mlp_ln/scale [d]
  decoder/layer_i/attn/q/kernel [d, H*hd]  decoder/layer_i/attn/{k,v}/kernel [d, K*hd]
  decoder/layer_i/attn/o/kernel [H*hd, d]  decoder/layer_i/mlp/{gate,up}/kernel [d, f], down [f, d]

`__call__` scores whole sequences (training, perplexity); `init_cache` + `decode` run the same
network a few positions at a time against a key/value cache, which `generate` uses. Checkpoints:
Hugging Face safetensors directories (`load_hf`, `save_hf`) and GGUF files (`load_gguf`,
dequantised with the `gguf` package: `wdjax/models/gguf_io.py`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange
from flax import nnx

from wdjax import trees
from wdjax.errors import WdjaxError
from wdjax.models.contract import (DECOMPOSE, OUTPUT, RANKS_HIDDEN, SUMMED_EMBEDDING, VOCAB_COLUMNS,
                                   VOCAB_ROWS, leaf)
from wdjax.models.layers import (DTYPES, activations, attention_implementation, dense, dropout,
                                 masked_norm, model_apply, sow, split_keys, unit_activations)

Array = jax.Array
Params = Any

# the family's own leaves (models/contract.py): keys and values live in the KV heads' space `kv`
# (narrower than the queries' `attn` under grouped-query attention); the norms, q, o, up and
# down are the shared layers' rules
PARAMETERS = (
    leaf(r"^decoder/embed/embedding$", (None, "hidden"), SUMMED_EMBEDDING, VOCAB_ROWS),
    leaf(r"^decoder/layer_\d+/attn/k/kernel$", ("hidden", "kv"), DECOMPOSE),
    leaf(r"^decoder/layer_\d+/attn/v/kernel$", ("hidden", "kv"), DECOMPOSE, RANKS_HIDDEN),
    leaf(r"^decoder/layer_\d+/attn/(k|v)/bias$", ("kv",)),
    leaf(r"^decoder/layer_\d+/mlp/gate/kernel$", ("hidden", "ffn"), DECOMPOSE),
    leaf(r"^lm_head/kernel$", ("hidden", None), OUTPUT, VOCAB_COLUMNS),
)

ROPE_TYPES = ("default", "linear", "llama3")
MODEL_TYPES = ("llama", "qwen2")  # how config.json names the architecture (and export writes it)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Shape and numerics of a decoder-only LM (teacher or student)."""

  vocab_size: int = 49152
  hidden_size: int = 576
  num_layers: int = 30
  num_heads: int = 9  # query heads
  num_kv_heads: int = 3  # key/value heads (grouped-query attention: num_heads is a multiple)
  head_dim: int = 64
  intermediate_size: int = 1536  # SwiGLU width
  rope_theta: float = 10000.0
  rope_scaling: tuple[tuple[str, Any], ...] = ()  # sorted (key, value) items of HF's rope parameters
  rms_norm_eps: float = 1e-5
  tie_embeddings: bool = True  # the output projection is the token embedding's transpose
  attention_bias: bool = False  # biases on q, k, v (Qwen2)
  max_position_embeddings: int = 2048
  bos_token_id: int | None = None
  eos_token_id: int | None = None
  model_type: str = "llama"  # "llama" | "qwen2": the architecture config.json names
  hidden_dropout: float = 0.0  # residual branches (pretrained Llamas use none)
  attention_dropout: float = 0.0  # must be 0: attention runs in the fused kernel
  initializer_range: float = 0.02
  dtype: str = "float32"
  attention: str = "auto"  # "auto" | "xla" | "cudnn", as the encoders'

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
    if self.head_dim % 2:
      raise ValueError(f"head_dim {self.head_dim} must be even (RoPE rotates pairs)")
    if self.dtype not in DTYPES:
      raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
    if self.attention_dropout:
      raise ValueError("attention_dropout must be 0 for Llama-family models")
    if self.model_type not in MODEL_TYPES:
      raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {self.model_type!r}")
    rope_type = dict(self.rope_scaling).get("rope_type", "default")
    if rope_type not in ROPE_TYPES:
      raise ValueError(f"RoPE scaling {rope_type!r} is not supported (supported: {', '.join(ROPE_TYPES)})")

  @property
  def compute_dtype(self):
    return DTYPES[self.dtype]

  @property
  def group_size(self) -> int:
    """Query heads per key/value head."""
    return self.num_heads // self.num_kv_heads


# --- rotary positions ---------------------------------------------------------------------

def rope_frequencies(cfg: LlamaConfig) -> np.ndarray:
  """`[head_dim // 2]` inverse frequencies theta^(-2i/hd), with the config's scaling."""
  hd = cfg.head_dim
  inv = 1.0 / (cfg.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
  s = dict(cfg.rope_scaling)
  kind = s.get("rope_type", "default")
  if kind == "linear":
    inv = inv / s["factor"]
  elif kind == "llama3":  # long wavelengths slowed by `factor`, short ones kept, a smooth blend between
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    smooth = np.clip((old / wavelen - low) / (high - low), 0.0, 1.0)
    inv = np.where(wavelen > old / low, inv / factor,
                   np.where(wavelen < old / high, inv, (1 - smooth) * inv / factor + smooth * inv))
  return inv.astype(np.float32)


def rope(x: Array, positions: Array, inv_freq: Array) -> Array:
  """`x [batch, seq, heads, head_dim]` rotated by `positions [batch, seq]`: HF's half-split
  convention (the first and second halves of each head form the pairs), computed in float32."""
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [b, t, hd/2]
  cos, sin = jnp.cos(angles)[:, :, None], jnp.sin(angles)[:, :, None]
  x32 = x.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


# --- layers -------------------------------------------------------------------------------

def rms_norm(cfg: LlamaConfig, d: int, rngs: nnx.Rngs) -> nnx.RMSNorm:
  # statistics in float32 whatever the compute dtype, as HF's LlamaRMSNorm
  return nnx.RMSNorm(d, epsilon=cfg.rms_norm_eps, dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs)


class CausalAttention(nnx.Module):
  """Grouped-query self-attention with RoPE, over a whole sequence or against a KV cache."""

  def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
    d, hd = cfg.hidden_size, cfg.head_dim
    self.cfg = cfg
    self.q = dense(cfg, d, cfg.num_heads * hd, rngs, bias=cfg.attention_bias)
    self.k = dense(cfg, d, cfg.num_kv_heads * hd, rngs, bias=cfg.attention_bias)
    self.v = dense(cfg, d, cfg.num_kv_heads * hd, rngs, bias=cfg.attention_bias)
    self.o = dense(cfg, cfg.num_heads * hd, d, rngs, bias=False)

  def __call__(self, x: Array, positions: Array, mask: Array, inv_freq: Array,
               cache: tuple[Array, Array] | None = None, start: Array | int = 0):
    """`x [batch, t, hidden]` at `positions [batch, t]` -> (`[batch, t, hidden]`, cache).

    Without a cache, the keys are `x`'s own and `mask` is `[batch, 1, t, t]`. With one (`k`, `v`
    of `[batch, max_len, kv_heads, head_dim]`), this call's keys and values are written at
    `start` and the queries attend over the whole cache through `mask [batch, 1, t, max_len]`.
    """
    cfg = self.cfg
    q = rope(rearrange(self.q(x), "b t (h d) -> b t h d", d=cfg.head_dim), positions, inv_freq)
    k = rope(rearrange(self.k(x), "b t (h d) -> b t h d", d=cfg.head_dim), positions, inv_freq)
    v = rearrange(self.v(x), "b t (h d) -> b t h d", d=cfg.head_dim)
    if cache is not None:
      k = jax.lax.dynamic_update_slice_in_dim(cache[0], k.astype(cache[0].dtype), start, axis=1)
      v = jax.lax.dynamic_update_slice_in_dim(cache[1], v.astype(cache[1].dtype), start, axis=1)
      cache = (k, v)
    # grouped-query attention: the kernel pairs each KV head with its group of query heads; a
    # few queries against the cache (decoding) take XLA's product, as the encoders' short rows do
    ctx = jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask=mask,
                                       implementation=attention_implementation(cfg) if cache is None else None)
    ctx = rearrange(ctx, "b t h d -> b t (h d)")
    sow(self, "inner", ctx)  # the attention-inner space (input of o)
    return self.o(ctx), cache


class GatedMlp(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
    self.gate = dense(cfg, cfg.hidden_size, cfg.intermediate_size, rngs, bias=False)
    self.up = dense(cfg, cfg.hidden_size, cfg.intermediate_size, rngs, bias=False)
    self.down = dense(cfg, cfg.intermediate_size, cfg.hidden_size, rngs, bias=False)

  def __call__(self, x: Array) -> Array:
    h = jax.nn.silu(self.gate(x)) * self.up(x)
    sow(self, "inner", h)  # [batch, seq, intermediate]: the FFN-inner space (input of down)
    return self.down(h)


class Block(nnx.Module):

  def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    self.attn_ln = rms_norm(cfg, cfg.hidden_size, rngs)
    self.attn = CausalAttention(cfg, rngs)
    self.mlp_ln = rms_norm(cfg, cfg.hidden_size, rngs)
    self.mlp = GatedMlp(cfg, rngs)

  def __call__(self, x, positions, mask, inv_freq, dropout_key=None, cache=None, start=0,
               hidden_keep=None):
    dt, rate = self.cfg.compute_dtype, self.cfg.hidden_dropout
    k1, k2 = split_keys(dropout_key, 2)
    h = masked_norm(self.attn_ln, x, hidden_keep).astype(dt)
    h, cache = self.attn(h, positions, mask, inv_freq, cache, start)
    x = x + dropout(h, rate, k1).astype(jnp.float32)
    h = masked_norm(self.mlp_ln, x, hidden_keep).astype(dt)
    x = x + dropout(self.mlp(h), rate, k2).astype(jnp.float32)
    sow(self, "out", x)  # the residual stream leaving the block (`layers.activations`)
    return x, cache


class Decoder(nnx.Module):
  """Token embedding, the blocks (`layer_0` ... as attributes: string paths) and the final norm."""

  def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=jnp.float32, param_dtype=jnp.float32,
                           embedding_init=nnx.initializers.normal(cfg.initializer_range), rngs=rngs)
    for i in range(cfg.num_layers):
      setattr(self, f"layer_{i}", Block(cfg, rngs))
    self.final_ln = rms_norm(cfg, cfg.hidden_size, rngs)

  def __call__(self, input_ids, positions, mask, dropout_key=None, cache=None, start=0,
               hidden_keep=None):
    """-> (final hidden states `[batch, t, hidden]` float32, updated cache or None).
    `hidden_keep` (`[hidden]` 0/1) restricts every RMSNorm's statistic to the kept units (WID)."""
    cfg = self.cfg
    inv_freq = jnp.asarray(rope_frequencies(cfg))
    keys = split_keys(dropout_key, cfg.num_layers + 1)
    x = dropout(self.embed(input_ids), cfg.hidden_dropout, keys[0])
    sow(self, "embedded", x)
    new_cache = []
    for i in range(cfg.num_layers):
      x, c = getattr(self, f"layer_{i}")(x, positions, mask, inv_freq, keys[i + 1],
                                         None if cache is None else cache[i], start, hidden_keep)
      new_cache.append(c)
    return masked_norm(self.final_ln, x, hidden_keep), (None if cache is None else tuple(new_cache))


class CausalLM(nnx.Module):
  """Decoder plus output projection: token ids -> next-token logits."""

  def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    self.decoder = Decoder(cfg, rngs)
    if not cfg.tie_embeddings:
      self.lm_head = dense(cfg, cfg.hidden_size, cfg.vocab_size, rngs, bias=False)

  def logits(self, h: Array) -> Array:
    """`h [batch, t, hidden]` -> float32 logits `[batch, t, vocab]`."""
    h = h.astype(self.cfg.compute_dtype)
    if self.cfg.tie_embeddings:
      table = self.decoder.embed.embedding[...].astype(h.dtype)
      return jnp.einsum("btd,vd->btv", h, table, preferred_element_type=jnp.float32)
    return self.lm_head(h).astype(jnp.float32)

  def __call__(self, input_ids: Array, attention_mask: Array | None = None, *,
               dropout_key: Array | None = None, hidden_keep: Array | None = None) -> Array:
    """`input_ids [batch, seq]` (right-padded; `attention_mask` 1 on real tokens) -> logits
    `[batch, seq, vocab]` float32, position t predicting token t + 1 (`hidden_keep`: WID's
    masked norms, `Decoder`)."""
    positions, mask = whole_sequence(input_ids, attention_mask)
    h, _ = self.decoder(input_ids, positions, mask, dropout_key, hidden_keep=hidden_keep)
    return self.logits(h)

  def decode(self, input_ids: Array, cache: dict) -> tuple[Array, dict]:
    """Run `input_ids [batch, t]` (the prompt, or the last sampled token) through the network
    against `cache` (`init_cache`) -> (logits `[batch, t, vocab]`, the cache with them written).
    Rows whose `cache["valid"]` positions are False (left padding of a prompt) are never attended."""
    b, t = input_ids.shape
    start = cache["length"]
    valid = jax.lax.dynamic_update_slice_in_dim(cache["valid"], cache["incoming"][:, :t], start, axis=1)
    positions = cache["next_position"][:, None] + jnp.cumsum(cache["incoming"][:, :t], axis=1) - 1
    positions = jnp.maximum(positions, 0)
    # the cache's slots past this call's are not valid yet; a valid slot's position is its rank
    mask = causal_mask(positions, jnp.cumsum(valid, axis=1) - 1, valid)
    h, kv = self.decoder(input_ids, positions, mask, None, cache["kv"], start)
    out = dict(cache, kv=kv, valid=valid, length=start + t,
               next_position=positions[:, -1] + 1,
               incoming=jnp.ones_like(cache["incoming"]))
    return self.logits(h), out


def whole_sequence(input_ids: Array, attention_mask: Array | None) -> tuple[Array, Array]:
  """Positions `[batch, seq]` 0..seq-1 and the causal mask `[batch, 1, seq, seq]` of right-padded
  sequences scored at once (`attention_mask` 1 on real tokens; None: all are)."""
  b, t = input_ids.shape
  valid = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
  positions = jnp.broadcast_to(jnp.arange(t), (b, t))
  return positions, causal_mask(positions, positions, valid)


def causal_mask(q_positions: Array, k_positions: Array, k_valid: Array) -> Array:
  """`[batch, 1, q, k]`: a query sees the valid keys at or before its position."""
  return (k_valid[:, None, None, :]
          & (k_positions[:, None, None, :] <= q_positions[:, None, :, None]))


def init_cache(cfg: LlamaConfig, batch: int, max_len: int, prompt_mask: Array | None = None,
               dtype=None) -> dict:
  """An empty KV cache for `max_len` positions. `prompt_mask [batch, t]` (0 on left padding)
  says which prompt tokens the first `decode` call brings are real."""
  dtype = dtype or cfg.compute_dtype
  shape = (batch, max_len, cfg.num_kv_heads, cfg.head_dim)
  kv = tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(cfg.num_layers))
  incoming = jnp.ones((batch, max_len), bool)
  if prompt_mask is not None:
    incoming = incoming.at[:, :prompt_mask.shape[1]].set(prompt_mask.astype(bool))
  return {"kv": kv, "valid": jnp.zeros((batch, max_len), bool), "incoming": incoming,
          "length": jnp.zeros((), jnp.int32), "next_position": jnp.zeros((batch,), jnp.int32)}


def build(cfg: LlamaConfig, seed: int = 0) -> CausalLM:
  return CausalLM(cfg, nnx.Rngs(params=seed))


def apply_fn(graphdef):
  """`apply(params, batch, dropout_key, **kwargs) -> logits [batch, seq, vocab]` for the training
  step and predictors (`batch`: `input_ids`, `attention_mask`; `layers.model_apply`)."""
  return model_apply(graphdef, lambda model, batch, dropout_key, **kwargs: model(
      batch["input_ids"], batch.get("attention_mask"), dropout_key=dropout_key, **kwargs))


def activation_fn(cfg: LlamaConfig):
  """`fn(params, batch) -> (activations, weights)` of a `CausalLM` of `cfg` (float32), as
  `bert.activation_fn`: the residual stream entering each block and leaving the last
  (`hidden/embeddings`, `hidden/layer_l`), each layer's attention context and gated FFN input,
  and `weights [batch, seq]` (1 on real tokens)."""
  graph = nnx.graphdef(nnx.eval_shape(lambda: build(dataclasses.replace(cfg, dtype="float32"))))

  def fn(params, batch):
    _, acts = activations(nnx.merge(graph, params), batch["input_ids"], batch["attention_mask"])
    return unit_activations(acts), batch["attention_mask"]

  return fn


def generate(cfg: LlamaConfig, params: Params, prompt_ids: Array, max_new_tokens: int, *,
             prompt_mask: Array | None = None, temperature: float = 0.0, top_k: int = 0,
             key: Array | None = None, eos_id: int | None = None) -> Array:
  """`max_new_tokens` tokens after each prompt `[batch, t]` (left-padded, `prompt_mask` 0 on the
  padding): greedy when `temperature` is 0, else sampled from softmax(logits / temperature),
  restricted to the `top_k` most likely tokens when `top_k` > 0. After `eos_id` a row repeats it.
  One compiled program: the prompt fills the KV cache, then a `lax.scan` adds a token a step.
  -> `[batch, max_new_tokens]` int32."""
  if temperature > 0 and key is None:
    raise ValueError("sampling (temperature > 0) needs a key")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: build(cfg)))
  prompt_ids = jnp.asarray(prompt_ids, jnp.int32)
  prompt_mask = (jnp.ones(prompt_ids.shape, bool) if prompt_mask is None
                 else jnp.asarray(prompt_mask, bool))
  return _generate(graphdef, params, prompt_ids, prompt_mask,
                   key if key is not None else jax.random.key(0), cfg=cfg, steps=max_new_tokens,
                   temperature=float(temperature), top_k=int(top_k),
                   eos_id=-1 if eos_id is None else int(eos_id))


@functools.partial(jax.jit, static_argnums=0,
                   static_argnames=("cfg", "steps", "temperature", "top_k", "eos_id"))
def _generate(graphdef, params, prompt_ids, prompt_mask, key, *, cfg, steps, temperature, top_k,
              eos_id):
  model = nnx.merge(graphdef, params)
  b, t = prompt_ids.shape

  def pick(logits, k):
    if temperature == 0.0:
      return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k:
      kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
      logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(k, logits).astype(jnp.int32)

  keys = jax.random.split(key, steps)
  logits, cache = model.decode(prompt_ids, init_cache(cfg, b, t + steps, prompt_mask))
  first = pick(logits[:, -1], keys[0])

  def step(carry, k):  # emit the current token, feed it, pick the next
    token, cache, done = carry
    done = done | (token == eos_id)
    logits, cache = model.decode(token[:, None], cache)
    nxt = jnp.where(done, token, pick(logits[:, -1], k))
    return (nxt, cache, done), token

  (last, _, _), tokens = jax.lax.scan(step, (first, cache, jnp.zeros((b,), bool)), keys[1:])
  return jnp.concatenate([tokens.T, last[:, None]], axis=1)


# --- Hugging Face checkpoints -------------------------------------------------------------

_BLOCK_NAMES = {  # wdjax path inside a block -> HF name inside model.layers.N (weights are [out, in])
    "attn_ln/scale": "input_layernorm.weight", "mlp_ln/scale": "post_attention_layernorm.weight",
    "attn/q/kernel": "self_attn.q_proj.weight", "attn/k/kernel": "self_attn.k_proj.weight",
    "attn/v/kernel": "self_attn.v_proj.weight", "attn/o/kernel": "self_attn.o_proj.weight",
    "attn/q/bias": "self_attn.q_proj.bias", "attn/k/bias": "self_attn.k_proj.bias",
    "attn/v/bias": "self_attn.v_proj.bias",
    "mlp/gate/kernel": "mlp.gate_proj.weight", "mlp/up/kernel": "mlp.up_proj.weight",
    "mlp/down/kernel": "mlp.down_proj.weight",
}


def name_map(cfg: LlamaConfig) -> dict[str, str]:
  """wdjax flat path -> HF state-dict name, for every leaf of `cfg`'s model."""
  out = {"decoder/embed/embedding": "model.embed_tokens.weight",
         "decoder/final_ln/scale": "model.norm.weight"}
  if not cfg.tie_embeddings:
    out["lm_head/kernel"] = "lm_head.weight"
  for i in range(cfg.num_layers):
    for ours, theirs in _BLOCK_NAMES.items():
      if ours.endswith("/bias") and not cfg.attention_bias:
        continue
      out[f"decoder/layer_{i}/{ours}"] = f"model.layers.{i}.{theirs}"
  return out


def _rope_items(params: dict) -> tuple[tuple[str, Any], ...]:
  params = dict(params)
  params.pop("rope_theta", None)
  if "type" in params and "rope_type" not in params:  # the older spelling
    params["rope_type"] = params.pop("type")
  if params.get("rope_type", "default") == "default":
    return ()
  return tuple(sorted(params.items()))


def config_from_hf(hf: dict, **overrides) -> LlamaConfig:
  """The config of a `transformers` Llama / Qwen2 (or SmolLM, a Llama) `config.json`."""
  kind = hf.get("model_type")
  if kind not in MODEL_TYPES:
    raise WdjaxError(f"model_type {kind!r} is not a Llama-family decoder ({', '.join(MODEL_TYPES)})")
  if hf.get("hidden_act", "silu") != "silu":
    raise WdjaxError(f"hidden_act {hf['hidden_act']!r}: Llama-family FFNs are SwiGLU (silu)")
  if kind == "qwen2" and hf.get("use_sliding_window"):
    raise WdjaxError("Qwen2 sliding-window attention is not supported (use_sliding_window: true)")
  if hf.get("mlp_bias"):
    raise WdjaxError("FFN biases (mlp_bias: true) are not supported")
  rope = hf.get("rope_parameters") or dict(hf.get("rope_scaling") or {}, rope_theta=hf.get("rope_theta", 10000.0))
  heads = hf["num_attention_heads"]
  eos = hf.get("eos_token_id")
  cfg = dict(
      vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
      num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
      head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
      intermediate_size=hf["intermediate_size"], rope_theta=float(rope.get("rope_theta", 10000.0)),
      rope_scaling=_rope_items(rope), rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
      tie_embeddings=bool(hf.get("tie_word_embeddings", kind == "qwen2")),
      attention_bias=True if kind == "qwen2" else bool(hf.get("attention_bias", False)),
      max_position_embeddings=hf.get("max_position_embeddings", 2048),
      bos_token_id=hf.get("bos_token_id"), eos_token_id=eos[0] if isinstance(eos, list) else eos,
      model_type=kind, initializer_range=hf.get("initializer_range", 0.02),
      dtype=hf.get("wdjax_dtype", "float32"))
  cfg.update(overrides)
  try:
    return LlamaConfig(**cfg)
  except ValueError as e:
    raise WdjaxError(f"config.json: {e}") from None


def config_to_hf(cfg: LlamaConfig) -> dict:
  rope = dict(cfg.rope_scaling) or {"rope_type": "default"}
  out = {
      "architectures": ["Qwen2ForCausalLM" if cfg.model_type == "qwen2" else "LlamaForCausalLM"],
      "model_type": cfg.model_type, "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
      "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
      "intermediate_size": cfg.intermediate_size, "hidden_act": "silu",
      "rms_norm_eps": cfg.rms_norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
      "max_position_embeddings": cfg.max_position_embeddings,
      # both spellings: transformers 5 reads rope_parameters, 4.x rope_theta and rope_scaling
      "rope_theta": cfg.rope_theta, "rope_parameters": dict(rope, rope_theta=cfg.rope_theta),
      "rope_scaling": dict(cfg.rope_scaling) or None,
      "attention_dropout": 0.0, "initializer_range": cfg.initializer_range,
      "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
      "torch_dtype": "float32", "wdjax_dtype": cfg.dtype,
  }
  if cfg.model_type == "llama":
    out.update(attention_bias=cfg.attention_bias, mlp_bias=False)
  else:
    out.update(use_sliding_window=False, sliding_window=None)
  return out


def from_hf(cfg: LlamaConfig, tensors: dict[str, np.ndarray], source: str = "") -> Params:
  """HF state-dict arrays -> wdjax parameters (kernels transposed to `[in, out]`)."""
  flat = {}
  for ours, theirs in name_map(cfg).items():
    if theirs not in tensors:
      raise WdjaxError(f"{source or 'the checkpoint'} lacks {theirs} (and perhaps more); is it a "
                       f"{cfg.model_type} model of this config?")
    value = np.asarray(tensors[theirs], np.float32)
    flat[ours] = value.T if ours.endswith("kernel") else value
  return trees.unflatten(flat)


def to_hf(cfg: LlamaConfig, params: Params) -> dict[str, np.ndarray]:
  flat = trees.flatten(params)
  return {theirs: np.ascontiguousarray(np.asarray(flat[ours], np.float32).T if ours.endswith("kernel")
                                       else np.asarray(flat[ours], np.float32))
          for ours, theirs in name_map(cfg).items()}


def check_shapes(cfg: LlamaConfig, params: Params, source: str) -> None:
  """Every leaf of `params` has the shape `cfg`'s model needs (a config and weights that do not
  belong together are refused by name)."""
  want = trees.flatten(nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: build(cfg)))))
  got = trees.flatten(params)
  for path, leaf_ in want.items():
    if path not in got:
      raise WdjaxError(f"{source}: no weight for {path}")
    if tuple(got[path].shape) != tuple(leaf_.shape):
      raise WdjaxError(f"{source}: {path} has shape {list(got[path].shape)} but the config needs "
                       f"{list(leaf_.shape)}; the config and the weights do not belong together")


def load_hf(model_dir: str | Path, **overrides) -> tuple[LlamaConfig, Params]:
  """(config, params) of a `transformers` Llama / Qwen2 safetensors directory."""
  from wdjax.models import hf
  d = Path(model_dir)
  cfg = config_from_hf(hf.read_config(d), **overrides)
  params = from_hf(cfg, hf.read_safetensors(d), str(d))
  check_shapes(cfg, params, str(d))
  return cfg, params


def save_hf(out: str | Path, cfg: LlamaConfig, params: Params, tokenizer_dir: str | Path | None = None,
            generation: dict | None = None) -> Path:
  """A `transformers` LlamaForCausalLM / Qwen2ForCausalLM directory, written atomically, with the
  tokenizer files of `tokenizer_dir` (if any)."""
  from safetensors.numpy import save_file
  from wdjax.models import hf
  out = Path(out)
  with hf.atomic_directory(out) as tmp:
    save_file(to_hf(cfg, params), str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(config_to_hf(cfg), indent=2) + "\n")
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, **(generation or {})}
    (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    hf.copy_tokenizer(tokenizer_dir, tmp)
  return out


# --- GGUF files (llama.cpp) ---------------------------------------------------------------

_GGUF_BLOCK = {  # wdjax path inside a block -> GGUF name inside blk.N (weights are [out, in])
    "attn_ln/scale": "attn_norm.weight", "mlp_ln/scale": "ffn_norm.weight",
    "attn/q/kernel": "attn_q.weight", "attn/k/kernel": "attn_k.weight",
    "attn/v/kernel": "attn_v.weight", "attn/o/kernel": "attn_output.weight",
    "attn/q/bias": "attn_q.bias", "attn/k/bias": "attn_k.bias", "attn/v/bias": "attn_v.bias",
    "mlp/gate/kernel": "ffn_gate.weight", "mlp/up/kernel": "ffn_up.weight",
    "mlp/down/kernel": "ffn_down.weight",
}


def unpermute_rope_rows(w: np.ndarray, heads: int) -> np.ndarray:
  """Undo llama.cpp's row order of a q or k projection `[heads * head_dim, in]`: its converter
  interleaves each head's two halves (pairs `(i, i + hd/2)` become rows `(2i, 2i+1)`) for its
  RoPE kernel; HF's half-split RoPE needs them back."""
  hd = w.shape[0] // heads
  return w.reshape(heads, hd // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def config_from_gguf(meta: dict, tensor_names: set[str], **overrides) -> LlamaConfig:
  arch = meta.get("general.architecture")
  if arch not in ("llama", "qwen2"):
    raise WdjaxError(f"the GGUF file holds a {arch!r} model, not a Llama-family decoder (llama, qwen2)")
  get = lambda key, default=None: meta.get(f"{arch}.{key}", default)
  heads = int(get("attention.head_count"))
  hidden = int(get("embedding_length"))
  scaling = get("rope.scaling.type")
  if scaling not in (None, "none", "linear"):
    raise WdjaxError(f"GGUF RoPE scaling {scaling!r} is not supported (none, linear)")
  rope = (("factor", float(get("rope.scaling.factor"))), ("rope_type", "linear")) if scaling == "linear" else ()
  cfg = dict(
      vocab_size=int(get("vocab_size") or len(meta["tokenizer.ggml.tokens"])), hidden_size=hidden,
      num_layers=int(get("block_count")), num_heads=heads,
      num_kv_heads=int(get("attention.head_count_kv", heads)),
      head_dim=int(get("attention.key_length") or get("rope.dimension_count") or hidden // heads),
      intermediate_size=int(get("feed_forward_length")), rope_theta=float(get("rope.freq_base", 10000.0)),
      rope_scaling=rope, rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
      tie_embeddings="output.weight" not in tensor_names, attention_bias="blk.0.attn_q.bias" in tensor_names,
      max_position_embeddings=int(get("context_length", 2048)),
      bos_token_id=meta.get("tokenizer.ggml.bos_token_id"), eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
      model_type=arch)
  cfg.update(overrides)
  try:
    return LlamaConfig(**cfg)
  except ValueError as e:
    raise WdjaxError(f"GGUF metadata: {e}") from None


def load_gguf(path: str | Path, **overrides) -> tuple[LlamaConfig, Params]:
  """(config, float32 params) of a llama.cpp GGUF file, its quantised tensors dequantised."""
  from wdjax.models import gguf_io
  reader = gguf_io.open_file(path)
  meta = gguf_io.metadata(reader)
  names = gguf_io.tensor_names(reader)
  cfg = config_from_gguf(meta, names, **overrides)
  flat = {"decoder/embed/embedding": "token_embd.weight", "decoder/final_ln/scale": "output_norm.weight"}
  if not cfg.tie_embeddings:
    flat["lm_head/kernel"] = "output.weight"
  for i in range(cfg.num_layers):
    for ours, theirs in _GGUF_BLOCK.items():
      if not ours.endswith("/bias") or cfg.attention_bias:
        flat[f"decoder/layer_{i}/{ours}"] = f"blk.{i}.{theirs}"
  tensors = gguf_io.tensors(reader, set(flat.values()), str(path))
  out = {}
  for ours, theirs in flat.items():
    w = tensors[theirs]
    if cfg.model_type == "llama" and ("/attn/q/" in ours or "/attn/k/" in ours):
      w = unpermute_rope_rows(w, cfg.num_heads if "/attn/q/" in ours else cfg.num_kv_heads)
    out[ours] = w.T if ours.endswith("kernel") else w
  params = trees.unflatten(out)
  check_shapes(cfg, params, str(path))
  return cfg, params
