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
from wdjax.generators.wid import WeightInherited

METHODS = ("kd", "select", "ws", "gws", "wd", "wid", "opdf")


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


__all__ = ["METHODS", "Generator", "Identity", "MatrixProductOperator", "StudentSpec", "WeightDistillation",
           "WeightInherited", "WeightSelection", "WeightSqueezing", "make", "param_count", "select"]
