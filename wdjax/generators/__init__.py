"""Parameter generators: teacher parameters -> student parameters (see base.py for the contract)."""

from wdjax.generators.base import GENERATORS, Generator, Identity, StudentSpec, param_count

__all__ = ["GENERATORS", "Generator", "Identity", "StudentSpec", "param_count"]
