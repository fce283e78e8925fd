"""The device mesh and the sharding rules, written once.

One mesh `('data', 'model')` with Auto axes (jax.make_mesh defaults to Explicit in new JAX, and
auto-style sharded matmuls then fail, so the axis types are always passed). Batches are sharded
on 'data'. Parameters follow rules by path: Megatron-style tensor parallelism on 'model' (Q/K/V
and FFN-up split by output columns, O and FFN-down by input rows, so each block needs one
all-reduce), and with `fsdp` the largest remaining dimension divisible by the 'data' size is
sharded on 'data' too (ZeRO-3 style, for teachers too big to replicate). Everything else is
replicated.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from wdjax.errors import WdjaxError
from wdjax import trees

# (path regex, spec) for tensor parallelism on 'model'; paths are '/'-joined param dict keys.
MODEL_RULES: tuple[tuple[str, P], ...] = (
    (r"attn/(q|k|v)/kernel$", P(None, "model")),
    (r"attn/(q|k|v)/bias$", P("model")),
    (r"attn/o/kernel$", P("model", None)),
    (r"mlp/up/kernel$", P(None, "model")),
    (r"mlp/up/bias$", P("model")),
    (r"mlp/down/kernel$", P("model", None)),
)


def make_mesh(data: int = -1, model: int = 1, devices: list | None = None) -> Mesh:
  """A ('data', 'model') mesh over `devices` (default: all); data=-1 takes what model leaves."""
  devices = list(jax.devices() if devices is None else devices)
  if data == -1:
    if len(devices) % model:
      raise WdjaxError(f"mesh.model={model} does not divide the {len(devices)} devices")
    data = len(devices) // model
  if data * model > len(devices):
    raise WdjaxError(f"mesh {data}x{model} needs {data * model} devices, only {len(devices)} present")
  if data * model == len(devices) and devices == list(jax.devices()):
    return jax.make_mesh((data, model), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
  grid = np.asarray(devices[:data * model], dtype=object).reshape(data, model)
  return Mesh(grid, ("data", "model"), axis_types=(AxisType.Auto,) * 2)


def path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _spec_for(path: str, shape: tuple[int, ...], mesh: Mesh, fsdp: bool) -> P:
  spec = [None] * len(shape)
  if mesh.shape["model"] > 1:
    for pattern, rule in MODEL_RULES:
      # generators store per-layer leaves stacked over the layers ('.../layers/...', [L, ...]):
      # the rule applies to each layer's slice, the layer axis stays whole
      lead = len(shape) - len(rule)
      if re.search(pattern, path) and (lead == 0 or (lead == 1 and trees.is_stacked(path))):
        rule = (None,) * lead + tuple(rule)
        spec = [a if a is None or shape[i] % mesh.shape["model"] == 0 else None
                for i, a in enumerate(rule)]
        break
  if fsdp and mesh.shape["data"] > 1:
    free = [i for i in range(len(shape)) if spec[i] is None and shape[i] % mesh.shape["data"] == 0]
    if free:
      spec[max(free, key=lambda i: shape[i])] = "data"
  return P(*spec)


def param_shardings(tree: Any, mesh: Mesh, fsdp: bool = False) -> Any:
  """NamedShardings for a param-shaped pytree (arrays or ShapeDtypeStructs)."""
  return jax.tree_util.tree_map_with_path(
      lambda p, x: NamedSharding(mesh, _spec_for(path_str(p), tuple(np.shape(x)), mesh, fsdp)), tree)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P("data"))


def put_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Global arrays from this process's slice of the batch (leading axis sharded on 'data')."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
