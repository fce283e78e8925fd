"""The quality table as a size curve: test accuracy against student parameters, per method.

    python benchmarks/quality/curve.py                  # text (Rotten Tomatoes), cpu
    python benchmarks/quality/curve.py --task vision    # Fashion-MNIST

It reads the main table (`results_<hardware>.json`) and every side table of another student size
that `run.py --tag <layers>x<width>` wrote (`results_<hardware>_3x384.json`, ...), groups their
rows by student size, and writes `curve_<task>_<hardware>.json`, `.md` and `.png` beside them. For each size the
markdown names the best weight-transfer row (every row but CE and KD from scratch) and its margin
over KD and over uniform selection + KD.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
FROM_SCRATCH = ("ce", "kd", "kd+inter")  # rows that inherit nothing from the teacher


def tables(task: str, hardware: str) -> dict[str, dict]:
  """`{student size: {"info", "rows"}}`, smallest student first: the rows of the main table and of
  its size side tables, grouped by their student (the main table's OPDF rows are at the teacher's
  width, so they join that size)."""
  stem = f"results_{'vision_' if task == 'vision' else ''}{hardware}"
  out: dict[str, dict] = {}
  for path in sorted(HERE.glob(f"{stem}*.json")):
    tag = path.stem[len(stem):].lstrip("_")
    if tag and not re.fullmatch(r"\d+x\d+", tag):
      continue  # a side table of another kind (not a student size)
    results = json.loads(path.read_text())
    for label, row in results["rows"].items():
      size = out.setdefault(row["student"], {"info": results["info"], "rows": {}})
      size["rows"].setdefault(label, row)
  first = lambda kv: next(iter(kv[1]["rows"].values()))["student_params"]
  return dict(sorted(out.items(), key=first))


def best_transfer(rows: dict) -> tuple[str, float] | None:
  transfer = {k: r["test_mean"] for k, r in rows.items() if k not in FROM_SCRATCH}
  return max(transfer.items(), key=lambda kv: kv[1]) if transfer else None


def markdown(task: str, curve: dict) -> str:
  sizes = list(curve)
  methods = list(dict.fromkeys(m for s in sizes for m in curve[s]["rows"]))
  info = next(iter(curve.values()))["info"]
  params = {s: next(iter(curve[s]["rows"].values()))["student_params"] for s in sizes}
  teachers = {s: curve[s]["info"]["teacher_test"] for s in sizes}
  head = {s: f"{s} ({params[s] / 1e6:.2f}M)" for s in sizes}
  teacher = f"teacher {info['teacher_test']:.2f}"
  if len(set(teachers.values())) > 1:  # tables of different trainings of the teacher
    head = {s: f"{s} ({params[s] / 1e6:.2f}M; teacher {teachers[s]:.2f})" for s in sizes}
    teacher = "teacher accuracy in each size's column"
  lines = [f"{info.get('data', task)} test accuracy (mean +- std over seeds {info['seeds']}) by student "
           f"size; {teacher} ({info['teacher_params'] / 1e6:.2f}M parameters).",
           "", "| method | " + " | ".join(head[s] for s in sizes) + " |",
           "|---|" + "---|" * len(sizes)]
  for m in methods:
    cells = [f"{curve[s]['rows'][m]['test_mean']:.2f} +- {curve[s]['rows'][m]['test_std']:.2f}"
             if m in curve[s]["rows"] else "" for s in sizes]
    lines.append(f"| {m} | " + " | ".join(cells) + " |")
  lines.append("")
  for s in sizes:
    rows, best = curve[s]["rows"], best_transfer(curve[s]["rows"])
    if best is None:
      continue
    margin = lambda base: (f"{best[1] - rows[base]['test_mean']:+.2f} over {base}" if base in rows else "")
    parts = [p for p in (margin("kd"), margin("select+kd")) if p]
    lines.append(f"- {s}: best weight transfer {best[0]} {best[1]:.2f}" + (f" ({', '.join(parts)})" if parts else ""))
  return "\n".join(lines) + "\n"


def plot(task: str, curve: dict, path: Path) -> None:
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    print("matplotlib is not installed: no plot (pip install matplotlib)")
    return
  sizes = list(curve)
  info = next(iter(curve.values()))["info"]
  fig, ax = plt.subplots(figsize=(7, 4))
  for m in dict.fromkeys(m for s in sizes for m in curve[s]["rows"]):
    pts = [(curve[s]["rows"][m]["student_params"] / 1e6, curve[s]["rows"][m]["test_mean"],
            curve[s]["rows"][m]["test_std"]) for s in sizes if m in curve[s]["rows"]]
    if len(pts) < 2:
      continue
    x, y, e = zip(*pts)
    ax.errorbar(x, y, yerr=e, marker="o", capsize=3, label=m)
  ax.axhline(info["teacher_test"], color="0.3", ls="--", lw=1, label="teacher")
  ax.set_xlabel("student parameters (M)")
  ax.set_ylabel("test accuracy (%)")
  ax.set_title(f"{info.get('data', task)}: accuracy by student size ({', '.join(sizes)})")
  ax.legend(fontsize=7, loc="lower right")
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--task", choices=["text", "vision"], default="text")
  ap.add_argument("--hardware", choices=["cpu", "gpu"], default="cpu")
  args = ap.parse_args()
  curve = tables(args.task, args.hardware)
  if not curve:
    raise SystemExit(f"no results for --task {args.task} --hardware {args.hardware}; run run.py first")
  stem = HERE / f"curve_{args.task}_{args.hardware}"
  points = {s: {m: {k: r[k] for k in ("student_params", "test_mean", "test_std", "val_mean")}
                | {"test": [100 * x["test_accuracy"] for x in r["runs"]]}
                for m, r in c["rows"].items()} for s, c in curve.items()}
  stem.with_suffix(".json").write_text(json.dumps(
      {"info": next(iter(curve.values()))["info"], "sizes": points}, indent=2))
  table = markdown(args.task, curve)
  stem.with_suffix(".md").write_text(table)
  plot(args.task, curve, stem.with_suffix(".png"))
  print(table)


if __name__ == "__main__":
  main()
