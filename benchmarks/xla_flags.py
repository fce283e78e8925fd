"""Does an XLA flag make wdjax's step faster? Each variant of `XLA_FLAGS`, in a process of its own.

    python benchmarks/xla_flags.py                       # gpu: GPU_VARIANTS, KD at 32k tokens/step
    python benchmarks/xla_flags.py --methods kd wd --budget-s 300
    python benchmarks/xla_flags.py --preset cpu --variants "" xla_cpu_use_xnnpack=false

A variant is one or more flags, space-separated, with or without their leading `--` ("" is XLA's
defaults).

XLA reads its flags once, when the backend starts, so every variant runs `speed.py` (wdjax's row
only) in a fresh process with the variant appended to the `XLA_FLAGS` it inherits. The first
variant is the baseline the others are compared with (by default: no extra flag), in the same run.
A flag this jaxlib does not know aborts its process: that variant's row gives the error and the
sweep goes on. Writes `benchmarks/results/xla_flags_<preset>.{json,md}`: per method and variant
the step's median time, its ratio to the baseline, the kernels in the compiled step, the compile
time and the first step's loss (a flag that changes the loss beyond rounding changed the maths).

What the GPU variants try, against the profile of the KD step (docs/speed.md): about 9 ms a step of
LayerNorm, residual and bias kernels around the matrix products, which neither XLA's default
pipeline nor Inductor fuses into them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

GPU_VARIANTS = (
    "",  # the baseline: XLA's defaults
    "--xla_gpu_enable_cublaslt=true",  # cuBLASLt GEMMs, which take bias / GELU epilogues
    "--xla_gpu_cudnn_gemm_fusion_level=2",  # cuDNN GEMMs fused with element-wise producers/consumers
    "--xla_gpu_triton_gemm_any=true",  # Triton GEMMs (fusing element-wise work) wherever they apply
    "--xla_gpu_experimental_enable_fusion_block_level_rewriter=true",  # Triton normalisations
    "--xla_gpu_enable_cudnn_layer_norm=true",  # cuDNN LayerNorm kernels
    "--xla_gpu_enable_command_buffer=",  # CUDA graphs off: what they save in launches
)


def flags_of(variant: str) -> str:
  """`"xla_a=1 --xla_b=2"` -> `"--xla_a=1 --xla_b=2"` (on the command line, a value that starts
  with `--` would read as an option of this script)."""
  return " ".join(f if f.startswith("--") else "--" + f for f in variant.split())


def run_variant(variant: str, args, out: Path, tag: str) -> dict:
  """speed.py's wdjax rows for `variant` (in a process of its own): `{"rows": [...]}` or
  `{"error": the last line the process printed}`."""
  flags = f"{os.environ.get('XLA_FLAGS', '')} {variant}".strip()
  cmd = [sys.executable, str(HERE / "speed.py"), "--preset", args.preset, "--methods", *args.methods,
         "--impls", "wdjax", "--out", str(out), "--tag", tag, "--no-plot"]
  if args.batches:
    cmd += ["--batches", *map(str, args.batches)]
  proc = subprocess.run(cmd, env=dict(os.environ, XLA_FLAGS=flags), capture_output=True, text=True,
                        timeout=args.variant_timeout_s)
  result = out / f"speed_{args.preset}_{tag}.json"
  rows = json.loads(result.read_text())["rows"] if result.exists() else []
  if proc.returncode or not rows:
    lines = [line for line in (proc.stderr + proc.stdout).splitlines() if line.strip()]
    return {"error": lines[-1][:300] if lines else f"exit status {proc.returncode}"}
  return {"rows": rows}


def table(results: list[dict], preset: str) -> str:
  lines = [f"wdjax's step under each XLA_FLAGS variant (benchmarks/xla_flags.py, preset {preset}); "
           "each variant in a process of its own, against the first one (the baseline) of this run.",
           "", "| variant | method | tokens/step | step (ms) | vs baseline | kernels | compile (s) | first loss |",
           "|---|---|---|---|---|---|---|---|"]
  base = {(r["method"], r["tokens_per_step"]): r["step_ms"] for r in results[0].get("rows", [])}
  for res in results:
    name = f"`{res['variant']}`" if res["variant"] else "(baseline)"
    if "error" in res:
      lines.append(f"| {name} | - | - | failed: {res['error'].replace('|', '/')} | - | - | - | - |")
      continue
    for r in res["rows"]:
      ref = base.get((r["method"], r["tokens_per_step"]))
      ratio = f"{ref / r['step_ms']:.2f}x" if ref else "-"  # > 1: the variant is faster
      lines.append(f"| {name} | {r['method']} | {r['tokens_per_step']} | {r['step_ms']:.2f} | {ratio} | "
                   f"{r['hlo_kernels']} | {r['compile_s']:.1f} | {r['first_loss']:.5f} |")
  return "\n".join(lines)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--preset", default="gpu", help="speed.py's preset")
  ap.add_argument("--methods", nargs="+", default=["kd"])
  ap.add_argument("--batches", nargs="+", type=int, default=None,
                  help="sequences per step (default: 256 on gpu, the preset's own elsewhere)")
  ap.add_argument("--variants", nargs="+", default=None,
                  help="XLA_FLAGS additions, the first being the baseline (default on gpu: GPU_VARIANTS)")
  ap.add_argument("--budget-s", type=float, default=float("inf"), help="start no variant after this")
  ap.add_argument("--variant-timeout-s", type=float, default=600.0)
  ap.add_argument("--out", default=str(HERE / "results"))
  args = ap.parse_args(argv)
  if args.variants is None:
    if args.preset != "gpu":
      ap.error("--variants is needed outside the gpu preset (GPU_VARIANTS are GPU flags)")
    args.variants = list(GPU_VARIANTS)
  args.variants = [flags_of(v) for v in args.variants]
  if args.batches is None and args.preset == "gpu":
    args.batches = [256]
  t0, results = time.perf_counter(), []
  stem = Path(args.out) / f"xla_flags_{args.preset}"
  stem.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory() as tmp:
    for i, variant in enumerate(args.variants):
      if time.perf_counter() - t0 > args.budget_s:
        results.append({"variant": variant, "error": "not run (--budget-s)"})
        continue
      try:
        res = run_variant(variant, args, Path(tmp), f"v{i}")
      except subprocess.TimeoutExpired:
        res = {"error": f"timed out after {args.variant_timeout_s:.0f} s"}
      results.append({"variant": variant, **res})
      print(f"{variant or '(baseline)'}: " + (res.get("error") or ", ".join(
          f"{r['method']} {r['step_ms']:.2f} ms" for r in res["rows"])), flush=True)
      stem.with_suffix(".json").write_text(json.dumps({"preset": args.preset, "results": results}, indent=2) + "\n")
      stem.with_suffix(".md").write_text(table(results, args.preset) + "\n")
  print(table(results, args.preset))
  return 0


if __name__ == "__main__":
  sys.exit(main())
