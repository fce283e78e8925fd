"""Hugging Face format in and out: `config.json` + `model.safetensors` <-> `EncoderConfig` + params.

Loading accepts bare encoders (`BertModel`, `MPNetModel`: names without a prefix, as the
sentence-transformers teachers ship) and task models (`bert.`/`mpnet.` prefixes plus heads).
Weights that the file does not have (a classifier head on a bare encoder, say) keep their fresh
initialisation and are reported, so the caller can say so. Export writes the task-model layout
that `transformers.Auto*` classes load, through a temporary directory renamed into place.
"""

from __future__ import annotations

import contextlib

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from wdjax.errors import WdjaxError
from wdjax.models import bert

Params = dict[str, Any]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.txt")

_ARCHITECTURES = {
    ("bert", "classifier"): "BertForSequenceClassification",
    ("bert", "mlm"): "BertForMaskedLM",
    ("mpnet", "classifier"): "MPNetForSequenceClassification",
    ("mpnet", "mlm"): "MPNetForMaskedLM",
}


def config_from_hf(hf: dict, **overrides) -> bert.EncoderConfig:
  """`EncoderConfig` from a parsed HF `config.json` (BERT or MPNet), plus field overrides."""
  arch = hf.get("model_type")
  if arch not in ("bert", "mpnet"):
    raise WdjaxError(f"model_type {arch!r} in config.json is not supported (bert or mpnet)")
  if hf.get("hidden_act", "gelu") != "gelu":
    raise WdjaxError(f"hidden_act {hf['hidden_act']!r} is not supported (gelu)")
  num_labels = hf.get("num_labels") or len(hf.get("id2label") or {}) or 2
  fields = dict(
      arch=arch,
      vocab_size=hf["vocab_size"],
      hidden_size=hf["hidden_size"],
      num_layers=hf["num_hidden_layers"],
      num_heads=hf["num_attention_heads"],
      intermediate_size=hf["intermediate_size"],
      max_position_embeddings=hf["max_position_embeddings"],
      type_vocab_size=hf.get("type_vocab_size", 2) if arch == "bert" else 0,
      layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
      pad_token_id=hf.get("pad_token_id", 0 if arch == "bert" else 1),
      relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
      hidden_dropout=hf.get("hidden_dropout_prob", 0.1),
      attention_dropout=hf.get("attention_probs_dropout_prob", 0.1),
      num_labels=num_labels,
      initializer_range=hf.get("initializer_range", 0.02),
  )
  fields.update(overrides)
  return bert.EncoderConfig(**fields)


def config_to_hf(cfg: bert.EncoderConfig, head: str) -> dict:
  """A `config.json` dict that `transformers.AutoConfig` reads back to the same shapes."""
  hf = {
      "architectures": [_ARCHITECTURES[(cfg.arch, head)]],
      "model_type": cfg.arch,
      "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.hidden_size,
      "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads,
      "intermediate_size": cfg.intermediate_size,
      "hidden_act": "gelu",
      "hidden_dropout_prob": cfg.hidden_dropout,
      "attention_probs_dropout_prob": cfg.attention_dropout,
      "max_position_embeddings": cfg.max_position_embeddings,
      "layer_norm_eps": cfg.layer_norm_eps,
      "pad_token_id": cfg.pad_token_id,
      "initializer_range": cfg.initializer_range,
      "num_labels": cfg.num_labels,
      "tie_word_embeddings": True,
  }
  if cfg.arch == "bert":
    hf["type_vocab_size"] = cfg.type_vocab_size
    hf["position_embedding_type"] = "absolute"
  else:
    hf["relative_attention_num_buckets"] = cfg.relative_attention_num_buckets
    hf.update(bos_token_id=0, eos_token_id=2)
  return hf


def _linear(ours: tuple, theirs: str) -> list[tuple[tuple, str, bool]]:
  return [(ours + ("kernel",), theirs + ".weight", True), (ours + ("bias",), theirs + ".bias", False)]


def _norm(ours: tuple, theirs: str, weight="weight", bias="bias") -> list[tuple[tuple, str, bool]]:
  return [(ours + ("scale",), f"{theirs}.{weight}", False), (ours + ("bias",), f"{theirs}.{bias}", False)]


def name_map(cfg: bert.EncoderConfig, head: str) -> list[tuple[tuple, str, bool]]:
  """(our path, HF name without model prefix, transpose?) for every parameter of the model.

  Encoder names carry the model prefix (`bert.`/`mpnet.`) in task models; head names do not.
  A leading `"!"` on the HF name marks a head parameter (no prefix).
  """
  enc = ("encoder",)
  rows = [
      (enc + ("embeddings", "word", "embedding"), "embeddings.word_embeddings.weight", False),
      (enc + ("embeddings", "position", "embedding"), "embeddings.position_embeddings.weight", False),
      *_norm(enc + ("embeddings", "ln"), "embeddings.LayerNorm"),
  ]
  if cfg.arch == "bert":
    rows.append((enc + ("embeddings", "token_type", "embedding"),
                 "embeddings.token_type_embeddings.weight", False))
  else:
    rows.append((enc + ("relative_bias", "embedding"), "encoder.relative_attention_bias.weight", False))
  for i in range(cfg.num_layers):
    ours, theirs = enc + (f"layer_{i}",), f"encoder.layer.{i}"
    if cfg.arch == "bert":
      for a, b in (("q", "query"), ("k", "key"), ("v", "value")):
        rows += _linear(ours + ("attn", a), f"{theirs}.attention.self.{b}")
      rows += _linear(ours + ("attn", "o"), f"{theirs}.attention.output.dense")
      rows += _norm(ours + ("attn_ln",), f"{theirs}.attention.output.LayerNorm")
    else:
      for a in "qkvo":
        rows += _linear(ours + ("attn", a), f"{theirs}.attention.attn.{a}")
      rows += _norm(ours + ("attn_ln",), f"{theirs}.attention.LayerNorm")
    rows += _linear(ours + ("mlp", "up"), f"{theirs}.intermediate.dense")
    rows += _linear(ours + ("mlp", "down"), f"{theirs}.output.dense")
    rows += _norm(ours + ("mlp_ln",), f"{theirs}.output.LayerNorm")
  if head == "classifier":
    if cfg.arch == "bert":
      rows += _linear(("pooler",), "pooler.dense")
      rows += [(p, "!" + n, t) for p, n, t in _linear(("classifier",), "classifier")]
    else:
      rows += [(p, "!" + n, t) for p, n, t in _linear(("pooler",), "classifier.dense")]
      rows += [(p, "!" + n, t) for p, n, t in _linear(("classifier",), "classifier.out_proj")]
  elif head == "mlm":
    if cfg.arch == "bert":
      rows += [(p, "!" + n, t) for p, n, t in _linear(("mlm_dense",), "cls.predictions.transform.dense")]
      rows += [(p, "!" + n, t) for p, n, t in _norm(("mlm_ln",), "cls.predictions.transform.LayerNorm")]
      rows.append((("mlm_bias",), "!cls.predictions.bias", False))
    else:
      rows += [(p, "!" + n, t) for p, n, t in _linear(("mlm_dense",), "lm_head.dense")]
      rows += [(p, "!" + n, t) for p, n, t in _norm(("mlm_ln",), "lm_head.layer_norm")]
      rows.append((("mlm_bias",), "!lm_head.bias", False))
  return rows


# Names a bare encoder file uses for weights that a task model keeps elsewhere.
_BARE_ALIASES = {"!classifier.dense.weight": "pooler.dense.weight",
                 "!classifier.dense.bias": "pooler.dense.bias"}


def _get(tree: Params, path: tuple) -> Any:
  for k in path:
    tree = tree[k]
  return tree


def _set(tree: Params, path: tuple, value: Any) -> None:
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def read_config(model_dir: str | os.PathLike) -> dict:
  path = Path(model_dir) / "config.json"
  if not path.is_file():
    raise WdjaxError(f"{model_dir} is not a Hugging Face model directory: {path.name} is missing")
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise WdjaxError(f"{path} is not valid JSON ({e})") from None


def read_safetensors(model_dir: str | os.PathLike) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file
  path = Path(model_dir) / "model.safetensors"
  if not path.is_file():
    raise WdjaxError(f"{path} is missing (only safetensors weights are read, never pickles)")
  try:
    return load_file(str(path))
  except Exception as e:  # safetensors raises several types for truncated or garbled files
    raise WdjaxError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e}); "
                     "re-fetch or re-export it") from None


def load_params(model_dir: str | os.PathLike, cfg: bert.EncoderConfig, head: str,
                init_params: Params) -> tuple[Params, list[str]]:
  """Fill `init_params` (a fresh model's pure dict) with the weights in `model_dir`.

  Returns the params and the list of our paths that kept their fresh initialisation.
  """
  tensors = read_safetensors(model_dir)
  prefix = f"{cfg.arch}."
  params = _copy_tree(init_params)
  fresh = []
  for path, name, transpose in name_map(cfg, head):
    head_param = name.startswith("!")
    candidates = [name[1:]] if head_param else [prefix + name, name]
    if name in _BARE_ALIASES:
      candidates.append(_BARE_ALIASES[name])
    found = next((c for c in candidates if c in tensors), None)
    if found is None:
      fresh.append("/".join(path))
      continue
    value = tensors[found].T if transpose else tensors[found]
    want = _get(params, path).shape
    if value.shape != tuple(want):
      stored, need = list(tensors[found].shape), list(want)[::-1] if transpose else list(want)
      if path[0] == "classifier":  # a task head of another task (its label count)
        raise WdjaxError(
            f"{model_dir}: its task head {found} has shape {stored}, this task needs {need} (another "
            "number of labels); start from a model without a task head, or one of this task")
      raise WdjaxError(
          f"{model_dir}: tensor {found} has shape {stored} but the config needs "
          f"{need}; config.json and model.safetensors do not belong together")
    _set(params, path, np.asarray(value, dtype=np.float32))
  encoder_missing = [p for p in fresh if p.startswith("encoder/")]
  if encoder_missing:
    raise WdjaxError(f"{model_dir}: model.safetensors lacks encoder weights such as "
                     f"{encoder_missing[0]!r} ({len(encoder_missing)} missing); is it a {cfg.arch} model?")
  return params, fresh


def _copy_tree(tree):
  return {k: _copy_tree(v) for k, v in tree.items()} if isinstance(tree, dict) else tree


def load(model_dir: str | os.PathLike, head: str = "classifier", seed: int = 0, **overrides):
  """(config, params, freshly-initialised paths) of the HF model in `model_dir`."""
  from flax import nnx
  cfg = config_from_hf(read_config(model_dir), **overrides)
  model = bert.build(cfg, head, seed)
  init = nnx.to_pure_dict(nnx.state(model))
  params, fresh = load_params(model_dir, cfg, head, init)
  return cfg, params, fresh


@contextlib.contextmanager
def atomic_directory(out: Path):
  """Yields a temporary sibling of `out` to fill; on success it replaces `out` (the old one
  is kept until the new one is in place), on failure it is removed and `out` is untouched."""
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
  try:
    yield tmp
    old = out.with_name(out.name + ".old")
    if out.exists():
      shutil.rmtree(old, ignore_errors=True)
      out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def copy_tokenizer(tokenizer_dir: str | os.PathLike | None, dest: Path) -> None:
  if tokenizer_dir is not None:
    for name in TOKENIZER_FILES:
      if (Path(tokenizer_dir) / name).is_file():
        shutil.copy2(Path(tokenizer_dir) / name, dest / name)


def export(out_dir: str | os.PathLike, cfg: bert.EncoderConfig, params: Params, head: str = "classifier",
           tokenizer_dir: str | os.PathLike | None = None, extra: dict | None = None) -> Path:
  """Write an HF task-model directory atomically (temporary sibling, then rename)."""
  from safetensors.numpy import save_file
  out = Path(out_dir)
  out.parent.mkdir(parents=True, exist_ok=True)
  prefix = f"{cfg.arch}."
  tensors = {}
  for path, name, transpose in name_map(cfg, head):
    value = np.asarray(_get(params, path), dtype=np.float32)
    key = name[1:] if name.startswith("!") else prefix + name
    tensors[key] = np.ascontiguousarray(value.T if transpose else value)
  if head == "mlm":  # transformers expects the decoder bias under its own name as well
    tensors[("cls.predictions.decoder.bias" if cfg.arch == "bert" else "lm_head.decoder.bias")] = \
        tensors["cls.predictions.bias" if cfg.arch == "bert" else "lm_head.bias"].copy()
  with atomic_directory(out) as tmp:
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    hf = config_to_hf(cfg, head)
    hf.update(extra or {})
    (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    copy_tokenizer(tokenizer_dir, tmp)
  return out
