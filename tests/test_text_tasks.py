"""Sentence pairs and regression: labels read as classes or scores, pair tokenisation, the
regression loss and metrics, the best-checkpoint metric, and `wdjax pipeline` end to end on a
pair task and a score task derived from Rotten Tomatoes."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from test_train import _write_config
from wdjax import losses, validate
from wdjax.config import DataConfig
from wdjax.data import builders, pipeline, text
from wdjax.data.tokenize import TextEncoder
from wdjax.errors import WdjaxError
from wdjax.train import evaluate


def _csv(path: Path, header: str, rows: list[str]) -> str:
  path.write_text("\n".join([header] + rows) + "\n")
  return str(path)


@pytest.mark.parametrize("values,kind", [
    (["0.5", "1", "3.25"], "regression"), (["1", "2", "3"], "classes"), (["1.0", "2.0"], "classes"),
    (["pos", "0.5"], "classes"), (["-0.75", "2"], "regression"), (["nan", "0.5"], "classes")])
def test_a_column_of_fractional_numbers_is_a_score(values, kind):
  assert builders.label_kind(values) == kind


def test_a_float_label_column_is_never_treated_as_classes(tmp_path):
  rows = [f"text {i},{i / 7:.3f}" for i in range(40)]
  train = _csv(tmp_path / "train.csv", "text,label", rows)
  auto = builders.TextFiles(files={"train": train}, text_column="text", label_column="label",
                            data_dir=str(tmp_path / "tfds"))
  assert auto.regression and auto._label_names() == ()
  with pytest.raises(WdjaxError, match="holds scores such as '0.143', not classes; set data.label_kind=regression"):
    builders.TextFiles(files={"train": train}, text_column="text", label_column="label",
                       kind="classes", data_dir=str(tmp_path / "tfds"))
  bad = _csv(tmp_path / "bad.csv", "text,label", rows[:5] + ["oops,high"])
  with pytest.raises(WdjaxError, match="train row 6: label 'high' is not a number"):
    builders.TextFiles(files={"train": bad}, text_column="text", label_column="label",
                       kind="regression", data_dir=str(tmp_path / "tfds"))
  assert text.is_regression(DataConfig(dataset="files", train_file=train))
  assert not text.is_regression(DataConfig(dataset="files", train_file=train, label_kind="classes"))


def test_pairs_get_the_tokenizers_template_and_longest_first_truncation(minilm_dir):
  enc = TextEncoder(minilm_dir, max_length=12, pad_id=0)
  split = enc.encode(["a good film", "word " * 20], [1, 0], pairs=["bad", "fine " * 3])
  cls, sep = 101, 102
  n = split.lengths[0]
  assert split.ids[0, 0] == cls and split.ids[0, n - 1] == sep and list(split.ids[0, :n]).count(sep) == 2
  assert split.token_types[0, :n].tolist() == [0, 0, 0, 0, 0, 1, 1]  # [CLS] a good film [SEP] | bad [SEP]
  # 12 tokens: the longer text gives way first, the short one keeps its 3 words
  assert split.lengths[1] == 12 and split.token_types[1].tolist() == [0] * 8 + [1] * 4
  batch = pipeline.make_batch(split, np.array([1, 0, -1]), 12)
  assert batch["token_type_ids"].shape == (3, 12)
  assert batch["token_type_ids"][1, n:].sum() == 0 and batch["token_type_ids"][2].sum() == 0
  # a pair's digest (the teacher-logit cache key) differs from the same tokens without types
  assert split.digest() != dataclasses.replace(split, token_types=None).digest()


def test_regression_batches_keep_float_scores_and_mark_missing_ones():
  from wdjax.data.tokenize import TokenizedSplit
  split = TokenizedSplit(np.ones((3, 4), np.int32), np.full(3, 4, np.int32),
                         np.array([-0.5, np.nan, 2.25], np.float32), 0)
  batch = pipeline.make_batch(split, np.array([0, 1, 2, -1]), 4)
  np.testing.assert_array_equal(batch["labels"], np.array([-0.5, 0.0, 2.25, 0.0], np.float32))
  np.testing.assert_array_equal(batch["label_weights"], [1, 0, 1, 0])
  np.testing.assert_array_equal(batch["weights"], [1, 1, 1, 0])


def test_regression_losses_and_metrics_by_hand():
  out = jnp.array([[0.5], [2.0], [1.0]])
  labels, w = jnp.array([1.0, 1.0, 3.0]), jnp.array([1.0, 1.0, 0.0])
  assert float(losses.squared_error(out, labels, w)) == pytest.approx((0.25 + 1.0) / 2)
  teacher = jnp.array([[0.0], [2.0], [9.0]])
  total, parts = losses.regression_kd(out, teacher, labels, w, alpha=0.25)
  assert float(parts["kd"]) == pytest.approx(0.25 / 2)
  assert float(total) == pytest.approx(0.25 * 0.125 + 0.75 * 0.625)
  scipy = pytest.importorskip("scipy.stats")
  rng = np.random.default_rng(0)
  y = rng.normal(size=50)
  pred = (y + rng.normal(size=50)).astype(np.float32)[:, None]
  got = evaluate.regression_scores(pred, y)
  assert got["pearson"] == pytest.approx(scipy.pearsonr(pred[:, 0], y)[0], abs=1e-6)
  assert got["spearman"] == pytest.approx(scipy.spearmanr(pred[:, 0], y)[0], abs=1e-6)
  assert got["mse"] == pytest.approx(np.mean((pred[:, 0] - y) ** 2), rel=1e-5)
  assert evaluate.regression_scores(np.zeros((50, 1)), y)["pearson"] == 0.0


def test_mcc_matches_its_definition():
  sklearn = pytest.importorskip("sklearn.metrics")
  rng = np.random.default_rng(1)
  labels = rng.integers(0, 3, 200)
  predicted = np.where(rng.random(200) < 0.6, labels, rng.integers(0, 3, 200))
  assert evaluate.mcc(predicted, labels) == pytest.approx(sklearn.matthews_corrcoef(labels, predicted))
  assert evaluate.mcc(np.zeros(10, int), np.r_[np.zeros(7, int), np.ones(3, int)]) == 0.0


def test_config_checks_for_pairs_regression_and_the_best_metric(tmp_path, task_teacher):
  scores = _csv(tmp_path / "s.csv", "text,label", [f"t{i},{i / 3:.2f}" for i in range(20)])
  cfg = tiny_config(tmp_path, task_teacher)
  ok = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, dataset="files", train_file=scores))
  validate.check(ok)
  for change, message in [
      (dict(best_metric="accuracy"), r"data.best_metric='accuracy' \(for regression: auto, pearson, spearman\)"),
      (dict(label_kind="labels"), "data.label_kind='labels'"),
      (dict(dataset="rotten-tomatoes", text_pair_column="b"), "text pairs and regression need your own"),
      (dict(text_pair_column="b", augment=2), "data.augment=2"),
  ]:
    with pytest.raises(WdjaxError, match=message):
      validate.check(dataclasses.replace(ok, data=dataclasses.replace(ok.data, **change)))
  with pytest.raises(WdjaxError, match=r"data.best_metric='pearson' \(for classification"):
    validate.check(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, best_metric="pearson")))


@pytest.fixture(scope="module")
def derived(tmp_path_factory, rt_csv):
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
  from benchmarks.quality import derived_tasks
  return derived_tasks.write(tmp_path_factory.mktemp("derived"))


def _pipeline(tmp_path, task_teacher, data: DataConfig, *extra: str):
  cfg = tiny_config(tmp_path / "run", task_teacher)
  cfg = dataclasses.replace(cfg, teacher=dataclasses.replace(cfg.teacher, path=""), data=data)
  path = _write_config(tmp_path / "cfg.py", cfg)
  proc = subprocess.run([sys.executable, "-m", "wdjax", "pipeline", str(path), *extra],
                        capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return Path(cfg.workdir), proc.stdout


def test_pipeline_on_a_sentence_pair_task(tmp_path, task_teacher, derived):
  files = derived["pairs"]
  data = DataConfig(dataset="files", train_file=str(files["train"]), validation_file=str(files["validation"]),
                    test_file=str(files["test"]), text_column="first", text_pair_column="second",
                    group_column="group", max_length=64, pad_to_multiple=64, max_train_examples=256,
                    max_eval_examples=64, best_metric="macro_f1")
  work, out = _pipeline(tmp_path, task_teacher, data)
  assert "| model | trainable params | test macro-f1 | validation macro-f1 |" in out
  student = json.loads((work / "distill" / "results.json").read_text())
  for key in ("test_accuracy", "test_macro_f1", "test_mcc", "validation_macro_f1"):
    assert 0.0 <= abs(student[key]) <= 1.0
  config = json.loads((work / "distill" / "model" / "config.json").read_text())
  assert config["id2label"] == {"0": "first", "1": "second"}
  # the exported model reads the pair as transformers tokenises it, with the same logits
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  tok = transformers.AutoTokenizer.from_pretrained(work / "distill" / "model")
  enc = tok(["a fine film"], ["a dull one"], return_tensors="pt")
  assert enc["token_type_ids"][0].tolist().count(1) == 4  # a dull one [SEP]
  from wdjax.models import bert, hf
  from flax import nnx
  cfg, params, _ = hf.load(work / "distill" / "model")
  got = nnx.merge(nnx.split(bert.build(cfg))[0], params)(
      *(jnp.asarray(enc[k].numpy()) for k in ("input_ids", "attention_mask", "token_type_ids")))
  ref = transformers.AutoModelForSequenceClassification.from_pretrained(work / "distill" / "model").eval()
  with torch.no_grad():
    want = ref(**enc).logits.numpy()
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)


def test_pipeline_on_a_regression_task(tmp_path, task_teacher, derived):
  files = derived["scores"]
  data = DataConfig(dataset="files", train_file=str(files["train"]), validation_file=str(files["validation"]),
                    test_file=str(files["test"]), label_column="score", group_column="group",
                    max_length=32, pad_to_multiple=32, max_train_examples=256, max_eval_examples=64)
  work, out = _pipeline(tmp_path, task_teacher, data)
  assert "| model | trainable params | test pearson | validation pearson |" in out
  assert "MSE only, same steps" in out
  for phase in ("finetune", "distill", "distill_ce"):
    r = json.loads((work / phase / "results.json").read_text())
    assert {"test_pearson", "test_spearman", "test_mse"} <= r.keys() and "test_accuracy" not in r
    assert -1.0 <= r["test_pearson"] <= 1.0 and r["test_mse"] >= 0.0
  config = json.loads((work / "distill" / "model" / "config.json").read_text())
  assert config["problem_type"] == "regression" and config["num_labels"] == 1
  eval_out = subprocess.run([sys.executable, "-m", "wdjax", "eval", str(tmp_path / "cfg.py"), "--split", "test"],
                            capture_output=True, text=True)
  assert eval_out.returncode == 0, eval_out.stderr[-2000:]
  assert json.loads(eval_out.stdout)["test_pearson"] == pytest.approx(
      json.loads((work / "distill" / "results.json").read_text())["test_pearson"], abs=1e-6)


def test_a_datasets_directory_reads_as_the_same_rows_as_its_csv(tmp_path, minilm_dir):
  datasets = pytest.importorskip("datasets")
  rows = [("a good film", "a fine one", "same"), ("dull", "great fun", "different"),
          ("awful", "bad", "same"), ("lovely", "boring", "different")] * 50
  names = ["different", "same"]
  ds = datasets.Dataset.from_dict(
      {"first": [f"{r[0]} {i}" for i, r in enumerate(rows)], "second": [r[1] for r in rows],
       "label": [names.index(r[2]) for r in rows]},
      features=datasets.Features({"first": datasets.Value("string"), "second": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=names)}))
  dd = datasets.DatasetDict({"train": ds, "test": ds.select(range(8))})
  dd.save_to_disk(str(tmp_path / "saved"))
  csv = _csv(tmp_path / "train.csv", "first,second,label",
             [f"{r[0]} {i},{r[1]},{r[2]}" for i, r in enumerate(rows)])
  common = dict(dataset="files", text_column="first", text_pair_column="second", max_length=16)
  from_dir = text.load(DataConfig(train_file=str(tmp_path / "saved" / "train"),
                                  test_file=str(tmp_path / "saved" / "test"), **common), minilm_dir, 0,
                       str(tmp_path / "cache"))
  from_csv = text.load(DataConfig(train_file=csv, test_file=_csv(tmp_path / "test.csv", "first,second,label", [
      f"{r[0]} {i},{r[1]},{r[2]}" for i, r in enumerate(rows[:8])]), **common), minilm_dir, 0, str(tmp_path / "cache"))
  assert from_dir.label_names == from_csv.label_names == ("different", "same")  # class names, not ids
  for split in ("train", "validation", "test"):
    a, b = from_dir.split(split), from_csv.split(split)
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.token_types, b.token_types)
    np.testing.assert_array_equal(a.labels, b.labels)
  with pytest.raises(WdjaxError, match=r"is a DatasetDict with splits \['train', 'test'\]; name one directory per split"):
    builders.read_table(tmp_path / "saved")
