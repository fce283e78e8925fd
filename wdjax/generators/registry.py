"""The method registry: each generator module registers its methods here, with the options it
reads from the config's `method` section and the values its choice fields take.

A method is `Method(name, build, options, choices, two_phase)`:
  build(student_shapes, teacher_shapes, **options) -> Generator
  options(method_config, context) -> the keyword options of `build` (context: `Context`)
`two_phase` methods train their generator in phase 1 and the materialised student in phase 2.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any


@dataclasses.dataclass(frozen=True)
class Context:
  """What a method's options may depend on besides its config section."""

  teacher_heads: int  # attention heads of the teacher
  student_heads: int  # attention heads of the student
  phase1_steps: int  # steps of the phase that trains the generator


@dataclasses.dataclass(frozen=True)
class Method:
  name: str
  build: Callable[..., Any]
  options: Callable[[Any, Context], dict] = lambda method, context: {}
  choices: dict[str, tuple] = dataclasses.field(default_factory=dict)  # method field -> allowed values
  two_phase: bool = False


_METHODS: dict[str, Method] = {}


def register(*methods: Method) -> None:
  for m in methods:
    if m.name in _METHODS and _METHODS[m.name] != m:
      raise ValueError(f"method {m.name!r} is registered twice")
    _METHODS[m.name] = m


def registered() -> dict[str, Method]:
  return dict(_METHODS)
