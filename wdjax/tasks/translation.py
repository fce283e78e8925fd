"""Translation: teacher training, sequence-level KD data, students (KD, WD), BLEU.

The pipeline's phases, generators, step, loop and checkpoints, with the `Translation`
objective (teacher-forced label-smoothed CE over target tokens):

  wdjax finetune mt          the teacher, from scratch on the bitext  -> finetune/
  wdjax distill  mt          a student on bitext + the teacher's beam
                                        translations of the training sources (sequence-level KD,
                                        Kim & Rush; cached in <workdir>/cache/)  -> distill*/
  --set method.name=wd                  Weight Distillation: phase 1 trains the generator (the
                                        decoder compressed, the encoder re-parameterised
                                        elementwise), phase 2 fine-tunes the student
  --set task.seq_kd=none                 the from-scratch student (bitext only)

Every trained model is scored by BLEU (sacrebleu, detokenised output against the raw reference
text) on the validation and test splits with beam search; `<phase>/results.json` holds it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any, ClassVar

import jax
import numpy as np
from flax import nnx

from wdjax import assets, config as config_lib, distributed
from wdjax.config import Config, TaskConfig
from wdjax.data import bible, builders, pipeline
from wdjax.data.bible import BpeCodec, PairSplit
from wdjax.errors import WdjaxError
from wdjax.generators import StudentSpec
from wdjax.models import search, transformer
from wdjax.models.transformer import TransformerConfig
from wdjax.tasks import register
from wdjax.tasks.base import FinetuneStart, Task, student_shape
from wdjax.train import phase as phase_lib
from wdjax.train.objectives import TokenPredictor
from wdjax.train.phase import Model

Params = Any


@dataclasses.dataclass(frozen=True)
class TranslationConfig(TaskConfig):
  """The `task` section of data.dataset="bible": the teacher is trained from scratch (`wdjax
  finetune`); students keep its encoder and take their decoder's shape from `student` (WD's
  setting, docs/methods.md §1.2)."""

  datasets: ClassVar[tuple[str, ...]] = ("bible",)
  pair: str = "en-de"  # source-target languages (data/bible.py: en, de, fr, es, ...)
  vocab_size: int = 8000  # joint BPE vocabulary size
  layers: int = 6  # teacher decoder layers
  encoder_layers: int = 6  # teacher (and student) encoder layers
  hidden_size: int = 512  # teacher d_model (encoder and decoder)
  num_heads: int = 8  # teacher attention heads
  intermediate_size: int = 2048  # teacher FFN width
  pre_ln: bool = False  # pre-LN blocks (False: post-LN, as transformer_wmt_en_de)
  label_smoothing: float = 0.1  # epsilon of the label-smoothed CE (teacher and students)
  beam: int = 4  # beam size for BLEU
  len_penalty: float = 1.0  # beam scores are sum log p / length ** len_penalty
  kd_beam: int = 6  # beam of the teacher's sequence-KD translations (the reference's)
  seq_kd: str = "add"  # students' data: "add" (bitext + teacher translations) | "replace" | "none"
  wd_encoder: str = "elementwise"  # wd: "elementwise" (A*tanh(W)+B, the reference) | "mapped"


@dataclasses.dataclass(frozen=True)
class Translation:
  """Teacher-forced next-token prediction of the target, label-smoothed CE."""

  label_smoothing: float = 0.1
  head = "translation"
  logit_kd = False  # translation distils through sequence-level KD data
  loss = "ce"
  best_metric = "accuracy"  # teacher-forced token accuracy (BLEU needs a beam search per evaluation)

  def build(self, config: TransformerConfig, seed: int = 0):
    return transformer.build(config, seed)

  def apply(self, graphdef):
    def apply(params, batch, dropout_key, **kwargs):
      model = nnx.merge(graphdef, params)
      return model(batch["src_ids"], batch["src_mask"], batch["tgt_in"], dropout_key=dropout_key,
                   **kwargs)  # [batch, tgt, vocab]
    return apply

  def prepare(self, batch: dict, step: int) -> dict:
    del step
    return batch

  def predictor(self, apply_fn, mesh, params_sharding, batch_size: int, pad_to_multiple: int):
    return TokenPredictor(apply_fn, mesh, params_sharding, batch_size, pad_to_multiple)

  def export(self, out: Path, config, params, tokenizer_dir: Path, task) -> None:
    del task
    transformer.save(out, config, params, tokenizer_dir)


@dataclasses.dataclass(frozen=True)
class TranslationData:
  name: str
  train: PairSplit
  validation: PairSplit
  test: PairSplit
  tokenizer: Path  # tokenizer.json of the joint BPE
  label_names: tuple[str, ...] = ()

  def split(self, name: str) -> PairSplit:
    if name not in builders.SPLITS:
      raise WdjaxError(f"unknown split {name!r}; choose one of {', '.join(builders.SPLITS)}")
    return getattr(self, name)


def prepare_bible(cfg: Config) -> bible.Bible:
  data_dir = assets.cache_dir(cfg.cache_dir) / "tfds"
  source = assets.path("bible", cfg.cache_dir) / "bible.db"
  return builders.prepare(bible.Bible(source=source, pair=cfg.task.pair, data_dir=str(data_dir),
                                      file_format="array_record"))


def load_pairs(cfg: Config, tokenizer: Path | None = None) -> TranslationData:
  """The Bible pair of `cfg.data`, tokenised with `tokenizer` (a model's tokenizer.json), or with
  the joint BPE trained once per (pair, vocabulary size) on the training split."""
  if cfg.data.dataset != "bible":
    raise WdjaxError(f"translation needs data.dataset='bible', got {cfg.data.dataset!r}")
  builder = distributed.process0_first("dataset", lambda: prepare_bible(cfg))
  texts = {s: bible.read_split(builder, s) for s in builders.SPLITS}
  if tokenizer is None:
    src, tgt = bible.parse_pair(cfg.task.pair)
    tokenizer = (assets.cache_dir(cfg.cache_dir) / "tfds" / "bible_bpe"
                 / f"{src}_{tgt}_{cfg.task.vocab_size}" / "tokenizer.json")
    if not tokenizer.is_file():
      distributed.process0_first("vocabulary", lambda: None if tokenizer.is_file() else bible.train_bpe(
          list(texts["train"][0]) + list(texts["train"][1]), cfg.task.vocab_size, tokenizer))
  codec = BpeCodec(tokenizer)
  splits = {}
  for name, (sources, targets) in texts.items():
    limit = cfg.data.max_train_examples if name == "train" else cfg.data.max_eval_examples
    if limit:
      sources, targets = sources[:limit], targets[:limit]
    splits[name] = codec.split(sources, targets, cfg.data.max_length, drop_long=name == "train")
  return TranslationData(builder.info.full_name, tokenizer=tokenizer, **splits)


def teacher_config(cfg: Config, vocab_size: int) -> TransformerConfig:
  m, t = cfg.task, cfg.teacher
  return TransformerConfig(
      vocab_size=vocab_size, hidden_size=m.hidden_size, num_heads=m.num_heads,
      intermediate_size=m.intermediate_size, num_layers=m.layers,
      encoder_hidden_size=m.hidden_size, encoder_heads=m.num_heads,
      encoder_intermediate_size=m.intermediate_size, encoder_layers=m.encoder_layers,
      pre_ln=m.pre_ln, hidden_dropout=t.hidden_dropout, attention_dropout=t.attention_dropout,
      dtype=t.dtype)


def student_config(cfg: Config, teacher: TransformerConfig) -> TransformerConfig:
  """The teacher's encoder and vocabulary, the student's decoder."""
  return student_shape(teacher, cfg)


def objective(cfg: Config) -> Translation:
  return Translation(cfg.task.label_smoothing)


def training_pairs(cfg: Config, teacher: Model, task: TranslationData, log) -> PairSplit:
  """The students' training pairs: the bitext, plus or instead of the teacher's translations."""
  mode = cfg.task.seq_kd
  if mode == "none":
    return task.train
  kd = sequence_kd(cfg, teacher, task.train, log)
  return task.train.concat(kd) if mode == "add" else kd


def sequence_kd(cfg: Config, teacher: Model, train: PairSplit, log) -> PairSplit:
  """The training sources paired with the teacher's beam-`task.kd_beam` translations, computed once
  per teacher and data and kept in `<workdir>/cache/` (every student of a workdir shares them)."""
  key = hashlib.sha256(json.dumps([teacher.sha256, config_lib.to_dict(cfg.data), cfg.task.kd_beam,
                                   cfg.task.len_penalty, train.digest()]).encode()).hexdigest()[:16]
  path = Path(cfg.workdir) / "cache" / f"seq_kd_{key}.npz"

  def compute():
    if path.exists():
      return
    log(f"[seq-kd] translating the {len(train)} training sources with the teacher (beam {cfg.task.kd_beam})")
    ids = translate(teacher.config, teacher.params, train, beam=cfg.task.kd_beam,
                    len_penalty=cfg.task.len_penalty, max_len=cfg.data.max_length,
                    pad_to_multiple=cfg.data.pad_to_multiple)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, ids=ids)
    tmp.replace(path)

  distributed.process0_first("sequence-KD data", compute)
  ids = np.load(path)["ids"]
  lengths = np.argmax(ids == bible.EOS, axis=1).astype(np.int32) + 1
  codec = BpeCodec(teacher.tokenizer_dir / "tokenizer.json")
  return train.with_targets(ids.astype(np.int32), lengths, tuple(codec.decode(ids)))


def translate(config: TransformerConfig, params: Params, split: PairSplit, *, beam: int,
              len_penalty: float = 1.0, max_len: int = 64, batch_size: int = 64,
              pad_to_multiple: int = 8, progress: bool = True) -> np.ndarray:
  """`[n, max_len]` ids of each source's translation (beam 1: greedy), </s>-terminated.
  Sources are batched shortest first and padded to a multiple of `pad_to_multiple` (one
  compiled search per padded length)."""
  graphdef = nnx.split(transformer.build(dataclasses.replace(config, hidden_dropout=0.0,
                                                             attention_dropout=0.0)))[0]
  params = jax.device_put(params, jax.devices()[0])
  out = np.full((len(split), max_len), bible.PAD, np.int32)
  batches = list(pipeline.eval_batches(split, batch_size, pad_to_multiple=pad_to_multiple))
  show = progress and jax.process_index() == 0
  if show and sys.stderr.isatty():
    from tqdm import tqdm
    batches = tqdm(batches, desc="translate", unit="batch", leave=False)
  t0, n = time.perf_counter(), len(batches)
  for i, batch in enumerate(batches):
    if show and not sys.stderr.isatty() and n >= 20 and (i + 1) % (n // 10) == 0:  # logs: ~10 lines
      rate = (i + 1) / (time.perf_counter() - t0)
      print(f"[translate] {i + 1}/{n} batches, {rate:.2f} batches/s, ETA {(n - i - 1) / rate:.0f}s",
            flush=True)
    if beam == 1:
      ids = search.greedy(graphdef, params, batch["src_ids"], batch["src_mask"], max_len)
    else:
      ids, _ = search.beam_search(graphdef, params, batch["src_ids"], batch["src_mask"], max_len,
                                  beam, len_penalty)
    valid = batch["index"] >= 0
    out[batch["index"][valid]] = np.asarray(ids)[valid]
  return out


def bleu(hypotheses: list[str], references: list[str] | tuple[str, ...]) -> float:
  """Corpus BLEU (sacrebleu's defaults: 13a tokenisation, exponential smoothing)."""
  import sacrebleu
  return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score)


def model_bleu(cfg: Config, model_dir: Path, task: TranslationData,
               splits=("validation", "test")) -> dict[str, float]:
  """`{split: BLEU}` of the saved model in `model_dir` (beam `task.beam`, its own tokenizer)."""
  m_cfg, params = transformer.load(model_dir)
  codec = BpeCodec(Path(model_dir) / "tokenizer.json")
  out = {}
  for split in splits:
    data = task.split(split)
    ids = translate(m_cfg, params, data, beam=cfg.task.beam, len_penalty=cfg.task.len_penalty,
                    max_len=cfg.data.max_length, pad_to_multiple=cfg.data.pad_to_multiple)
    out[split] = bleu(codec.decode(ids), data.references)
  return out


def with_bleu(cfg: Config, phase_path: Path, results: dict, task: TranslationData, log) -> dict:
  """`results` plus validation/test BLEU of the phase's exported model (computed once, kept in
  its results.json)."""
  if "test_bleu" in results:
    return results
  results.update({f"{split}_bleu": v for split, v in model_bleu(cfg, phase_path / "model", task).items()})
  if jax.process_index() == 0:
    phase_lib.write_results(phase_path / "results.json", results)
  log(f"[{phase_path.name}] BLEU (beam {cfg.task.beam}): validation {results['validation_bleu']:.2f}, "
      f"test {results['test_bleu']:.2f}")
  return results


SEQ_KD = ("add", "replace", "none")
WD_ENCODER = ("elementwise", "mapped")


class TranslationTask(Task):
  name = "translation"
  datasets = ("bible",)
  metric = "bleu"
  methods = ("kd", "select", "ws", "gws", "wd")  # generators written for the encoder-decoder tree

  def check(self, cfg: Config) -> list[str]:
    bad = []
    if cfg.method.name in ("ws", "gws") and cfg.method.init == "pca":
      bad.append("method.init='pca' (computed from encoder activations; use identity or "
                 "xavier for translation)")
    if cfg.task.wd_encoder not in WD_ENCODER:
      bad.append(f"task.wd_encoder={cfg.task.wd_encoder!r} (one of {', '.join(WD_ENCODER)})")
    if cfg.task.seq_kd not in SEQ_KD:
      bad.append(f"task.seq_kd={cfg.task.seq_kd!r} (one of {', '.join(SEQ_KD)})")
    return bad

  def objective(self, cfg: Config) -> Translation:
    return objective(cfg)

  def finetune_start(self, cfg: Config, log) -> FinetuneStart:
    data = load_pairs(cfg)
    t_cfg = teacher_config(cfg, BpeCodec(data.tokenizer).vocab_size)
    init = nnx.to_pure_dict(nnx.state(transformer.build(t_cfg, cfg.seed)))
    return FinetuneStart(data, StudentSpec(t_cfg, init), data.tokenizer.parent)

  def load_teacher(self, cfg: Config) -> Model:
    return phase_lib.load_trained_teacher(cfg, "translation", transformer.load)

  def load_data(self, cfg: Config, teacher: Model, log) -> TranslationData:
    data = load_pairs(cfg, teacher.tokenizer_dir / "tokenizer.json")
    return dataclasses.replace(data, train=training_pairs(cfg, teacher, data, log))

  def student_config(self, cfg: Config, teacher_config: TransformerConfig) -> TransformerConfig:
    return student_config(cfg, teacher_config)

  def load_model(self, model_dir: Path):
    return transformer.load(model_dir)

  def generator_options(self, cfg: Config, teacher: Model, data: TranslationData, student_shapes,
                        log) -> dict:
    if cfg.method.name == "wd":
      return {"elementwise": ("enc/",) if cfg.task.wd_encoder == "elementwise" else ()}
    return {}

  def finish(self, cfg: Config, phase_path: Path, results: dict, data: TranslationData, log) -> dict:
    return with_bleu(cfg, phase_path, results, data, log)

  def evaluate(self, cfg: Config, model_dir: Path, splits: tuple[str, ...]) -> dict[str, float]:
    """BLEU of a saved translation model on the config's data."""
    data = load_pairs(cfg, Path(model_dir) / "tokenizer.json")
    return model_bleu(cfg, Path(model_dir), data, splits)


TASK = register(TranslationTask())
