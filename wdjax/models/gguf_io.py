"""Reading llama.cpp GGUF files: metadata, tensors dequantised to float32 numpy arrays, and the
vocabulary as a `tokenizers` tokenizer.

The `gguf` package (llama.cpp's own reader, numpy only) parses the file and dequantises its
block formats (Q4_0, Q4_1, Q8_0, K-quants, ...). A tensor comes out in the row-major layout of
the model that was converted, `[out, in]` for a projection, as in a PyTorch state dict.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from wdjax.errors import WdjaxError


def open_file(path: str | Path):
  """A `gguf.GGUFReader` of `path` (memory-mapped: nothing is read until a tensor is asked for)."""
  try:
    import gguf
  except ImportError:
    raise WdjaxError("reading GGUF files needs the gguf package: pip install 'wdjax[gguf]'") from None
  p = Path(path)
  if not p.is_file():
    raise WdjaxError(f"{p} does not exist")
  try:
    return gguf.GGUFReader(str(p))
  except (ValueError, OSError) as e:
    raise WdjaxError(f"{p} is not a readable GGUF file ({type(e).__name__}: {e})") from None


def metadata(reader) -> dict:
  """Every key-value field of the file: numbers and strings as Python values, arrays as lists."""
  out = {}
  for key, field in reader.fields.items():
    if key.startswith("GGUF."):
      continue
    try:
      out[key] = field.contents()
    except (ValueError, IndexError, TypeError):  # a field type this gguf version cannot decode
      continue
  return out


def tensor_names(reader) -> set[str]:
  return {t.name for t in reader.tensors}


def tensors(reader, names: set[str], source: str = "") -> dict[str, np.ndarray]:
  """The float32 arrays of the tensors `names`, dequantised; a missing one is refused by name."""
  from gguf import quants
  by_name = {t.name: t for t in reader.tensors}
  missing = sorted(names - set(by_name))
  if missing:
    raise WdjaxError(f"{source or 'the GGUF file'} lacks {missing[0]} ({len(missing)} missing)")
  out = {}
  for name in names:
    t = by_name[name]
    shape = tuple(int(n) for n in reversed(t.shape))  # GGUF lists dimensions innermost first
    out[name] = np.asarray(quants.dequantize(t.data, t.tensor_type), np.float32).reshape(shape)
  return out


def tokenizer(meta: dict):
  """The file's vocabulary as a `tokenizers.Tokenizer`: a byte-level BPE (`tokenizer.ggml.model`
  "gpt2") with the merges in the file, its control tokens as special tokens, and the
  pre-tokenizer its `tokenizer.ggml.pre` names (SmolLM's splits digits one by one)."""
  from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
  kind = meta.get("tokenizer.ggml.model")
  if kind != "gpt2":
    raise WdjaxError(f"GGUF tokenizer {kind!r} is not supported (byte-level BPE, 'gpt2')")
  tokens = list(meta["tokenizer.ggml.tokens"])
  merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
  bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False,
                   byte_fallback=False)
  tok = Tokenizer(bpe)
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  pre = meta.get("tokenizer.ggml.pre", "default")
  tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                       if pre == "smollm" else byte_level)
  tok.decoder = decoders.ByteLevel()
  types = list(meta.get("tokenizer.ggml.token_type") or [])
  control = [tokens[i] for i, ty in enumerate(types) if ty == 3]  # 3: CONTROL
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
  return tok


def special_tokens(meta: dict) -> dict[str, str]:
  """`{bos_token, eos_token, unk_token, pad_token}` named by the file's ids (those it has)."""
  tokens = meta["tokenizer.ggml.tokens"]
  out = {}
  for name in ("bos", "eos", "unknown", "padding"):
    i = meta.get(f"tokenizer.ggml.{name}_token_id")
    if i is not None and 0 <= int(i) < len(tokens):
      out[{"unknown": "unk_token", "padding": "pad_token"}.get(name, f"{name}_token")] = tokens[int(i)]
  return out
