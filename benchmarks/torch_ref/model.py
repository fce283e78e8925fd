"""A BERT sequence classifier as a function of a flat parameter dict (PyTorch).

Parameters are keyed by '/'-joined paths (`encoder/layer_0/attn/q/kernel`) with kernels laid out
`[in, out]`, so generated parameters (WS, WD, ...) plug in without a module tree; the forward
pass is the HF BertForSequenceClassification maths: post-LN blocks, exact GELU, tanh pooler on
the first token. Dropout is off unless `dropout=p` is given (parity compares deterministic steps;
`speed.py --dropout` times the step as it trains): then at wdjax's BERT sites, on the embeddings,
the attention probabilities (inside SDPA's kernel), both residual branches and the pooled output.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F


@dataclasses.dataclass(frozen=True)
class BertShape:
  num_layers: int
  hidden_size: int
  num_heads: int
  intermediate_size: int
  vocab_size: int = 30522
  max_positions: int = 512
  num_labels: int = 2
  eps: float = 1e-12


def _linear(p: dict, name: str, x: torch.Tensor) -> torch.Tensor:
  # F.linear, as nn.Linear: under autocast its output, bias included, is bf16; `x @ W + b`
  # would promote the bf16 product to fp32 on the fp32 bias, and every activation with it
  return F.linear(x, p[f"{name}/kernel"].t(), p[f"{name}/bias"])


def _ln(p: dict, name: str, x: torch.Tensor, eps: float, keep: torch.Tensor | None = None) -> torch.Tensor:
  if keep is None:
    return F.layer_norm(x, x.shape[-1:], p[f"{name}/scale"], p[f"{name}/bias"], eps)
  # WID's LayerNorm: statistics over the kept units only (what the cut student computes)
  n = keep.sum()
  mean = (x * keep).sum(-1, keepdim=True) / n
  var = (((x - mean) * keep) ** 2).sum(-1, keepdim=True) / n
  return (x - mean) * torch.rsqrt(var + eps) * p[f"{name}/scale"] + p[f"{name}/bias"]


def classifier_logits(p: dict, shape: BertShape, input_ids: torch.Tensor,
                      attention_mask: torch.Tensor, hidden_keep: torch.Tensor | None = None,
                      dropout: float = 0.0, first_token_last_layer: bool = False) -> torch.Tensor:
  """Logits `[batch, labels]` of `input_ids [batch, seq]`; `hidden_keep [hidden]` (0/1) makes
  every LayerNorm of the residual stream take its statistics over the kept units (WID);
  `dropout`: the training-mode rate of every dropout site (0: none); `first_token_last_layer`:
  the last layer's queries, attention output, residuals and FFN at the pooled token only, as
  wdjax computes them (keys and values at every token): the same logits, ~10% fewer FLOPs.
  Off by default: a PyTorch user's model (HF's) computes every token."""
  drop = (lambda y: F.dropout(y, dropout, training=True)) if dropout > 0 else (lambda y: y)
  b, t = input_ids.shape
  e = "encoder/embeddings"
  x = (p[f"{e}/word/embedding"][input_ids] + p[f"{e}/position/embedding"][:t][None]
       + p[f"{e}/token_type/embedding"][0])
  x = drop(_ln(p, f"{e}/ln", x, shape.eps, hidden_keep))
  mask = attention_mask.bool()[:, None, None, :]  # [batch, 1, 1, key]
  h = shape.num_heads
  for i in range(shape.num_layers):
    pre = f"encoder/layer_{i}"
    heads = lambda y: y.view(b, y.shape[1], h, -1).transpose(1, 2)  # [batch, heads, seq, head_dim]
    k, v = (heads(_linear(p, f"{pre}/attn/{n}", x)) for n in "kv")
    if first_token_last_layer and i == shape.num_layers - 1:
      x = x[:, :1]  # from here on only the row the pooler reads
    q = heads(_linear(p, f"{pre}/attn/q", x))
    ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
    ctx = ctx.transpose(1, 2).reshape(b, x.shape[1], -1)
    x = _ln(p, f"{pre}/attn_ln", x + drop(_linear(p, f"{pre}/attn/o", ctx)), shape.eps, hidden_keep)
    ffn = F.gelu(_linear(p, f"{pre}/mlp/up", x))
    x = _ln(p, f"{pre}/mlp_ln", x + drop(_linear(p, f"{pre}/mlp/down", ffn)), shape.eps, hidden_keep)
  pooled = torch.tanh(_linear(p, "pooler", x[:, 0]))
  return _linear(p, "classifier", drop(pooled)).float()


def init_params(shape: BertShape, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
  """Random parameters of this shape (N(0, 0.02) matrices, zero biases, unit LayerNorm gains)."""
  d, f = shape.hidden_size, shape.intermediate_size
  normal = lambda *s: torch.randn(*s, generator=generator) * 0.02
  p = {"encoder/embeddings/word/embedding": normal(shape.vocab_size, d),
       "encoder/embeddings/position/embedding": normal(shape.max_positions, d),
       "encoder/embeddings/token_type/embedding": normal(2, d),
       "encoder/embeddings/ln/scale": torch.ones(d), "encoder/embeddings/ln/bias": torch.zeros(d),
       "pooler/kernel": normal(d, d), "pooler/bias": torch.zeros(d),
       "classifier/kernel": normal(d, shape.num_labels), "classifier/bias": torch.zeros(shape.num_labels)}
  for i in range(shape.num_layers):
    pre = f"encoder/layer_{i}"
    for n, (a, c) in {"attn/q": (d, d), "attn/k": (d, d), "attn/v": (d, d), "attn/o": (d, d),
                      "mlp/up": (d, f), "mlp/down": (f, d)}.items():
      p[f"{pre}/{n}/kernel"], p[f"{pre}/{n}/bias"] = normal(a, c), torch.zeros(c)
    for n in ("attn_ln", "mlp_ln"):
      p[f"{pre}/{n}/scale"], p[f"{pre}/{n}/bias"] = torch.ones(d), torch.zeros(d)
  return p
