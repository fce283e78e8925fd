"""Causal language modelling with Llama-family decoders: a pretrained teacher distilled into a
smaller decoder on plain text.

  wdjax distill lm                  a student (shape from `student`) by `method`      -> distill*/
  --set method.init=selection       its layers and units selected from the teacher's, then KD
  --set kd.alpha=0                  next-token cross-entropy alone (no teacher)
  wdjax eval    lm --model DIR      perplexity on the validation and test text

The teacher (`teacher.model`: the `smollm2-135m` asset, a GGUF file, or a `transformers`
Llama / Qwen2 directory) is used as it is: there is no fine-tuning phase. The loss is the
next-token cross-entropy at every position and, under KD, the temperature-softened KL to the
teacher's next-token distribution: the teacher's top `task.kd_top_k` logits per token, computed
once over the training text and cached (`kd.cache_teacher_logits`), or its full distribution
from a forward pass in every step (`task.kd_top_k=0`). The metric is perplexity, exp of the mean
next-token cross-entropy over a split's tokens; the exported checkpoint is the one of the best
validation log-likelihood. Students are saved as `transformers` LlamaForCausalLM (or
Qwen2ForCausalLM) directories with the teacher's tokenizer.

Data (`wdjax/data/lm.py`): `data.dataset="bible-lm"`, one Bible translation (`task.language`,
the World English Bible by default) split by book as the translation data is; or
`data.dataset="text"`, the user's text files (`data.train_file`, optional `validation_file` and
`test_file`), documents separated by blank lines. Documents are packed into rows of
`data.max_length` tokens.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import ClassVar

import jax
import numpy as np

from wdjax import assets, distributed
from wdjax.config import Config, TaskConfig
from wdjax.data import lm, pipeline
from wdjax.data.lm import LmSplit
from wdjax.errors import WdjaxError
from wdjax.models import gguf_io, hf, llama
from wdjax.models.llama import LlamaConfig
from wdjax.tasks import register
from wdjax.tasks.base import Task, student_shape
from wdjax.train import mesh as mesh_lib
from wdjax.train.evaluate import device_batch
from wdjax.train.objectives import TokenPredictor
from wdjax.train.phase import Model


@dataclasses.dataclass(frozen=True)
class CausalLMConfig(TaskConfig):
  """The `task` section of data.dataset="bible-lm" | "text" (causal language modelling)."""

  datasets: ClassVar[tuple[str, ...]] = ("bible-lm", "text")
  language: str = "en"  # bible-lm: the translation (data/bible.py: en = World English Bible, kjv, de, ...)
  kd_top_k: int = 64  # KD targets: the teacher's top-k logits per token, cached once (0: its full
  #                     distribution, the teacher running in every step)


@dataclasses.dataclass(frozen=True)
class CausalLanguageModel:
  """Next-token prediction at every position of packed text rows."""

  top_k: int = 64  # the cached KD targets per token (0: none cached)
  head = "lm"
  label_smoothing = 0.0
  logit_kd = True
  loss = "ce"
  best_metric = "log_likelihood"  # -(mean next-token CE): the higher the better, as `best` keeps

  def build(self, config: LlamaConfig, seed: int = 0):
    return llama.build(config, seed)

  def apply(self, graphdef):
    return llama.apply_fn(graphdef)

  def prepare(self, batch: dict, step: int) -> dict:
    del step
    return batch

  def predictor(self, apply_fn, mesh, params_sharding, batch_size: int, pad_to_multiple: int):
    return LmPredictor(apply_fn, mesh, params_sharding, batch_size, pad_to_multiple)

  @property
  def caches_targets(self) -> bool:
    """Whether `teacher_targets` caches the KD targets (else the teacher runs in the step)."""
    return self.top_k > 0

  def teacher_targets(self, teacher_apply, params, split: LmSplit, mesh, sharding, batch_size: int,
                      pad_to_multiple: int) -> dict[str, np.ndarray]:
    """The teacher's top-k logits and their ids at every position of every training row,
    `[rows, length, k]` (float16 logits: what the KD term reads, at half the memory)."""
    top = jax.jit(lambda p, b: jax.lax.top_k(teacher_apply(p, b, None), self.top_k),
                  in_shardings=(sharding, mesh_lib.batch_sharding(mesh)),
                  out_shardings=mesh_lib.replicated(mesh))
    length = split.ids.shape[1] - 1
    values = np.zeros((len(split), length, self.top_k), np.float16)
    ids = np.zeros((len(split), length, self.top_k), np.int32)
    for batch in pipeline.eval_batches(split, batch_size, pad_to_multiple=pad_to_multiple):
      v, i = (np.asarray(a) for a in top(params, device_batch(batch, mesh)))
      valid = batch["index"] >= 0
      t = v.shape[1]
      values[batch["index"][valid], :t] = v[valid]
      ids[batch["index"][valid], :t] = i[valid]
    return {"teacher_topk_logits": values, "teacher_topk_ids": ids}

  def export(self, out: Path, config: LlamaConfig, params, tokenizer_dir: Path, task) -> None:
    del task
    llama.save_hf(out, config, params, tokenizer_dir)


class LmPredictor(TokenPredictor):
  """Token accuracy, mean next-token cross-entropy, its exp (perplexity) and its negation
  (log-likelihood) over a split's tokens."""

  def scores(self, params, split) -> dict[str, float]:
    out = super().scores(params, split)
    return dict(out, perplexity=float(math.exp(min(out["loss"], 80.0))), log_likelihood=-out["loss"])


@dataclasses.dataclass(frozen=True)
class LmData:
  name: str
  train: LmSplit
  validation: LmSplit
  test: LmSplit
  tokenizer_dir: Path
  label_names: tuple[str, ...] = ()

  def split(self, name: str) -> LmSplit:
    if name not in ("train", "validation", "test"):
      raise WdjaxError(f"unknown split {name!r}; choose one of train, validation, test")
    return getattr(self, name)


# --- the teacher ----------------------------------------------------------------------------

def _source(cfg: Config) -> Path:
  """The teacher's file or directory: `teacher.path`, else `teacher.model` (a GGUF file, or what
  `assets.path` resolves: an asset's name, a `transformers` directory, a Hub id); a directory
  holding `model.gguf` and no `config.json` (the `smollm2-135m` asset) is its GGUF file."""
  ref = cfg.teacher.path or cfg.teacher.model
  p = Path(ref).expanduser()
  if p.is_file():
    return p
  if ref not in assets.ASSETS and not p.exists() and not assets.HUB_ID.match(ref):
    raise WdjaxError(f"teacher.model={ref!r} is neither an asset ({', '.join(assets.ASSETS)}), a GGUF "
                     "file nor a transformers directory")
  d = distributed.process0_first("teacher asset", lambda: assets.path(ref, cfg.cache_dir))
  return d / "model.gguf" if (d / "model.gguf").is_file() and not (d / "config.json").is_file() else d


def gguf_tokenizer_dir(cfg: Config, path: Path, sha256: str) -> Path:
  """A directory with the GGUF file's vocabulary as `tokenizer.json` (plus the configs
  `transformers` reads), written once per file in the asset cache."""
  out = assets.cache_dir(cfg.cache_dir) / "gguf_tokenizers" / sha256[:16]
  if (out / "tokenizer.json").is_file():
    return out

  def write():
    if (out / "tokenizer.json").is_file():
      return
    meta = gguf_io.metadata(gguf_io.open_file(path))
    tok = gguf_io.tokenizer(meta)
    specials = gguf_io.special_tokens(meta)
    with hf.atomic_directory(out) as tmp:
      tok.save(str(tmp / "tokenizer.json"))
      (tmp / "tokenizer_config.json").write_text(json.dumps(
          {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False,
           "clean_up_tokenization_spaces": False, **specials}, indent=2) + "\n")
      (tmp / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")

  distributed.process0_first("tokenizer", write)
  return out


def load_teacher(cfg: Config) -> Model:
  src = _source(cfg)
  if src.is_file():
    if src.suffix != ".gguf":
      raise WdjaxError(f"teacher {src}: a file teacher must be a .gguf file")
    t_cfg, params = llama.load_gguf(src, dtype=cfg.teacher.dtype)
    sha = assets.sha256_file(src)
    return Model(t_cfg, params, gguf_tokenizer_dir(cfg, src, sha), sha)
  t_cfg, params = llama.load_hf(src, dtype=cfg.teacher.dtype)
  if not (src / "tokenizer.json").is_file():
    raise WdjaxError(f"teacher {src} has no tokenizer.json")
  return Model(t_cfg, params, src, assets.sha256_files(hf.safetensors_files(src)))  # every shard


# --- data -----------------------------------------------------------------------------------

def documents(cfg: Config) -> dict[str, list[str]]:
  d = cfg.data
  if d.dataset == "bible-lm":
    return lm.bible_books(assets.path("bible", cfg.cache_dir) / "bible.db", cfg.task.language)
  if not d.train_file:
    raise WdjaxError("data.dataset='text' needs data.train_file (a UTF-8 text file)")
  return lm.text_files(d.train_file, d.validation_file, d.test_file)


def load_data(cfg: Config, tokenizer_dir: Path, eos_id: int | None, vocab_size: int) -> LmData:
  """Every split's documents tokenised with `tokenizer_dir`'s tokenizer and packed."""
  from tokenizers import Tokenizer
  if eos_id is None:
    raise WdjaxError(f"the model at {tokenizer_dir} names no eos_token_id (documents end with it)")
  tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
  tok.no_padding()
  tok.no_truncation()
  if tok.get_vocab_size() > vocab_size:
    raise WdjaxError(f"the tokenizer at {tokenizer_dir} has {tok.get_vocab_size()} tokens, the model {vocab_size}")
  splits = {}
  for name, docs in documents(cfg).items():
    ids = [e.ids for e in tok.encode_batch(docs, add_special_tokens=False)]
    split = lm.pack(ids, cfg.data.max_length, eos_id, eos_id, keep_last=name != "train")
    limit = cfg.data.max_train_examples if name == "train" else cfg.data.max_eval_examples
    splits[name] = split.take(limit) if limit else split
  name = (f"bible-{cfg.task.language}" if cfg.data.dataset == "bible-lm" else Path(cfg.data.train_file).name)
  return LmData(name, tokenizer_dir=tokenizer_dir, **splits)


def student_config(cfg: Config, teacher: LlamaConfig) -> LlamaConfig:
  """The teacher's vocabulary, positions, RoPE and head size with the student's depth, width
  (`hidden_size`: the residual stream), heads and FFN; its query heads per KV head are the
  teacher's. A student started from the teacher's weights may have fewer heads: it keeps whole
  KV heads with their query heads (`select.group_indices`), uniformly or by importance, and so do
  the generators' starts (WS's and WD's identity maps, OPDF's cores); WID, which cuts the widths
  it learns, keeps the teacher's heads."""
  s = cfg.student
  if s.num_heads % teacher.group_size:
    raise WdjaxError(f"student: num_heads={s.num_heads} must be a multiple of the teacher's "
                     f"{teacher.group_size} query heads per KV head")
  if cfg.method.name == "wid" and s.num_heads != teacher.num_heads:
    raise WdjaxError(f"student: num_heads={s.num_heads}; method {cfg.method.label!r} keeps the "
                     f"teacher's {teacher.num_heads} heads (the other methods keep whole KV "
                     "groups; or narrow hidden_size or intermediate_size)")
  return student_shape(teacher, cfg, num_kv_heads=s.num_heads // teacher.group_size)


class CausalLMTask(Task):
  name = "causal language modelling"
  datasets = ("bible-lm", "text")
  metric = "perplexity"
  # the generators checked on the decoder's tree (WID with the teacher's heads, its KV space whole)
  methods = ("kd", "select", "ws", "gws", "wd", "wid", "opdf")
  ranks_units = True
  compresses_vocabulary = True

  def check(self, cfg: Config) -> list[str]:
    bad = []
    if cfg.task.kd_top_k < 0:
      bad.append(f"task.kd_top_k={cfg.task.kd_top_k} (>= 0; 0 = the full distribution)")
    if cfg.student.attention_dropout:
      bad.append(f"student.attention_dropout={cfg.student.attention_dropout} (Llama-family students "
                 "have none; use student.hidden_dropout)")
    if cfg.method.task_agnostic:
      bad.append(f"method {cfg.method.label!r} (its phase 1 is an encoder's masked LM)")
    if cfg.data.best_metric not in ("auto", "log_likelihood"):
      bad.append(f"data.best_metric={cfg.data.best_metric!r} (a language model keeps the best "
                 "validation log_likelihood: auto)")
    return bad

  def objective(self, cfg: Config) -> CausalLanguageModel:
    return CausalLanguageModel(top_k=cfg.task.kd_top_k)

  trains_teacher = False  # a pretrained LM is distilled as it is

  def finetune_start(self, cfg: Config, log):
    raise WdjaxError("a causal-LM teacher is a pretrained model distilled as it is (teacher.model); "
                     "there is no finetune phase: run `wdjax distill`")

  def load_teacher(self, cfg: Config) -> Model:
    return load_teacher(cfg)

  def load_data(self, cfg: Config, teacher: Model, log) -> LmData:
    data = load_data(cfg, teacher.tokenizer_dir, teacher.config.eos_token_id, teacher.config.vocab_size)
    log(f"[data] {data.name}: {data.train.tokens:,} training tokens in {len(data.train)} rows of "
        f"{cfg.data.max_length}; validation {data.validation.tokens:,}, test {data.test.tokens:,}")
    return data

  def student_config(self, cfg: Config, teacher_config: LlamaConfig) -> LlamaConfig:
    return student_config(cfg, teacher_config)

  def load_model(self, model_dir: Path):
    return llama.load_hf(model_dir)

  def selection_indices(self, cfg: Config, teacher: Model, student_shapes) -> dict | None:
    """Uniform selection of whole KV heads, each with its query heads, for a student with fewer."""
    from wdjax.generators.select import SelectionPlan, uniform_group_indices
    plan = SelectionPlan(teacher.params, student_shapes, cfg.method.layer_map or "every_k")
    return uniform_group_indices(plan, teacher.config.num_heads) or None

  def activation_fn(self, teacher_config: LlamaConfig):
    return llama.activation_fn(teacher_config)

  def eval_data(self, cfg: Config, model_dir: Path, config: LlamaConfig) -> LmData:
    return load_data(cfg, Path(model_dir), config.eos_token_id, config.vocab_size)


TASK = register(CausalLMTask())
