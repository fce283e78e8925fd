"""wdjax: knowledge distillation through weights, in JAX."""

__version__ = "0.1.0"
