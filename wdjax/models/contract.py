"""The family contract for parameters: what every leaf of a model's tree *is*.

Each family module (`bert.py`, `vit.py`, `transformer.py`, ...) and the shared layers
(`layers.py`) declare a `PARAMETERS` table of `Leaf` rules; generators, the mesh's sharding and
export read *roles* and *tags* from here, never a family's paths.

- **Roles** name the space each axis lives in: the residual stream `hidden`, a layer's
  attention-inner space `attn` or FFN space `ffn`, the pooled space `pooled`, an encoder's own
  spaces `enc_hidden` / `enc_attn` / `enc_ffn` (encoder-decoders keep the encoder's width while
  the decoder's shrinks), cross-attention's `xattn`, grouped-query attention's key/value space
  `kv` (narrower than `attn`), attention heads `heads`. Axes without a
  role (vocabulary rows, positions, classes) are the same size in teacher and student. Two axes
  with one role live in one space: a map shared per role, or a selection of indices per role, is
  consistent across residual-connected tensors.
- **Tags** say what a leaf does for the methods (the constants below).

The rules of the family tables come first (their patterns name the family's own leaves and do
not overlap), then the shared layers'; within a table, the first rule whose pattern matches
(`re.search` on the `/`-joined path) and whose roles have the leaf's rank wins.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import pkgutil
import re

# --- tags -----------------------------------------------------------------------------------
OUTPUT = "output"  # the output projection (classifier, head, decoder output): WD maps it linearly
DECOMPOSE = "decompose"  # a block's attention / FFN matrix: OPDF trains it as an MPO chain
GAIN = "gain"  # a LayerNorm gain: a diagonal operator, mapped as diag(M^T diag(g) M)
SUMMED_EMBEDDING = "summed_embedding"  # a table summed into the stream before its LayerNorm (WID: one compactor)
RANKS_INPUT = "ranks_input"  # WID ranks the units of this kernel's input space by its norms
RANKS_HIDDEN = "ranks_hidden"  # WID ranks the residual stream by this kernel (its first layer's)
QUERY = "query"  # attention queries: rescaled when WID narrows the heads (1/sqrt(head size))
VOCAB_ROWS = "vocab_rows"  # a token table, one row per vocabulary entry (vocabulary compression)
VOCAB_COLUMNS = "vocab_columns"  # an output over the vocabulary on its last axis (lm_head, MLM bias)

# roles of the spaces inside a layer: a space of their own per layer, sharded over 'model'
INNER_SPACES = ("attn", "kv", "ffn", "enc_attn", "enc_ffn", "xattn")


@dataclasses.dataclass(frozen=True)
class Leaf:
  pattern: str  # regex searched in the leaf's path
  roles: tuple[str | None, ...]  # the role of each axis (its rank = the leaf's)
  tags: frozenset[str] = frozenset()


def leaf(pattern: str, roles: tuple[str | None, ...], *tags: str) -> Leaf:
  return Leaf(pattern, tuple(roles), frozenset(tags))


@functools.cache
def table() -> tuple[tuple[re.Pattern, Leaf], ...]:
  """Every family's rules (modules of `wdjax.models` in name order), then the shared layers'."""
  import wdjax.models as package
  families, shared = [], []
  for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
    module = importlib.import_module(f"{package.__name__}.{info.name}")
    rules = getattr(module, "PARAMETERS", None)
    if rules:
      (shared if info.name == "layers" else families).extend(rules)
  return tuple((re.compile(r.pattern), r) for r in families + shared)


@functools.lru_cache(maxsize=65536)
def lookup(path: str, ndim: int) -> Leaf | None:
  """The rule for the leaf at `path` of rank `ndim` (None when no rule matches)."""
  for pattern, rule in table():
    if len(rule.roles) == ndim and pattern.search(path):
      return rule
  return None


def roles(path: str, ndim: int) -> tuple[str | None, ...]:
  """The role of each axis of the leaf at `path` (all None when no rule matches)."""
  rule = lookup(path, ndim)
  return rule.roles if rule else (None,) * ndim


@functools.lru_cache(maxsize=65536)
def tags(path: str) -> frozenset[str]:
  """The tags of the leaf at `path` (the first rule whose pattern matches, of any rank)."""
  for pattern, rule in table():
    if pattern.search(path):
      return rule.tags
  return frozenset()


def has(path: str, tag: str) -> bool:
  return tag in tags(path)
