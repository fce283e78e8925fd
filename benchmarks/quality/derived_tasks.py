"""A sentence-pair task and a regression task derived from the Rotten Tomatoes asset, as CSV files
for `data.dataset=files` (no other real pair or score data is reachable offline).

- `pairs/`: a fresh and a rotten review snippet of two different movies, in random order, labelled
  `first` or `second`: which one is fresh (a comparison: the model must read both texts and know
  which is which). Snippets are paired within one movie-hash split (the split `wdjax` gives Rotten
  Tomatoes), so no snippet appears in two splits; each snippet is used once.
- `scores/`: one snippet, and as its score the share of fresh snippets among all of its movie's
  snippets (movies with at least 5; a float in [0, 1], which `data.label_kind=auto` reads as a
  regression target). Split by movie (`group` column), so a movie's score is never seen in
  training and tested.

  python -m benchmarks.quality.derived_tasks OUT_DIR          # writes OUT_DIR/{pairs,scores}/{split}.csv
  python -m benchmarks.quality.derived_tasks OUT_DIR --run    # and runs `wdjax pipeline quickstart`
                                                              # on both (about 25 minutes on 2 cores),
                                                              # writing results_derived_cpu.{json,md}

`--collect` writes the results files from the two workdirs without running them again.
"""

from __future__ import annotations

import csv
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from wdjax import assets
from wdjax.data import builders

MIN_SNIPPETS = 5  # movies with fewer snippets give too coarse a score


def _snippets(cache: str = "") -> list[dict]:
  """Rotten Tomatoes' fresh / rotten snippets, de-duplicated, as the builder reads them."""
  return builders.rotten_tomatoes_rows(
      assets.path("rotten-tomatoes", cache) / "rotten_tomatoes_corpus_full.csv.bz2")


def _write(path: Path, rows: list[dict]) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)


def pairs(snippets: list[dict], seed: int = 0) -> dict[str, list[dict]]:
  """`{split: rows}` of the which-one-is-fresh pair task."""
  rng = np.random.default_rng(seed)
  out = {}
  for split in builders.SPLITS:
    in_split = [r for r in snippets if builders.hash_split(r["group"]) == split]
    fresh = [in_split[i] for i in rng.permutation(len(in_split)) if in_split[i]["label"] == "fresh"]
    rotten = [in_split[i] for i in rng.permutation(len(in_split)) if in_split[i]["label"] == "rotten"]
    made = []
    for f in fresh:
      # the next rotten snippet of another movie (one movie's snippets share its topic)
      j = next((k for k in range(len(rotten) - 1, -1, -1) if rotten[k]["group"] != f["group"]), None)
      if j is None:
        break
      r = rotten.pop(j)
      a, b, label = (f, r, "first") if rng.random() < 0.5 else (r, f, "second")
      made.append({"first": a["text"], "second": b["text"], "label": label,
                   "group": f"{a['group']}|{b['group']}"})
    out[split] = made
  return out


def scores(snippets: list[dict]) -> dict[str, list[dict]]:
  """`{split: rows}` of the movie-freshness regression task."""
  by_movie = defaultdict(list)
  for r in snippets:
    by_movie[r["group"]].append(r)
  out = {s: [] for s in builders.SPLITS}
  for movie, rows in by_movie.items():
    if len(rows) < MIN_SNIPPETS:
      continue
    share = sum(r["label"] == "fresh" for r in rows) / len(rows)
    for r in rows:
      out[builders.hash_split(movie)].append({"text": r["text"], "score": f"{share:.4f}", "group": movie})
  return out


def write(out_dir: str | Path, cache: str = "") -> dict[str, dict[str, Path]]:
  """Write both tasks' CSV files; `{task: {split: path}}`."""
  snippets = _snippets(cache)
  written = {}
  for task, splits in (("pairs", pairs(snippets)), ("scores", scores(snippets))):
    written[task] = {}
    for split, rows in splits.items():
      path = Path(out_dir) / task / f"{split}.csv"
      _write(path, rows)
      written[task][split] = path
  return written


HERE = Path(__file__).resolve().parent
WORKDIRS = {"pairs": "runs/rt_pairs_fresh", "scores": "runs/rt_scores"}
PHASES = {"finetune": "teacher (fine-tuned all-MiniLM-L6-v2, 1 epoch)",
          "distill_kd_selection": "student 3x192, weight selection + KD",
          "distill": "student 3x192, KD", "distill_ce": "student 3x192, labels only (CE / MSE)"}


def pipeline_args(task: str, files: dict[str, Path]) -> list[str]:
  """`wdjax pipeline quickstart` overrides of a derived task (the quickstart's teacher recipe,
  3x192 student and step budget)."""
  sets = [f"workdir={WORKDIRS[task]}", "data.dataset=files", "data.group_column=group",
          "log.progress=false"] + [f"data.{s}_file={p}" for s, p in files.items()]
  if task == "pairs":
    sets += ["data.text_column=first", "data.text_pair_column=second", "data.max_length=96"]
  else:
    sets += ["data.label_column=score"]
  return [a for kv in sets for a in ("--set", kv)]


def collect() -> dict:
  import datetime
  import platform
  import subprocess
  import jax
  metrics = {"pairs": ("accuracy", "macro_f1", "mcc"), "scores": ("pearson", "spearman", "mse")}
  out = {"info": {"date": datetime.date.today().isoformat(),
                  "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                           text=True).stdout.strip(),
                  "hardware": f"{platform.processor() or platform.machine()}, {jax.devices()[0].platform}",
                  "jax": jax.__version__, "python": platform.python_version()}, "tasks": {}}
  for task, work in WORKDIRS.items():
    rows = {}
    for phase, label in PHASES.items():
      r = json.loads((Path(work) / phase / "results.json").read_text())
      rows[label] = {m: r[f"test_{m}"] for m in metrics[task]} | {"steps": r["steps"],
                                                                  "model_params": r["model_params"]}
    out["tasks"][task] = rows
  return out


def markdown(results: dict) -> str:
  info = results["info"]
  lines = [f"Derived Rotten Tomatoes tasks, test split, seed 0; {info['date']}, commit {info['commit']}, "
           f"{info['hardware']}, jax {info['jax']}.", ""]
  for task, rows in results["tasks"].items():
    names = list(next(iter(rows.values())))[:3]
    lines += [f"**{task}**", "", "| model | " + " | ".join(names) + " | steps |",
              "|---|" + "---|" * (len(names) + 1)]
    for label, r in rows.items():
      cells = " | ".join(f"{r[n]:.4f}" if n == "mse" else f"{100 * r[n]:.2f}" for n in names)
      lines.append(f"| {label} | {cells} | {r['steps']} |")
    lines.append("")
  return "\n".join(lines)


if __name__ == "__main__":
  import subprocess
  out_dir = sys.argv[1] if len(sys.argv) > 1 and not sys.argv[1].startswith("--") else "runs/derived"
  written = write(out_dir)
  for task, files in written.items():
    print(task, {s: len(builders.read_table(p)) for s, p in files.items()})
  if "--run" in sys.argv:
    for task, files in written.items():
      subprocess.run([sys.executable, "-m", "wdjax", "pipeline", "quickstart", *pipeline_args(task, files)],
                     check=True)
  if "--run" in sys.argv or "--collect" in sys.argv:
    results = collect()
    (HERE / "results_derived_cpu.json").write_text(json.dumps(results, indent=2) + "\n")
    (HERE / "results_derived_cpu.md").write_text(markdown(results))
    print(markdown(results))
