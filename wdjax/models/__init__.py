"""Models: NNX modules used functionally (`nnx.split` once, `nnx.merge` inside `jax.jit`)."""

from wdjax.models.bert import EncoderConfig, MaskedLM, SequenceClassifier, build

__all__ = ["EncoderConfig", "MaskedLM", "SequenceClassifier", "build"]
