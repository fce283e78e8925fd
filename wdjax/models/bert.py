"""The BERT family of encoders (Flax NNX) with sequence-classification and masked-LM heads:
BERT, RoBERTa, XLM-RoBERTa, DistilBERT, ELECTRA (discriminator) and MPNet.

One module family serves teachers and students: a student is the same code with a smaller
`EncoderConfig`. Every architecture is a post-LayerNorm Transformer; they differ in a few
`Features` (one row of `ARCHS` each), never in code paths named after them:

- token-type embeddings or none (MPNet, DistilBERT);
- position ids `0..seq-1`, or RoBERTa-style `cumsum(mask) * mask + pad_id` (RoBERTa, XLM-R, MPNet);
- MPNet's relative-position bias (T5-style bidirectional buckets), computed once per forward
  pass from one shared `[buckets, heads]` table and added to the attention scores of every layer;
- the classification head's activation (tanh; ReLU for DistilBERT, GELU for ELECTRA) and whether
  it applies dropout before its dense layer as well as after it (RoBERTa, ELECTRA, MPNet).

How each names its weights in Hugging Face files is `hf.py`'s business (`hf.DIALECTS`).

Parameters live in string-keyed paths (`layer_0/attn/q/kernel`, never integer keys) so that
generators can match them with path rules and Orbax can save them as they are. Kernels use the
Flax layout `[in, out]` (the transpose of torch's `Linear.weight`).

Dropout is explicit: pass `dropout_key` to train, omit it to evaluate; there is no RNG state
inside the module, so `nnx.split` yields parameters only.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx
from wdjax.errors import WdjaxError
from wdjax.models.layers import (DTYPES, Attention, Mlp, Rows, activations, dense, dropout, gelu,
                                 layer_norm, masked_norm, sow, split_keys, take_rows,
                                 unit_activations)
from wdjax.models.contract import OUTPUT, RANKS_INPUT, SUMMED_EMBEDDING, VOCAB_COLUMNS, VOCAB_ROWS, leaf

Array = jax.Array

# the family's own leaves (models/contract.py; the blocks' are the shared layers')
PARAMETERS = (
    leaf(r"encoder/embeddings/word/embedding$", (None, "hidden"), SUMMED_EMBEDDING, VOCAB_ROWS),
    leaf(r"encoder/embeddings/(position|token_type)/embedding$", (None, "hidden"), SUMMED_EMBEDDING),
    leaf(r"relative_bias/embedding$", (None, "heads")),
    leaf(r"pooler/kernel$", ("hidden", "pooled")),
    leaf(r"pooler/bias$", ("pooled",)),
    leaf(r"classifier/kernel$", ("pooled", None), OUTPUT, RANKS_INPUT),
    leaf(r"classifier/bias$", (None,), OUTPUT),
    leaf(r"mlm_dense/kernel$", ("hidden", "hidden")),
    leaf(r"mlm_dense/bias$", ("hidden",)),
    leaf(r"mlm_bias$", (None,), VOCAB_COLUMNS),
)


@dataclasses.dataclass(frozen=True)
class Features:
  """What sets one architecture of the family apart from BERT."""

  token_types: bool = True  # a token-type table summed into the embeddings
  padded_positions: bool = False  # RoBERTa's position ids: real tokens count from pad_id + 1
  relative_bias: bool = False  # MPNet's shared relative-position bias on the attention scores
  head_activation: str = "tanh"  # of the classification head's dense layer: tanh | relu | gelu
  head_dropout_first: bool = False  # dropout on the first token before the head's dense layer


ARCHS = {
    "bert": Features(),
    "roberta": Features(padded_positions=True, head_dropout_first=True),
    "xlm-roberta": Features(padded_positions=True, head_dropout_first=True),
    "electra": Features(head_activation="gelu", head_dropout_first=True),
    "distilbert": Features(token_types=False, head_activation="relu"),
    "mpnet": Features(token_types=False, padded_positions=True, relative_bias=True,
                      head_dropout_first=True),
}

_HEAD_ACTIVATIONS = {"tanh": jnp.tanh, "relu": jax.nn.relu, "gelu": gelu}


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
  """Shape and numerics of a BERT-family encoder (teacher or student)."""

  arch: str = "bert"  # a key of `ARCHS` (its HF `model_type`)
  vocab_size: int = 30522  # rows of the word-embedding table
  hidden_size: int = 384  # d_model
  num_layers: int = 6  # Transformer blocks
  num_heads: int = 12  # attention heads; head size = hidden_size // num_heads
  intermediate_size: int = 1536  # FFN inner width
  max_position_embeddings: int = 512  # rows of the absolute position table
  type_vocab_size: int = 2  # token-type rows (1 for RoBERTa; unused without token types)
  layer_norm_eps: float = 1e-12  # 1e-12 for BERT/MiniLM, 1e-5 for MPNet
  pad_token_id: int = 0  # 0 for BERT, 1 for MPNet
  relative_attention_num_buckets: int = 32  # with a relative bias (MPNet) only
  hidden_dropout: float = 0.1  # dropout on embeddings, residual branches and the head
  attention_dropout: float = 0.1  # dropout on attention probabilities
  num_labels: int = 2  # classifier outputs
  initializer_range: float = 0.02  # std of the truncated-normal init of fresh weights
  dtype: str = "float32"  # compute dtype ("bfloat16" for mixed precision); parameters stay fp32
  # jax.nn.dot_product_attention implementation: "auto" (cuDNN's fused flash attention on a GPU in
  # bf16/fp16 with head size <= 128, XLA otherwise), "xla" or "cudnn". cuDNN was 15% faster for a
  # whole KD step on an H100 (benchmarks/results/speed_gpu.md).
  attention: str = "auto"

  def __post_init__(self):
    if self.arch not in ARCHS:
      raise ValueError(f"arch must be one of {sorted(ARCHS)}, got {self.arch!r}")
    if self.hidden_size % self.num_heads:
      raise ValueError(
          f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
    if self.dtype not in DTYPES:
      raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
    if self.attention not in ("auto", "xla", "cudnn"):
      raise ValueError(f"attention must be 'auto', 'xla' or 'cudnn', got {self.attention!r}")

  @property
  def features(self) -> Features:
    return ARCHS[self.arch]

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def compute_dtype(self):
    return DTYPES[self.dtype]


def relative_position_bucket(relative_position: Array, num_buckets: int = 32,
                             max_distance: int = 128) -> Array:
  """T5/MPNet bidirectional bucketing of `memory - context` offsets -> int bucket ids."""
  n = -relative_position
  half = num_buckets // 2
  ret = (n < 0).astype(jnp.int32) * half
  n = jnp.abs(n)
  max_exact = half // 2
  is_small = n < max_exact
  # log-spaced buckets for large offsets; the float division by max_exact matches the reference.
  safe_n = jnp.maximum(n, 1).astype(jnp.float32)
  large = max_exact + (jnp.log(safe_n / max_exact) / math.log(max_distance / max_exact)
                       * (half - max_exact)).astype(jnp.int32)
  large = jnp.minimum(large, half - 1)
  return ret + jnp.where(is_small, n, large)


class Embeddings(nnx.Module):

  def __init__(self, cfg: EncoderConfig, rngs: nnx.Rngs):
    init = nnx.initializers.truncated_normal(cfg.initializer_range)
    self.cfg = cfg
    self.word = nnx.Embed(cfg.vocab_size, cfg.hidden_size, param_dtype=jnp.float32,
                          embedding_init=init, rngs=rngs)
    self.position = nnx.Embed(cfg.max_position_embeddings, cfg.hidden_size,
                              param_dtype=jnp.float32, embedding_init=init, rngs=rngs)
    if cfg.features.token_types:
      self.token_type = nnx.Embed(max(cfg.type_vocab_size, 1), cfg.hidden_size,
                                  param_dtype=jnp.float32, embedding_init=init, rngs=rngs)
    self.ln = layer_norm(cfg, cfg.hidden_size, rngs)

  def __call__(self, input_ids: Array, attention_mask: Array, token_type_ids: Array | None,
               dropout_key: Array | None, hidden_keep: Array | None = None) -> Array:
    cfg = self.cfg
    seq = input_ids.shape[1]
    padded = cfg.features.padded_positions
    # RoBERTa's and MPNet's positions start after the pad id (514 rows: 512 tokens); out of
    # range, an embedding lookup would give NaN, not an error.
    room = cfg.max_position_embeddings - (cfg.pad_token_id + 1 if padded else 0)
    if seq > room:
      raise WdjaxError(f"sequences of {seq} tokens are longer than the model's {room} positions")
    if padded:
      # RoBERTa positions: real tokens count from pad_id + 1; padding sits on pad_id.
      not_pad = (input_ids != cfg.pad_token_id).astype(jnp.int32)
      positions = jnp.cumsum(not_pad, axis=1) * not_pad + cfg.pad_token_id
      x = self.word(input_ids) + self.position(positions)
    else:
      # Positions 0..seq-1 in every row: a slice of the table, whose gradient is a sum over the
      # batch, not a scatter-add of batch x seq rows.
      x = self.word(input_ids) + self.position.embedding[...][:seq]
    if cfg.features.token_types:
      types = jnp.zeros_like(input_ids) if token_type_ids is None else token_type_ids
      x = x + _small_table_lookup(self.token_type.embedding[...], types)
    x = masked_norm(self.ln, x, hidden_keep)  # [batch, seq, hidden] fp32
    return dropout(x, cfg.hidden_dropout, dropout_key).astype(cfg.compute_dtype)


def _small_table_lookup(table: Array, ids: Array) -> Array:
  """`table[ids]` ([n, H] table, ids [B, S] -> [B, S, H]) as a one-hot product: its gradient is
  a [n, H] matrix product, not a scatter-add into n rows from every token, whose atomics on a
  GPU all hit the same row or two (BERT's token types: 0.33 ms a step at 32k tokens on an H100).
  HIGHEST precision keeps it an exact copy of the table's rows in float32."""
  one_hot = jax.nn.one_hot(ids, table.shape[0], dtype=table.dtype)
  return jnp.einsum("bsn,nh->bsh", one_hot, table, precision=jax.lax.Precision.HIGHEST)


class Block(nnx.Module):
  """Post-LN Transformer block: x = LN(x + Attn(x)); x = LN(x + MLP(x))."""

  def __init__(self, cfg: EncoderConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    self.attn = Attention(cfg, rngs)
    self.attn_ln = layer_norm(cfg, cfg.hidden_size, rngs)
    self.mlp = Mlp(cfg, rngs)
    self.mlp_ln = layer_norm(cfg, cfg.hidden_size, rngs)

  def __call__(self, x: Array, mask: Array, bias: Array | None, dropout_key: Array | None,
               hidden_keep: Array | None = None, rows: Rows = None) -> Array:
    """`[batch, seq, hidden]` -> the same, or at `rows` only (`take_rows`): `[batch, k, hidden]`."""
    k_attn, k_res1, k_res2 = split_keys(dropout_key, 3)
    rate = self.cfg.hidden_dropout
    attn = self.attn(x, mask, bias, k_attn, rows)
    h = masked_norm(self.attn_ln, take_rows(x, rows) + dropout(attn, rate, k_res1), hidden_keep)
    h = h.astype(self.cfg.compute_dtype)
    out = masked_norm(self.mlp_ln, h + dropout(self.mlp(h), rate, k_res2), hidden_keep)
    out = out.astype(self.cfg.compute_dtype)
    sow(self, "out", out)
    return out


class Encoder(nnx.Module):
  """Embeddings + `num_layers` blocks -> last hidden state `[batch, seq, hidden]`."""

  def __init__(self, cfg: EncoderConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embeddings = Embeddings(cfg, rngs)
    for i in range(cfg.num_layers):
      setattr(self, f"layer_{i}", Block(cfg, rngs))
    if cfg.features.relative_bias:
      self.relative_bias = nnx.Embed(
          cfg.relative_attention_num_buckets, cfg.num_heads, param_dtype=jnp.float32,
          embedding_init=nnx.initializers.truncated_normal(cfg.initializer_range), rngs=rngs)

  def layers(self) -> list[Block]:
    return [getattr(self, f"layer_{i}") for i in range(self.cfg.num_layers)]

  def position_bias(self, seq: int) -> Array | None:
    """MPNet's shared relative bias `[1, heads, seq, seq]` (None without one)."""
    if not self.cfg.features.relative_bias:
      return None
    pos = jnp.arange(seq)
    buckets = relative_position_bucket(pos[None, :] - pos[:, None],
                                       self.cfg.relative_attention_num_buckets)
    return jnp.transpose(self.relative_bias(buckets), (2, 0, 1))[None]

  def __call__(self, input_ids: Array, attention_mask: Array, token_type_ids: Array | None = None,
               *, dropout_key: Array | None = None,
               hidden_keep: Array | None = None, rows: Rows = None) -> Array:
    """Last hidden state `[batch, seq, hidden]`; every space's activations are sown as the
    module's intermediates (`activations` reads them). `hidden_keep` (`[hidden]` 0/1) restricts
    every LayerNorm's statistics to the kept units.

    `rows` (`take_rows`): the positions the caller reads, `[batch, k, hidden]` returned. The last
    layer then computes its queries, residuals, LayerNorms and FFN at those rows only (its keys
    and values need every row): the same numbers, and for a classifier's first token about 5/6
    of the last layer's work left out (its K and V projections remain)."""
    keys = split_keys(dropout_key, self.cfg.num_layers + 1)
    x = self.embeddings(input_ids, attention_mask, token_type_ids, keys[0], hidden_keep)
    sow(self, "embedded", x)
    mask = attention_mask.astype(bool)[:, None, None, :]  # [batch, 1, 1, key]
    bias = self.position_bias(input_ids.shape[1])
    last = self.cfg.num_layers - 1
    for i, (layer, key) in enumerate(zip(self.layers(), keys[1:])):
      x = layer(x, mask, bias, key, hidden_keep, rows if i == last else None)
    return x


class SequenceClassifier(nnx.Module):
  """Encoder + pooler (dense + the arch's activation) on the first token + linear classifier
  -> logits `[batch, labels]`.

  BERT names the two dense layers `pooler.dense` and `classifier`; RoBERTa, ELECTRA and MPNet
  `classifier.dense` and `classifier.out_proj`; DistilBERT `pre_classifier` and `classifier`.
  The maths differs in `Features` only, so one head serves them all.
  """

  def __init__(self, cfg: EncoderConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    self.encoder = Encoder(cfg, rngs)
    self.pooler = dense(cfg, cfg.hidden_size, cfg.hidden_size, rngs)
    self.classifier = dense(cfg, cfg.hidden_size, cfg.num_labels, rngs)

  def __call__(self, input_ids: Array, attention_mask: Array, token_type_ids: Array | None = None,
               *, dropout_key: Array | None = None, hidden_keep: Array | None = None,
               all_rows: bool = False) -> Array:
    """Logits `[batch, labels]`. The head reads the first token only, so the last layer computes
    that row only, unless `all_rows` (for reading every position's activations)."""
    k_enc, k_pre, k_post = split_keys(dropout_key, 3)
    rate = self.cfg.hidden_dropout
    h = self.encoder(input_ids, attention_mask, token_type_ids, dropout_key=k_enc,
                     hidden_keep=hidden_keep, rows=None if all_rows else slice(0, 1))
    first = h[:, 0]  # [batch, hidden]
    features = self.cfg.features
    if features.head_dropout_first:
      first = dropout(first, rate, k_pre)
    pooled = _HEAD_ACTIVATIONS[features.head_activation](self.pooler(first))
    sow(self, "pooled", pooled[:, None])  # [batch, 1, hidden]
    return self.classifier(dropout(pooled, rate, k_post)).astype(jnp.float32)


class MaskedLM(nnx.Module):
  """Encoder + MLM head with the decoder tied to the word embeddings -> `[batch, seq, vocab]`.

  BERT: dense -> GELU -> LayerNorm -> tied decoder + bias; every architecture's head is the same.
  """

  def __init__(self, cfg: EncoderConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    self.encoder = Encoder(cfg, rngs)
    self.mlm_dense = dense(cfg, cfg.hidden_size, cfg.hidden_size, rngs)
    self.mlm_ln = layer_norm(cfg, cfg.hidden_size, rngs)
    self.mlm_bias = nnx.Param(jnp.zeros((cfg.vocab_size,), jnp.float32))

  def __call__(self, input_ids: Array, attention_mask: Array, token_type_ids: Array | None = None,
               *, dropout_key: Array | None = None, positions: Array | None = None,
               hidden_keep: Array | None = None) -> Array:
    """Logits `[batch, seq, vocab]`, or `[batch, k, vocab]` at `positions [batch, k]` only (the
    head then costs k, not seq, vocabulary projections). `hidden_keep` as in `Encoder`; the
    head's LayerNorm lives in the hidden space too (the decoder is tied to the embeddings)."""
    # the last layer computes the rows the head reads only (`Encoder`'s `rows`)
    h = self.encoder(input_ids, attention_mask, token_type_ids, dropout_key=dropout_key,
                     hidden_keep=hidden_keep, rows=positions)
    h = masked_norm(self.mlm_ln, gelu(self.mlm_dense(h)), hidden_keep)
    h = h.astype(self.cfg.compute_dtype)
    table = self.encoder.embeddings.word.embedding[...].astype(self.cfg.compute_dtype)
    return (h @ table.T).astype(jnp.float32) + self.mlm_bias[...]


HEADS = {"classifier": SequenceClassifier, "mlm": MaskedLM}


def activation_fn(cfg: EncoderConfig):
  """`fn(params, batch) -> (activations, weights)` of a `SequenceClassifier` of `cfg` (float32):
  every space's activations at every row (`layers.activations`' names) and `weights [batch, seq]`
  (1 on real tokens), what the calibration passes of importance selection and PCA read."""
  graph = nnx.graphdef(nnx.eval_shape(lambda: build(dataclasses.replace(cfg, dtype="float32"))))

  def fn(params, batch):
    model = nnx.merge(graph, params)
    _, acts = activations(model, batch["input_ids"], batch["attention_mask"],
                          batch.get("token_type_ids"), all_rows=True)
    return unit_activations(acts), batch["attention_mask"]

  return fn


def build(cfg: EncoderConfig, head: str = "classifier", seed: int = 0) -> nnx.Module:
  """A freshly initialised model (random weights) of the given head type."""
  if head not in HEADS:
    raise ValueError(f"head must be one of {sorted(HEADS)}, got {head!r}")
  return HEADS[head](cfg, nnx.Rngs(params=seed))
