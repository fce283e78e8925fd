"""Where a training step's device time goes, by kind of operation, from a profile.

`log.profile_steps=N` (the training loop) and `benchmarks/speed.py --trace DIR` (every job of the
speed harness, PyTorch's included) summarise their traces with this module, so a profile answers
"which kind of work takes the time" without opening a trace viewer:

    matmul       matrix products: cuBLAS / oneDNN calls, XLA dot fusions (Triton gemms), aten::mm
    attention    fused attention kernels: cuDNN / flash / SDPA
    elementwise  element-wise fusions and kernels (GELU, bias, casts mixed with arithmetic, AdamW)
    reduction    fusions and kernels that reduce (LayerNorm, softmax, losses, gradient sums)
    copy         data movement only: copies, transposes, casts, gathers, concatenations
    collective   all-reduce, all-gather, reduce-scatter, ...
    other        everything else (control flow, host callbacks, unrecognised kernels)

A JAX op is classified from the compiled HLO it ran (the trace gives each device event its
`hlo_op` name; the HLO gives what that instruction, or the fused computation it calls, does).
A PyTorch kernel, which carries only its name, is classified by name; the same rules classify a
JAX event whose op is not in the HLO given. Times are summed per step: on a GPU that is kernel
time (streams can overlap, so it can differ from the wall time); on a CPU it is the time of each
op on its thread (XLA runs independent ops side by side, each slower than alone). Steps of
another shape (batches padded to another length) run another program of the same name, whose
ops are read against the HLO given: their time is counted, their classification assumed alike.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import re
from pathlib import Path

CATEGORIES = ("matmul", "attention", "elementwise", "reduction", "copy", "collective", "other")

MATMUL_OPS = {"dot", "convolution", "ragged-dot"}
REDUCE_OPS = {"reduce", "reduce-window", "scatter", "select-and-scatter", "sort"}
# ops that only move or re-type data (a fusion of nothing else is a copy)
MOVE_OPS = {"parameter", "constant", "copy", "transpose", "bitcast", "reshape", "broadcast", "slice",
            "dynamic-slice", "dynamic-update-slice", "concatenate", "pad", "iota", "tuple",
            "get-tuple-element", "gather", "reverse", "convert", "bitcast-convert", "copy-start",
            "copy-done"}
CONTROL_OPS = {"while", "conditional", "call", "custom-call", "async-start", "async-done",
               "async-update", "send", "recv", "send-done", "recv-done", "infeed", "outfeed",
               "rng-get-and-update-state", "after-all", "partition-id", "replica-id"}
NESTING_OPS = {"while", "conditional", "call"}
COLLECTIVE_PREFIXES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-")

_ATTENTION = re.compile(r"fmha|flash|sdpa|scaled_dot_product|attention|attn", re.I)
_MATMUL = re.compile(r"gemm|matmul|cublas|nvjet|cutlass|xmma|\bdot\b|convolution|onednn|mkldnn|"
                     r"aten::(mm|addmm|bmm|baddbmm|linear|matmul)$", re.I)
_COLLECTIVE = re.compile(r"nccl|all[-_]?reduce|all[-_]?gather|reduce[-_]scatter|all[-_]to[-_]all", re.I)
_REDUCTION = re.compile(r"triton_(red|per)_|reduce|reduction|softmax|norm|aten::(sum|mean|max|"
                        r"min|amax|var|std)\b|cross_entropy|nll_loss", re.I)
_COPY = re.compile(r"memcpy|memset|aten::(copy_|to|_to_copy|contiguous|clone|cat|index_select|"
                   r"embedding|t|transpose|permute|view|reshape|expand|slice|select|empty.*)$|"
                   r"\bcopy\b|transpose|cat_|concat|gather|index_?select|embedding", re.I)
_ELEMENTWISE = re.compile(r"triton_poi_|elementwise|vectorized|unrolled|foreach|adam|fusion|^aten::",
                          re.I)  # an aten op none of the above claims is point-wise (add, gelu, ...)


def kernel_category(name: str) -> str:
  """The category of a kernel or op known only by name (PyTorch's, or an unmatched JAX event).

  Inductor names its kernels by kind first (`triton_tem_` a matmul template, `triton_red_` /
  `triton_per_` a reduction, `triton_poi_` point-wise), so those prefixes are read before the
  fused ops listed after them."""
  if "CompiledFxGraph" in name:  # a CPU: inductor's C++ kernels (fused point-wise and reductions)
    return "elementwise"          # run inside it, unprofiled; its matmuls are aten::mm calls
  if "#" in name:  # a record_function label around other ops ("Optimizer.step#AdamW.step"): host time
    return "other"
  for pattern, category in ((_ATTENTION, "attention"), (_COLLECTIVE, "collective")):
    if pattern.search(name):
      return category
  if name.startswith("triton_"):
    return {"tem": "matmul", "red": "reduction", "per": "reduction"}.get(name[7:10], "elementwise")
  for pattern, category in ((_MATMUL, "matmul"), (_REDUCTION, "reduction"), (_COPY, "copy"),
                            (_ELEMENTWISE, "elementwise")):
    if pattern.search(name):
      return category
  return "other"


@dataclasses.dataclass(frozen=True)
class HloOp:
  """One instruction of a compiled module: what a device event named `name` ran."""

  name: str
  opcode: str
  shape: str  # its output type, layouts dropped ("bf16[32768,3072]")
  category: str
  detail: str  # fusion kind and the distinct ops it fuses, or the custom call's target
  fused: bool  # it runs inside a fusion (part of another instruction's kernel)


_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.+?) ([a-z][\w\-]*)\(")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_TARGET = re.compile(r'custom_call_target="([^"]+)"')
_KIND = re.compile(r"kind=(k\w+)")
_LAYOUT = re.compile(r"\{[^{}]*\}")


def parse_hlo(text: str) -> dict[str, HloOp]:
  """`{instruction name: HloOp}` for every instruction of a compiled module's text
  (`jitted.as_text()`, or an XLA dump's `*after_optimizations.txt`)."""
  computations: dict[str, list[tuple[str, str, str, str]]] = {}
  current: list | None = None
  for line in text.splitlines():
    if m := _COMPUTATION.match(line):
      current = computations.setdefault(m.group(1), [])
    elif current is not None and (m := _INSTRUCTION.match(line)):
      current.append((m.group(1), m.group(2), m.group(3), line))

  def fused_ops(comp: str, seen: frozenset = frozenset()) -> set[str]:
    """Opcodes of a called computation, nested calls included ('custom-call:<target>' for calls)."""
    ops = set()
    for _, _, opcode, line in computations.get(comp, ()):
      if opcode == "custom-call" and (t := _TARGET.search(line)):
        ops.add("custom-call:" + t.group(1))
      ops.add(opcode)
      for called in _CALLS.findall(line):
        if called not in seen:
          ops |= fused_ops(called, seen | {comp})
    return ops

  def classify(opcode: str, ops: set[str]) -> str:
    """`ops`: the opcodes the instruction runs (its own, or its fused computation's)."""
    targets = " ".join(o for o in ops if o.startswith("custom-call:"))
    if targets and _ATTENTION.search(targets):
      return "attention"
    if ops & MATMUL_OPS or (targets and _MATMUL.search(targets)):
      return "matmul"
    if any(o.startswith(COLLECTIVE_PREFIXES) for o in ops):
      return "collective"
    if ops & REDUCE_OPS:
      return "reduction"
    if ops <= MOVE_OPS:
      return "copy"
    if opcode != "fusion" and opcode in CONTROL_OPS:
      return "other"
    return "elementwise"

  in_fusion = {c for comp in computations.values() for _, _, opcode, line in comp
               if opcode == "fusion" for c in _CALLS.findall(line)}
  out = {}
  for comp, instructions in computations.items():
    for name, shape, opcode, line in instructions:
      if opcode == "fusion" and (called := _CALLS.search(line)):
        ops = fused_ops(called.group(1)) - {"parameter"}
        kind = (k.group(1) if (k := _KIND.search(line)) else "fusion")
        shown = sorted(o for o in ops if o not in ("bitcast", "constant", "tuple", "get-tuple-element"))
        detail = f"{kind}: {', '.join(shown)}"
      else:
        target = _TARGET.search(line) if opcode == "custom-call" else None
        ops = {opcode} | ({"custom-call:" + target.group(1)} if target else set())
        detail = target.group(1) if target else opcode
      out[name] = HloOp(name, opcode, _LAYOUT.sub("", shape), classify(opcode, ops), detail,
                        comp in in_fusion)
  return out


def kernel_count(text: str) -> int:
  """Kernels one step launches (at most: both branches of a cond count): the fusions, custom
  calls (library matmuls, cuDNN) and unfused matrix products, not counting what runs inside a
  fusion. On a GPU each costs microseconds however small, which is what per-layer leaves multiply."""
  return sum(not op.fused and (op.opcode in ("fusion", "custom-call") or op.opcode in MATMUL_OPS)
             for op in parse_hlo(text).values())


def load_trace_events(trace_dir: str | Path) -> list[dict]:
  """The trace events (Chrome trace format) of the newest profile under `trace_dir` (the folder
  given to `jax.profiler.trace`, or one of its runs): every host's `*.trace.json.gz` of that run."""
  files = sorted(Path(trace_dir).rglob("*.trace.json.gz"))
  if not files:
    raise FileNotFoundError(f"no *.trace.json.gz under {trace_dir}")
  newest = max(f.parent for f in files)  # run folders are named by start time
  events = []
  for f in files:
    if f.parent == newest:
      events += json.loads(gzip.decompress(f.read_bytes()))["traceEvents"]
  return events


def jax_op_times(events: list[dict], module: str | None = None,
                 hlo: dict[str, HloOp] | None = None) -> dict[str, tuple[float, int]]:
  """`{op name: (total µs, calls)}` of the device's work in a `jax.profiler` trace.

  A GPU's work is its kernel events, on the device's `Stream #...` lines (the trace also derives
  `XLA Ops` / `XLA Modules` lines from them, which would count the same time twice); a TPU's is
  its `XLA Ops` line; a CPU's, the XLA ops its threads ran. Each is named by its `hlo_op`, else by
  the kernel's own name (XLA names a fusion's kernel after the fusion) — also when `hlo_op` names
  a loop or call of `hlo`, or no instruction of it (a GPU's command buffer runs many kernels under
  its own name, `command_buffer_1`). A CPU's event of a loop or call itself is left out: it spans
  its body's ops, counted themselves.
  `module` (`jit_step`) keeps the events of that program only, when they say which they belong to."""
  process = {e["pid"]: e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
  thread = {(e["pid"], e.get("tid")): e["args"]["name"] for e in events
            if e.get("ph") == "M" and e.get("name") == "thread_name"}
  spans = [e for e in events if e.get("ph") == "X"]
  on_device = [e for e in spans if process.get(e["pid"], "").startswith("/device:")]
  line = lambda e: thread.get((e["pid"], e.get("tid")), "")
  if on_device:
    streams = [e for e in on_device if line(e).startswith("Stream")]
    spans = streams or [e for e in on_device if line(e) == "XLA Ops"] or on_device
  else:  # a CPU: its ops run on host threads, among Python's and the runtime's own events
    spans = [e for e in spans if "hlo_op" in e.get("args", {})]
  times: dict[str, tuple[float, int]] = {}
  for e in spans:
    args = e.get("args", {})
    if module is not None and "hlo_module" in args and not str(args["hlo_module"]).startswith(module):
      continue
    name = args.get("hlo_op", e["name"])
    if hlo and ((op := hlo.get(name)) is None or op.opcode in NESTING_OPS):
      if op is not None and name == e["name"]:
        continue  # a CPU's loop or call event itself
      name = e["name"]  # a kernel run by a command buffer carries the buffer's name (command_buffer_1)
    t, n = times.get(name, (0.0, 0))
    times[name] = (t + float(e.get("dur", 0.0)), n + 1)
  return times


def summarize(op_times: dict[str, tuple[float, int]], steps: int,
              hlo: dict[str, HloOp] | None = None, top: int = 12) -> dict:
  """Per-step milliseconds by category and the `top` costliest ops.

  `op_times`: `{op or kernel name: (total µs, calls)}` over `steps` steps; `hlo`: the compiled
  module's instructions (`parse_hlo`), which classify JAX ops by what they do."""
  hlo = hlo or {}
  kernels = {name.replace(".", "_").replace("-", "_"): op for name, op in hlo.items()}
  by_category = dict.fromkeys(CATEGORIES, 0.0)
  rows = []
  for name, (us, calls) in op_times.items():
    op = hlo.get(name) or _op_of_kernel(name, kernels)
    category = op.category if op else kernel_category(name)
    ms = us / 1e3 / steps
    by_category[category] += ms
    rows.append({"op": name, "category": category, "ms": ms, "calls": calls / steps,
                 "shape": op.shape if op else "", "detail": op.detail if op else ""})
  rows.sort(key=lambda r: -r["ms"])
  return {"device_ms": sum(by_category.values()), "categories": by_category, "top": rows[:top],
          "steps": steps, "calls": sum(r["calls"] for r in rows)}


def _op_of_kernel(name: str, kernels: dict[str, HloOp]) -> HloOp | None:
  """The op whose sanitized name (`loop_add_fusion.3` -> `loop_add_fusion_3`) is the kernel's
  name, or its longest `_`-separated prefix of two parts or more (a kernel of a fusion may carry
  a suffix of its own, `gemm_fusion_dot_3_impl`)."""
  parts = name.split("_")
  for i in range(len(parts), 1, -1):
    if (op := kernels.get("_".join(parts[:i]))) is not None:
      return op
  return None


def jax_summary(trace_dir: str | Path, hlo_text: str, steps: int) -> dict:
  """`summarize` of a `jax.profiler` trace of `steps` runs of the compiled module `hlo_text`."""
  module = re.match(r"HloModule ([\w.\-]+)", hlo_text)
  hlo = parse_hlo(hlo_text)
  times = jax_op_times(load_trace_events(trace_dir), module.group(1) if module else None, hlo)
  if not times:
    raise ValueError(f"the trace under {trace_dir} has no events of the module "
                     f"{module.group(1) if module else '?'}")
  return summarize(times, steps, hlo)


def table(summaries: dict[str, dict], top: int = 8) -> str:
  """Markdown: one row per job (ms per step by category, share of the total), then each job's
  costliest ops."""
  head = "| job | device ms/step | calls/step | " + " | ".join(CATEGORIES) + " |"
  lines = ["Milliseconds of device time per step by kind of operation (share of the total); calls: "
           "events per step (a CPU runs a large op as several tasks, one event each).", "",
           head, "|" + "---|" * (len(CATEGORIES) + 3)]
  for job, s in summaries.items():
    total = s["device_ms"] or 1.0
    cells = [f"{s['categories'][c]:.2f} ({100 * s['categories'][c] / total:.0f}%)" for c in CATEGORIES]
    calls = f"{s['calls']:g}" if "calls" in s else "-"
    lines.append(f"| {job} | {s['device_ms']:.2f} | {calls} | " + " | ".join(cells) + " |")
  for job, s in summaries.items():
    lines += ["", f"{job}: costliest ops per step", "",
              "| op | category | ms | calls | shape | what |", "|---|---|---|---|---|---|"]
    for r in s["top"][:top]:
      what = r["detail"].replace("|", "/")[:90]
      lines.append(f"| {r['op'][:60]} | {r['category']} | {r['ms']:.3f} | {r['calls']:g} | "
                   f"{r['shape'][:40]} | {what} |")
  return "\n".join(lines)
