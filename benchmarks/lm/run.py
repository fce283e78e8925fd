"""The causal-LM table: SmolLM2-135M (4-bit GGUF, dequantised) and half-depth students by every
method that runs on the Llama family, on the same token budget, with perplexity, parameters,
CPU time and speed measured side by side.

    python benchmarks/lm/run.py --hardware cpu                 # lm:cpu, about 70 min on 2 cores
    python benchmarks/lm/run.py --rows importance+kd kd        # a subset; finished phases are reused

Every row is the phase `wdjax distill lm:<hw>` runs with the row's settings (one workdir, so
the teacher's cached top-k logits are computed once). The scratch rows (CE, KD) take a higher
learning rate than the inheriting ones (1e-3 against 3e-4), as a randomly initialised network
wants. Besides the trained rows, the table gives each inheriting student's perplexity before
training (what selection alone keeps). Speed: next-token forward passes over test rows at batch
16 (tokens/s) and greedy generation of 32 tokens after a 16-token prompt at batch 1 (tokens/s,
KV cache), models interleaved within each repeat. Writes `benchmarks/lm/results_<hw>.json`, `.md`
and `perplexity_<hw>.png`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from wdjax import config as config_lib, generators, validate
from wdjax.generators import param_count
from wdjax.models import llama
from wdjax.tasks import causal_lm
from wdjax.train import mesh as mesh_lib
from wdjax.train import run as run_lib

HERE = Path(__file__).resolve().parent

ROWS = {  # label -> (phase, --set assignments)
    "ce": ("distill_ce", ["method.init=random", "kd.alpha=0.0", "distill.optim.lr=1e-3"]),
    "kd": ("distill_kd", ["method.init=random", "distill.optim.lr=1e-3"]),
    "select+kd": ("distill_kd_selection", ["method.init=selection"]),  # every 2nd layer
    "importance+kd": ("distill_kd_importance", ["method.init=importance"]),  # most influential layers
    # the 15 layers whose network moves the teacher's last hidden state least (greedy removal on
    # 2 calibration batches: about 345 sub-network passes), then KD
    "importance+kd-output": ("distill_kd_importance_output", [
        "method.init=importance", "method.depth_score=output", "method.calibration_batches=2"]),
    # the same, keeping only the tokens the training text uses (student.vocabulary=corpus)
    "importance+kd+vocab": ("distill_kd_importance_vocab", ["method.init=importance",
                                                            "student.vocabulary=corpus"]),
    # learned maps from the importance-selected student (WS: W_s = L W_t R)
    "ws-importance": ("distill_ws", ["method=ws", "method.init=importance"]),
    # gated WS: W_s = g * W_m + (1 - g) * L W_t R, with W_m and both maps from the same selection
    "gws-importance": ("distill_gws", ["method=gws", "method.init=importance"]),
    # WD from identity maps over contiguous layer pairs; WID narrowing the every-2nd-layer
    # student's residual stream (576 -> 432: 48 of each 64-unit chunk) and FFN (1536 -> 1024),
    # its heads kept, with KD in both phases; OPDF's MPO cores from the importance selection
    "wd": ("distill_wd", ["method=wd", "method.init=identity"]),
    "wid": ("distill_wid", ["method=wid", "kd.alpha=0.9", "student.hidden_size=432",
                            "student.intermediate_size=1024"]),
    "opdf-importance": ("distill_opdf", ["method=opdf", "method.init=importance",
                                         "method.constraint_lambda=0"]),
    # a smaller student: 10 of the 30 layers, 384 wide, 6 of the 9 query heads (2 of the 3 KV
    # groups, whole), FFN 1024, from the teacher's most active units and most influential layers
    "importance+kd-small": ("distill_kd_importance_small", [
        "method.init=importance", "student.num_layers=10", "student.hidden_size=384",
        "student.num_heads=6", "student.intermediate_size=1024"]),
}


# rows whose student starts from the teacher's weights: the table gives its perplexity before training
INHERITS = ("select+kd", "importance+kd", "importance+kd-output", "ws-importance", "gws-importance",
            "importance+kd-small")


def perplexity(cfg_m, params, split, batch_size: int) -> float:
  objective = causal_lm.CausalLanguageModel()
  mesh = mesh_lib.make_mesh(1, 1)
  sh = mesh_lib.param_shardings(params, mesh)
  graph = nnx.graphdef(nnx.eval_shape(lambda: llama.build(cfg_m)))
  predictor = objective.predictor(objective.apply(graph), mesh, sh, batch_size, 128)
  return predictor.scores(jax.device_put(params, sh), split)["perplexity"]


def initial_perplexity(cfg, teacher, data, row: str) -> float:
  """The inheriting student's test perplexity before any training."""
  c = config_lib.apply_overrides(cfg, ROWS[row][1])
  s_cfg = causal_lm.student_config(c, teacher.config)
  shapes = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: llama.build(s_cfg))))
  indices = (causal_lm.TASK.unit_ranking(c, teacher, data, shapes, print)
             if c.method.ranks_units else None)
  params = generators.select(teacher.params, shapes, c.method.layer_map or "every_k", indices)
  return perplexity(s_cfg, params, data.test, c.distill.eval_batch_size)


def speed(models: dict[str, tuple], data, repeats: int = 3) -> dict[str, dict]:
  """Forward tokens/s (batch 16 of test rows) and greedy-generation tokens/s (batch 1)."""
  batch = data.test.batch(np.arange(min(16, len(data.test))), 128)
  prompt = batch["input_ids"][:1, :16]
  fns = {}
  for name, (cfg_m, params) in models.items():
    model = nnx.merge(nnx.graphdef(nnx.eval_shape(lambda c=cfg_m: llama.build(c))), params)
    graph, state = nnx.split(model)
    fwd = jax.jit(lambda s, ids, mask, g=graph: nnx.merge(g, s)(ids, mask))
    fns[name] = (fwd, state, cfg_m, params)

  def forward(name):
    fwd, state, _, _ = fns[name]
    t0 = time.perf_counter()
    jax.block_until_ready(fwd(state, batch["input_ids"], batch["attention_mask"]))
    return time.perf_counter() - t0

  def generate(name):
    _, _, cfg_m, params = fns[name]
    t0 = time.perf_counter()
    jax.block_until_ready(llama.generate(cfg_m, params, prompt, 32))
    return time.perf_counter() - t0

  for name in fns:  # compile
    forward(name)
    generate(name)
  fw = {k: [] for k in fns}
  gen = {k: [] for k in fns}
  for _ in range(repeats):
    for name in fns:
      fw[name].append(forward(name))
      gen[name].append(generate(name))
  tokens = int(batch["attention_mask"].sum())
  return {k: {"forward_tokens_per_s": tokens / statistics.median(fw[k]),
              "generate_tokens_per_s": 32 / statistics.median(gen[k])} for k in fns}


def width(row: str, default: int) -> int:
  """The residual width a row's settings give its student (`default` unless they narrow it)."""
  sets = dict(s.split("=", 1) for s in ROWS.get(row, ("", []))[1])
  return int(sets.get("student.hidden_size", default))


def table(rows: list[dict], info: dict) -> str:
  c = info["config"]
  lines = [f"SmolLM2-135M-Instruct (4-bit Q4_1 GGUF, dequantised) -> {c['student']['num_layers']} x "
           f"{c['student']['hidden_size']} students (unless a row narrows them) on the World English Bible; "
           f"{info['train_tokens']:,} training tokens ({c['distill']['steps']} steps of "
           f"{c['distill']['batch_size']} x {c['data']['max_length']}), test perplexity on "
           f"{info['test_tokens']:,} tokens of Romans and Ephesians", "",
           f"{info['date']}, commit {info['commit']}, {info['hardware']}, jax {info['jax']}", "",
           "| model | layers x width | vocabulary | params | test ppl | val ppl | ppl before training | x teacher "
           "| CPU min | forward tok/s | generate tok/s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
  teacher = rows[0]["test_perplexity"]
  for r in rows:
    before = f"{r['initial_test_perplexity']:.1f}" if r.get("initial_test_perplexity") else ""
    minutes = f"{r['cpu_s'] / 60:.1f}" if r.get("cpu_s") else ""
    shape = f"{r['layers']} x {r.get('hidden_size') or width(r['row'], c['student']['hidden_size'])}"
    lines.append(f"| {r['row']} | {shape} | {r['vocab']:,} | {r['params'] / 1e6:.1f}M | {r['test_perplexity']:.2f} | "
                 f"{r['validation_perplexity']:.2f} | {before} | {r['test_perplexity'] / teacher:.2f} | "
                 f"{minutes} | {r.get('forward_tokens_per_s', 0):.0f} | {r.get('generate_tokens_per_s', 0):.1f} |")
  return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 3.2))
  names = [r["row"] for r in rows]
  ax.bar(names, [r["test_perplexity"] for r in rows], color=["#555"] + ["#4a7"] * (len(rows) - 1))
  ax.set_yscale("log")
  ax.set_ylabel("test perplexity (log)")
  ax.set_title("SmolLM2-135M -> smaller students, same token budget")
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--hardware", default="cpu", choices=["cpu", "gpu"])
  ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
  ap.add_argument("--set", action="append", default=[], help="extra config assignments for every row")
  args = ap.parse_args(argv)
  base = validate.load(f"lm:{args.hardware}", args.set)
  stem = HERE / f"results_{args.hardware}"
  old = json.loads(stem.with_suffix(".json").read_text()) if stem.with_suffix(".json").exists() else {}
  old_times = {r["row"]: r.get("cpu_s") for r in old.get("rows", [])}
  task = causal_lm.TASK
  teacher = task.load_teacher(base)
  data = task.load_data(base, teacher, print)
  results, dirs, times = {}, {}, {}
  for row in args.rows:
    phase, sets = ROWS[row]
    cfg = validate.check(config_lib.apply_overrides(base, sets))
    done = (Path(cfg.workdir) / phase / "results.json").exists()
    t0 = time.perf_counter()
    results[row] = run_lib.distill(cfg, phase=phase)
    times[row] = old_times.get(row) if done else time.perf_counter() - t0
    dirs[row] = Path(cfg.workdir) / phase / "model"
    print(f"{row:14s} test perplexity {results[row]['test_perplexity']:.2f}", flush=True)
  models = {"teacher": (teacher.config, teacher.params)}
  models.update({row: llama.load_hf(d) for row, d in dirs.items()})
  speeds = speed(models, data)
  rows = [{"row": "teacher", "layers": teacher.config.num_layers, "hidden_size": teacher.config.hidden_size,
           "vocab": teacher.config.vocab_size,
           "params": param_count(teacher.params), "test_tokens": data.test.tokens,
           "test_perplexity": perplexity(teacher.config, teacher.params, data.test, base.distill.eval_batch_size),
           "validation_perplexity": perplexity(teacher.config, teacher.params, data.validation,
                                               base.distill.eval_batch_size), **speeds["teacher"]}]
  commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          cwd=HERE).stdout.strip()
  for row in args.rows:
    r = results[row]
    row_out = {"row": row, "layers": models[row][0].num_layers, "hidden_size": models[row][0].hidden_size,
               "vocab": models[row][0].vocab_size,
               "params": param_count(models[row][1]),
               "test_perplexity": r["test_perplexity"], "validation_perplexity": r["validation_perplexity"],
               "steps": r["steps"], "cpu_s": times[row], "commit": commit, **speeds[row],
               # its own tokenizer's count (a narrowed vocabulary may split new words finer)
               "test_tokens": causal_lm.load_data(base, dirs[row], models[row][0].eos_token_id,
                                                  models[row][0].vocab_size).test.tokens}
    if row in INHERITS:
      row_out["initial_test_perplexity"] = initial_perplexity(base, teacher, data, row)
    rows.append(row_out)
  # the rows of the file not run now are kept as they were (their speeds: their own run's, beside
  # the teacher of that run), in ROWS order
  earlier = {r["row"]: r for r in old.get("rows", []) if r["row"] in ROWS and r["row"] not in args.rows}
  rows = rows[:1] + sorted(rows[1:] + list(earlier.values()), key=lambda r: list(ROWS).index(r["row"]))
  info = {"date": datetime.date.today().isoformat(), "commit": commit,
          "hardware": f"{args.hardware}: {platform.processor() or platform.machine()}, "
                      f"{jax.device_count()} {jax.devices()[0].platform} device(s)",
          "jax": jax.__version__, "python": platform.python_version(),
          "train_tokens": data.train.tokens, "test_tokens": data.test.tokens,
          "config": config_lib.to_dict(base)}
  stem.with_suffix(".json").write_text(json.dumps({"info": info, "rows": rows}, indent=2) + "\n")
  stem.with_suffix(".md").write_text(table(rows, info) + "\n")
  plot(rows, HERE / f"perplexity_{args.hardware}.png")
  print(table(rows, info))
  return 0


if __name__ == "__main__":
  sys.exit(main())
