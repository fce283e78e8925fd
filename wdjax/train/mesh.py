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

from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from wdjax.errors import WdjaxError
from wdjax import trees
from wdjax.models import contract

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
    # tensor parallelism: every axis in a layer's inner space (attention heads, FFN units) is
    # split over 'model'. Generators store per-layer leaves stacked over the layers
    # ('.../layers/...', [L, ...]): the roles are those of each layer's slice, the layer axis
    # stays whole.
    for lead in (0, 1) if trees.is_stacked(path) else (0,):
      if lead < len(shape) and (rule := contract.lookup(path, len(shape) - lead)) is not None:
        spec = [None] * lead + ["model" if r in contract.INNER_SPACES and shape[lead + i] % mesh.shape["model"] == 0
                                else None for i, r in enumerate(rule.roles)]
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
