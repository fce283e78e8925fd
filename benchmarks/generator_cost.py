"""What a generator costs to train, against the plain student of the same shape, side by side.

    python benchmarks/generator_cost.py                          # OPDF (5 and 7 cores) vs KD, 3x384
    python benchmarks/generator_cost.py --student 3x192 --methods kd ws wd wid

For each method: trainable parameters, parameter + AdamW-state memory, XLA's compiled memory for
the step (arguments, outputs, temporaries: `compiled.memory_analysis()`), and the median step
time, from one jitted wdjax training step each on the real MiniLM teacher (KD from precomputed
teacher logits, as `wdjax distill` runs it, so the teacher's forward pass is not in the step).
Steps of all methods are timed interleaved (one of each, repeated), so a busy machine slows them
alike; times are reported as ratios to the first method. Absolute times mean something only on
the GPU (benchmarks/README rules); on a CPU, read the ratios.

Writes `benchmarks/results/generator_cost_<device>_<student>.json` and `.md`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from wdjax import assets, generators
from wdjax.config import KDConfig, OptimConfig
from wdjax.generators import StudentSpec
from wdjax.models import bert, hf
from wdjax.train import step as step_lib

HERE = Path(__file__).resolve().parent
OPTIONS = {  # method label -> (generator name, options beyond the shapes)
    "kd": ("kd", {}),
    "ws": ("ws", {}),
    "gws": ("gws", {}),
    "wd": ("wd", {"init": "identity", "layer_map": "contiguous"}),
    "wid": ("wid", {"teacher_heads": 12, "student_heads": 12, "w_step": 100}),
    "opdf-2": ("opdf", {"n_cores": 2}),
    "opdf-5": ("opdf", {"n_cores": 5}),
    "opdf-7": ("opdf", {"n_cores": 7}),
}


def build(label: str, t_cfg, t_params, s_cfg, batch: int, seq: int):
  name, options = OPTIONS[label]
  init = nnx.to_pure_dict(nnx.state(bert.build(s_cfg, seed=0)))
  gen = generators.make(name, init, t_params, **options)
  spec = StudentSpec(s_cfg, init)
  shapes, state_shapes = jax.eval_shape(lambda: gen.init(jax.random.key(0), t_params, spec))
  tx = step_lib.make_optimizer(OptimConfig(lr=1e-5), 10_000, shapes, gen.optimizer_hooks(shapes, state_shapes))
  net = gen.training_config(s_cfg)
  step = step_lib.make_train_step(
      generator=gen, student_apply=step_lib.classifier_apply(nnx.split(bert.build(net))[0]),
      teacher_apply=step_lib.classifier_apply(nnx.split(bert.build(t_cfg))[0]), tx=tx,
      kd=KDConfig(alpha=0.9, temperature=2.0), seed=0, products=step_lib.generator_products(net.dtype))
  state = jax.jit(lambda t: step_lib.init_state(gen, tx, 0, t, spec))(t_params)
  rng = np.random.default_rng(0)
  data = {"input_ids": rng.integers(1000, 20000, (batch, seq)).astype(np.int32),
          "attention_mask": np.ones((batch, seq), np.int32),
          "labels": rng.integers(0, 2, batch).astype(np.int32),
          "weights": np.ones(batch, np.float32),
          "teacher_logits": rng.standard_normal((batch, 2)).astype(np.float32)}
  data = jax.device_put(data)
  jitted = jax.jit(step, donate_argnums=0)
  t0 = time.perf_counter()
  compiled = jitted.lower(state, t_params, data).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  trainable = generators.param_count(state["params"])
  adam = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(state["opt_state"])
             if hasattr(x, "dtype") and x.ndim > 0)
  info = {"trainable_params": trainable, "param_bytes": 4 * trainable, "adam_bytes": int(adam),
          "compile_s": compile_s,
          "xla_bytes": None if mem is None else {
              "arguments": int(mem.argument_size_in_bytes), "outputs": int(mem.output_size_in_bytes),
              "temporaries": int(mem.temp_size_in_bytes)}}
  holder = {"state": state}

  def run_step():
    holder["state"], metrics = compiled(holder["state"], t_params, data)
    jax.block_until_ready(metrics["loss"])

  return info, run_step


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--methods", nargs="*", default=["kd", "opdf-5", "opdf-7"], choices=list(OPTIONS))
  ap.add_argument("--student", default="3x384", help="LAYERSxWIDTH (12 heads, FFN 4x width)")
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--seq", type=int, default=64)
  ap.add_argument("--repeats", type=int, default=15)
  args = ap.parse_args()
  layers, width = (int(x) for x in args.student.split("x"))
  t_cfg, t_params, _ = hf.load(assets.path("all-MiniLM-L6-v2"), num_labels=2)
  s_cfg = bert.EncoderConfig(**{**t_cfg.__dict__, "num_layers": layers, "hidden_size": width,
                                "intermediate_size": 4 * width})
  t_params = jax.device_put(t_params)
  built = {m: build(m, t_cfg, t_params, s_cfg, args.batch, args.seq) for m in args.methods}
  for _, run_step in built.values():  # warm-up
    run_step(), run_step()
  times = {m: [] for m in built}
  for _ in range(args.repeats):
    for m, (_, run_step) in built.items():
      t0 = time.perf_counter()
      run_step()
      times[m].append(time.perf_counter() - t0)
  base = args.methods[0]
  rows = {}
  for m, (info, _) in built.items():
    rows[m] = dict(info, step_s=statistics.median(times[m]),
                   step_ratio=statistics.median(times[m]) / statistics.median(times[base]))
  device = jax.devices()[0].device_kind
  out = {"device": device, "jax": jax.__version__, "student": args.student, "batch": args.batch,
         "seq": args.seq, "teacher": "all-MiniLM-L6-v2 (6x384)", "rows": rows}
  lines = [f"Training-step cost on {device} (jax {jax.__version__}), student {args.student}, batch "
           f"{args.batch} x {args.seq} tokens, KD from cached teacher logits; ratios to `{base}`, "
           "timed interleaved.", "",
           "| method | trainable params | params + Adam (fp32) | XLA temporaries | step time vs "
           f"{base} |", "|---|---|---|---|---|"]
  for m, r in rows.items():
    temp = "n/a" if r["xla_bytes"] is None else f"{r['xla_bytes']['temporaries'] / 2**20:.0f} MB"
    lines.append(f"| {m} | {r['trainable_params'] / 1e6:.2f}M | "
                 f"{(r['param_bytes'] + r['adam_bytes']) / 2**20:.0f} MB | {temp} | "
                 f"{r['step_ratio']:.2f}x |")
  table = "\n".join(lines) + "\n"
  results = HERE / "results"
  results.mkdir(exist_ok=True)
  stem = f"generator_cost_{device.replace(' ', '_').lower()}_{args.student}"
  (results / f"{stem}.json").write_text(json.dumps(out, indent=2) + "\n")
  (results / f"{stem}.md").write_text(table)
  print(table)


if __name__ == "__main__":
  main()
