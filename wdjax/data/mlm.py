"""Masked-language-model batches (BERT's recipe) from any tokenised text batch.

Per sequence, `rate` of the non-special tokens (at least one) are chosen for prediction, capped
at `max_predictions` so every batch has the static shape `[batch, max_predictions]`; a chosen
token becomes `[MASK]` 80% of the time, a random vocabulary token 10%, and stays 10%. Masking is
dynamic (new positions every step) but a pure function of `(seed, step)`, so a resumed run sees
the same batches.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class MlmMasking:
  mask_id: int
  vocab_size: int
  special_ids: tuple[int, ...]  # never predicted: [CLS], [SEP], [PAD], ...
  rate: float = 0.15
  max_predictions: int = 10
  seed: int = 0

  def __call__(self, batch: dict[str, np.ndarray], step: int) -> dict[str, np.ndarray]:
    """`batch` with masked `input_ids`, `labels`/`label_weights` `[batch, max_predictions]`
    (the original ids; weight 0 for unused slots and padding rows) and `mlm_positions`."""
    rng = np.random.default_rng([self.seed, 104_729, step])
    ids = batch["input_ids"]
    b, seq = ids.shape
    k = self.max_predictions
    candidate = (batch["attention_mask"] > 0) & ~np.isin(ids, self.special_ids)
    n = np.minimum(np.maximum(1, np.round(self.rate * candidate.sum(1))), k).astype(int)
    n = np.where(candidate.any(1), n, 0)
    # The n highest random scores among candidates, as k sorted slots (unused ones at the end).
    score = np.where(candidate, rng.random((b, seq)), -1.0)
    order = np.argsort(-score, axis=1, kind="stable")[:, :k]
    if order.shape[1] < k:
      order = np.pad(order, ((0, 0), (0, k - order.shape[1])))
    used = np.arange(k)[None, :] < n[:, None]
    positions = np.where(used, order, 0).astype(np.int32)
    rows = np.arange(b)[:, None]
    labels = np.where(used, ids[rows, positions], 0).astype(np.int32)
    roll = rng.random((b, k))
    replacement = np.where(roll < 0.8, self.mask_id,
                           np.where(roll < 0.9, rng.integers(0, self.vocab_size, (b, k)), labels))
    masked = ids.copy()
    r, c = np.nonzero(used)
    masked[r, positions[r, c]] = replacement[r, c]
    return dict(batch, input_ids=masked, labels=labels, mlm_positions=positions,
                label_weights=(used & (batch["weights"][:, None] > 0)).astype(np.float32))


def masking_for(tokenizer_dir, vocab_size: int, *, seed: int = 0, rate: float = 0.15,
                max_predictions: int = 10) -> MlmMasking:
  """The masking of a model's tokenizer: its mask token, and all its special tokens unmasked."""
  from pathlib import Path

  from tokenizers import Tokenizer

  from wdjax.errors import WdjaxError
  tok = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
  mask_id = next((i for t in ("[MASK]", "<mask>") if (i := tok.token_to_id(t)) is not None), None)
  if mask_id is None:
    raise WdjaxError(f"masked-LM training needs a mask token; {tokenizer_dir}'s tokenizer has none")
  special = tuple(sorted(i for i, t in tok.get_added_tokens_decoder().items() if t.special))
  return MlmMasking(mask_id, vocab_size, special, rate, max_predictions, seed)
