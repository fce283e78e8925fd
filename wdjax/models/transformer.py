"""Encoder-decoder Transformer for translation (Flax NNX), with an incremental decoder.

Vaswani et al.'s model as fairseq's `transformer_wmt_en_de` builds it: token embeddings scaled
by sqrt(d), sinusoidal positions (no parameters), pre- or post-LayerNorm blocks, ReLU FFN, an
untied output projection without bias (or tied to the decoder embedding). Encoder and decoder
may have different depths; WD's students keep the teacher's encoder and shrink the decoder.

Parameter paths (what the generators' path rules match, `wdjax/generators/paths.py`):

  enc/embed/embedding [V, d]            dec/embed/embedding [V, d]
  enc/layer_i/attn/{q,k,v,o}            dec/layer_i/self_attn/{q,k,v,o}, dec/layer_i/cross_attn/...
  enc/layer_i/{attn_ln,mlp_ln}          dec/layer_i/{self_attn_ln,cross_attn_ln,mlp_ln}
  enc/layer_i/mlp/{up,down}             dec/layer_i/mlp/{up,down}
  enc/final_ln, dec/final_ln (pre-LN)   dec/output/kernel [d, V] (untied)

`__call__` is the teacher-forced forward pass of training; `init_cache` + `decode_step` decode
one token at a time with a key/value cache (`wdjax/models/search.py` builds greedy and beam
search on them). The cache holds, per decoder layer, the self-attention keys and values written
so far `[batch, max_len, heads, head_dim]` and the cross-attention keys and values of the source,
computed once.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from wdjax.models.layers import DTYPES, dropout, split_keys
from wdjax.models.contract import GAIN, OUTPUT, leaf

Array = jax.Array
# the ids of the special tokens the family reserves (its joint BPE vocabularies start with them:
# `data/bible.py`); generation starts from BOS, stops at EOS, pads with PAD
PAD, BOS, EOS, UNK = 0, 1, 2, 3

# the family's own leaves (models/contract.py): the encoder's spaces are its own (`enc_*`: WD keeps
# its width while the decoder's shrinks); cross-attention reads the encoder's stream into an inner
# space of its own (`xattn`); the decoder's blocks are the shared layers'
PARAMETERS = (
    leaf(r"^enc/embed/embedding$", (None, "enc_hidden")),
    leaf(r"^enc/.*ln/scale$", ("enc_hidden",), GAIN),
    leaf(r"^enc/.*ln/bias$", ("enc_hidden",)),
    leaf(r"^enc/.*attn/(q|k|v)/kernel$", ("enc_hidden", "enc_attn")),
    leaf(r"^enc/.*attn/(q|k|v)/bias$", ("enc_attn",)),
    leaf(r"^enc/.*attn/o/kernel$", ("enc_attn", "enc_hidden")),
    leaf(r"^enc/.*mlp/up/kernel$", ("enc_hidden", "enc_ffn")),
    leaf(r"^enc/.*mlp/up/bias$", ("enc_ffn",)),
    leaf(r"^enc/.*mlp/down/kernel$", ("enc_ffn", "enc_hidden")),
    leaf(r"^enc/.*(attn/o|mlp/down)/bias$", ("enc_hidden",)),
    leaf(r"cross_attn/q/kernel$", ("hidden", "xattn")),
    leaf(r"cross_attn/(k|v)/kernel$", ("enc_hidden", "xattn")),
    leaf(r"cross_attn/(q|k|v)/bias$", ("xattn",)),
    leaf(r"cross_attn/o/kernel$", ("xattn", "hidden")),
    leaf(r"^dec/embed/embedding$", (None, "hidden")),
    leaf(r"^dec/output/kernel$", ("hidden", None), OUTPUT),
)


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Shape and numerics of an encoder-decoder (teacher or student)."""

  vocab_size: int = 8000  # joint source/target vocabulary
  hidden_size: int = 512  # decoder d_model
  num_heads: int = 8  # decoder attention heads
  intermediate_size: int = 2048  # decoder FFN width
  num_layers: int = 6  # decoder layers
  encoder_hidden_size: int = 512  # encoder d_model (the teacher's, in WD's students)
  encoder_heads: int = 8
  encoder_intermediate_size: int = 2048
  encoder_layers: int = 6
  pre_ln: bool = False  # False: post-LN (the paper's transformer_wmt_en_de); True: pre-LN
  tie_output: bool = False  # output projection = decoder embedding^T (else its own kernel)
  hidden_dropout: float = 0.1  # residual branches and embeddings
  attention_dropout: float = 0.1  # attention probabilities
  relu_dropout: float = 0.0  # inside the FFN
  layer_norm_eps: float = 1e-5
  dtype: str = "float32"  # compute dtype; parameters stay fp32

  def __post_init__(self):
    for d, h, side in ((self.hidden_size, self.num_heads, "decoder"),
                       (self.encoder_hidden_size, self.encoder_heads, "encoder")):
      if d % h:
        raise ValueError(f"{side} width {d} is not divisible by its {h} heads")
    if self.dtype not in DTYPES:
      raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")

  @property
  def compute_dtype(self):
    return DTYPES[self.dtype]


def sinusoids(positions: Array, d: int) -> Array:
  """fairseq's sinusoidal embedding: `[..., d]`, sines in the first half, cosines in the second."""
  half = d // 2
  freq = jnp.exp(jnp.arange(half, dtype=jnp.float32) * -(math.log(10000.0) / max(half - 1, 1)))
  angles = positions.astype(jnp.float32)[..., None] * freq
  out = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
  return jnp.pad(out, [(0, 0)] * (out.ndim - 1) + [(0, d - 2 * half)])


def dense(d_in: int, d_out: int, dtype, rngs: nnx.Rngs, bias: bool = True) -> nnx.Linear:
  return nnx.Linear(d_in, d_out, use_bias=bias, dtype=dtype, param_dtype=jnp.float32,
                    kernel_init=nnx.initializers.xavier_uniform(), rngs=rngs)


def _embed(vocab: int, d: int, rngs: nnx.Rngs) -> nnx.Embed:
  # N(0, d^-1/2): with the sqrt(d) scale of the forward pass, embeddings start at unit scale
  return nnx.Embed(vocab, d, param_dtype=jnp.float32,
                   embedding_init=nnx.initializers.normal(d ** -0.5), rngs=rngs)


def _ln(d: int, eps: float, rngs: nnx.Rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(d, epsilon=eps, dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs)


def _attend(q: Array, k: Array, v: Array, mask: Array, rate: float, key: Array | None) -> Array:
  """`q [b, tq, h, hd]`, `k, v [b, tk, h, hd]`, `mask` broadcastable to `[b, h, tq, tk]`."""
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / math.sqrt(q.shape[-1])
  scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  probs = dropout(jax.nn.softmax(scores, axis=-1), rate, key)
  return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)


class Attention(nnx.Module):
  """Multi-head attention from a `d_q` query stream to a `d_kv` memory, inner width `d`."""

  def __init__(self, d_q: int, d_kv: int, d: int, heads: int, cfg: TransformerConfig, rngs: nnx.Rngs):
    dt = cfg.compute_dtype
    self.heads, self.rate = heads, cfg.attention_dropout
    self.q, self.o = dense(d_q, d, dt, rngs), dense(d, d_q, dt, rngs)
    self.k, self.v = dense(d_kv, d, dt, rngs), dense(d_kv, d, dt, rngs)

  def split(self, y: Array) -> Array:
    return rearrange(y, "... (h d) -> ... h d", h=self.heads)

  def project_kv(self, memory: Array) -> tuple[Array, Array]:
    return self.split(self.k(memory)), self.split(self.v(memory))

  def __call__(self, x: Array, k: Array, v: Array, mask: Array, key: Array | None) -> Array:
    ctx = _attend(self.split(self.q(x)), k, v, mask, self.rate, key)
    return self.o(rearrange(ctx, "... h d -> ... (h d)"))


class Mlp(nnx.Module):

  def __init__(self, d: int, ffn: int, cfg: TransformerConfig, rngs: nnx.Rngs):
    self.up, self.down = dense(d, ffn, cfg.compute_dtype, rngs), dense(ffn, d, cfg.compute_dtype, rngs)
    self.rate = cfg.relu_dropout

  def __call__(self, x: Array, key: Array | None) -> Array:
    return self.down(dropout(jax.nn.relu(self.up(x)), self.rate, key))


def _residual(ln: nnx.LayerNorm, x: Array, branch, pre_ln: bool, rate: float, key: Array | None) -> Array:
  """`x + drop(branch(ln(x)))` (pre-LN) or `ln(x + drop(branch(x)))` (post-LN)."""
  if pre_ln:
    return x + dropout(branch(ln(x).astype(x.dtype)), rate, key)
  return ln(x + dropout(branch(x), rate, key)).astype(x.dtype)


class EncoderLayer(nnx.Module):

  def __init__(self, cfg: TransformerConfig, rngs: nnx.Rngs):
    d = cfg.encoder_hidden_size
    self.attn = Attention(d, d, d, cfg.encoder_heads, cfg, rngs)
    self.attn_ln = _ln(d, cfg.layer_norm_eps, rngs)
    self.mlp = Mlp(d, cfg.encoder_intermediate_size, cfg, rngs)
    self.mlp_ln = _ln(d, cfg.layer_norm_eps, rngs)
    self.cfg = cfg

  def __call__(self, x: Array, mask: Array, key: Array | None) -> Array:
    k = split_keys(key, 4)
    c = self.cfg

    def self_attn(y):
      kv = self.attn.project_kv(y)
      return self.attn(y, *kv, mask, k[0])

    x = _residual(self.attn_ln, x, self_attn, c.pre_ln, c.hidden_dropout, k[1])
    return _residual(self.mlp_ln, x, lambda y: self.mlp(y, k[2]), c.pre_ln, c.hidden_dropout, k[3])


class DecoderLayer(nnx.Module):

  def __init__(self, cfg: TransformerConfig, rngs: nnx.Rngs):
    d, h = cfg.hidden_size, cfg.num_heads
    self.self_attn = Attention(d, d, d, h, cfg, rngs)
    self.self_attn_ln = _ln(d, cfg.layer_norm_eps, rngs)
    self.cross_attn = Attention(d, cfg.encoder_hidden_size, d, h, cfg, rngs)
    self.cross_attn_ln = _ln(d, cfg.layer_norm_eps, rngs)
    self.mlp = Mlp(d, cfg.intermediate_size, cfg, rngs)
    self.mlp_ln = _ln(d, cfg.layer_norm_eps, rngs)
    self.cfg = cfg

  def __call__(self, x: Array, self_kv: Callable | None, self_mask: Array,
               cross_kv: tuple[Array, Array], cross_mask: Array, key: Array | None
               ) -> tuple[Array, tuple[Array, Array]]:
    """`self_kv=None`: keys/values from `x` itself (training); else `self_kv(this step's (k, v))`
    writes them into the cache and returns the cache's. Returns the output and this step's (k, v)."""
    k = split_keys(key, 6)
    c = self.cfg
    new_kv = []

    def self_attn(y):
      kv = self.self_attn.project_kv(y)
      new_kv.append(kv)
      full = kv if self_kv is None else self_kv(kv)
      return self.self_attn(y, *full, self_mask, k[0])

    x = _residual(self.self_attn_ln, x, self_attn, c.pre_ln, c.hidden_dropout, k[1])
    x = _residual(self.cross_attn_ln, x, lambda y: self.cross_attn(y, *cross_kv, cross_mask, k[2]),
                  c.pre_ln, c.hidden_dropout, k[3])
    x = _residual(self.mlp_ln, x, lambda y: self.mlp(y, k[4]), c.pre_ln, c.hidden_dropout, k[5])
    return x, new_kv[0]


class Encoder(nnx.Module):

  def __init__(self, cfg: TransformerConfig, rngs: nnx.Rngs):
    d = cfg.encoder_hidden_size
    self.embed = _embed(cfg.vocab_size, d, rngs)
    for i in range(cfg.encoder_layers):
      setattr(self, f"layer_{i}", EncoderLayer(cfg, rngs))
    if cfg.pre_ln:
      self.final_ln = _ln(d, cfg.layer_norm_eps, rngs)
    self.cfg = cfg

  def __call__(self, ids: Array, mask: Array, key: Array | None) -> Array:
    c = self.cfg
    k = split_keys(key, c.encoder_layers + 1)
    pos = jnp.arange(ids.shape[1])
    x = self.embed(ids) * math.sqrt(c.encoder_hidden_size) + sinusoids(pos, c.encoder_hidden_size)
    x = dropout(x, c.hidden_dropout, k[-1]).astype(c.compute_dtype)
    attn_mask = mask[:, None, None, :].astype(bool)  # [b, 1, 1, src]
    for i in range(c.encoder_layers):
      x = getattr(self, f"layer_{i}")(x, attn_mask, k[i])
    if c.pre_ln:
      x = self.final_ln(x).astype(c.compute_dtype)
    return x  # [batch, src, d_enc]


class Decoder(nnx.Module):

  def __init__(self, cfg: TransformerConfig, rngs: nnx.Rngs):
    d = cfg.hidden_size
    self.embed = _embed(cfg.vocab_size, d, rngs)
    for i in range(cfg.num_layers):
      setattr(self, f"layer_{i}", DecoderLayer(cfg, rngs))
    if cfg.pre_ln:
      self.final_ln = _ln(d, cfg.layer_norm_eps, rngs)
    if not cfg.tie_output:
      self.output = dense(d, cfg.vocab_size, cfg.compute_dtype, rngs, bias=False)
    self.cfg = cfg

  def embed_tokens(self, ids: Array, positions: Array, key: Array | None) -> Array:
    c = self.cfg
    x = self.embed(ids) * math.sqrt(c.hidden_size) + sinusoids(positions, c.hidden_size)
    return dropout(x, c.hidden_dropout, key).astype(c.compute_dtype)

  def logits(self, x: Array) -> Array:
    c = self.cfg
    if c.pre_ln:
      x = self.final_ln(x).astype(c.compute_dtype)
    if c.tie_output:
      return jnp.einsum("...d,vd->...v", x, self.embed.embedding[...].astype(x.dtype))
    return self.output(x)


class Transformer(nnx.Module):

  def __init__(self, cfg: TransformerConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    self.enc = Encoder(cfg, rngs)
    self.dec = Decoder(cfg, rngs)

  def __call__(self, src_ids: Array, src_mask: Array, tgt_in: Array,
               dropout_key: Array | None = None) -> Array:
    """Teacher-forced logits `[batch, tgt, vocab]` of `tgt_in [batch, tgt]` (<s> first)."""
    k_enc, k_dec = split_keys(dropout_key, 2)
    memory = self.enc(src_ids, src_mask, k_enc)
    c = self.cfg
    k = split_keys(k_dec, c.num_layers + 1)
    t = tgt_in.shape[1]
    x = self.dec.embed_tokens(tgt_in, jnp.arange(t), k[-1])
    causal = jnp.tril(jnp.ones((t, t), bool))[None, None]  # [1, 1, t, t]
    cross_mask = src_mask[:, None, None, :].astype(bool)
    for i in range(c.num_layers):
      layer = getattr(self.dec, f"layer_{i}")
      x, _ = layer(x, None, causal, layer.cross_attn.project_kv(memory), cross_mask, k[i])
    return self.dec.logits(x)

  def init_cache(self, src_ids: Array, src_mask: Array, max_len: int, repeat: int = 1) -> dict:
    """Encode the source once; empty self-attention caches for `max_len` target positions. With
    `repeat=k` (beam search) every sentence's rows are repeated k times after encoding, so the
    encoder and the cross-attention projections run once per sentence, not once per beam."""
    c = self.cfg
    memory = self.enc(src_ids, src_mask, None)
    rep = lambda x: jnp.repeat(x, repeat, axis=0)
    b, hd = src_ids.shape[0] * repeat, c.hidden_size // c.num_heads
    cache = {"src_mask": rep(src_mask.astype(jnp.int32))}
    for i in range(c.num_layers):
      layer = getattr(self.dec, f"layer_{i}")
      ck, cv = (rep(x) for x in layer.cross_attn.project_kv(memory))
      zeros = jnp.zeros((b, max_len, c.num_heads, hd), c.compute_dtype)
      cache[f"layer_{i}"] = {"k": zeros, "v": zeros, "cross_k": ck, "cross_v": cv}
    return cache

  def decode_step(self, tokens: Array, position: Array, cache: dict) -> tuple[Array, dict]:
    """Logits `[batch, vocab]` of the next token after `tokens [batch]` at `position` (a scalar:
    every row is at the same step), and the cache with this position's keys/values written."""
    c = self.cfg
    x = self.dec.embed_tokens(tokens[:, None], position[None], None)  # [b, 1, d]
    max_len = cache["layer_0"]["k"].shape[1]
    self_mask = (jnp.arange(max_len) <= position)[None, None, None, :]
    cross_mask = cache["src_mask"][:, None, None, :].astype(bool)
    new = {"src_mask": cache["src_mask"]}
    for i in range(c.num_layers):
      layer, lc = getattr(self.dec, f"layer_{i}"), cache[f"layer_{i}"]
      written = {}

      def write(kv, lc=lc, written=written):
        k = jax.lax.dynamic_update_slice_in_dim(lc["k"], kv[0].astype(lc["k"].dtype), position, axis=1)
        v = jax.lax.dynamic_update_slice_in_dim(lc["v"], kv[1].astype(lc["v"].dtype), position, axis=1)
        written.update(k=k, v=v)
        return k, v

      x, _ = layer(x, write, self_mask, (lc["cross_k"], lc["cross_v"]), cross_mask, None)
      new[f"layer_{i}"] = dict(lc, **written)
    return self.dec.logits(x)[:, 0], new


def build(cfg: TransformerConfig, seed: int = 0) -> Transformer:
  return Transformer(cfg, nnx.Rngs(seed))


# A trained model is a directory: config.json (this config, "model_type": "wdjax-transformer"),
# model.safetensors (the '/'-joined parameter paths), tokenizer.json (the joint BPE).
MODEL_TYPE = "wdjax-transformer"


def save(out_dir, cfg: TransformerConfig, params, tokenizer_dir=None):
  """Write the model directory atomically (a temporary sibling renamed into place)."""
  import json
  from pathlib import Path

  import numpy as np
  from safetensors.numpy import save_file

  from wdjax.models import hf

  flat = {"/".join(str(getattr(k, "key", k)) for k in p): np.asarray(x, np.float32)
          for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  out = Path(out_dir)
  with hf.atomic_directory(out) as tmp:
    save_file(flat, str(tmp / "model.safetensors"))
    (tmp / "config.json").write_text(json.dumps(
        {"model_type": MODEL_TYPE, **dataclasses.asdict(cfg)}, indent=2) + "\n")
    hf.copy_tokenizer(tokenizer_dir, tmp)
  return out


def load(model_dir, **overrides) -> tuple[TransformerConfig, dict]:
  """(config, params) of a saved model; `overrides` replace config fields (dtype, dropout)."""
  import json
  from pathlib import Path

  from safetensors import SafetensorError
  from safetensors.numpy import load_file

  from wdjax.errors import WdjaxError
  from wdjax import trees

  d = Path(model_dir)
  try:
    raw = json.loads((d / "config.json").read_text())
  except (OSError, ValueError) as e:
    raise WdjaxError(f"{d} is not a wdjax translation model ({e})") from None
  if raw.pop("model_type", None) != MODEL_TYPE:
    raise WdjaxError(f"{d}/config.json is not a {MODEL_TYPE} config")
  try:
    cfg = dataclasses.replace(TransformerConfig(**raw), **overrides)
    flat = load_file(str(d / "model.safetensors"))
  except (TypeError, ValueError, OSError, SafetensorError) as e:
    raise WdjaxError(f"cannot load {d}: {e}") from None
  expected = trees.flatten(jax.eval_shape(lambda: nnx.to_pure_dict(nnx.state(build(cfg)))))
  for path, spec in expected.items():
    if path not in flat or flat[path].shape != spec.shape:
      got = flat[path].shape if path in flat else "missing"
      raise WdjaxError(f"{d}/model.safetensors: {path} is {got}, the config needs {spec.shape}")
  return cfg, trees.unflatten({p: flat[p] for p in expected})
