"""Layers every family shares (Flax NNX): dense and LayerNorm constructors, the masked LayerNorm
of WID's training-time network, dropout with explicit keys, exact GELU, multi-head attention
(XLA's or cuDNN's fused kernel) and the FFN.

The modules read their sizes and numerics from the family's config, which has `hidden_size`,
`num_heads`, `head_dim`, `intermediate_size`, `attention_dropout`, `initializer_range`, `dtype`,
`compute_dtype` and `attention` (`bert.EncoderConfig`, `vit.ViTConfig`). Kernels are Flax's
`[in, out]`; parameters are float32 whatever the compute dtype.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from wdjax.models.contract import DECOMPOSE, GAIN, QUERY, RANKS_HIDDEN, RANKS_INPUT, leaf

Array = jax.Array


# every family's blocks: LayerNorms, attention and FFN leaves (models/contract.py)
PARAMETERS = (
    leaf(r"(ln|_ln)/scale$", ("hidden",), GAIN),
    leaf(r"(ln|_ln)/bias$", ("hidden",)),
    leaf(r"attn/q/kernel$", ("hidden", "attn"), DECOMPOSE, QUERY),
    leaf(r"attn/k/kernel$", ("hidden", "attn"), DECOMPOSE),
    leaf(r"attn/v/kernel$", ("hidden", "attn"), DECOMPOSE, RANKS_HIDDEN),
    leaf(r"attn/q/bias$", ("attn",), QUERY),
    leaf(r"attn/(k|v)/bias$", ("attn",)),
    leaf(r"attn/o/kernel$", ("attn", "hidden"), DECOMPOSE, RANKS_INPUT),
    leaf(r"mlp/up/kernel$", ("hidden", "ffn"), DECOMPOSE),
    leaf(r"mlp/up/bias$", ("ffn",)),
    leaf(r"mlp/down/kernel$", ("ffn", "hidden"), DECOMPOSE, RANKS_INPUT),
    leaf(r"(attn/o|mlp/down)/bias$", ("hidden",)),
)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}




def dense(cfg, d_in: int, d_out: int, rngs: nnx.Rngs, bias: bool = True) -> nnx.Linear:
  return nnx.Linear(
      d_in, d_out, use_bias=bias, dtype=cfg.compute_dtype, param_dtype=jnp.float32,
      kernel_init=nnx.initializers.truncated_normal(cfg.initializer_range), rngs=rngs)


def layer_norm(cfg, d: int, rngs: nnx.Rngs) -> nnx.LayerNorm:
  # Statistics in fp32 even under bf16 compute: LayerNorm is where bf16 loses accuracy.
  return nnx.LayerNorm(d, epsilon=cfg.layer_norm_eps, dtype=jnp.float32,
                       param_dtype=jnp.float32, rngs=rngs)


def masked_norm(ln: nnx.LayerNorm | nnx.RMSNorm, x: Array, keep: Array | None) -> Array:
  """`ln(x)`, or with `keep` (`[hidden]` of 0/1) a LayerNorm whose mean and variance (an
  RMSNorm's mean square) run over the kept units only: WID's training-time norm, which equals
  the cut student's once the dropped units carry zeros (their gain and shift are driven to zero
  as well)."""
  if keep is None:
    return ln(x)
  x = x.astype(jnp.float32)
  keep = keep.astype(jnp.float32)
  n = jnp.sum(keep)
  if isinstance(ln, nnx.RMSNorm):
    return x * jax.lax.rsqrt(jnp.sum(jnp.square(x) * keep, axis=-1, keepdims=True) / n + ln.epsilon) * ln.scale[...]
  mean = jnp.sum(x * keep, axis=-1, keepdims=True) / n
  var = jnp.sum(jnp.square((x - mean) * keep), axis=-1, keepdims=True) / n
  y = (x - mean) * jax.lax.rsqrt(var + ln.epsilon)
  return y * ln.scale[...] + ln.bias[...]


def dropout(x: Array, rate: float, key: Array | None) -> Array:
  if key is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def split_keys(key: Array | None, n: int) -> list[Array | None]:
  return [None] * n if key is None else list(jax.random.split(key, n))


Rows = slice | Array | None  # sequence positions a layer computes its outputs at (`take_rows`)


def sow(module: nnx.Module, name: str, value: Array) -> None:
  """Record `value` as `module`'s intermediate `name` when the call runs under
  `nnx.capture(..., nnx.Intermediate)` (activation PCA reads them that way). A plain call records
  nothing, so a module object stays unchanged and usable under any JAX transform."""
  if hasattr(module, "__captures__"):  # set by nnx.capture for the duration of the call
    module.sow(nnx.Intermediate, name, value)


# Where a family's sown activations live in its module tree -> the space each belongs to: the
# embedding output and the block outputs are the residual stream (`hidden`), `attn`/`ffn` a
# layer's inner spaces (the inputs of its output and down projections), `pooled` a pooler's output.
# `query`/`key` are a layer's attention queries and keys (intermediate distillation's maps).
_SOWN = {("encoder", "embedded"): "hidden/embeddings", ("decoder", "embedded"): "hidden/embeddings",
         ("pooled",): "pooled"}
_SOWN_IN_LAYER = {("out",): "hidden", ("attn", "inner"): "attn", ("mlp", "inner"): "ffn",
                  ("attn", "query"): "query", ("attn", "key"): "key"}
UNIT_SPACES = ("hidden", "attn", "ffn", "pooled")  # the spaces whose units importance ranks


def unit_activations(acts: dict[str, Array]) -> dict[str, Array]:
  """The activations of `UNIT_SPACES` only (what activation PCA and importance read)."""
  return {k: v for k, v in acts.items() if k.split("/")[0] in UNIT_SPACES}


def activations(model: nnx.Module, *args, **kwargs) -> tuple[Array, dict[str, Array]]:
  """`model(*args, **kwargs)` and the activations it sowed, by space: `hidden/embeddings`,
  `hidden/layer_l`, `attn/layer_l`, `ffn/layer_l`, `query/layer_l`, `key/layer_l` (`[batch, rows,
  width]`) and `pooled` (`[batch, 1, hidden]`). A layer that computes fewer rows than its input
  (`take_rows`) sows its first rows. `model` is a module, or a function whose first argument is
  one (`nnx.capture`'s)."""
  result, sown_state = nnx.capture(model, nnx.Intermediate)(*args, **kwargs)
  out = {}
  for path, sown in nnx.to_flat_state(sown_state):
    path = tuple(str(p) for p in path)
    if path in _SOWN:
      out[_SOWN[path]] = sown.get_value()[0]
    elif path[0] in ("encoder", "decoder") and path[1].startswith("layer_") and path[2:] in _SOWN_IN_LAYER:
      out[f"{_SOWN_IN_LAYER[path[2:]]}/{path[1]}"] = sown.get_value()[0]
  return result, out


def model_apply(graphdef, call):
  """`apply(params, batch, dropout_key, **kwargs) = call(model, batch, dropout_key, **kwargs)`, the
  model merged from `graphdef` and `params` inside the trace (the training step's and predictors'
  apply functions). `apply.with_activations` takes the same arguments and returns
  `(output, activations(...))`, what intermediate distillation reads."""

  def apply(params, batch, dropout_key, **kwargs):
    return call(nnx.merge(graphdef, params), batch, dropout_key, **kwargs)

  def with_activations(params, batch, dropout_key, **kwargs):
    return activations(lambda model: call(model, batch, dropout_key, **kwargs),
                       nnx.merge(graphdef, params))

  apply.with_activations = with_activations
  return apply


def take_rows(x: Array, rows: Rows) -> Array:
  """`x [batch, seq, ...]` at the sequence positions `rows`: None, all of them; a slice, the same
  ones in every sequence (`slice(0, 1)`: the first token, which a classification head reads); or
  `[batch, k]` int positions, per sequence (the masked tokens an MLM head reads)."""
  if rows is None:
    return x
  if isinstance(rows, slice):
    return x[:, rows]
  return jnp.take_along_axis(x, rows.reshape(*rows.shape, *(1,) * (x.ndim - 2)), axis=1)


def attention_implementation(cfg) -> str | None:
  """`implementation=` for jax.nn.dot_product_attention (None: XLA's), resolving "auto" by the
  default backend at trace time."""
  if cfg.attention != "auto":
    return None if cfg.attention == "xla" else cfg.attention
  fused_ok = cfg.dtype in ("bfloat16", "float16") and cfg.head_dim <= 128 and cfg.head_dim % 8 == 0
  return "cudnn" if fused_ok and jax.default_backend() == "gpu" else None


class Attention(nnx.Module):

  def __init__(self, cfg, rngs: nnx.Rngs):
    d = cfg.hidden_size
    self.cfg = cfg
    self.q = dense(cfg, d, d, rngs)
    self.k = dense(cfg, d, d, rngs)
    self.v = dense(cfg, d, d, rngs)
    self.o = dense(cfg, d, d, rngs)

  def __call__(self, x: Array, mask: Array, bias: Array | None, dropout_key: Array | None,
               rows: Rows = None) -> Array:
    """`x [batch, seq, hidden]` -> `[batch, seq, hidden]`, or with `rows` (`take_rows`) the
    outputs at those positions only, `[batch, k, hidden]`: queries from those rows, keys and
    values from all of them. `mask [batch, 1, 1, seq]`, `bias [1, heads, seq, seq]` or None."""
    cfg = self.cfg
    b = x.shape[0]
    split = lambda y: rearrange(y, "b t (h d) -> b t h d", h=cfg.num_heads)
    q, k, v = self.q(take_rows(x, rows)), self.k(x), self.v(x)
    sow(self, "query", q)  # [batch, rows, d]: what intermediate distillation's attention maps read
    sow(self, "key", k)
    q, k, v = split(q), split(k), split(v)
    if bias is not None and rows is not None:  # the bias at those query rows: [1 or b, heads, k, seq]
      bias = (bias[:, :, rows] if isinstance(rows, slice)
              else jnp.moveaxis(jnp.take(bias[0], rows, axis=1), 1, 0))
    t = q.shape[1]
    if dropout_key is None or cfg.attention_dropout == 0.0:
      # the few rows a head reads make a small product: XLA's (cuDNN's fused kernel is for
      # full-length queries, and its short-query cases are untested here)
      implementation = attention_implementation(cfg) if rows is None else None
      if implementation == "cudnn":  # cuDNN takes a mask only at the full [batch, 1, query, key] shape
        mask = jnp.broadcast_to(mask, (b, 1, t, mask.shape[-1]))
      ctx = jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, implementation=implementation)
    else:
      # Attention-probability dropout needs the probabilities, so the fused kernel is bypassed.
      scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / math.sqrt(cfg.head_dim)
      if bias is not None:
        scores = scores + bias
      scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
      probs = dropout(jax.nn.softmax(scores, axis=-1), cfg.attention_dropout, dropout_key)
      ctx = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)
    ctx = rearrange(ctx, "b t h d -> b t (h d)")
    sow(self, "inner", ctx)  # the attention-inner space (input of o)
    return self.o(ctx)


def gelu(x: Array) -> Array:
  """Exact GELU, 0.5·x·(1 + erf(x/√2)), as BERT's and PyTorch's `gelu` compute it: in float32,
  rounded once to `x`'s dtype. Same shape as `x`.

  Not `jax.nn.gelu(approximate=False)`: that evaluates erfc(-x/√2), whose XLA lowering computes
  both of erfc's branches (an exponential and two divisions per element), and the teacher's GELU
  over [32768, 3072] took 0.45 ms a layer on an H100 against 0.15 ms for PyTorch's."""
  x32 = x.astype(jnp.float32)
  return (0.5 * x32 * (1.0 + jax.lax.erf(x32 * (1.0 / math.sqrt(2.0))))).astype(x.dtype)


class Mlp(nnx.Module):

  def __init__(self, cfg, rngs: nnx.Rngs):
    self.up = dense(cfg, cfg.hidden_size, cfg.intermediate_size, rngs)
    self.down = dense(cfg, cfg.intermediate_size, cfg.hidden_size, rngs)

  def __call__(self, x: Array) -> Array:
    h = gelu(self.up(x))
    sow(self, "inner", h)  # [batch, seq, intermediate]: the FFN-inner space (input of down)
    return self.down(h)
