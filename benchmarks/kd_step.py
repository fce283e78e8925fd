"""Time wdjax's logit-KD training step at BERT-base teacher size (the speed baseline).

    python benchmarks/kd_step.py                 # GPU configuration (MPNet 12x768 -> 6x384)
    python benchmarks/kd_step.py --preset cpu    # tiny shapes, checks the harness on a CPU

The step is wdjax's own (`wdjax.train.step.make_train_step` under `jax.jit` with donation), with
the teacher's forward pass inside the step, AdamW, bf16 compute and fp32 parameters. Teacher and
student weights are random with the shapes of all-mpnet-base-v2 (12 x 768, 12 heads, FFN 3072,
vocab 30527) and of a 6 x 384 student: the real teacher's 438 MB cannot travel to the GPU machine,
and speed does not depend on the values. Batches are random token ids at full length.

FLOPs per step (counted, not measured; matmuls only, 2 FLOPs per multiply-add):
  per token, per layer, forward:  2 * (4 D^2 + 2 D F) + 4 S D     (projections, FFN, QK^T and PV)
  except the last layer, which computes the first token only (the classifier reads nothing else;
  `bert.Encoder`'s `rows`): K and V at every token, 4 D^2, the rest at 1 token in S
  teacher:  forward only          -> 1x
  student:  forward + backward    -> 3x
  plus the student's classifier head (negligible) and no vocabulary projection (classification).
MFU = FLOPs per step / step time / peak, peak = 989 TFLOP/s (H100 and H200 SXM dense bf16; the
H200 differs in memory: 141 GB at 4.8 TB/s).

Writes `benchmarks/results/kd_step_<device>.json` and `.md`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from wdjax.config import KDConfig, OptimConfig
from wdjax.generators import Identity, StudentSpec
from wdjax.models import bert
from wdjax.train import mesh as mesh_lib, step as step_lib

PEAK_FLOPS = {"gpu": 989e12}  # H100 and H200 SXM dense bf16; no MFU is reported for other devices

PRESETS = {
    "gpu": dict(teacher=bert.EncoderConfig(arch="mpnet", vocab_size=30527, hidden_size=768, num_layers=12,
                                           num_heads=12, intermediate_size=3072, max_position_embeddings=514,
                                           type_vocab_size=0, pad_token_id=1, layer_norm_eps=1e-5),
                student=dict(num_layers=6, hidden_size=384, num_heads=12, intermediate_size=1536),
                # XLA attention: the portable baseline; cuDNN attention is the speed issue's to try.
                seq=128, batches=(256, 32), dtype="bfloat16", attention="xla", steps=50),
    "cpu": dict(teacher=bert.EncoderConfig(arch="mpnet", vocab_size=30527, hidden_size=128, num_layers=2,
                                           num_heads=4, intermediate_size=256, max_position_embeddings=514,
                                           type_vocab_size=0, pad_token_id=1, layer_norm_eps=1e-5),
                student=dict(num_layers=1, hidden_size=64, num_heads=4, intermediate_size=128),
                seq=32, batches=(32, 8), dtype="float32", attention="xla", steps=5),
}


def layer_flops(cfg: bert.EncoderConfig, seq: int, rows: int | None = None) -> float:
  """A layer's forward matmul FLOPs per token. `rows`: the query rows per sequence it computes
  (a classifier's last layer: 1, `bert.Encoder`'s `rows`); its K and V are at every token."""
  d, f = cfg.hidden_size, cfg.intermediate_size
  full = 2 * (4 * d * d + 2 * d * f) + 4 * seq * d
  if rows is None:
    return full
  kv = 2 * 2 * d * d
  return kv + rows / seq * (full - kv)


def network_flops(cfg: bert.EncoderConfig, tokens: int, seq: int) -> float:
  """A classifier's forward matmul FLOPs: its last layer at the first token only."""
  return tokens * ((cfg.num_layers - 1) * layer_flops(cfg, seq) + layer_flops(cfg, seq, rows=1))


def step_flops(teacher: bert.EncoderConfig, student: bert.EncoderConfig, tokens: int, seq: int) -> dict:
  t = network_flops(teacher, tokens, seq)
  s = 3 * network_flops(student, tokens, seq)
  return {"teacher_forward": t, "student_train": s, "total": t + s}


def time_step(preset: dict, batch: int, dropout: float) -> dict:
  kind = preset["dtype"]
  teacher_cfg = dataclasses.replace(preset["teacher"], dtype=kind, attention=preset["attention"],
                                    hidden_dropout=0.0, attention_dropout=0.0)
  student_cfg = dataclasses.replace(teacher_cfg, **preset["student"], hidden_dropout=dropout,
                                    attention_dropout=0.0)
  seq = preset["seq"]
  mesh = mesh_lib.make_mesh(-1, 1)
  t_model, s_model = bert.build(teacher_cfg, seed=0), bert.build(student_cfg, seed=1)
  t_params = jax.device_put(nnx.to_pure_dict(nnx.state(t_model)), mesh_lib.replicated(mesh))
  s_init = nnx.to_pure_dict(nnx.state(s_model))
  gen = Identity()
  tx = step_lib.make_optimizer(OptimConfig(lr=1e-4), 10_000, s_init)
  state = jax.jit(lambda p: step_lib.init_state(gen, tx, 0, None, StudentSpec(student_cfg, p)))(s_init)
  step = jax.jit(step_lib.make_train_step(
      generator=gen, student_apply=step_lib.classifier_apply(nnx.split(s_model)[0]),
      teacher_apply=step_lib.classifier_apply(nnx.split(t_model)[0]), tx=tx,
      kd=KDConfig(temperature=2.0, alpha=0.9, cache_teacher_logits=False), seed=0), donate_argnums=0)
  rng = np.random.default_rng(0)
  batches = [mesh_lib.put_batch({
      "input_ids": rng.integers(3, teacher_cfg.vocab_size, (batch, seq)).astype(np.int32),
      "attention_mask": np.ones((batch, seq), np.int32),
      "labels": rng.integers(0, 2, batch).astype(np.int32),
      "weights": np.ones(batch, np.float32)}, mesh) for _ in range(4)]
  t0 = time.perf_counter()
  state, metrics = step(state, t_params, batches[0])
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - t0
  for i in range(3):  # warm-up
    state, metrics = step(state, t_params, batches[i % 4])
  jax.block_until_ready(metrics)
  times = []
  for i in range(preset["steps"]):
    t0 = time.perf_counter()
    state, metrics = step(state, t_params, batches[i % 4])
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t0)
  median = statistics.median(times)
  tokens = batch * seq
  flops = step_flops(teacher_cfg, student_cfg, tokens, seq)
  device = jax.devices()[0].platform
  row = {"batch": batch, "seq": seq, "tokens_per_step": tokens, "step_ms": 1e3 * median,
         "step_ms_p10": 1e3 * float(np.percentile(times, 10)),
         "step_ms_p90": 1e3 * float(np.percentile(times, 90)),
         "tokens_per_s": tokens / median, "compile_s": compile_s, "flops_per_step": flops,
         "student_dropout": dropout, "loss": float(metrics["loss"])}
  if device in PEAK_FLOPS:
    row["mfu_total"] = flops["total"] / median / PEAK_FLOPS[device]
    row["mfu_student"] = flops["student_train"] / median / PEAK_FLOPS[device]
  return row


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--preset", choices=sorted(PRESETS), default="gpu")
  ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
  args = ap.parse_args()
  preset = PRESETS[args.preset]
  rows = [time_step(preset, b, dropout) for b in preset["batches"] for dropout in (0.0, 0.1)]
  device = jax.devices()[0]
  info = {"device": device.device_kind, "platform": device.platform, "jax": jax.__version__,
          "flax": __import__("flax").__version__, "python": platform.python_version(),
          "preset": args.preset, "dtype": preset["dtype"], "attention": preset["attention"],
          "teacher": dataclasses.asdict(preset["teacher"]), "student": preset["student"]}
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  stem = f"kd_step_{args.preset}"
  (out / f"{stem}.json").write_text(json.dumps({"info": info, "rows": rows}, indent=2) + "\n")
  lines = [f"KD step, teacher {preset['teacher'].num_layers}x{preset['teacher'].hidden_size} -> "
           f"student {preset['student']['num_layers']}x{preset['student']['hidden_size']}, "
           f"{info['device']}, jax {info['jax']}, {preset['dtype']}",
           "", "| tokens/step | dropout | step (ms) | tokens/s | MFU total | MFU student | compile (s) |",
           "|---|---|---|---|---|---|---|"]
  for r in rows:
    mfu = lambda k: f"{100 * r[k]:.1f}%" if k in r else "n/a"
    lines.append(f"| {r['tokens_per_step']} | {r['student_dropout']} | {r['step_ms']:.1f} | "
                 f"{r['tokens_per_s']:.0f} | {mfu('mfu_total')} | {mfu('mfu_student')} | {r['compile_s']:.1f} |")
  (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
