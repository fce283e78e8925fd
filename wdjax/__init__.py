"""wdjax: knowledge distillation through weights, in JAX.

`wdjax.finetune`, `distill`, `export`, `evaluate`, `model_dir` and `load_config` are the Python API
(`wdjax/api.py`); importing `wdjax` alone loads none of JAX.
"""

__version__ = "0.1.0"

_API = ("load_config", "distill", "evaluate", "export", "finetune", "model_dir")


def __getattr__(name: str):
  if name in _API:
    from wdjax import api
    return getattr(api, name)
  raise AttributeError(f"module 'wdjax' has no attribute {name!r}")


def __dir__() -> list[str]:
  return sorted([*globals(), *_API])
