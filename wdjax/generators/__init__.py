"""Parameter generators: teacher parameters -> student parameters (see base.py for the contract).

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

from typing import Any

from wdjax.generators.base import Generator, Identity, StudentSpec, param_count
from wdjax.generators.select import WeightSelection, select
from wdjax.generators.squeeze import WeightSqueezing
from wdjax.generators.wd import WeightDistillation
from wdjax.generators.opdf import MatrixProductOperator
from wdjax.generators.wid import SURGERIES, STRATEGIES, WeightInherited
from wdjax.generators import paths

METHODS = ("kd", "select", "ws", "gws", "wd", "wid", "opdf")

# the values each choice field of `method` takes (the generators refuse others as well)
CHOICES = {
    "init": ("random", "selection"),
    "layer_map": ("",) + paths.LAYER_MAPS,
    "sharing": ("role", "tensor"),
    "map_init": ("identity", "xavier", "pca"),
    "layer_mix": ("fixed", "learned"),
    "gate": ("matrix", "row", "element"),
    "wd_mode": ("faithful", "lean"),
    "wd_init": ("xavier", "identity"),
    "wid_strategy": STRATEGIES,
    "wid_objective": ("task", "mlm"),
    "wid_surgery": SURGERIES,
    "opdf_start": ("selection", "random"),
}


def check(method) -> list[str]:
  """Problems of a `method` config section, each as `method.key=value (rule)`."""
  bad = []
  if method.name not in METHODS:
    bad.append(f"method.name={method.name!r} (one of {', '.join(METHODS)})")
  for key, allowed in CHOICES.items():
    value = getattr(method, key)
    if value not in allowed:
      bad.append(f"method.{key}={value!r} (one of {', '.join(repr(a) if a == '' else a for a in allowed)})")
  if method.name == "wid" and method.wid_w_step < 0:
    bad.append(f"method.wid_w_step={method.wid_w_step} (must be >= 0; 0 = phase-1 steps // 20)")
  if method.opdf_cores < 2:
    bad.append(f"method.opdf_cores={method.opdf_cores} (an MPO needs at least 2 cores)")
  if not 0 < method.phase1_fraction <= 1:
    bad.append(f"method.phase1_fraction={method.phase1_fraction!r} (must be in (0, 1])")
  return bad


def make(name: str, student_shapes: Any = None, teacher_shapes: Any = None, **options) -> Generator:
  """The generator `name`, planned for these student and teacher parameter shapes."""
  if name == "kd":
    return Identity()
  if name == "select":
    return WeightSelection(student_shapes, teacher_shapes, **options)
  if name in ("ws", "gws"):
    return WeightSqueezing(student_shapes, teacher_shapes, gated=name == "gws", **options)
  if name == "wd":
    return WeightDistillation(student_shapes, teacher_shapes, **options)
  if name == "wid":
    return WeightInherited(student_shapes, teacher_shapes, **options)
  if name == "opdf":
    return MatrixProductOperator(student_shapes, teacher_shapes, **options)
  raise ValueError(f"unknown method {name!r}; available: {', '.join(METHODS)}")


__all__ = ["CHOICES", "METHODS", "check", "Generator", "Identity", "MatrixProductOperator", "StudentSpec", "WeightDistillation",
           "WeightInherited", "WeightSelection", "WeightSqueezing", "make", "param_count", "select"]
