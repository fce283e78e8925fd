"""Hugging Face format in and out: `config.json` + `model.safetensors` <-> `EncoderConfig` + params.

Loading accepts bare encoders (`BertModel`, `MPNetModel`: names without a prefix, as the
sentence-transformers teachers ship) and task models (`bert.`/`mpnet.` prefixes plus heads).
Weights that the file does not have (a classifier head on a bare encoder, say) keep their fresh
initialisation and are reported, so the caller can say so. Export writes the task-model layout
that `transformers.Auto*` classes load, through a temporary directory renamed into place.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from wdjax.errors import WdjaxError
from wdjax.models import bert

Params = dict[str, Any]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.txt")

Row = tuple[tuple, str, bool]  # (our path, HF name without the model prefix, transpose?)


def _linear(ours: tuple, theirs: str) -> list[Row]:
  return [(ours + ("kernel",), theirs + ".weight", True), (ours + ("bias",), theirs + ".bias", False)]


def _norm(ours: tuple, theirs: str, weight="weight", bias="bias") -> list[Row]:
  return [(ours + ("scale",), f"{theirs}.{weight}", False), (ours + ("bias",), f"{theirs}.{bias}", False)]


def _head(rows: list[Row]) -> list[Row]:
  """Head parameters: their HF names carry no model prefix (marked by a leading "!")."""
  return [(p, "!" + n, t) for p, n, t in rows]


@dataclasses.dataclass(frozen=True)
class Dialect:
  """How one architecture of the BERT family names its weights and config fields in HF files;
  the names that differ between them are one row of `DIALECTS`."""

  classes: dict[str, str]  # head -> the transformers class of the task model
  embedding_rows: Callable[[], list[Row]]  # past the word and position tables and the LayerNorm
  attention_rows: Callable[[tuple, str], list[Row]]  # (our layer path, HF layer name)
  head_rows: dict[str, Callable[[], list[Row]]]
  mlm_bias: str  # the MLM output bias; export also writes it under `<decoder>.bias`
  mlm_decoder: str
  config_fields: Callable[[dict], dict]  # EncoderConfig fields read from config.json
  config_extra: Callable[[bert.EncoderConfig], dict]  # config.json entries written on export


def _bert_attention(ours: tuple, theirs: str) -> list[Row]:
  rows = [r for a, b in (("q", "query"), ("k", "key"), ("v", "value"))
          for r in _linear(ours + ("attn", a), f"{theirs}.attention.self.{b}")]
  return (rows + _linear(ours + ("attn", "o"), f"{theirs}.attention.output.dense")
          + _norm(ours + ("attn_ln",), f"{theirs}.attention.output.LayerNorm"))


def _mpnet_attention(ours: tuple, theirs: str) -> list[Row]:
  rows = [r for a in "qkvo" for r in _linear(ours + ("attn", a), f"{theirs}.attention.attn.{a}")]
  return rows + _norm(ours + ("attn_ln",), f"{theirs}.attention.LayerNorm")


DIALECTS = {
    "bert": Dialect(
        classes={"classifier": "BertForSequenceClassification", "mlm": "BertForMaskedLM"},
        embedding_rows=lambda: [(("encoder", "embeddings", "token_type", "embedding"),
                                 "embeddings.token_type_embeddings.weight", False)],
        attention_rows=_bert_attention,
        head_rows={
            "classifier": lambda: _linear(("pooler",), "pooler.dense")
            + _head(_linear(("classifier",), "classifier")),
            "mlm": lambda: _head(_linear(("mlm_dense",), "cls.predictions.transform.dense")
                                 + _norm(("mlm_ln",), "cls.predictions.transform.LayerNorm")
                                 + [(("mlm_bias",), "cls.predictions.bias", False)])},
        mlm_bias="cls.predictions.bias", mlm_decoder="cls.predictions.decoder",
        config_fields=lambda hf: dict(type_vocab_size=hf.get("type_vocab_size", 2),
                                      pad_token_id=hf.get("pad_token_id", 0)),
        config_extra=lambda cfg: {"type_vocab_size": cfg.type_vocab_size,
                                  "position_embedding_type": "absolute"}),
    "mpnet": Dialect(
        classes={"classifier": "MPNetForSequenceClassification", "mlm": "MPNetForMaskedLM"},
        embedding_rows=lambda: [(("encoder", "relative_bias", "embedding"),
                                 "encoder.relative_attention_bias.weight", False)],
        attention_rows=_mpnet_attention,
        head_rows={
            "classifier": lambda: _head(_linear(("pooler",), "classifier.dense")
                                        + _linear(("classifier",), "classifier.out_proj")),
            "mlm": lambda: _head(_linear(("mlm_dense",), "lm_head.dense")
                                 + _norm(("mlm_ln",), "lm_head.layer_norm")
                                 + [(("mlm_bias",), "lm_head.bias", False)])},
        mlm_bias="lm_head.bias", mlm_decoder="lm_head.decoder",
        config_fields=lambda hf: dict(type_vocab_size=0, pad_token_id=hf.get("pad_token_id", 1)),
        config_extra=lambda cfg: {"relative_attention_num_buckets": cfg.relative_attention_num_buckets,
                                  "bos_token_id": 0, "eos_token_id": 2}),
}


def config_from_hf(hf: dict, **overrides) -> bert.EncoderConfig:
  """`EncoderConfig` from a parsed HF `config.json` (an architecture of `DIALECTS`), plus
  field overrides."""
  arch = hf.get("model_type")
  if arch not in DIALECTS:
    raise WdjaxError(f"model_type {arch!r} in config.json is not supported "
                     f"({' or '.join(DIALECTS)})")
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
      layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
      relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
      hidden_dropout=hf.get("hidden_dropout_prob", 0.1),
      attention_dropout=hf.get("attention_probs_dropout_prob", 0.1),
      num_labels=num_labels,
      initializer_range=hf.get("initializer_range", 0.02),
      **DIALECTS[arch].config_fields(hf),
  )
  fields.update(overrides)
  return bert.EncoderConfig(**fields)


def config_to_hf(cfg: bert.EncoderConfig, head: str) -> dict:
  """A `config.json` dict that `transformers.AutoConfig` reads back to the same shapes."""
  dialect = DIALECTS[cfg.arch]
  return {
      "architectures": [dialect.classes[head]],
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
      **dialect.config_extra(cfg),
  }


def name_map(cfg: bert.EncoderConfig, head: str) -> list[Row]:
  """(our path, HF name without model prefix, transpose?) for every parameter of the model.

  Encoder names carry the model prefix (`bert.`/`mpnet.`) in task models; head names do not.
  A leading `"!"` on the HF name marks a head parameter (no prefix).
  """
  dialect, enc = DIALECTS[cfg.arch], ("encoder",)
  rows = [
      (enc + ("embeddings", "word", "embedding"), "embeddings.word_embeddings.weight", False),
      (enc + ("embeddings", "position", "embedding"), "embeddings.position_embeddings.weight", False),
      *_norm(enc + ("embeddings", "ln"), "embeddings.LayerNorm"),
      *dialect.embedding_rows(),
  ]
  for i in range(cfg.num_layers):
    ours, theirs = enc + (f"layer_{i}",), f"encoder.layer.{i}"
    rows += dialect.attention_rows(ours, theirs)
    rows += _linear(ours + ("mlp", "up"), f"{theirs}.intermediate.dense")
    rows += _linear(ours + ("mlp", "down"), f"{theirs}.output.dense")
    rows += _norm(ours + ("mlp_ln",), f"{theirs}.output.LayerNorm")
  return rows + (dialect.head_rows[head]() if head in dialect.head_rows else [])


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
  """Every tensor of `model.safetensors`, or of the shards `model.safetensors.index.json` lists."""
  from safetensors.numpy import load_file
  index = Path(model_dir) / "model.safetensors.index.json"
  if index.is_file():
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    paths = [Path(model_dir) / s for s in shards]
  else:
    paths = [Path(model_dir) / "model.safetensors"]
  tensors = {}
  for path in paths:
    if not path.is_file():
      raise WdjaxError(f"{path} is missing (only safetensors weights are read, never pickles)")
    try:
      tensors.update(load_file(str(path)))
    except Exception as e:  # safetensors raises several types for truncated or garbled files
      raise WdjaxError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e}); "
                       "re-fetch or re-export it") from None
  return tensors


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
    dialect = DIALECTS[cfg.arch]
    tensors[f"{dialect.mlm_decoder}.bias"] = tensors[dialect.mlm_bias].copy()
  with atomic_directory(out) as tmp:
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    hf = config_to_hf(cfg, head)
    hf.update(extra or {})
    (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    copy_tokenizer(tokenizer_dir, tmp)
  return out
