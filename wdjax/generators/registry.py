"""The method registry: each generator module registers its methods here, with its config
section (a `wdjax.config.MethodConfig` subclass), how the section becomes the generator's
options, and the values its fields may take.

A method is `Method(name, build, section, options, choices, check, two_phase)`:
  build(student_shapes, teacher_shapes, **options) -> Generator
  options(section, context) -> the keyword options of `build` (context: `Context`)
  choices: section field -> allowed values; check(section) -> problems as "method.key=value (rule)"
`two_phase` methods train their generator in phase 1 and the materialised student in phase 2
(their section is a `wdjax.config.TwoPhaseMethod`).
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
  section: type  # the method's config section, a wdjax.config.MethodConfig subclass
  options: Callable[[Any, Context], dict] = lambda method, context: {}
  choices: dict[str, tuple] = dataclasses.field(default_factory=dict)  # section field -> allowed values
  check: Callable[[Any], list[str]] = lambda method: []
  two_phase: bool = False


_METHODS: dict[str, Method] = {}


def register(*methods: Method) -> None:
  for m in methods:
    if m.name in _METHODS and _METHODS[m.name] != m:
      raise ValueError(f"method {m.name!r} is registered twice")
    _METHODS[m.name] = m


def registered() -> dict[str, Method]:
  return dict(_METHODS)
