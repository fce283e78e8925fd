"""wdjax against PyTorch, the same training step side by side, for every method in torch_ref.

    python benchmarks/speed.py                  # gpu: BERT-base-size teacher -> 6x384, seq 128
    python benchmarks/speed.py --preset cpu     # tiny shapes: checks the harness on a CPU
    python benchmarks/speed.py --preset overhead --impls wdjax   # gpu depths, tiny widths
    python benchmarks/speed.py --methods kd ws  # a subset

For each method (kd, ws, gws, wd, wid, opdf: the steps `benchmarks/torch_ref/` implements, their
parity with wdjax tested in tests/test_torch_parity.py; both frameworks start from the same
random draw, converted) and each batch (32k and 4k tokens per step on gpu), one run times:

- `wdjax`: the library's jitted step (`make_train_step`, donation, AdamW), teacher forward inside;
- `jax-handwritten` (kd only): the same maths as a bare `jax.jit` function over the NNX model
  and `optax.adamw`, no wdjax machinery: the library-overhead reference;
- `torch-eager` and `torch-compile`: benchmarks/torch_ref as a PyTorch user writes it (SDPA
  attention, AdamW fused on CUDA, bf16 autocast on CUDA), eager and under `torch.compile`;
- `torch-graphs`: the same under `torch.compile(mode="reduce-overhead")`, forward and backward
  replayed as CUDA graphs (on a CPU, plain `torch.compile`): the PyTorch step without its host
  overhead, which the generators' many small tensors make the larger part of torch's step;
- `wdjax-cached` (kd only): wdjax's step as `wdjax distill` runs it by default, on teacher
  logits computed once per run (`kd.cache_teacher_logits`; the teacher is frozen and the inputs
  repeat every epoch). Not the step the others time (no teacher forward; its MFU counts the
  student's FLOPs only), so no target counts it: it is what a user's KD step costs.

Dropout is off by default, so every implementation of a method computes the same step; with
`--dropout P` the student trains with dropout P at every site (embeddings, attention
probabilities, residual branches, pooled output), as a real run does: torch's SDPA draws the
attention dropout inside its fused kernel, while wdjax's attention then runs in XLA (the fused
cuDNN call takes no dropout), so the rows show what dropout costs each framework.

Warm-up steps are excluded; the step time is the median over windows of 5 steps run back to back
and synchronised at the window's end, as a training loop runs them (`_time`); compile time (first step) is reported separately. Teacher and student have the
shapes of all-mpnet-base-v2 (12 x 768, FFN 3072, vocab 30527) and a 6 x 384 student, in the BERT
architecture both implementations share (MPNet's relative bias is <0.1% of the FLOPs); weights
are random (speed does not depend on them). MFU counts matmul FLOPs: per token and layer
`2 (4 D^2 + 2 D F) + 4 S D` forward, except each network's last layer, which wdjax computes at
the first token only (`kd_step.layer_flops`; torch_ref computes every token there, as a PyTorch
user's model does, so its MFU leaves that work out); teacher 1x, student 3x (forward +
backward), plus the generator's forward and backward FLOPs from XLA's cost analysis of
`generate`'s VJP with respect to the generator's parameters (`generator_flops`); peak
989 TFLOP/s (H100 and H200 SXM dense bf16). Writes `benchmarks/results/speed_<preset>.{json,md,png}`; with `--trace DIR`, also a
profile of every job under DIR and `speed_<preset>_profile.{md,json}` beside the results: each
step's device time by kind of operation (`wdjax/profiling.py`). Precision is the same on both
sides: bf16 compute with fp32 parameters, and the generators' matrix products with bf16 operands
and fp32 accumulation (torch's autocast; wdjax's `step.generator_products`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import NamedTuple

# JAX and torch share the GPU in one process: JAX must not take 75% of it up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import numpy as np
import optax  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.kd_step import PEAK_FLOPS, step_flops  # noqa: E402
from wdjax import generators, profiling  # noqa: E402
from wdjax.config import KDConfig, OptimConfig  # noqa: E402
from wdjax import trees  # noqa: E402
from wdjax.generators import StudentSpec  # noqa: E402
from wdjax.models import bert, layers  # noqa: E402
from wdjax.train import mesh as mesh_lib, step as step_lib  # noqa: E402

PRESETS = {
    "gpu": dict(teacher=dict(vocab_size=30527, hidden_size=768, num_layers=12, num_heads=12,
                             intermediate_size=3072, max_position_embeddings=514),
                student=dict(num_layers=6, hidden_size=384, num_heads=12, intermediate_size=1536),
                seq=128, batches=(256, 32), dtype="bfloat16", steps=40, warmup=5),
    "cpu": dict(teacher=dict(vocab_size=2000, hidden_size=128, num_layers=2, num_heads=4,
                             intermediate_size=256, max_position_embeddings=64),
                student=dict(num_layers=1, hidden_size=64, num_heads=4, intermediate_size=128),
                seq=32, batches=(16, 4), dtype="float32", steps=5, warmup=2),
    # the gpu preset's depths (12 -> 6 layers: as many tensors, maps and kernels per step) at
    # tiny widths, so a CPU measures per-operation overhead rather than FLOPs
    "overhead": dict(teacher=dict(vocab_size=2000, hidden_size=64, num_layers=12, num_heads=4,
                                  intermediate_size=256, max_position_embeddings=64),
                     student=dict(num_layers=6, hidden_size=32, num_heads=4, intermediate_size=128),
                     seq=32, batches=(8,), dtype="float32", steps=60, warmup=5),
}
METHODS = ("kd", "ws", "gws", "wd", "wid", "opdf")
KD = dict(temperature=2.0, alpha=0.9)
TRACE_STEPS = 5  # steps profiled after the timed ones, with --trace
WINDOW = 5  # steps timed back to back between synchronisations
TORCH_MODES = {"torch-eager": None, "torch-compile": "default", "torch-graphs": "reduce-overhead"}


class JobResult(NamedTuple):
  """One implementation's step at one batch."""

  median_s: float  # median step time
  compile_s: float  # the first step's time (tracing, compilation, autotuning)
  gen_flops: float | None  # the generator's FLOPs per step (JAX's cost analysis; None: not known)
  peak_bytes: int | None  # peak device memory
  kernels: int | None  # kernels the compiled step launches (JAX)
  first_loss: float  # the first step's loss
  profile: dict | None  # profiling.summarize of TRACE_STEPS steps, with --trace


def _configs(preset):
  """Teacher and student configs. The teacher is frozen (eval mode: no dropout); the student
  trains with the preset's `dropout` (0 unless `--dropout`) at every site."""
  t = bert.EncoderConfig(**preset["teacher"], dtype=preset["dtype"], hidden_dropout=0.0,
                         attention_dropout=0.0, attention=preset.get("attention", "auto"))
  p = preset.get("dropout", 0.0)
  return t, dataclasses.replace(t, **preset["student"], hidden_dropout=p, attention_dropout=p)


def _batch(preset, batch, seed):
  rng = np.random.default_rng(seed)
  v = preset["teacher"]["vocab_size"]
  return {"input_ids": rng.integers(3, v, (batch, preset["seq"])).astype(np.int32),
          "attention_mask": np.ones((batch, preset["seq"]), np.int32),
          "labels": rng.integers(0, 2, batch).astype(np.int32), "weights": np.ones(batch, np.float32)}


def _time(run, steps, warmup, sync):
  """Median time per step after warm-up, the first call's time (compilation) and its output.

  Steps are timed as a training loop runs them: back to back, `WINDOW` at a time with one
  synchronisation at the end of each window (wdjax's loop and a PyTorch loop read the loss only to
  log it), so a step's host work overlaps the previous step's device work in both frameworks. The
  median is over the windows' times per step."""
  t0 = time.perf_counter()
  first = run(0)
  sync(first)
  compile_s = time.perf_counter() - t0
  for i in range(warmup):
    sync(run(i + 1))
  times = []
  for w in range(max(1, steps // WINDOW)):
    t0 = time.perf_counter()
    for i in range(WINDOW):
      out = run(w * WINDOW + i)
    sync(out)
    times.append((time.perf_counter() - t0) / WINDOW)
  return statistics.median(times), compile_s, first


_SETUP = {}


def setup(method, preset):
  """Memoised `_setup` of the last (method, preset): building a generator at these shapes takes
  seconds to minutes (WD's maps), and every implementation of a method starts from the same draw."""
  key = (method, json.dumps(preset, sort_keys=True, default=str))
  if key not in _SETUP:
    _SETUP.clear()
    _SETUP[key] = _setup(method, preset)
  return _SETUP[key]


def _setup(method, preset):
  """Teacher, student init and generator (params, state) of `method`: one random draw that both
  frameworks start from (the torch steps get the same values, converted)."""
  t_cfg, s_cfg = _configs(preset)
  if method == "opdf":  # OPDF's setting: half the depth at the teacher's width
    s_cfg = dataclasses.replace(s_cfg, hidden_size=t_cfg.hidden_size, num_heads=t_cfg.num_heads,
                                intermediate_size=t_cfg.intermediate_size)
  t_params = nnx.to_pure_dict(nnx.state(bert.build(t_cfg, seed=0)))
  init = nnx.to_pure_dict(nnx.state(bert.build(s_cfg, seed=1)))
  gen = generators.make(method, init, t_params, **OPTIONS[method](t_cfg, s_cfg))
  gp, gs = jax.jit(lambda t, p: gen.init(jax.random.key(0), t, StudentSpec(s_cfg, p)))(t_params, init)
  return t_cfg, s_cfg, t_params, init, gen, gp, gs


OPTIONS = {"kd": lambda t, s: {}, "ws": lambda t, s: {}, "gws": lambda t, s: {}, "wd": lambda t, s: {},
           "wid": lambda t, s: dict(teacher_heads=t.num_heads, student_heads=s.num_heads, w_step=10**6),
           "opdf": lambda t, s: dict(n_cores=5)}


def generator_flops(gen, gen_params, t_params, gen_state) -> float:
  """FLOPs of the generator's forward and backward pass in a step: XLA's cost analysis of the
  VJP of `generate` with respect to the generator's parameters only (the frozen teacher gets no
  gradient, so the backward is less than twice the forward: 3x forward overcounted WS by 21%).
  The lowered (not compiled) function's cost: a GPU's compiled HLO hands the matrix products to
  cuBLAS as custom calls, which XLA's cost analysis counts as no FLOPs."""
  def forward_backward(gp):
    out, pull = jax.vjp(lambda g: gen.generate(g, t_params, gen_state), gp)
    return pull(out)  # a cotangent of the generated weights' shapes: the backward's products
  cost = jax.jit(forward_backward).lower(gen_params).cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return float(cost.get("flops", 0.0))


def wdjax_step(method, preset, batch, handwritten=False):
  t_cfg, s_cfg, t_params, init, gen, gen_params, gen_state = setup(method, preset)
  mesh = mesh_lib.make_mesh(1, 1, jax.devices()[:1])
  t_params = jax.device_put(t_params)
  net_cfg = gen.training_config(s_cfg)
  s_graph, t_graph = nnx.split(bert.build(net_cfg))[0], nnx.split(bert.build(t_cfg))[0]
  batches = [mesh_lib.put_batch(_batch(preset, batch, i), mesh) for i in range(4)]
  if preset.get("cached_logits"):  # as `wdjax distill` runs by default (kd.cache_teacher_logits):
    t_fwd = jax.jit(step_lib.classifier_apply(t_graph))  # the teacher's logits computed once
    batches = [dict(b, teacher_logits=t_fwd(t_params, b, None)) for b in batches]
  gen_flops = 0.0
  if method != "kd":
    gen_flops = generator_flops(gen, gen_params, t_params, gen_state)
  if handwritten:  # the same maths as a bare jax.jit step: the library-overhead reference
    tx = optax.adamw(1e-4, weight_decay=0.01)

    def step(state, teacher, b):
      params, opt, n = state
      key = jax.random.fold_in(jax.random.key(0), n)  # dropout's, when the preset has any
      def loss_fn(p):
        logits = nnx.merge(s_graph, p)(b["input_ids"], b["attention_mask"], dropout_key=key)
        t_logits = jax.lax.stop_gradient(nnx.merge(t_graph, teacher)(b["input_ids"], b["attention_mask"]))
        t = KD["temperature"]
        log_ps, log_pt = jax.nn.log_softmax(logits / t), jax.nn.log_softmax(t_logits / t)
        kl = (jax.numpy.exp(log_pt) * (log_pt - log_ps)).sum(-1).mean()
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, b["labels"]).mean()
        return KD["alpha"] * t * t * kl + (1 - KD["alpha"]) * ce
      loss, grads = jax.value_and_grad(loss_fn)(params)
      updates, opt = tx.update(grads, opt, params)
      return (optax.apply_updates(params, updates), opt, n + 1), {"loss": loss}  # as wdjax's metrics

    init = jax.tree.map(jax.numpy.copy, init)  # the step donates
    state = (init, tx.init(init), jax.numpy.zeros((), jax.numpy.int32))
  else:
    shapes = jax.eval_shape(lambda: gen_params)
    tx = step_lib.make_optimizer(OptimConfig(lr=1e-4), 10_000, shapes, gen.optimizer_hooks(shapes, gen_state))
    step = step_lib.make_train_step(
        generator=gen, student_apply=step_lib.classifier_apply(s_graph),
        teacher_apply=step_lib.classifier_apply(t_graph), tx=tx,
        kd=KDConfig(**KD, cache_teacher_logits=False), seed=0,
        products=step_lib.generator_products(net_cfg.dtype))  # as `wdjax distill` runs it
    gen_params, gen_state = jax.tree.map(jax.numpy.copy, (gen_params, gen_state))  # the step donates
    state = {"step": jax.numpy.zeros((), jax.numpy.int32), "params": gen_params,
             "opt_state": tx.init(gen_params), "gen_state": gen_state,
             "nonfinite_steps": jax.numpy.zeros((), jax.numpy.int32)}
  t0 = time.perf_counter()  # compiled ahead, so the memory analysis costs no second compile
  jitted = jax.jit(step, donate_argnums=0).lower(state, t_params, batches[0]).compile()
  lower_s = time.perf_counter() - t0
  hlo_text = jitted.as_text()
  kernels = profiling.kernel_count(hlo_text)
  mem = jitted.memory_analysis()
  peak = None if mem is None else (mem.argument_size_in_bytes + mem.output_size_in_bytes
                                   + mem.temp_size_in_bytes - mem.alias_size_in_bytes)
  holder = [state]

  def run(i):
    holder[0], out = jitted(holder[0], t_params, batches[i % 4])
    return out

  median, compile_s, first = _time(run, preset["steps"], preset["warmup"], jax.block_until_ready)
  profile = None
  if preset.get("trace_dir"):  # a profile of a few more steps, for xprof / tensorboard
    Path(preset["trace_dir"]).mkdir(parents=True, exist_ok=True)
    Path(preset["trace_dir"], "step.hlo.txt").write_text(hlo_text)  # what the trace's ops are
    with jax.profiler.trace(preset["trace_dir"]):
      for i in range(TRACE_STEPS):
        jax.block_until_ready(run(i))
    profile = _summary(lambda: profiling.jax_summary(preset["trace_dir"], hlo_text, TRACE_STEPS))
  return JobResult(median, lower_s + compile_s, gen_flops, peak, kernels, float(first["loss"]), profile)


def torch_step(method, preset, batch, impl):
  import torch
  from benchmarks.torch_ref import generators as tgen
  from benchmarks.torch_ref.model import BertShape, classifier_logits
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  t_cfg, s_cfg, t_params, init, gen_jax, gen_params, gen_state = setup(method, preset)
  net_cfg = gen_jax.training_config(s_cfg)
  to_torch = lambda tree: {k: torch.tensor(np.asarray(v)).to(dev) for k, v in trees.flatten(tree).items()}
  shape = lambda c: BertShape(c.num_layers, c.hidden_size, c.num_heads, c.intermediate_size,
                              c.vocab_size, c.max_position_embeddings)
  teacher = to_torch(t_params)
  gen = {k: v.requires_grad_(True) for k, v in to_torch(gen_jax.flat_params(gen_params)).items()}
  s_shapes = {k: tuple(np.shape(v)) for k, v in trees.flatten(init).items()}
  n_t, n_s = t_cfg.num_layers, s_cfg.num_layers
  generate = (lambda gp, t: gp) if method == "kd" else (
      lambda gp, t: getattr(tgen, f"{method}_generate")(gp, t, s_shapes, n_t, n_s))
  keep = torch.tensor(np.asarray(gen_state["masks"]["hidden"])).to(dev) if method == "wid" else None
  targets = to_torch(trees.unstack_layers(trees.flatten(gen_state["targets"]))) if method == "opdf" else {}
  opt = torch.optim.AdamW(list(gen.values()), lr=1e-4, weight_decay=0.01,
                          **({"fused": True} if dev == "cuda" else {"foreach": True}))
  amp = preset["dtype"] == "bfloat16" and dev == "cuda"
  first = preset.get("torch_first_token", False)

  def loss_fn(gp, ids, mask, labels):
    with torch.autocast(dev, dtype=torch.bfloat16, enabled=amp):
      with torch.no_grad():
        t_logits = classifier_logits(teacher, shape(t_cfg), ids, mask, first_token_last_layer=first)
      logits = classifier_logits(generate(gp, teacher), shape(net_cfg), ids, mask, keep,
                                 dropout=net_cfg.hidden_dropout,  # the JAX student's own rate
                                 first_token_last_layer=first)
      loss = tgen.hinton_loss(logits.float(), t_logits.float(), labels, **KD)
    if targets:
      loss = loss + tgen.opdf_constraint(gp, targets, gen_jax.constraint_lambda, len(gen_jax.factors))
    return loss

  mode = TORCH_MODES[impl]
  graphs = mode == "reduce-overhead"
  if mode is not None:
    # A fresh compile per job, with static shapes, as a user's run gets: dynamo caches graphs per
    # code object, so jobs in one process would pile up recompiles of `loss_fn` until its limit
    # (8) and then run it eagerly, and a later batch size would be compiled with dynamic shapes.
    torch._dynamo.reset()
  fwd_bwd = loss_fn if mode is None else torch.compile(loss_fn, mode=mode, dynamic=False)
  batches = [{k: torch.tensor(v).to(dev) for k, v in _batch(preset, batch, i).items()} for i in range(4)]

  def run(i):
    b = batches[i % 4]
    if graphs:  # a new step: the graphs' outputs of the last one may be overwritten
      torch.compiler.cudagraph_mark_step_begin()
    opt.zero_grad(set_to_none=True)
    loss = fwd_bwd(gen, b["input_ids"].long(), b["attention_mask"], b["labels"].long())
    loss.backward()
    opt.step()
    return loss.detach().clone() if graphs else loss  # a graph's output is its replay's buffer

  sync = (lambda _: torch.cuda.synchronize()) if dev == "cuda" else (lambda x: x.item())
  if dev == "cuda":
    torch.cuda.reset_peak_memory_stats()
  median, compile_s, first = _time(run, preset["steps"], preset["warmup"], sync)
  peak = torch.cuda.max_memory_allocated() if dev == "cuda" else None
  profile = None
  if preset.get("trace_dir"):  # the same steps' kernels, classified as JAX's are
    activities = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if dev == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
      for i in range(TRACE_STEPS):
        sync(run(i))
    profile = _summary(lambda: torch_summary(prof.key_averages(), TRACE_STEPS))
  return JobResult(median, compile_s, None, peak, None, first.item(), profile)


def _summary(make) -> dict | None:
  """`make()`, or None when the profile cannot be summarised: the row's timing stands without it."""
  try:
    return make()
  except Exception as e:  # noqa: BLE001
    print(f"  no profile summary: {type(e).__name__}: {str(e)[:300]}", flush=True)
    return None


def torch_summary(averages, steps: int) -> dict:
  """`summarize` of `steps` steps' `torch.profiler.profile(...).key_averages()`: CUDA kernels by
  their device time when there are any, else (a CPU run) every op by its own (self) CPU time.
  On a GPU a record_function label (`Optimizer.step#AdamW.step`) is left out: it spans kernels
  that are counted themselves."""
  label = lambda a: "#" in a.key or a.key.startswith("ProfilerStep")
  device = [a for a in averages if getattr(a, "self_device_time_total", 0) > 0
            and "CUDA" in str(getattr(a, "device_type", ""))]
  if device:
    times = {a.key: (float(a.self_device_time_total), a.count) for a in device if not label(a)}
  else:
    times = {a.key: (float(a.self_cpu_time_total), a.count) for a in averages
             if a.self_cpu_time_total > 0 and not a.key.startswith("ProfilerStep")}
  return profiling.summarize(times, steps)


def kd_parts(preset, batch):
  """Where a KD step's time goes: the teacher's forward alone, and the student's forward and
  backward alone (fixed teacher logits, no optimizer), each its own jitted function."""
  t_cfg, s_cfg, t_params, init, *_ = setup("kd", preset)
  b = _batch(preset, batch, 0)
  t_graph, s_graph = nnx.split(bert.build(t_cfg))[0], nnx.split(bert.build(s_cfg))[0]
  t_fwd = jax.jit(lambda t, b: nnx.merge(t_graph, t)(b["input_ids"], b["attention_mask"]))
  t_logits = t_fwd(t_params, b)

  def s_loss(p, b, t_logits):
    logits = nnx.merge(s_graph, p)(b["input_ids"], b["attention_mask"])
    return jax.numpy.mean((logits - t_logits) ** 2)
  s_grad = jax.jit(jax.grad(s_loss))
  out = {}
  for name, fn in (("teacher_forward", lambda i: t_fwd(t_params, b)),
                   ("student_fwd_bwd", lambda i: s_grad(init, b, t_logits))):
    out[name + "_ms"] = 1e3 * _time(fn, preset["steps"], preset["warmup"], jax.block_until_ready)[0]
  return out


def jobs(methods, batches):
  """(method, batch, impl) in the order that matters: the big batch of every method before any
  small one, KD first, so a run stopped by its time budget has the rows the targets need."""
  out = []
  for batch in batches:
    for method in methods:
      impls = ["wdjax"] + (["wdjax-xla", "jax-handwritten"] if method == "kd" else [])
      impls += ["torch-eager", "torch-compile", "torch-graphs"] + (["wdjax-cached"] if method == "kd" else [])
      out += [(method, batch, impl) for impl in impls]
  return out


def run_job(method, batch, impl, preset, trace: str | None = None) -> JobResult:
  if trace:
    preset = dict(preset, trace_dir=f"{trace}/{method}_{impl}_{batch}")
    if impl.startswith("torch"):
      return _torch_job_apart(method, batch, impl, preset)
  if impl == "wdjax-cached":
    return wdjax_step(method, dict(preset, cached_logits=True), batch)
  if impl.startswith("wdjax"):
    return wdjax_step(method, dict(preset, attention="xla") if impl == "wdjax-xla" else preset, batch)
  if impl == "jax-handwritten":
    return wdjax_step(method, preset, batch, handwritten=True)
  return torch_step(method, preset, batch, impl)


def _torch_job_apart(method, batch, impl, preset) -> JobResult:
  """A profiled torch job, run in a process of its own. torch.profiler leaves CUPTI subscribed
  when it ends, which on a GPU stops every later `jax.profiler` trace in the process
  (CUPTI_ERROR_MULTIPLE_SUBSCRIBERS_NOT_SUPPORTED) and slowed later torch steps 2x (H100)."""
  import subprocess
  import tempfile
  with tempfile.TemporaryDirectory() as tmp:
    job = Path(tmp, "job.json")
    job.write_text(json.dumps({"method": method, "batch": batch, "impl": impl, "preset": preset}))
    subprocess.run([sys.executable, __file__, "--one-job", str(job)], check=True)
    return JobResult(**json.loads(job.read_text())["result"])


def _one_job(path: str) -> int:
  """Runs the job `_torch_job_apart` wrote to `path` and writes its result there."""
  job = json.loads(Path(path).read_text())
  res = torch_step(job["method"], job["preset"], job["batch"], job["impl"])
  Path(path).write_text(json.dumps(dict(job, result=res._asdict())))
  return 0


def attention_of(impl: str, preset: dict) -> str:
  """The attention kernel a row ran: torch's SDPA, or what "auto" resolved to for JAX."""
  if impl.startswith("torch"):
    return "sdpa"
  t_cfg, s_cfg = _configs(dict(preset, attention="xla") if impl == "wdjax-xla" else preset)
  teacher = layers.attention_implementation(t_cfg) or "xla"
  if s_cfg.attention_dropout > 0 and teacher != "xla":  # the student's dropout bypasses the kernel
    return f"{teacher}, student xla"
  return teacher


def merge(files: list[str], stem: Path) -> None:
  """One table of several runs' JSON (each row keeps its `run`; ratios stay within a run)."""
  runs = [json.loads(Path(f).read_text()) for f in files]
  rows = [r for d in runs for r in d["rows"]]
  rows.sort(key=lambda r: (METHODS.index(r["method"]), -r["tokens_per_step"], r["run"]))
  info = dict(runs[-1]["info"], runs=sorted({r["run"] for r in rows}))
  stem.with_suffix(".json").write_text(json.dumps({"info": info, "rows": rows}, indent=2) + "\n")
  stem.with_suffix(".md").write_text(table(rows, info) + "\n")
  plot(rows, stem.with_suffix(".png"))


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--preset", choices=sorted(PRESETS), default="gpu")
  ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
  ap.add_argument("--batches", nargs="+", type=int, help="sequences per step (default: the preset's)")
  ap.add_argument("--impls", nargs="+", help="only these implementations (default: all)")
  ap.add_argument("--budget-s", type=float, default=float("inf"),
                  help="start no job after this many seconds (rows so far are written after each job)")
  ap.add_argument("--dropout", type=float, default=0.0,
                  help="the student's dropout rate at every site, as it trains (default 0: deterministic "
                  "steps, equal first losses across implementations)")
  ap.add_argument("--torch-first-token", action="store_true",
                  help="torch_ref computes its last layer at the pooled token only, as wdjax does (the "
                  "same FLOPs on both sides; default: every token, as a PyTorch user's HF model)")
  ap.add_argument("--parts", action="store_true", help="also time the KD step's teacher and student parts")
  ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
  ap.add_argument("--tag", default="", help="suffix of the output files' names")
  ap.add_argument("--trace", help="profile every job: JAX traces (xprof, tensorboard) under this "
                  "folder, each step's device time by kind of operation in <out>/speed_<preset>_profile.{md,json}")
  ap.add_argument("--no-plot", action="store_true")
  ap.add_argument("--merge", nargs="+", metavar="JSON", help="only merge earlier runs' JSON into one table")
  ap.add_argument("--one-job", help=argparse.SUPPRESS)  # a torch job apart (_torch_job_apart)
  args = ap.parse_args(argv)
  if args.one_job:
    return _one_job(args.one_job)
  if args.merge:
    merge(args.merge, Path(args.out) / f"speed_{args.preset}{'_' + args.tag if args.tag else ''}")
    return 0
  t_start = time.perf_counter()
  preset = dict(PRESETS[args.preset], dropout=args.dropout, torch_first_token=args.torch_first_token)
  device = jax.devices()[0]
  import torch
  info = {"device": device.device_kind, "platform": device.platform, "jax": jax.__version__,
          "flax": __import__("flax").__version__, "torch": torch.__version__,
          "torch_device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
          "python": platform.python_version(), "preset": args.preset, "dtype": preset["dtype"],
          "teacher": preset["teacher"], "student": preset["student"], "seq": preset["seq"],
          "dropout": preset["dropout"], "torch_first_token": preset["torch_first_token"]}
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  stem = out / f"speed_{args.preset}{'_' + args.tag if args.tag else ''}"
  rows, skipped, parts, profiles = [], [], {}, {}

  def write():
    stem.with_suffix(".json").write_text(
        json.dumps({"info": info, "rows": rows, "skipped": skipped, "kd_parts": parts}, indent=2) + "\n")
    stem.with_suffix(".md").write_text(table(rows, info) + "\n")
    if profiles:  # where each traced step's time goes, side by side
      Path(f"{stem}_profile.json").write_text(json.dumps(profiles, indent=2) + "\n")
      Path(f"{stem}_profile.md").write_text(profile_table(profiles, info) + "\n")

  flops_of = {}
  for method, batch, impl in jobs(args.methods, args.batches or preset["batches"]):
    if args.impls and impl not in args.impls:
      continue
    if time.perf_counter() - t_start > args.budget_s:
      skipped.append([method, batch, impl])
      continue
    tokens = batch * preset["seq"]
    if method not in flops_of:
      t_m, s_m, _, _, g_m, _, _ = setup(method, preset)
      flops_of[method] = (t_m, g_m.training_config(s_m))  # WID trains at the teacher's width
    flops = step_flops(*flops_of[method], tokens, preset["seq"])[
        "student_train" if impl == "wdjax-cached" else "total"]
    try:
      res = run_job(method, batch, impl, preset, args.trace)
    except Exception as e:  # one implementation failing must not lose the other rows
      print(f"{method} {impl} {tokens}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
      skipped.append([method, batch, impl, f"{type(e).__name__}: {str(e)[:300]}"])
      continue
    finally:
      if torch.cuda.is_available():
        torch.cuda.empty_cache()
    gen_flops = res.gen_flops if res.gen_flops is not None else next(
        (r["flops_per_step"] - flops for r in rows if r["method"] == method
         and r["tokens_per_step"] == tokens and r["impl"] == "wdjax"), 0.0)
    row = {"method": method, "impl": "wdjax" if impl == "wdjax-xla" else impl,
           "attention": attention_of(impl, preset), "run": args.tag or "run", "tokens_per_step": tokens,
           "step_ms": 1e3 * res.median_s, "tokens_per_s": tokens / res.median_s,
           "compile_s": res.compile_s, "peak_bytes": res.peak_bytes, "flops_per_step": flops + gen_flops,
           "hlo_kernels": res.kernels, "first_loss": res.first_loss}
    if device.platform in PEAK_FLOPS:
      row["mfu"] = (flops + gen_flops) / res.median_s / PEAK_FLOPS[device.platform]
    if res.profile:
      row["profile_ms"] = res.profile["categories"]
      profiles[f"{method} {impl} {tokens}"] = res.profile
    rows.append(row)
    write()
    print(f"{method:4s} {impl:16s} {tokens:6d} tok/step: {1e3 * res.median_s:8.2f} ms  "
          f"(compile {res.compile_s:.1f} s, {time.perf_counter() - t_start:.0f} s in)", flush=True)
  if args.parts and time.perf_counter() - t_start < args.budget_s:
    for b in args.batches or preset["batches"]:
      parts[str(b * preset["seq"])] = kd_parts(preset, b)
      parts[str(b * preset["seq"]) + "-xla"] = kd_parts(dict(preset, attention="xla"), b)
    print("kd parts:", parts, flush=True)
  write()
  if rows and not args.no_plot:
    plot(rows, stem.with_suffix(".png"))
  print(table(rows, info))
  if skipped:
    print("not run:", skipped)
  return 0


def table(rows, info) -> str:
  lines = [f"Training step, teacher {info['teacher']['num_layers']}x{info['teacher']['hidden_size']} -> "
           f"student {info['student']['num_layers']}x{info['student']['hidden_size']}, seq {info['seq']}, "
           f"{info['dtype']}; {info['device']} (jax {info['jax']}), torch {info['torch']} on {info['torch_device']}. "
           "Ratios compare rows of the same run." + (
               f" The student trains with dropout {info['dropout']} at every site, so first losses "
               "differ between frameworks by their dropout draws." if info.get("dropout") else "") + (
               " torch_ref computes each network's last layer at the pooled token only, as wdjax: "
               "both sides do the same FLOPs." if info.get("torch_first_token") else
               " torch_ref computes each network's last layer at every token (a PyTorch user's "
               "model), ~10% more FLOPs than wdjax at these shapes; MFU counts wdjax's."),
           "Step / KD: a wdjax row's time over the same run's wdjax KD row at that batch (the "
           "generator's overhead); kernels: fusions and library calls in the compiled step; first "
           "loss: the first step's loss, from the draw every implementation of a method starts from "
           "(equal up to the dtype's rounding: they time the same computation).",
           "", "| method | tokens/step | impl | attention | run | step (ms) | tokens/s | vs torch-compile | "
           "vs torch-graphs | vs torch-eager | step / KD | kernels | MFU | peak mem | compile (s) | first loss |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  ref = {(r.get("run"), r["method"], r["tokens_per_step"], r["impl"], r.get("attention")): r["step_ms"]
         for r in rows}
  ref.update({k[:4]: v for k, v in ref.items()})  # any attention, when a run has one of the impl
  for r in rows:
    key = (r.get("run"), r["method"], r["tokens_per_step"])
    vs = lambda impl: f"{ref[(*key, impl)] / r['step_ms']:.2f}x" if (*key, impl) in ref else "-"
    kd = (r.get("run"), "kd", r["tokens_per_step"], "wdjax", r.get("attention"))
    over = f"{r['step_ms'] / ref[kd]:.2f}x" if r["impl"] == "wdjax" and kd in ref else "-"
    mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "n/a"
    mem = f"{r['peak_bytes'] / 2**30:.2f} GiB" if r["peak_bytes"] else "n/a"
    lines.append(f"| {r['method']} | {r['tokens_per_step']} | {r['impl']} | {r.get('attention', '-')} | "
                 f"{r.get('run', '-')} | {r['step_ms']:.2f} | {r['tokens_per_s']:.0f} | {vs('torch-compile')} | "
                 f"{vs('torch-graphs')} | {vs('torch-eager')} | {over} | {r.get('hlo_kernels') or '-'} | {mfu} | {mem} | "
                 f"{r['compile_s']:.1f} | {_loss(r.get('first_loss'))} |")
  return "\n".join(lines)


def profile_table(profiles: dict, info: dict) -> str:
  """The profiles side by side, then, for every method and batch with a wdjax and a torch
  profile, wdjax's time minus torch's per kind of operation: where the gap between them is."""
  gaps = ["", "Where wdjax's step differs from torch's: wdjax minus torch, ms per step "
          "(positive: wdjax spends more).", "",
          "| method | tokens | vs | total | " + " | ".join(profiling.CATEGORIES) + " |",
          "|" + "---|" * (len(profiling.CATEGORIES) + 4)]
  for job, p in profiles.items():
    method, impl, tokens = job.split()
    for other in ("torch-compile", "torch-graphs", "torch-eager"):
      q = profiles.get(f"{method} {other} {tokens}")
      if impl == "wdjax" and q:
        cells = [f"{p['categories'][c] - q['categories'][c]:+.2f}" for c in profiling.CATEGORIES]
        gaps.append(f"| {method} | {tokens} | {other} | {p['device_ms'] - q['device_ms']:+.2f} | "
                    + " | ".join(cells) + " |")
  return "\n".join([
      f"Device time per step by kind of operation ({profiling.__name__}; {TRACE_STEPS} steps "
      f"profiled after the timed ones): {info['device']} (jax {info['jax']}), torch {info['torch']} on "
      f"{info['torch_device']}. On a GPU, kernel time (streams can overlap); on a CPU, each op's "
      "time on its thread.", "", profiling.table(profiles)] + (gaps if len(gaps) > 5 else []))


def _loss(x) -> str:
  return "-" if x is None else f"{x:.5f}"  # rows of runs before the column existed have none


def plot(rows, path: Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  label = lambda r: r["impl"] if r["impl"].startswith("torch") else f"{r['impl']} ({r.get('attention', 'xla')})"
  groups = sorted({(r["method"], r["tokens_per_step"]) for r in rows},
                  key=lambda k: (METHODS.index(k[0]), -k[1]))
  impls = list(dict.fromkeys(label(r) for r in rows))
  fig, ax = plt.subplots(figsize=(1.6 * len(groups) + 2, 3.5))
  width = 0.8 / len(impls)
  for j, impl in enumerate(impls):  # the latest run's row of each (group, implementation)
    vals = [([r["tokens_per_s"] for r in rows if (r["method"], r["tokens_per_step"]) == g
              and label(r) == impl] or [0])[-1] for g in groups]
    ax.bar(np.arange(len(groups)) + j * width, vals, width, label=impl)
  ax.set_xticks(np.arange(len(groups)) + 0.4 - width / 2, [f"{m}\n{t} tok" for m, t in groups])
  ax.set_ylabel("tokens / s")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


if __name__ == "__main__":
  sys.exit(main())
