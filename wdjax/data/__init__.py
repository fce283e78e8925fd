"""Data: TFDS builders for the offline real data, tokenisation, and the batch pipeline."""
