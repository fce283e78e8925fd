"""Greedy and beam search over `Transformer.decode_step` (key/value cache), jit-compiled.

Both are pure functions of `(params, src_ids, src_mask)` for a model graph, run as one
`lax.while_loop` that stops when every sentence is finished or `max_len` tokens were produced
(the last one is forced to </s>, so every output ends in </s>).

Beam search follows fairseq's `SequenceGenerator`, so its numbers compare with the paper's:
each step ranks the `2K` best continuations of the `K` live hypotheses; a candidate that ends in
</s> *and ranks within the first K* is finished with score `sum log p / length ** len_penalty`;
the `K` best other candidates live on; a sentence stops once it has `K` finished hypotheses, and
its answer is the best-scoring one. With `K = 1` this is exactly greedy search (a </s> outside
the top K never finishes a hypothesis), which the tests check.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from wdjax.models.transformer import BOS, EOS, PAD

NEG = -1e9


def _step(graphdef, params, tokens, position, cache):
  return nnx.merge(graphdef, params).decode_step(tokens, position, cache)


def _forced_eos(logp: jax.Array, t: jax.Array, max_len: int) -> jax.Array:
  """<pad> and <s> are never produced; at the last position only </s> is allowed."""
  ids = jnp.arange(logp.shape[-1])
  banned = (ids == PAD) | (ids == BOS) | ((t == max_len - 1) & (ids != EOS))
  return jnp.where(banned, NEG, logp)


@functools.partial(jax.jit, static_argnums=(0, 4))
def greedy(graphdef, params, src_ids: jax.Array, src_mask: jax.Array, max_len: int) -> jax.Array:
  """`[batch, max_len]` token ids: argmax continuations until </s>, then <pad>."""
  model = nnx.merge(graphdef, params)
  b = src_ids.shape[0]
  cache = model.init_cache(src_ids, src_mask, max_len)

  def body(carry):
    t, prev, out, done, cache = carry
    logits, cache = _step(graphdef, params, prev, t, cache)
    logp = _forced_eos(jax.nn.log_softmax(logits.astype(jnp.float32)), t, max_len)
    tok = jnp.where(done, PAD, jnp.argmax(logp, axis=-1)).astype(jnp.int32)
    out = out.at[:, t].set(tok)
    return t + 1, tok, out, done | (tok == EOS), cache

  def cond(carry):
    t, _, _, done, _ = carry
    return (t < max_len) & ~jnp.all(done)

  init = (jnp.zeros((), jnp.int32), jnp.full((b,), BOS, jnp.int32), jnp.full((b, max_len), PAD, jnp.int32),
          jnp.zeros((b,), bool), cache)
  return jax.lax.while_loop(cond, body, init)[2]


@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def beam_search(graphdef, params, src_ids: jax.Array, src_mask: jax.Array, max_len: int,
                beam: int, len_penalty: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """Best hypothesis per sentence: `([batch, max_len] ids ending in </s> then <pad>, [batch] score)`."""
  model = nnx.merge(graphdef, params)
  b, k = src_ids.shape[0], beam
  cache = model.init_cache(src_ids, src_mask, max_len, repeat=k)  # rows [b * k], beams of a sentence adjacent
  batch_idx = jnp.arange(b)[:, None]

  def body(c):
    t = c["t"]
    prev = c["seqs"][:, :, t].reshape(b * k)
    logits, cache = _step(graphdef, params, prev, t, c["cache"])
    logp = _forced_eos(jax.nn.log_softmax(logits.astype(jnp.float32)), t, max_len)
    vocab = logp.shape[-1]
    cand = (c["alive_lp"][:, :, None] + logp.reshape(b, k, vocab)).reshape(b, k * vocab)
    vals, idx = jax.lax.top_k(cand, 2 * k)  # [b, 2k]
    origin, tok = idx // vocab, (idx % vocab).astype(jnp.int32)
    seqs = c["seqs"][batch_idx, origin].at[:, :, t + 1].set(tok)  # [b, 2k, max_len + 1]
    is_eos = tok == EOS
    # finished: </s> within the first k candidates, for sentences still searching
    finishes = is_eos & (jnp.arange(2 * k) < k)[None] & ~c["done"][:, None] & (vals > NEG / 2)
    score = jnp.where(finishes, vals / ((t + 1).astype(jnp.float32) ** len_penalty), NEG)
    all_scores = jnp.concatenate([c["fin_scores"], score], axis=1)  # [b, 3k]
    all_seqs = jnp.concatenate([c["fin_seqs"], seqs], axis=1)
    fin_scores, keep = jax.lax.top_k(all_scores, k)
    fin_seqs = all_seqs[batch_idx, keep]
    fin_count = c["fin_count"] + jnp.sum(finishes, axis=1)
    # alive: the k best candidates that did not end in </s>
    alive_vals, pick = jax.lax.top_k(jnp.where(is_eos, NEG, vals), k)
    alive_seqs = seqs[batch_idx, pick]
    rows = (batch_idx * k + origin[batch_idx, pick]).reshape(b * k)  # cache rows to carry on
    # self-attention caches follow their hypotheses; the source's rows are the same in a beam
    cache = {n: v if n == "src_mask" else dict(v, k=v["k"][rows], v=v["v"][rows])
             for n, v in cache.items()}
    return {"t": t + 1, "seqs": alive_seqs, "alive_lp": alive_vals, "fin_seqs": fin_seqs,
            "fin_scores": fin_scores, "fin_count": fin_count, "done": fin_count >= k, "cache": cache}

  def cond(c):
    return (c["t"] < max_len) & ~jnp.all(c["done"])

  seqs = jnp.full((b, k, max_len + 1), PAD, jnp.int32).at[:, :, 0].set(BOS)
  init = {"t": jnp.zeros((), jnp.int32), "seqs": seqs,
          "alive_lp": jnp.full((b, k), NEG).at[:, 0].set(0.0),  # one live beam at the start
          "fin_seqs": seqs, "fin_scores": jnp.full((b, k), NEG), "fin_count": jnp.zeros((b,), jnp.int32),
          "done": jnp.zeros((b,), bool), "cache": cache}
  out = jax.lax.while_loop(cond, body, init)
  return out["fin_seqs"][:, 0, 1:], out["fin_scores"][:, 0]
