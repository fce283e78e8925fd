"""Parameter generators: teacher parameters -> student parameters (see base.py for the contract).

Each generator module defines its methods' config sections and registers them (`registry.Method`:
how to build the generator, its section and how it becomes the generator's options, the values
its fields may take); every module of this package is imported here, so a new method is a new
module.

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

from wdjax.config import DEPTH_SCORES, RankedStartMethod
from wdjax.generators import paths, registry
from wdjax.generators.base import Generator, Identity, OptimizerHooks, StudentSpec, param_count
from wdjax.generators.registry import Context, Method
from wdjax.generators.select import WeightSelection, select

for _info in pkgutil.iter_modules(__path__):  # each module registers its methods on import
  importlib.import_module(f"{__name__}.{_info.name}")

METHODS = tuple(registry.registered())  # in the order the modules registered them
LAYER_MAP_CHOICES = ("",) + paths.LAYER_MAPS  # `layer_map`, a field of every section


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


def options_for(section, context: Context) -> dict:
  """The keyword options of `make` that the config's `method` section gives."""
  return method(section.name).options(section, context)


def section(name: str, **fields):
  """The config section of method `name` with `fields` set: `section("wd", init="identity")`."""
  return method(name).section(**fields)


def check(section) -> list[str]:
  """Problems of a `method` config section, each as `method.key=value (rule)`."""
  if section.name not in METHODS:
    return [f"method.name={section.name!r} (one of {', '.join(METHODS)})"]
  m = method(section.name)
  if type(section) is not m.section:
    return [f"method.name={section.name!r} (the section is a {type(section).__name__}; {section.name}'s "
            f"is {m.section.__name__}: build it with generators.section({section.name!r}, ...))"]
  bad = []
  for key, allowed in dict(m.choices, layer_map=LAYER_MAP_CHOICES).items():
    value = getattr(section, key)
    if value not in allowed:
      bad.append(f"method.{key}={value!r} (one of {', '.join(repr(a) if a == '' else a for a in allowed)})")
  if m.two_phase and not 0 < section.phase1_fraction <= 1:
    bad.append(f"method.phase1_fraction={section.phase1_fraction!r} (must be in (0, 1])")
  if isinstance(section, RankedStartMethod):
    if section.depth_score not in DEPTH_SCORES:
      bad.append(f"method.depth_score={section.depth_score!r} (one of {', '.join(DEPTH_SCORES)})")
    if section.calibration_batches < 1:
      bad.append(f"method.calibration_batches={section.calibration_batches} (must be at least 1)")
  if m.two_phase and section.phase2_lr < 0:
    bad.append(f"method.phase2_lr={section.phase2_lr!r} (must be >= 0; 0 = distill.optim.lr)")
  return bad + m.check(section)


__all__ = ["LAYER_MAP_CHOICES", "METHODS", "Context", "Generator", "Identity", "Method", "OptimizerHooks",
           "StudentSpec",
           "WeightSelection", "check", "is_two_phase", "make", "method", "options_for", "param_count",
           "section", "select"]
