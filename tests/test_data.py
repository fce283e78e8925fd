"""Rotten Tomatoes through TFDS, users' own files, tokenisation, and the batch pipeline."""

import bz2
import csv
import io
import json
import sys

import numpy as np
import pytest

from wdjax.config import DataConfig
from wdjax.data import builders, pipeline, text
from wdjax.data.tokenize import TextEncoder, TokenizedSplit
from wdjax.errors import WdjaxError


@pytest.fixture(scope="module")
def rt_builder(rt_csv, tmp_path_factory):
  b = builders.RottenTomatoes(source=rt_csv, data_dir=str(tmp_path_factory.mktemp("tfds")),
                              file_format="array_record")
  return builders.prepare(b)


def test_rotten_tomatoes_splits_by_movie_without_tensorflow(rt_builder, rt_csv):
  assert "tensorflow" not in sys.modules
  rows = list(csv.DictReader(io.StringIO(bz2.decompress(rt_csv.read_bytes()).decode())))
  movie_of = {}
  for r in rows:
    movie_of.setdefault(r["text"], set()).add(r["movie_name"])
  sizes, movies = {}, {}
  for split in builders.SPLITS:
    texts, pairs, labels = builders.read_split(rt_builder, split)
    assert set(pairs) == {""} and labels.dtype == np.int32
    sizes[split] = len(texts)
    movies[split] = set().union(*(movie_of[t] for t in texts))
    assert set(labels) == {0, 1}
    assert len(set(texts)) == len(texts)
  # 12,808 labelled snippets, minus 56 repeated texts: docs/data.md's split (10,504/981/1,323) de-duplicated
  assert sizes == {"train": 10451, "validation": 981, "test": 1320}
  # the first occurrence of a repeated text is kept, so only its own movie counts
  firsts = {}
  for r in rows:
    if r["category"] != "plot":
      firsts.setdefault(r["text"], r["movie_name"])
  for split in builders.SPLITS:
    texts = builders.read_split(rt_builder, split)[0]
    assert all(builders.hash_split(firsts[t]) == split for t in texts)
  assert rt_builder.info.features["label"].names == ["rotten", "fresh"]


def test_rebuilding_is_deterministic(rt_builder, rt_csv, tmp_path):
  other = builders.prepare(builders.RottenTomatoes(source=rt_csv, data_dir=str(tmp_path),
                                                   file_format="array_record"))
  a, b = builders.read_split(other, "test"), builders.read_split(rt_builder, "test")
  assert a[:2] == b[:2] and np.array_equal(a[2], b[2])


def test_tokenizer_gives_the_published_ids(minilm_dir):
  enc = TextEncoder(minilm_dir, max_length=64, pad_id=0)
  split = enc.encode(["A small movie with a big impact.", "word " * 100], [1, 0])
  assert split.ids[0, :10].tolist() == [101, 1037, 2235, 3185, 2007, 1037, 2502, 4254, 1012, 102]
  assert split.lengths.tolist() == [10, 64]
  assert split.ids[0, 10:].tolist() == [0] * 54  # padded here, not to tokenizer.json's fixed 128
  assert split.ids[1, 63] == 102  # truncation keeps [SEP] inside max_length


def _split(n=100, seed=0):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(3, 40, n).astype(np.int32)
  ids = np.zeros((n, 40), np.int32)
  for i, l in enumerate(lengths):
    ids[i, :l] = i + 1
  return TokenizedSplit(ids, lengths, (np.arange(n) % 2).astype(np.int32), pad_id=0)


@pytest.mark.parametrize("grouping", [0, 4])
def test_train_batches_are_deterministic_reshuffled_and_resumable(grouping):
  data = _split()
  a = pipeline.TrainBatches(data, 8, seed=1, length_grouping=grouping)
  b = pipeline.TrainBatches(data, 8, seed=1, length_grouping=grouping)
  c = pipeline.TrainBatches(data, 8, seed=2, length_grouping=grouping)
  steps = a.steps_per_epoch
  assert steps == 12
  epoch0 = np.concatenate([a.global_indices(s) for s in range(steps)])
  epoch1 = np.concatenate([a.global_indices(s) for s in range(steps, 2 * steps)])
  assert len(set(epoch0.tolist())) == 96  # a permutation, remainder dropped
  assert not np.array_equal(epoch0, epoch1)  # reshuffled per epoch
  assert not np.array_equal(epoch0, np.concatenate([c.global_indices(s) for s in range(steps)]))
  # resuming at step 17 (fresh object, no iterator state) gives the same batch
  for key in ("input_ids", "attention_mask", "labels"):
    np.testing.assert_array_equal(a.batch(17)[key], b.batch(17)[key])
  batch = a.batch(5)
  assert batch["input_ids"].shape[1] in (16, 32, 40)  # multiples of 16, capped at max_length
  assert (batch["attention_mask"].sum(1) == data.lengths[batch["index"]]).all()


def test_length_grouping_reduces_padding():
  data = _split(400)
  pad = {}
  for g in (0, 8):
    b = pipeline.TrainBatches(data, 8, seed=0, length_grouping=g, pad_to_multiple=1)
    pad[g] = sum(b.batch(s)["input_ids"].size for s in range(b.steps_per_epoch))
  assert pad[8] < 0.7 * pad[0]


def test_processes_get_disjoint_slices_of_the_same_global_batch():
  data = _split()
  whole = pipeline.TrainBatches(data, 8, seed=3).batch(4)
  parts = [pipeline.TrainBatches(data, 8, seed=3, process_index=p, process_count=4).batch(4)
           for p in range(4)]
  for key in whole:
    np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])


def test_eval_batches_cover_every_example_once():
  data = _split(37)
  seen = np.concatenate([b["index"][b["weights"] > 0] for b in pipeline.eval_batches(data, 8)])
  assert sorted(seen.tolist()) == list(range(37))


def _write(path, rows, fmt):
  if fmt == "csv":
    with open(path, "w", newline="") as f:
      w = csv.DictWriter(f, fieldnames=list(rows[0]))
      w.writeheader()
      w.writerows(rows)
  else:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_user_files_go_through_the_same_builder(tmp_path, minilm_dir, rt_builder, fmt):
  texts, _, labels = builders.read_split(rt_builder, "validation")
  names = ["neg", "pos"]
  rows = [{"review": t, "sentiment": names[l]} for t, l in zip(texts, labels)]
  train = tmp_path / f"train.{fmt}"
  _write(train, rows[:800], fmt)
  test = tmp_path / f"test.{fmt}"
  _write(test, rows[800:], fmt)
  cfg = DataConfig(dataset="files", train_file=str(train), test_file=str(test),
                   text_column="review", label_column="sentiment")
  task = text.load(cfg, minilm_dir, pad_id=0, cache=str(tmp_path / "cache"))
  assert task.label_names == ("neg", "pos")
  assert len(task.test) == len(rows) - 800
  assert len(task.train) + len(task.validation) == len(set(t for t in texts[:800]))
  assert 40 < len(task.validation) < 120  # ~10% carved from train by hash


def test_user_file_with_a_missing_column_is_one_clear_error(tmp_path, minilm_dir):
  train = tmp_path / "train.csv"
  _write(train, [{"text": "good", "label": 1}, {"text": "bad", "label": 0}], "csv")
  cfg = DataConfig(dataset="files", train_file=str(train), label_column="stars")
  with pytest.raises(WdjaxError, match="has no column 'stars'"):
    text.load(cfg, minilm_dir, pad_id=0, cache=str(tmp_path / "cache"))



def test_tsv_reads_quotes_literally_and_a_bom_is_skipped(tmp_path):
  """A TSV text starting with '"' is read literally, not as a quoted field swallowing the
  following lines (200 lines would read as 21 rows); Excel's UTF-8 BOM is not part of the first
  column's name."""
  tsv = tmp_path / "train.tsv"
  lines = [f"review {i}\t{'pos' if i % 2 else 'neg'}" for i in range(50)]
  lines[10] = '" meh, said nobody\tneg'
  tsv.write_text("text\tlabel\n" + "\n".join(lines) + "\n")
  rows = builders.read_table(tsv)
  assert len(rows) == 50 and rows[10] == {"text": '" meh, said nobody', "label": "neg"}
  bom = tmp_path / "excel.csv"
  bom.write_bytes("text,label\ngood,pos\n".encode("utf-8-sig"))
  assert builders.read_table(bom) == [{"text": "good", "label": "pos"}]


_PREPARE_AND_COUNT = """
import sys
from wdjax.config import DataConfig
from wdjax.data import builders, text
data = DataConfig(dataset="files", train_file=sys.argv[1])
b = builders.prepare(text.make_builder(data, sys.argv[2]))
print(sum(s.num_examples for s in b.info.splits.values()))
"""


def test_concurrent_builds_of_one_dataset_all_see_its_splits(tmp_path):
  """Three processes prepare one dataset in an empty cache: one builds it while the others wait
  on the lock, and every one of them then reads all 300 rows (those that waited had made their
  builder before the files existed)."""
  import subprocess
  csv_file = tmp_path / "train.csv"
  csv_file.write_text("text,label\n" + "".join(f"review number {i},{'pos' if i % 3 else 'neg'}\n"
                                               for i in range(300)))
  procs = [subprocess.Popen([sys.executable, "-c", _PREPARE_AND_COUNT, str(csv_file), str(tmp_path / "cache")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
  outs = [p.communicate(timeout=300) for p in procs]
  assert [p.returncode for p in procs] == [0, 0, 0], [err[-500:] for _, err in outs]
  assert [out.split()[-1] for out, _ in outs] == ["300", "300", "300"]


@pytest.mark.parametrize("name, content, message", [
    ("latin1.csv", "text,label\ncaf\xe9,pos\n".encode("latin-1"), r"is not UTF-8 text .* re-save it as UTF-8"),
    ("scalar.jsonl", b"3\n", r":1 is a JSON int, not an object of columns"),
    ("empty.csv", b"text,label\n", r"the train file .* has no data rows"),
    ("short.csv", b"text,label\ngood,pos\nbad\n", r"train row 2 has no value in column 'label'"),
    ("blank.csv", b"text,label\ngood,pos\nbad, \n", r"train row 2 has no value in column 'label'"),
    ("null.jsonl", b'{"text": null, "label": "pos"}\n', r"train row 1 has no value in column 'text'"),
    ("empty_text.csv", b'text,label\ngood,pos\nfine,neg\n"",neg\n', r"train row 3 has no value in column 'text'"),
    ("blank_text.jsonl", b'{"text": "ok", "label": 1}\n{"text": "  ", "label": 0}\n',
     r"train row 2 has no value in column 'text'"),
])
def test_broken_user_files_are_one_clear_error(tmp_path, minilm_dir, name, content, message):
  train = tmp_path / name
  train.write_bytes(content)
  cfg = DataConfig(dataset="files", train_file=str(train))
  with pytest.raises(WdjaxError, match=message):
    text.load(cfg, minilm_dir, pad_id=0, cache=str(tmp_path / "cache"))


def test_a_class_the_training_file_lacks_is_refused(tmp_path, minilm_dir):
  """A label only the validation file has became a class no example trains."""
  train, val = tmp_path / "train.csv", tmp_path / "val.csv"
  _write(train, [{"text": f"t{i}", "label": ["neg", "pos"][i % 2]} for i in range(20)], "csv")
  _write(val, [{"text": "v", "label": "neutral"}, {"text": "w", "label": "pos"}], "csv")
  cfg = DataConfig(dataset="files", train_file=str(train), validation_file=str(val))
  with pytest.raises(WdjaxError, match=r"validation has label\(s\) \['neutral'\] that the training file never has"):
    text.load(cfg, minilm_dir, pad_id=0, cache=str(tmp_path / "cache"))

def test_augmented_copies_keep_special_tokens_and_carry_no_label():
  from wdjax.data.augment import augment
  from wdjax.data.tokenize import TokenizedSplit
  rng = np.random.default_rng(0)
  n, width = 200, 40
  lengths = rng.integers(8, width, n).astype(np.int32)
  ids = np.zeros((n, width), np.int32)
  for i, length in enumerate(lengths):
    ids[i, :length] = np.r_[101, rng.integers(1000, 2000, length - 2), 102]
  split = TokenizedSplit(ids, lengths, rng.integers(0, 2, n).astype(np.int32), 0)
  out = augment(split, 3, mask_id=103, seed=0)
  again = augment(split, 3, mask_id=103, seed=0)
  np.testing.assert_array_equal(out.ids, again.ids)  # deterministic in the data seed
  assert len(out) == 4 * n
  np.testing.assert_array_equal(out.ids[:n], ids)  # the originals come first, untouched
  np.testing.assert_array_equal(out.labels[:n], split.labels)
  assert (out.labels[n:] == -1).all()
  copies = out.ids[n:]
  ends = out.lengths[n:]
  assert (copies[:, 0] == 101).all() and (copies[np.arange(3 * n), ends - 1] == 102).all()
  assert all((copies[i, ends[i]:] == 0).all() for i in range(3 * n))  # padded after the end
  short = ends < np.repeat(lengths, 3)
  assert 0.15 < short.mean() < 0.35  # n-gram sampling with p = 0.25
  body = np.concatenate([copies[i, 1:ends[i] - 1] for i in np.flatnonzero(~short)])
  assert 0.07 < (body == 103).mean() < 0.13  # masking with p = 0.1


def test_unlabelled_examples_enter_the_kd_term_only():
  import jax.numpy as jnp
  from wdjax import losses
  s = jnp.array([[2.0, -1.0], [0.5, 0.3]])
  t = jnp.array([[1.0, 0.0], [-1.0, 1.0]])
  labels, w = jnp.array([0, 0]), jnp.ones(2)
  _, parts = losses.hinton(s, t, labels, w, temperature=2.0, alpha=0.5,
                           label_weights=jnp.array([1.0, 0.0]))
  np.testing.assert_allclose(parts["ce"], losses.cross_entropy(s[:1], labels[:1], w[:1]), rtol=1e-6)
  np.testing.assert_allclose(parts["kd"], losses.kd_kl(s, t, 2.0, w), rtol=1e-6)


def test_mlm_masking_follows_bert_recipe_and_is_a_function_of_the_step():
  from wdjax.data.mlm import MlmMasking
  rng = np.random.default_rng(0)
  b, seq, vocab = 4000, 40, 1000
  lengths = rng.integers(3, seq + 1, b)
  mask = (np.arange(seq)[None] < lengths[:, None]).astype(np.int32)
  ids = np.where(mask > 0, rng.integers(10, vocab, (b, seq)), 0).astype(np.int32)
  ids[:, 0] = 1  # [CLS]
  ids[np.arange(b), lengths - 1] = 2  # [SEP]
  batch = {"input_ids": ids, "attention_mask": mask, "weights": np.ones(b, np.float32)}
  masking = MlmMasking(mask_id=3, vocab_size=vocab, special_ids=(0, 1, 2, 3), max_predictions=6)
  out = masking(batch, step=5)
  used = out["label_weights"] > 0
  rows = np.arange(b)[:, None]
  # 15% of the ordinary tokens (at least 1, at most 6), never a special token, no repeats.
  n_ordinary = lengths - 2
  np.testing.assert_array_equal(used.sum(1), np.clip(np.round(0.15 * n_ordinary), 1, 6))
  np.testing.assert_array_equal(out["labels"][used], ids[rows, out["mlm_positions"]][used])
  assert not np.isin(out["labels"][used], (0, 1, 2, 3)).any()
  pos = np.where(used, out["mlm_positions"], -1 - np.arange(6)[None])
  assert all(len(set(r)) == 6 for r in pos)
  # 80% [MASK], 10% random, 10% unchanged; nothing else changes.
  new = out["input_ids"][rows, out["mlm_positions"]][used]
  frac_mask = np.mean(new == 3)
  frac_same = np.mean(new == out["labels"][used])
  assert abs(frac_mask - 0.8) < 0.02 and abs(frac_same - 0.1) < 0.02  # ~0.1% of same by chance
  changed = out["input_ids"] != ids
  assert changed.sum() <= used.sum() and not changed[out["attention_mask"] == 0].any()
  # Dynamic but reproducible: same step, same masks; next step, others.
  np.testing.assert_array_equal(masking(batch, 5)["input_ids"], out["input_ids"])
  assert (masking(batch, 6)["mlm_positions"] != out["mlm_positions"]).any()


def test_teacher_target_cache_is_keyed_by_the_data_itself(tmp_path):
  """A training file edited in place (same config, same size) is other data: its teacher targets
  are computed again, not read from the cache of the old file (KD trained on the wrong targets);
  another objective (a language model's top-k) is another cache."""
  import types
  from wdjax.config import Config
  from wdjax.train import phase as phase_lib
  cfg = Config(workdir=str(tmp_path))
  teacher = types.SimpleNamespace(sha256="t" * 64)
  ids = np.arange(12, dtype=np.int32).reshape(3, 4)
  lengths, labels = np.full(3, 4, np.int32), np.zeros(3, np.int32)
  old = types.SimpleNamespace(train=TokenizedSplit(ids, lengths, labels, 0))
  new = types.SimpleNamespace(train=TokenizedSplit(ids[::-1].copy(), lengths, labels, 0))
  calls = []

  def compute(value):
    return lambda: (calls.append(value), {"teacher_logits": np.full((3, 2), value, np.float32)})[1]

  quiet = lambda *_: None
  cached = lambda data, value, objective="classification": phase_lib.teacher_train_targets(
      cfg, teacher, data, objective, compute(value), quiet)["teacher_logits"][0, 0]
  assert cached(old, 1.0) == 1.0
  assert cached(old, 9.0) == 1.0  # cached
  assert cached(new, 2.0) == 2.0
  assert cached(old, 4.0, objective="top-k 8") == 4.0
  assert calls == [1.0, 2.0, 4.0]
  # the same content in a new array is the same data
  same = types.SimpleNamespace(train=TokenizedSplit(ids.copy(), lengths, labels, 0))
  assert cached(same, 3.0) == 1.0
