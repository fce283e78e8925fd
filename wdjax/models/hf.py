"""Hugging Face format in and out: `config.json` + `model.safetensors` <-> `EncoderConfig` + params.

Architectures: BERT, RoBERTa, XLM-RoBERTa, ELECTRA (discriminator), DistilBERT and MPNet, one
`Dialect` each. Loading accepts bare encoders (`BertModel`, `MPNetModel`: names without a prefix,
as the sentence-transformers teachers ship) and task models (`bert.`/`roberta.`/... prefixes
plus heads).
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


# EncoderConfig field -> (config.json key, default when the file has none): BERT's names; a
# dialect renames some (`Dialect.keys`).
_KEYS = {
    "vocab_size": ("vocab_size", None),
    "hidden_size": ("hidden_size", None),
    "num_layers": ("num_hidden_layers", None),
    "num_heads": ("num_attention_heads", None),
    "intermediate_size": ("intermediate_size", None),
    "max_position_embeddings": ("max_position_embeddings", None),
    "layer_norm_eps": ("layer_norm_eps", 1e-12),
    "type_vocab_size": ("type_vocab_size", 2),
    "pad_token_id": ("pad_token_id", 0),
    "hidden_dropout": ("hidden_dropout_prob", 0.1),
    "attention_dropout": ("attention_probs_dropout_prob", 0.1),
    "initializer_range": ("initializer_range", 0.02),
}


@dataclasses.dataclass(frozen=True)
class Dialect:
  """How one architecture of the BERT family names its weights and config fields in HF files
  (`bert.ARCHS` holds what it computes differently); one row of `DIALECTS` each."""

  prefix: str  # the encoder's name prefix in task models (`bert.`)
  classes: dict[str, str]  # head -> the transformers class of the task model
  layer_rows: Callable[[tuple, str], list[Row]]  # (our layer path, HF layer index)
  embedding_rows: Callable[[], list[Row]]  # past the word and position tables and the LayerNorm
  head_rows: dict[str, Callable[[], list[Row]]]
  mlm_bias: str  # the MLM output bias; export also writes it under `<decoder>.bias`
  mlm_decoder: str
  keys: dict = dataclasses.field(default_factory=dict)  # `_KEYS` entries renamed or added;
  # a key of None is never in the file: the field takes its default
  activation_key: str = "hidden_act"
  config_extra: Callable[[bert.EncoderConfig], dict] = lambda cfg: {}  # written on export
  check: Callable[[dict], str | None] = lambda hf: None  # why a config.json cannot be read


def _bert_layer(ours: tuple, i: str) -> list[Row]:
  theirs = f"encoder.layer.{i}"
  rows = [r for a, b in (("q", "query"), ("k", "key"), ("v", "value"))
          for r in _linear(ours + ("attn", a), f"{theirs}.attention.self.{b}")]
  return (rows + _linear(ours + ("attn", "o"), f"{theirs}.attention.output.dense")
          + _norm(ours + ("attn_ln",), f"{theirs}.attention.output.LayerNorm")
          + _bert_ffn(ours, theirs))


def _bert_ffn(ours: tuple, theirs: str) -> list[Row]:
  return (_linear(ours + ("mlp", "up"), f"{theirs}.intermediate.dense")
          + _linear(ours + ("mlp", "down"), f"{theirs}.output.dense")
          + _norm(ours + ("mlp_ln",), f"{theirs}.output.LayerNorm"))


def _mpnet_layer(ours: tuple, i: str) -> list[Row]:
  theirs = f"encoder.layer.{i}"
  rows = [r for a in "qkvo" for r in _linear(ours + ("attn", a), f"{theirs}.attention.attn.{a}")]
  return rows + _norm(ours + ("attn_ln",), f"{theirs}.attention.LayerNorm") + _bert_ffn(ours, theirs)


def _distilbert_layer(ours: tuple, i: str) -> list[Row]:
  theirs = f"transformer.layer.{i}"
  rows = [r for a, b in (("q", "q_lin"), ("k", "k_lin"), ("v", "v_lin"), ("o", "out_lin"))
          for r in _linear(ours + ("attn", a), f"{theirs}.attention.{b}")]
  return (rows + _norm(ours + ("attn_ln",), f"{theirs}.sa_layer_norm")
          + _linear(ours + ("mlp", "up"), f"{theirs}.ffn.lin1")
          + _linear(ours + ("mlp", "down"), f"{theirs}.ffn.lin2")
          + _norm(ours + ("mlp_ln",), f"{theirs}.output_layer_norm"))


def _token_types() -> list[Row]:
  return [(("encoder", "embeddings", "token_type", "embedding"),
           "embeddings.token_type_embeddings.weight", False)]


def _mlm_head(dense: str, norm: str, bias: str) -> Callable[[], list[Row]]:
  return lambda: _head(_linear(("mlm_dense",), dense) + _norm(("mlm_ln",), norm)
                       + [(("mlm_bias",), bias, False)])


def _out_proj_classifier() -> list[Row]:
  """RoBERTa's, ELECTRA's and MPNet's head: `classifier.dense` then `classifier.out_proj`."""
  return _head(_linear(("pooler",), "classifier.dense") + _linear(("classifier",), "classifier.out_proj"))


def _roberta(name: str) -> Dialect:
  return Dialect(
      prefix="roberta.",
      classes={"classifier": f"{name}ForSequenceClassification", "mlm": f"{name}ForMaskedLM"},
      layer_rows=_bert_layer, embedding_rows=_token_types,
      head_rows={"classifier": _out_proj_classifier,
                 "mlm": _mlm_head("lm_head.dense", "lm_head.layer_norm", "lm_head.bias")},
      mlm_bias="lm_head.bias", mlm_decoder="lm_head.decoder",
      keys={"type_vocab_size": ("type_vocab_size", 1), "pad_token_id": ("pad_token_id", 1),
            "layer_norm_eps": ("layer_norm_eps", 1e-5)},
      config_extra=lambda cfg: {"type_vocab_size": cfg.type_vocab_size, "bos_token_id": 0,
                                "eos_token_id": 2, "position_embedding_type": "absolute"})


def _electra_check(hf: dict) -> str | None:
  if hf.get("embedding_size", hf["hidden_size"]) != hf["hidden_size"]:
    return (f"embedding_size {hf['embedding_size']} differs from hidden_size {hf['hidden_size']} "
            "(a projected embedding, as ELECTRA-small's) and is not supported")
  return None


def _distilbert_check(hf: dict) -> str | None:
  if hf.get("sinusoidal_pos_embds"):
    return "sinusoidal_pos_embds (fixed sinusoidal positions) is not supported"
  return None


DIALECTS = {
    "bert": Dialect(
        prefix="bert.",
        classes={"classifier": "BertForSequenceClassification", "mlm": "BertForMaskedLM"},
        layer_rows=_bert_layer, embedding_rows=_token_types,
        head_rows={
            "classifier": lambda: _linear(("pooler",), "pooler.dense")
            + _head(_linear(("classifier",), "classifier")),
            "mlm": _mlm_head("cls.predictions.transform.dense", "cls.predictions.transform.LayerNorm",
                             "cls.predictions.bias")},
        mlm_bias="cls.predictions.bias", mlm_decoder="cls.predictions.decoder",
        config_extra=lambda cfg: {"type_vocab_size": cfg.type_vocab_size,
                                  "position_embedding_type": "absolute"}),
    "roberta": _roberta("Roberta"),
    "xlm-roberta": _roberta("XLMRoberta"),
    "electra": Dialect(
        prefix="electra.",
        classes={"classifier": "ElectraForSequenceClassification", "mlm": "ElectraForMaskedLM"},
        layer_rows=_bert_layer, embedding_rows=_token_types,
        head_rows={"classifier": _out_proj_classifier,
                   "mlm": _mlm_head("generator_predictions.dense", "generator_predictions.LayerNorm",
                                    "generator_lm_head.bias")},
        mlm_bias="generator_lm_head.bias", mlm_decoder="generator_lm_head",
        config_extra=lambda cfg: {"type_vocab_size": cfg.type_vocab_size,
                                  "embedding_size": cfg.hidden_size,
                                  "position_embedding_type": "absolute"},
        check=_electra_check),
    "distilbert": Dialect(
        prefix="distilbert.",
        classes={"classifier": "DistilBertForSequenceClassification", "mlm": "DistilBertForMaskedLM"},
        layer_rows=_distilbert_layer, embedding_rows=lambda: [],
        head_rows={"classifier": lambda: _head(_linear(("pooler",), "pre_classifier")
                                               + _linear(("classifier",), "classifier")),
                   "mlm": _mlm_head("vocab_transform", "vocab_layer_norm", "vocab_projector.bias")},
        mlm_bias="vocab_projector.bias", mlm_decoder="vocab_projector",
        keys={"hidden_size": ("dim", None), "num_layers": ("n_layers", None),
              "num_heads": ("n_heads", None), "intermediate_size": ("hidden_dim", None),
              "hidden_dropout": ("dropout", 0.1), "attention_dropout": ("attention_dropout", 0.1),
              # DistilBERT's LayerNorms are built with eps 1e-12 whatever the file says
              "layer_norm_eps": (None, 1e-12)},
        activation_key="activation",
        config_extra=lambda cfg: {"sinusoidal_pos_embds": False, "seq_classif_dropout": cfg.hidden_dropout,
                                  "tie_weights_": True},
        check=_distilbert_check),
    "mpnet": Dialect(
        prefix="mpnet.",
        classes={"classifier": "MPNetForSequenceClassification", "mlm": "MPNetForMaskedLM"},
        layer_rows=_mpnet_layer,
        embedding_rows=lambda: [(("encoder", "relative_bias", "embedding"),
                                 "encoder.relative_attention_bias.weight", False)],
        head_rows={"classifier": _out_proj_classifier,
                   "mlm": _mlm_head("lm_head.dense", "lm_head.layer_norm", "lm_head.bias")},
        mlm_bias="lm_head.bias", mlm_decoder="lm_head.decoder",
        keys={"type_vocab_size": (None, 0), "pad_token_id": ("pad_token_id", 1),
              "relative_attention_num_buckets": ("relative_attention_num_buckets", 32)},
        config_extra=lambda cfg: {"bos_token_id": 0, "eos_token_id": 2}),
}


def _keys(dialect: Dialect) -> dict:
  return {**_KEYS, **dialect.keys}


def config_from_hf(hf: dict, **overrides) -> bert.EncoderConfig:
  """`EncoderConfig` from a parsed HF `config.json` (an architecture of `DIALECTS`), plus
  field overrides."""
  arch = hf.get("model_type")
  if arch not in DIALECTS:
    raise WdjaxError(f"model_type {arch!r} in config.json is not supported "
                     f"({', '.join(DIALECTS)})")
  dialect = DIALECTS[arch]
  if hf.get(dialect.activation_key, "gelu") != "gelu":
    raise WdjaxError(f"{dialect.activation_key} {hf[dialect.activation_key]!r} in config.json is "
                     "not supported (gelu)")
  fields = {}
  for field, (key, default) in _keys(dialect).items():
    if key is not None and key not in hf and default is None:
      raise WdjaxError(f"config.json of model_type {arch!r} lacks {key!r}")
    fields[field] = default if key is None else hf.get(key, default)
  if (problem := dialect.check(hf)) is not None:
    raise WdjaxError(f"config.json of model_type {arch!r}: {problem}")
  fields["num_labels"] = hf.get("num_labels") or len(hf.get("id2label") or {}) or 2
  fields.update(overrides)
  return bert.EncoderConfig(arch=arch, **fields)


def config_to_hf(cfg: bert.EncoderConfig, head: str) -> dict:
  """A `config.json` dict that `transformers.AutoConfig` reads back to the same shapes."""
  dialect = DIALECTS[cfg.arch]
  fields = {key: getattr(cfg, field) for field, (key, _) in _keys(dialect).items() if key is not None}
  return {
      "architectures": [dialect.classes[head]],
      "model_type": cfg.arch,
      **fields,
      dialect.activation_key: "gelu",
      "num_labels": cfg.num_labels,
      "tie_word_embeddings": True,
      **dialect.config_extra(cfg),
  }


def name_map(cfg: bert.EncoderConfig, head: str) -> list[Row]:
  """(our path, HF name without model prefix, transpose?) for every parameter of the model.

  Encoder names carry the model prefix (`bert.`, `roberta.`, ...) in task models; head names
  do not. A leading `"!"` on the HF name marks a head parameter (no prefix).
  """
  dialect, enc = DIALECTS[cfg.arch], ("encoder",)
  rows = [
      (enc + ("embeddings", "word", "embedding"), "embeddings.word_embeddings.weight", False),
      (enc + ("embeddings", "position", "embedding"), "embeddings.position_embeddings.weight", False),
      *_norm(enc + ("embeddings", "ln"), "embeddings.LayerNorm"),
      *dialect.embedding_rows(),
  ]
  for i in range(cfg.num_layers):
    rows += dialect.layer_rows(enc + (f"layer_{i}",), str(i))
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


def safetensors_files(model_dir: str | os.PathLike) -> list[Path]:
  """`model.safetensors`, or the shards `model.safetensors.index.json` lists (sorted)."""
  index = Path(model_dir) / "model.safetensors.index.json"
  if index.is_file():
    return [Path(model_dir) / s for s in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
  return [Path(model_dir) / "model.safetensors"]


def read_safetensors(model_dir: str | os.PathLike) -> dict[str, np.ndarray]:
  """Every tensor of `safetensors_files(model_dir)`."""
  from safetensors.numpy import load_file
  tensors = {}
  for path in safetensors_files(model_dir):
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
  prefix = DIALECTS[cfg.arch].prefix
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
  prefix = DIALECTS[cfg.arch].prefix
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
