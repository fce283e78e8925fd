"""Quality table: every method, same teacher, same student shape, same step budget, several seeds.

    python benchmarks/quality/run.py                       # cpu: MiniLM 6x384 -> 3x192, 3 seeds
    python benchmarks/quality/run.py --hardware gpu        # MPNet 12x768 -> 6x384
    python benchmarks/quality/run.py --methods kd ws --seeds 0
    python benchmarks/quality/run.py --methods opdf --update   # re-run rows, keep the others
    python benchmarks/quality/run.py --task vision         # Fashion-MNIST ViT 4x128 -> 4x64
                                                           # (wdjax/configs/vit.py; results_vision_*)

It fine-tunes the teacher once (seed 0) and trains, for each seed, the student by: CE from
scratch, logit KD from scratch, weight selection + KD, WS, GWS, WD (phase 1 + 2) and WID
(compactors on the task loss or, task-agnostic, on masked-LM; then the cut student fine-tuned),
each from its preset in `wdjax/configs/` (so the numbers are what `wdjax distill <preset>:cpu` gives).
All runs live in the preset's workdir and resume like any other run. It writes
`benchmarks/quality/results_<hardware>.json`, `.md` (mean +- std test accuracy, trainable
parameters during training, student parameters, CPU latency of student and teacher) and `.png`.

Latency: the median wall time of a jitted forward pass on the CPU (this process's devices),
batch 1 and batch 32 at 64 tokens, after warm-up.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from wdjax import config as config_lib, notebook
from wdjax.models import bert, hf
from wdjax.train import run as run_lib

HERE = Path(__file__).resolve().parent

METHODS = {  # label -> (preset, extra --set assignments)
    "ce": ("kd", ["kd.alpha=0.0"]),
    "kd": ("kd", []),
    "select+kd": ("select_kd", []),
    # the same student keeping only the tokens the training text uses (its twin: select+kd)
    "select+kd-vocab": ("select_kd", ["student.vocabulary=corpus"]),
    # the same, from the teacher's most active units on 16 training batches (generators/importance.py)
    "importance+kd": ("select_kd", ["method.init=importance"]),
    # the same, a shallower student's layers chosen together: the subset whose network moves the
    # teacher's output least (method.depth_score=output) instead of each layer's block influence
    "importance+kd-output": ("select_kd", ["method.init=importance", "method.depth_score=output"]),
    # intermediate-layer distillation beside the logit KD (train/intermediate.py): hidden states
    # (1 - R^2 of their affine fit) and attention maps, weight 1 each
    "kd+inter": ("kd", ["kd.hidden_weight=1", "kd.attention_weight=1"]),
    "importance+kd+inter": ("select_kd", ["method.init=importance", "kd.hidden_weight=1",
                                          "kd.attention_weight=1"]),
    "ws": ("ws", []),
    "ws-importance": ("ws", ["method.init=importance"]),  # WS's maps start at importance selection
    "gws": ("gws", []),
    # WD as wdjax/configs/wd.py runs it: identity-initialised maps (an extension, docs/methods.md 1.9)
    "wd": ("wd", []),
    # WD as the paper initialises it: xavier-normal maps, phase-1 lr 3e-4
    "wd-paper": ("wd", ["method.init=xavier", "distill.optim.lr=3e-4"]),
    "wid": ("wid", []),
    # the same with logit KD in both phases (the paper trains phase 1 on the task's labels alone)
    "wid+kd": ("wid", ["kd.alpha=0.9"]),
    # task-agnostic WID: compactors on masked-LM over the task's text, then fine-tuned
    "wid-mlm": ("wid", ["method.objective=mlm"]),
    # OPDF's own setting: a half-depth student at the teacher's width (3x384 on cpu), from the
    # teacher's layers; its baseline is KD alone on that student, and the ablation drops the loss
    # (both start from the teacher's first layers, as the paper's student and its KD baseline)
    "kd-384": ("select_kd", ["SAME_WIDTH", "method.layer_map=first_n"]),
    "opdf": ("opdf", []),
    "opdf-noloss": ("opdf", ["method.constraint_lambda=0"]),
    # where the constraint can act: a random start (its baseline: KD from scratch at 3x384, the
    # size curve's kd row), and the scale-free constraint at lambda 10, whose gradient at the
    # start is about KD's (opdf_gradients_cpu.md) where the paper's is 4e-8 of it
    "opdf-random": ("opdf", ["method.init=random"]),
    "opdf-random-noloss": ("opdf", ["method.init=random", "method.constraint_lambda=0"]),
    "opdf-random-relative": ("opdf", ["method.init=random", "method.constraint=relative",
                                      "method.constraint_lambda=10"]),
    "opdf-relative": ("opdf", ["method.constraint=relative", "method.constraint_lambda=10"]),
}


# Vision (`--task vision`): every row from wdjax/configs/vit.py, the same student shape (4x64 on cpu,
# half the teacher's width at its depth: weight selection's ViT-S -> ViT-T setting) and budget.
VISION_METHODS = {
    "ce": ("vit", ["kd.alpha=0.0"]),  # the student from scratch, no teacher
    "kd": ("vit", []),
    "select+kd": ("vit", ["method.init=selection"]),  # weight selection's own setting, plus KD
    "importance+kd": ("vit", ["method.init=importance"]),  # the most active units (generators/importance.py)
    # a shallower student's layers: the subset that moves the teacher's last representation least
    "importance+kd-output": ("vit", ["method.init=importance", "method.depth_score=output"]),
    "importance+kd+inter": ("vit", ["method.init=importance", "kd.hidden_weight=1",
                                    "kd.attention_weight=1"]),  # plus intermediate-layer terms
    "ws": ("vit", ["method.name=ws"]),
    "gws": ("vit", ["method.name=gws"]),
    "wd": ("vit", ["method.name=wd", "method.init=identity"]),
    "wid": ("vit", ["method.name=wid"]),
    "opdf": ("vit", ["method.name=opdf"]),  # at half width: the width-mismatch extension
}
TASKS = {"text": dict(methods=METHODS, base="kd", data="Rotten Tomatoes", inputs="64 tokens"),
         "vision": dict(methods=VISION_METHODS, base="vit", data="Fashion-MNIST",
                        inputs="28x28 images")}


def _median_ms(fwd, *args, repeats: int = 30) -> float:
  fwd(*args).block_until_ready()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fwd(*args).block_until_ready()
    times.append(time.perf_counter() - t0)
  return 1e3 * statistics.median(times)


def latency_ms(model_dir: Path, batch: int, seq: int = 64) -> float:
  """Median jitted forward time of a saved model: a text classifier on `seq` tokens, or a ViT."""
  if json.loads((Path(model_dir) / "config.json").read_text()).get("model_type") == "vit":
    from wdjax.models import vit
    cfg, params = vit.load(model_dir)
    graph = nnx.split(vit.build(cfg))[0]
    x = np.random.default_rng(0).normal(size=(batch, cfg.image_size, cfg.image_size, 1)).astype(np.float32)
    return _median_ms(jax.jit(lambda p, x: nnx.merge(graph, p)(x)), jax.device_put(params), x)
  cfg, params, _ = hf.load(model_dir)
  graph = nnx.split(bert.build(cfg))[0]
  ids = np.random.default_rng(0).integers(1000, 5000, (batch, seq)).astype(np.int32)
  return _median_ms(jax.jit(lambda p, i, m: nnx.merge(graph, p)(i, m)), jax.device_put(params), ids,
                    np.ones_like(ids))


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--hardware", choices=["cpu", "gpu"], default="cpu")
  ap.add_argument("--task", choices=sorted(TASKS), default="text")
  ap.add_argument("--methods", nargs="*", help="rows to run (default: all of the task's)")
  ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
  ap.add_argument("--set", action="append", default=[], help="extra overrides for every run")
  ap.add_argument("--tag", default="", help="write results_<hardware>_<tag>.* (a side table)")
  ap.add_argument("--latency", default="measure",
                  help="'measure', 'none', or a results JSON whose latencies to reuse (measured "
                       "on a quiet machine: latency under load means nothing)")
  ap.add_argument("--update", action="store_true",
                  help="replace only the rows run in the existing results file, keeping the other "
                       "rows and its latency (same teacher and seeds, or it is refused)")
  args = ap.parse_args()
  task = TASKS[args.task]
  methods = task["methods"]
  unknown = set(args.methods or ()) - set(methods)
  if unknown:
    ap.error(f"unknown methods for --task {args.task}: {sorted(unknown)}; choose from {list(methods)}")
  quiet = lambda *_: None

  base = config_lib.load(f"{task['base']}:{args.hardware}", args.set)
  teacher = run_lib.finetune(base)
  teacher_dir = Path(base.teacher_dir)
  rows = {}
  for label in args.methods or list(methods):
    preset, extra = methods[label]
    runs = []
    for seed in args.seeds:
      sets = notebook.expand(extra, args.hardware)  # "SAME_WIDTH": the teacher's width
      cfg = config_lib.load(f"{preset}:{args.hardware}",
                            sets + args.set + [f"seed={seed}", f"teacher.path={teacher_dir}"])
      cfg = dataclasses.replace(cfg, log=dataclasses.replace(cfg.log, progress=False))
      tag = f"_{args.tag}" if args.tag else ""  # a side table's runs are its own phases
      phase = f"quality_{label.replace('+', '_').replace('-', '_')}{tag}_s{seed}"
      t0 = time.time()
      result = run_lib.distill(cfg, phase=phase, log=quiet)
      print(f"{label:10s} seed {seed}: test {100 * result['test_accuracy']:.2f} "
            f"(val {100 * result['validation_accuracy']:.2f}) in {time.time() - t0:.0f}s", flush=True)
      runs.append(dict(result, seed=seed, model=str(run_lib.final_model_dir(cfg, phase)),
                       wall_s=time.time() - t0))  # a resumed run counts only its own part
    acc = [100 * r["test_accuracy"] for r in runs]
    rows[label] = {"runs": runs, "test_mean": float(np.mean(acc)),
                   "test_std": float(np.std(acc, ddof=1)) if len(acc) > 1 else 0.0,
                   "val_mean": float(np.mean([100 * r["validation_accuracy"] for r in runs])),
                   "trainable_params": runs[0]["trainable_params"],
                   "student": f"{cfg.student.num_layers}x{cfg.student.hidden_size}",
                   "student_params": runs[0]["model_params"]}

  stem = f"results_{'vision_' if args.task == 'vision' else ''}{args.hardware}" + (f"_{args.tag}" if args.tag else "")
  if args.update:
    rows, info = updated(HERE / f"{stem}.json", rows, methods, 100 * teacher["test_accuracy"], args.seeds)
    write(stem, info, rows)
    return
  student_dir = Path(rows[next(iter(rows))]["runs"][0]["model"])
  if args.latency == "measure":
    latency = {name: {str(b): latency_ms(d, b) for b in (1, 32)}
               for name, d in (("teacher", teacher_dir), ("student", student_dir))}
  elif args.latency == "none":
    latency = None
  else:  # a quiet machine's measurement of the same models, from an earlier results file
    latency = json.loads(Path(args.latency).read_text())["info"]["latency_ms"]
  first = rows[next(iter(rows))]["runs"][0]
  info = {"hardware": args.hardware, "data": task["data"], "inputs": task["inputs"], "device": jax.devices()[0].device_kind, "jax": jax.__version__,
          "seeds": args.seeds, "teacher_test": 100 * teacher["test_accuracy"],
          "teacher_params": teacher["model_params"], "latency_ms": latency,
          "budget_steps": first["total_steps"] + first.get("phase1", {}).get("total_steps", 0)}
  write(stem, info, rows)


def updated(path: Path, new_rows: dict, methods: dict, teacher_test: float, seeds: list[int]
            ) -> tuple[dict, dict]:
  """The rows and info of the results file `path` with `new_rows` in place of theirs, in the
  task's row order; refused when the teacher or the seeds differ (the rows would not compare)."""
  if not path.exists():
    raise SystemExit(f"--update: no {path} to update; run without --update first")
  old = json.loads(path.read_text())
  info = old["info"]
  if abs(info["teacher_test"] - teacher_test) > 1e-6 or info["seeds"] != seeds:
    raise SystemExit(f"--update: {path} has teacher {info['teacher_test']:.2f} and seeds "
                     f"{info['seeds']}, this run {teacher_test:.2f} and {seeds}: re-run every row")
  rows = {**old["rows"], **new_rows}
  return {k: rows[k] for k in [*methods, *rows] if k in rows}, info


def write(stem: str, info: dict, rows: dict) -> None:
  (HERE / f"{stem}.json").write_text(json.dumps({"info": info, "rows": rows}, indent=2))
  table = markdown(info, rows)
  (HERE / f"{stem}.md").write_text(table)
  plot(rows, info, HERE / f"{stem}.png")
  print(table)


def _f1_mean(row: dict) -> float | None:
  """Mean test macro-F1 of a row's runs; None where one of its results lacks it."""
  f1 = [100 * r["test_macro_f1"] for r in row["runs"] if "test_macro_f1" in r]
  return float(np.mean(f1)) if len(f1) == len(row["runs"]) else None


def _minutes(row: dict) -> str:
  """Mean wall minutes per seed of a row (the 2-core CPU, whatever else ran beside it); "—" where
  a run's time was not recorded."""
  t = [r["wall_s"] for r in row["runs"] if "wall_s" in r]
  return f"{np.mean(t) / 60:.1f}" if len(t) == len(row["runs"]) else "—"


def markdown(info: dict, rows: dict) -> str:
  lat = info["latency_ms"]
  lines = [
      f"{info.get('data', 'Rotten Tomatoes')} test accuracy, mean +- std over seeds {info['seeds']}; same step budget "
      f"({info['budget_steps']} steps) for every method; teacher {info['teacher_test']:.2f}.",
      "",
      "| method | student | test accuracy | test macro-F1 | val accuracy | trainable params (training) "
      "| trainable + Adam (fp32) | student params | CPU min / seed |",
      "|---|---|---|---|---|---|---|---|---|",
      f"| teacher ({'trained' if info.get('data') == 'Fashion-MNIST' else 'fine-tuned'}) | | {info['teacher_test']:.2f} | | | | | {info['teacher_params'] / 1e6:.2f}M | |",
  ]
  for label, r in rows.items():
    f1 = _f1_mean(r)
    lines.append(f"| {label} | {r.get('student', '')} | {r['test_mean']:.2f} +- {r['test_std']:.2f} | "
                 f"{'—' if f1 is None else f'{f1:.2f}'} | {r['val_mean']:.2f} | "
                 f"{r['trainable_params'] / 1e6:.2f}M | {12 * r['trainable_params'] / 2**20:.0f} MB | "
                 f"{r['student_params'] / 1e6:.2f}M | {_minutes(r)} |")
  if lat:
    t, s = ({str(k): v for k, v in lat[m].items()} for m in ("teacher", "student"))
    lines += ["", f"CPU latency ({info['device']}, {info.get('inputs', '64 tokens')}): teacher {t['1']:.1f} ms vs "
                  f"student {s['1']:.1f} ms at batch 1 ({t['1'] / s['1']:.1f}x), "
                  f"{t['32']:.0f} ms vs {s['32']:.0f} ms at batch 32 ({t['32'] / s['32']:.1f}x)."]
  return "\n".join(lines) + "\n"


def plot(rows: dict, info: dict, path: Path) -> None:
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    print("matplotlib is not installed: no plot (pip install matplotlib)")
    return
  labels = list(rows)
  fig, ax = plt.subplots(figsize=(7, 3.5))
  for i, label in enumerate(labels):
    acc = [100 * r["test_accuracy"] for r in rows[label]["runs"]]
    ax.scatter([i] * len(acc), acc, color="0.6", s=12, zorder=2)
    ax.errorbar(i, rows[label]["test_mean"], yerr=rows[label]["test_std"], fmt="o", color="C0",
                capsize=4, zorder=3)
  ax.axhline(info["teacher_test"], color="C3", ls="--", lw=1, label="teacher")
  ax.set_xticks(range(len(labels)), labels)
  ax.set_ylabel("test accuracy (%)")
  ax.set_title(f"{info.get('data', 'Rotten Tomatoes')}, {info['hardware']} preset, seeds {info['seeds']}")
  ax.legend(loc="lower right")
  fig.tight_layout()
  fig.savefig(path, dpi=120)


if __name__ == "__main__":
  main()
