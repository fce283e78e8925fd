"""The MT table: teacher, from-scratch student, sequence-KD student and WD student on Bible
En-De, with BLEU, parameters and decoding speed measured side by side.

    python benchmarks/mt/run.py --hardware cpu          # mt:cpu, about 75 min on 2 cores
    python benchmarks/mt/run.py --hardware gpu          # the paper's shapes (not yet run)
    python benchmarks/mt/run.py --rows teacher seq-kd   # a subset; finished phases are reused

Every row is the phase `wdjax finetune/distill wdjax/configs/mt.py:<hw>` runs (same workdir, resumable).
Decoding speed: beam search (task.beam) of the first 256 test sources, batch 64 (sentences/s) and
batch 1 (median latency over 16 sentences), after a warm-up pass that compiles every shape;
models alternate within each repeat so machine load hits them alike. Writes
`benchmarks/mt/results_<hardware>.json` and `.md`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import jax

from wdjax import config as config_lib
from wdjax.generators import param_count
from wdjax.models import transformer
from wdjax.tasks import translation as translate
from wdjax.train import run as run_lib

HERE = Path(__file__).resolve().parent

ROWS = {  # label -> (phase, --set assignments); the teacher is `finetune`
    "scratch": ("distill_scratch", ["task.seq_kd=none"]),
    "seq-kd": ("distill", []),
    # WD from truncated-identity maps (docs/methods.md §1.9's function-preserving extension)
    "wd": ("distill_wd", ["method.name=wd", "method.init=identity", "distill.optim.lr=3e-4",
                          "method.phase2_lr=1.5e-3"]),
    # WD as the reference initialises it (xavier maps, elementwise encoder)
    "wd-paper": ("distill_wd_paper", ["method.name=wd", "method.init=xavier"]),
}


def decoding_speed(models: dict[str, Path], cfg, repeats: int = 3) -> dict[str, dict]:
  """Sentences/s at batch 64 and median latency (ms) at batch 1, for every model, interleaved."""
  task = translate.load_pairs(cfg, next(iter(models.values())) / "tokenizer.json")
  big, single = task.test.take(256), task.test.take(16)
  loaded = {k: transformer.load(d) for k, d in models.items()}

  def run(name, split, batch):
    cfg_m, params = loaded[name]
    t0 = time.perf_counter()
    translate.translate(cfg_m, params, split, beam=cfg.task.beam, len_penalty=cfg.task.len_penalty,
                        max_len=cfg.data.max_length, batch_size=batch,
                        pad_to_multiple=cfg.data.pad_to_multiple, progress=False)
    return time.perf_counter() - t0

  for name in loaded:  # compile every shape first
    run(name, big, 64)
    for i in range(len(single)):
      run(name, _one(single, i), 1)
  totals = {k: [] for k in loaded}
  latency = {k: [] for k in loaded}
  for _ in range(repeats):
    for name in loaded:
      totals[name].append(run(name, big, 64))
      latency[name] += [run(name, _one(single, i), 1) for i in range(len(single))]
  return {k: {"sentences_per_s_b64": len(big) / statistics.median(totals[k]),
              "latency_ms_b1": 1e3 * statistics.median(latency[k])} for k in loaded}


def _one(split, i):
  return dataclasses.replace(split, src=split.src[i:i + 1], src_len=split.src_len[i:i + 1],
                             tgt=split.tgt[i:i + 1], tgt_len=split.tgt_len[i:i + 1],
                             sources=split.sources[i:i + 1], references=split.references[i:i + 1])


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--hardware", default="cpu", choices=["cpu", "gpu"])
  ap.add_argument("--rows", nargs="+", default=["teacher", "scratch", "seq-kd", "wd"],
                  choices=["teacher", *ROWS])
  ap.add_argument("--set", action="append", default=[], help="extra config assignments for every row")
  ap.add_argument("--no-speed", action="store_true", help="skip the decoding-speed measurement")
  args = ap.parse_args(argv)
  base = config_lib.load(f"mt:{args.hardware}", args.set)
  results, dirs = {}, {}
  t0 = time.perf_counter()
  results["teacher"] = run_lib.finetune(base)
  dirs["teacher"] = Path(base.workdir) / "finetune" / "model"
  for row in args.rows:
    if row == "teacher":
      continue
    phase, sets = ROWS[row]
    cfg = config_lib.apply_overrides(base, sets)
    results[row] = run_lib.distill(cfg, phase=phase)
    two_phase = cfg.method.name == "wd"
    dirs[row] = Path(cfg.workdir) / (phase + "_phase2" if two_phase else phase) / "model"
    print(f"{row:10s} test BLEU {results[row]['test_bleu']:.2f}", flush=True)
  speed = None if args.no_speed else decoding_speed(dirs, base)
  rows = []
  for name in ["teacher", *[r for r in args.rows if r != "teacher"]]:
    r = results[name]
    cfg_m, params = transformer.load(dirs[name])
    row = {"row": name, "test_bleu": r["test_bleu"], "validation_bleu": r["validation_bleu"],
           "params": param_count(params), "trainable_params": r["trainable_params"],
           "decoder": f"{cfg_m.num_layers}x{cfg_m.hidden_size}"}
    if speed:
      row.update(speed[name], speedup_b64=speed[name]["sentences_per_s_b64"] / speed["teacher"]["sentences_per_s_b64"],
                 speedup_b1=speed["teacher"]["latency_ms_b1"] / speed[name]["latency_ms_b1"])
    rows.append(row)
  info = {"hardware": args.hardware, "device": str(jax.devices()[0]), "jax": jax.__version__,
          "config": config_lib.to_dict(base), "wall_s": time.perf_counter() - t0}
  stem = HERE / f"results_{args.hardware}"
  stem.with_suffix(".json").write_text(json.dumps({"info": info, "rows": rows}, indent=2) + "\n")
  stem.with_suffix(".md").write_text(table(rows, info) + "\n")
  print(table(rows, info))
  return 0


def table(rows: list[dict], info: dict) -> str:
  c = info["config"]
  head = (f"Bible {c['task']['pair']}, test = Romans + Ephesians ({info['hardware']}, {info['device']}, "
          f"jax {info['jax']}); BLEU: sacrebleu, beam {c['task']['beam']}")
  lines = [head, "", "| model | decoder | params | trained params | test BLEU | val BLEU | sent/s b64 | "
           "ms b1 | speed-up b64 | speed-up b1 |", "|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    sp = (f"{r['sentences_per_s_b64']:.1f} | {r['latency_ms_b1']:.1f} | {r['speedup_b64']:.2f}x | "
          f"{r['speedup_b1']:.2f}x") if "speedup_b1" in r else "- | - | - | -"
    lines.append(f"| {r['row']} | {r['decoder']} | {r['params'] / 1e6:.2f}M | "
                 f"{r['trainable_params'] / 1e6:.2f}M | {r['test_bleu']:.2f} | {r['validation_bleu']:.2f} | {sp} |")
  return "\n".join(lines)


if __name__ == "__main__":
  sys.exit(main())
