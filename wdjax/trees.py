"""Parameter trees as flat `{"a/b/c": leaf}` dicts, and per-layer leaves stacked over layers.

Leaves of layer l live under a `layer_<l>` path component (`encoder/layer_3/attn/q/kernel`);
a stack of them under `layers` (`encoder/layers/attn/q/kernel`, leading axis = layer).
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp

Params = Any

_LAYER = re.compile(r"(?:^|/)layer_(\d+)(?=/)")
_LAYERS = re.compile(r"(?:^|/)layers(?=/|$)")  # a stack of layers (see `stacked`)


def flatten(tree: Params) -> dict[str, Any]:
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    out["/".join(str(getattr(k, "key", k)) for k in path)] = leaf
  return out


def unflatten(flat: dict[str, Any]) -> Params:
  tree: dict = {}
  for path, leaf in flat.items():
    node = tree
    *parents, last = path.split("/")
    for k in parents:
      node = node.setdefault(k, {})
    node[last] = leaf
  return tree


def layer_of(path: str) -> int | None:
  m = _LAYER.search(path)
  return int(m.group(1)) if m else None


def stack_of(path: str) -> str:
  """The layer stack a layered leaf belongs to: the path before `layer_N` ('encoder/' in a
  BERT, 'enc/' or 'dec/' in an encoder-decoder); depth maps are planned per stack."""
  m = _LAYER.search(path)
  return path[:m.start() + (m.group(0).startswith("/"))] if m else ""


def stacked(path: str) -> str:
  """The name of a layered leaf's stack across layers ('encoder/layer_3/attn/q/kernel' ->
  'encoder/layers/attn/q/kernel'); a leaf outside the layers is its own name."""
  return _LAYER.sub(lambda m: m.group(0).replace(f"layer_{m.group(1)}", "layers"), path, count=1)


def is_stacked(name: str) -> bool:
  return _LAYERS.search(name) is not None


def layer_groups(leaf_paths) -> dict[str, list[str]]:
  """`{stack name: its leaves in layer order}`: the L per-layer copies of a leaf share one name;
  a leaf outside the layers is a group of one under its own name."""
  groups: dict[str, list[str]] = {}
  for p in leaf_paths:
    groups.setdefault(stacked(p), []).append(p)
  return {k: sorted(g, key=lambda p: layer_of(p) or 0) for k, g in groups.items()}


def stack_layers(flat: dict[str, Any]) -> dict[str, Any]:
  """Per-layer leaves stacked on a new leading axis under their stack names (the rest as is).

  Generators store per-layer parameters this way: one `[L, ...]` leaf per stack is one kernel
  per operation (a batched product, one optimizer update) where per-layer leaves are L."""
  return {k: jnp.stack([flat[p] for p in g]) if is_stacked(k) else flat[g[0]]
          for k, g in layer_groups(flat).items()}


def layer_names(name: str, n_layers: int) -> list[str]:
  """The per-layer names a stack name stands for ('attn/layers' -> 'attn/layer_0', ...)."""
  return [_LAYERS.sub(lambda m: m.group(0).replace("layers", f"layer_{i}"), name, count=1)
          for i in range(n_layers)]


def unstack_layers(flat: dict[str, Any]) -> dict[str, Any]:
  """The inverse of `stack_layers`: every leaf under a `layers` name split into its layers."""
  out = {}
  for k, x in flat.items():
    if is_stacked(k):
      out.update(zip(layer_names(k, x.shape[0]), x))
    else:
      out[k] = x
  return out


def with_layer(path: str, layer: int) -> str:
  return _LAYER.sub(lambda m: m.group(0).replace(f"layer_{m.group(1)}", f"layer_{layer}"), path, count=1)
