"""Parameter generators: teacher parameters -> student parameters (see base.py for the contract).

Each generator module registers its methods (`registry.Method`: how to build the generator,
which options it reads from the config's `method` section, the values of its choice fields);
every module of this package is imported here, so a new method is a new module.

| name   | generator                         | trainable leaves                                  |
|--------|-----------------------------------|---------------------------------------------------|
| kd     | Identity (the student itself)     | the student's weights                             |
| select | WeightSelection                   | none (a fixed slice of the teacher)               |
| ws     | WeightSqueezing                   | linear maps per space (or per tensor)             |
| gws    | WeightSqueezing(gated=True)       | maps + a student-shaped model + gates             |
| wd     | WeightDistillation                | per-tensor maps, layer mixes, tanh-affine A, B    |
| wid    | WeightInherited                   | compactors around every kernel + teacher weights  |
| opdf   | MatrixProductOperator             | MPO cores of every attention/FFN matrix + the rest |
"""

import importlib
import pkgutil
from typing import Any

from wdjax.generators import paths, registry
from wdjax.generators.base import Generator, Identity, StudentSpec, param_count
from wdjax.generators.registry import Context, Method
from wdjax.generators.select import WeightSelection, select

for _info in pkgutil.iter_modules(__path__):  # each module registers its methods on import
  importlib.import_module(f"{__name__}.{_info.name}")

METHODS = tuple(registry.registered())  # in the order the modules registered them
# choice fields every method shares (each method's own: its `Method.choices`)
COMMON_CHOICES = {"init": ("random", "selection"), "layer_map": ("",) + paths.LAYER_MAPS}


def method(name: str) -> Method:
  methods = registry.registered()
  if name not in methods:
    raise ValueError(f"unknown method {name!r}; available: {', '.join(methods)}")
  return methods[name]


def is_two_phase(name: str) -> bool:
  """Whether the method trains its generator in phase 1 and the materialised student in phase 2."""
  m = registry.registered().get(name)
  return m is not None and m.two_phase


def make(name: str, student_shapes: Any = None, teacher_shapes: Any = None, **options) -> Generator:
  """The generator `name`, planned for these student and teacher parameter shapes."""
  return method(name).build(student_shapes, teacher_shapes, **options)


def options_for(method_config, context: Context) -> dict:
  """The keyword options of `make` that the config's `method` section gives."""
  return method(method_config.name).options(method_config, context)


def check(method_config) -> list[str]:
  """Problems of a `method` config section, each as `method.key=value (rule)`."""
  bad = []
  if method_config.name not in METHODS:
    bad.append(f"method.name={method_config.name!r} (one of {', '.join(METHODS)})")
  choices = dict(COMMON_CHOICES)
  for m in registry.registered().values():
    choices.update(m.choices)
  for key, allowed in choices.items():
    value = getattr(method_config, key)
    if value not in allowed:
      bad.append(f"method.{key}={value!r} (one of {', '.join(repr(a) if a == '' else a for a in allowed)})")
  if method_config.wid_w_step < 0:
    bad.append(f"method.wid_w_step={method_config.wid_w_step} (must be >= 0; 0 = phase-1 steps // 20)")
  if method_config.opdf_cores < 2:
    bad.append(f"method.opdf_cores={method_config.opdf_cores} (an MPO needs at least 2 cores)")
  if not 0 < method_config.phase1_fraction <= 1:
    bad.append(f"method.phase1_fraction={method_config.phase1_fraction!r} (must be in (0, 1])")
  return bad


__all__ = ["COMMON_CHOICES", "METHODS", "Context", "Generator", "Identity", "Method", "StudentSpec",
           "WeightSelection", "check", "is_two_phase", "make", "method", "options_for", "param_count",
           "select"]
