"""Vocabulary compression (`student.vocabulary=corpus`): the student keeps only the tokens its
training text uses.

The teacher is narrowed first, and everything else follows unchanged: its embedding rows (and
the tied or separate output columns, an MLM bias) of the kept tokens are gathered into a teacher
of a smaller vocabulary, and its `tokenizer.json` is rewritten to number the kept tokens 0..n-1.
On the training text that tokenizer gives exactly the teacher's tokens (renumbered), so the
narrowed teacher computes the same hidden states; its logits over the kept vocabulary are the
full teacher's at those ids, and a softmax over them renormalises its distribution there (a
language model's KD targets). Every method then distils that teacher; the exported student
carries the rewritten tokenizer and loads, tokenises and predicts in `transformers` as in wdjax.

Kept tokens: every id of the training split, the tokenizer's added and special tokens, and for a
byte-level BPE also every single-character token (any text stays encodable) and every token a
kept token is merged from (BPE applies merges through them). A WordPiece vocabulary keeps what
the text uses; a word of new text that needs a dropped piece becomes `[UNK]`. Which leaves hold
the vocabulary is the families' `VOCAB_ROWS` / `VOCAB_COLUMNS` tags (`models/contract.py`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from wdjax import trees
from wdjax.errors import WdjaxError
from wdjax.models import contract

MODES = ("teacher", "corpus")


def used_ids(split) -> np.ndarray:
  """The distinct token ids of a tokenised split (`ids [n, length]` with `lengths [n]`)."""
  real = np.arange(split.ids.shape[1])[None, :] < split.lengths[:, None]
  return np.unique(split.ids[real])


def kept_ids(tokenizer: dict, used: np.ndarray) -> np.ndarray:
  """Ascending old ids of the kept vocabulary (see the module docstring)."""
  model = tokenizer["model"]
  vocab = model["vocab"]
  keep = {int(i) for i in used} | {int(t["id"]) for t in tokenizer.get("added_tokens", [])}
  if model["type"] == "BPE":
    keep |= {i for tok, i in vocab.items() if len(tok) == 1}
    parts = {}
    for merge in model.get("merges", []):
      left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
      parts.setdefault(left + right, (left, right))
    by_id = {i: tok for tok, i in vocab.items()}
    todo = [by_id[i] for i in keep if i in by_id]
    while todo:
      tok = todo.pop()
      for part in parts.get(tok, ()):
        if vocab[part] not in keep:
          keep.add(vocab[part])
          todo.append(part)
  elif model["type"] == "WordPiece":
    keep.add(vocab[model["unk_token"]])
  else:
    raise WdjaxError(f"vocabulary compression reads BPE and WordPiece tokenizers, not {model['type']}")
  return np.asarray(sorted(keep), np.int64)


def compress_tokenizer(tokenizer: dict, kept: np.ndarray) -> dict:
  """`tokenizer` (a parsed tokenizer.json) over the kept tokens, renumbered by their order."""
  new_id = {int(old): new for new, old in enumerate(kept)}
  out = json.loads(json.dumps(tokenizer))
  model = out["model"]
  model["vocab"] = {tok: new_id[i] for tok, i in sorted(model["vocab"].items(), key=lambda kv: kv[1])
                    if i in new_id}
  if model["type"] == "BPE":
    kept_tokens = set(model["vocab"])
    merges = []
    for merge in tokenizer["model"].get("merges", []):
      left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
      if {left, right, left + right} <= kept_tokens:
        merges.append(merge)
    model["merges"] = merges
  for added in out.get("added_tokens", []):
    added["id"] = new_id[int(added["id"])]
  post = out.get("post_processor") or {}
  for special in (post.get("special_tokens") or {}).values():
    special["ids"] = [new_id[int(i)] for i in special["ids"]]
  for name in ("cls", "sep"):  # BertProcessing / RobertaProcessing: [token, id]
    if isinstance(post.get(name), list):
      post[name][1] = new_id[int(post[name][1])]
  return out


def compress_params(params: Any, kept: np.ndarray) -> Any:
  """The leaves tagged `VOCAB_ROWS` (axis 0) and `VOCAB_COLUMNS` (last axis) at the kept ids."""
  out = {}
  for path, x in trees.flatten(params).items():
    x = np.asarray(x)
    if contract.has(path, contract.VOCAB_ROWS):
      x = x[kept]
    elif contract.has(path, contract.VOCAB_COLUMNS):
      x = x[..., kept]
    out[path] = x
  return trees.unflatten(out)


def compress_config(config, kept: np.ndarray):
  """`config` with the kept vocabulary's size and its special-token ids renumbered."""
  new_id = {int(old): new for new, old in enumerate(kept)}
  changes = {"vocab_size": len(kept)}
  for f in dataclasses.fields(config):
    value = getattr(config, f.name)
    if f.name.endswith("_token_id") and isinstance(value, int):
      if value not in new_id:
        raise WdjaxError(f"{f.name} {value} is not among the kept tokens")
      changes[f.name] = new_id[value]
  return dataclasses.replace(config, **changes)


def write_tokenizer(src: Path, dest: Path, tokenizer: dict) -> None:
  """`dest` as `src`'s tokenizer files with `tokenizer` as tokenizer.json (and vocab.txt, for a
  WordPiece vocabulary, in the new order)."""
  from wdjax.models.hf import TOKENIZER_FILES, atomic_directory
  with atomic_directory(dest) as tmp:
    for name in TOKENIZER_FILES:
      if name not in ("tokenizer.json", "vocab.txt") and (src / name).is_file():
        shutil.copy2(src / name, tmp / name)
    (tmp / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False) + "\n", encoding="utf-8")
    if tokenizer["model"]["type"] == "WordPiece":
      order = sorted(tokenizer["model"]["vocab"].items(), key=lambda kv: kv[1])
      (tmp / "vocab.txt").write_text("".join(tok + "\n" for tok, _ in order), encoding="utf-8")


def compress_teacher(teacher, train_split, cache_dir: Path, log):
  """The teacher `Model` over the vocabulary `train_split` uses: its tokenizer rewritten into
  `cache_dir/vocab_<key>/` (written once), its vocabulary leaves gathered, its config's size and
  special ids renumbered; its sha256 is the teacher's and the kept ids' together."""
  src = Path(teacher.tokenizer_dir)
  tokenizer = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
  used = used_ids(train_split)
  kept = kept_ids(tokenizer, used)
  digest = hashlib.sha256(teacher.sha256.encode() + kept.tobytes()).hexdigest()
  dest = Path(cache_dir) / f"vocab_{digest[:16]}"
  if not (dest / "tokenizer.json").is_file():
    write_tokenizer(src, dest, compress_tokenizer(tokenizer, kept))
  config = compress_config(teacher.config, kept)
  log(f"[vocabulary] the training text uses {len(used):,} of the teacher's "
      f"{teacher.config.vocab_size:,} tokens; keeping {len(kept):,} (tokenizer in {dest})")
  return dataclasses.replace(teacher, config=config, params=compress_params(teacher.params, kept),
                             tokenizer_dir=dest, sha256=digest)
