"""KD, Weight Squeezing and Weight Distillation in PyTorch, over flat parameter dicts.

Generator parameters are flat dicts whose keys are the '/'-joined paths wdjax gives the same
tensors (`maps/hidden`, `maps/attn/layer_0`, `mix/encoder/layer_0/attn/q/kernel/lam`, ...), so a
parity test can load one implementation's parameters into the other. The maths is written here
from the papers' definitions (docs/methods.md §1.2, §4.2), not translated from wdjax's code:

  WS:  W_s = M_in^T W_t M_out per matrix, one map per space (the residual stream, each layer's
       attention and FFN spaces, the pooler's), LayerNorm gains as diag(M^T diag(g) M).
  WD:  W_s = A * tanh(P^T (sum_j c_j W_t^(j)) Q) + B, c = Lambda w, a map per tensor axis,
       the classifier linear only.
  GWS: g W_m + (1 - g) WS(W_t);  OPDF: W = contraction of its MPO cores, plus the constraint;
  WID: the teacher-width network of kernels C K R with LayerNorms over the kept units.
"""

from __future__ import annotations

import math
import re

import torch

# axis roles of a BERT classifier's leaves ("hidden": the residual stream; per-layer spaces)
_ROLES = [
    (r"embeddings/\w+/embedding$", (None, "hidden")),
    (r"ln/(scale|bias)$", ("hidden",)),
    (r"attn/[qkv]/kernel$", ("hidden", "attn")),
    (r"attn/[qkv]/bias$", ("attn",)),
    (r"attn/o/kernel$", ("attn", "hidden")),
    (r"mlp/up/kernel$", ("hidden", "ffn")),
    (r"mlp/up/bias$", ("ffn",)),
    (r"mlp/down/kernel$", ("ffn", "hidden")),
    (r"(attn/o|mlp/down)/bias$", ("hidden",)),
    (r"^pooler/kernel$", ("hidden", "pooled")),
    (r"^pooler/bias$", ("pooled",)),
    (r"^classifier/kernel$", ("pooled", None)),
    (r"^classifier/bias$", (None,)),
]


def roles(path: str) -> tuple:
  for pattern, axes in _ROLES:
    if re.search(pattern, path):
      return axes
  raise KeyError(path)


def layer(path: str) -> int | None:
  m = re.search(r"layer_(\d+)/", path)
  return int(m.group(1)) if m else None


def teacher_sources(path: str, n_teacher: int, n_student: int, how: str) -> list[str]:
  """Teacher leaves feeding student leaf `path`: the last of each group (`every_k`) or the
  whole contiguous group (`contiguous`)."""
  l = layer(path)
  if l is None:
    return [path]
  k = n_teacher // n_student
  group = range(k * l + k - 1, k * l + k) if how == "every_k" else range(k * l, k * l + k)
  return [path.replace(f"layer_{l}/", f"layer_{j}/", 1) for j in group]


def selection(d_t: int, d_s: int) -> torch.Tensor:
  """`[d_t, d_s]` truncated identity: every k-th teacher unit (weight selection's indices)."""
  idx = (torch.arange(0, d_t, d_t // d_s) if d_t % d_s == 0
         else torch.round(torch.linspace(0, d_t - 1, d_s)).long())
  m = torch.zeros(d_t, d_s)
  m[idx, torch.arange(d_s)] = 1.0
  return m


def _project(x: torch.Tensor, maps: list) -> torch.Tensor:
  if x.ndim == 1:
    return x @ maps[0] if maps[0] is not None else x
  a, b = maps
  if a is not None:
    x = a.T @ x
  return x @ b if b is not None else x


# ---------------------------------------------------------------- Weight Squeezing


def ws_space(path: str, role: str) -> str:
  l = layer(path)
  return f"{role}/layer_{l}" if role in ("attn", "ffn") and l is not None else role


def ws_init(teacher: dict, student_shapes: dict, n_teacher: int, n_student: int) -> dict:
  """Identity maps: step 0 is the weight-selection student."""
  gen = {}
  for path, shape in student_shapes.items():
    t_shape = teacher[teacher_sources(path, n_teacher, n_student, "every_k")[0]].shape
    for axis, role in enumerate(roles(path)):
      if role is not None:
        gen[f"maps/{ws_space(path, role)}"] = selection(t_shape[axis], shape[axis])
  return gen


def ws_generate(gen: dict, teacher: dict, student_shapes: dict, n_teacher: int, n_student: int) -> dict:
  out = {}
  for path in student_shapes:
    x = teacher[teacher_sources(path, n_teacher, n_student, "every_k")[0]]
    maps = [None if r is None else gen[f"maps/{ws_space(path, r)}"] for r in roles(path)]
    if re.search(r"ln/scale$", path):  # a gain is the diagonal operator diag(g): M^T diag(g) M
      maps = [None if m is None else m * m for m in maps]
    out[path] = _project(x, maps)
  return out


def gws_generate(gen: dict, teacher: dict, student_shapes: dict, n_teacher: int, n_student: int) -> dict:
  """Gated WS: `g W_m + (1 - g) M_in^T W_t M_out`, g = sigmoid(gate) per matrix, row or element."""
  mapped = ws_generate(gen, teacher, student_shapes, n_teacher, n_student)
  out = {}
  for path, x in mapped.items():
    g = torch.sigmoid(gen[f"gate/{path}"])
    out[path] = g * gen[f"student/{path}"] + (1 - g) * x
  return out


# ---------------------------------------------------------------- OPDF


def mpo_contract(cores: list) -> torch.Tensor:
  """`W [I, J]` of an MPO chain, cores `[d_left, i_k, j_k, d_right]`, row-major multi-indices."""
  out = cores[0][0]  # [i_1, j_1, d_1]
  for core in cores[1:]:
    a, b, _ = out.shape
    out = torch.einsum("IJd,dije->IiJje", out, core)
    out = out.reshape(a * core.shape[1], b * core.shape[2], core.shape[3])
  return out[..., 0]


def opdf_generate(gen: dict, teacher: dict, student_shapes: dict, n_teacher: int, n_student: int) -> dict:
  """Every matrix with cores is their contraction (cores factor `W = kernel^T`); the rest dense."""
  out = {}
  for path in student_shapes:
    cores = sorted((k for k in gen if k.startswith(f"cores/{path}/core_")),
                   key=lambda k: int(k.rsplit("_", 1)[1]))
    out[path] = mpo_contract([gen[k] for k in cores]).T if cores else gen[f"dense/{path}"]
  return out


def opdf_constraint(gen: dict, targets: dict, lam: float, n_matrices: int) -> torch.Tensor:
  """lambda / |M| * sum over constrained cores of MSE(student core, teacher core)."""
  return lam * sum(((gen[f"cores/{k}"] - t) ** 2).mean() for k, t in targets.items()) / n_matrices


# ---------------------------------------------------------------- Weight Distillation


def wd_init(teacher: dict, student_shapes: dict, n_teacher: int, n_student: int,
            generator: torch.Generator | None = None) -> dict:
  """The reference's initialisation: Xavier-normal maps and Lambda, w = 1/ts, A = 1, B = 0."""
  gen = {}
  for path, shape in student_shapes.items():
    sources = teacher_sources(path, n_teacher, n_student, "contiguous")
    t_shape = teacher[sources[0]].shape
    for axis, role in enumerate(roles(path)):
      if role is not None:
        d_t, d_s = t_shape[axis], shape[axis]
        gen[f"maps/{path}/axis_{axis}"] = torch.randn(d_t, d_s, generator=generator) * math.sqrt(2 / (d_t + d_s))
    if layer(path) is not None:
      ts = len(sources)
      gen[f"mix/{path}/lam"] = torch.randn(ts, ts, generator=generator) * math.sqrt(1 / ts)
      gen[f"mix/{path}/w"] = torch.full((ts,), 1 / ts)
    if not path.startswith("classifier/"):
      gen[f"affine/{path}/a"], gen[f"affine/{path}/b"] = torch.ones(shape), torch.zeros(shape)
  return gen


def wd_generate(gen: dict, teacher: dict, student_shapes: dict, n_teacher: int, n_student: int) -> dict:
  out = {}
  for path in student_shapes:
    sources = teacher_sources(path, n_teacher, n_student, "contiguous")
    if layer(path) is not None:
      c = gen[f"mix/{path}/lam"] @ gen[f"mix/{path}/w"]  # [ts]
      x = sum(c[j] * teacher[s] for j, s in enumerate(sources))
    else:
      x = teacher[sources[0]]
    x = _project(x, [None if r is None else gen[f"maps/{path}/axis_{a}"]
                     for a, r in enumerate(roles(path))])
    if not path.startswith("classifier/"):  # the output projection is linear only
      x = gen[f"affine/{path}/a"] * torch.tanh(x) + gen[f"affine/{path}/b"]
    out[path] = x
  return out


# ---------------------------------------------------------------- WID


def wid_generate(gen: dict, teacher: dict, student_shapes: dict, n_teacher: int, n_student: int) -> dict:
  """WID's training network (teacher width): every kernel `C K R` (column compactor on its input,
  row compactor on its output), biases `b R`, embedding tables `E R_emb`; the weights themselves
  (the depth-selected teacher's) are trainable leaves too."""
  out = {}
  for key, x in gen.items():
    if not key.startswith("weights/"):
      continue
    p = key[len("weights/"):]
    base = p.rsplit("/", 1)[0]
    if p.endswith("/kernel"):
      if f"compactors/{p}/col" in gen:
        x = gen[f"compactors/{p}/col"] @ x
      if f"compactors/{p}/row" in gen:
        x = x @ gen[f"compactors/{p}/row"]
    elif p.endswith("/bias") and f"compactors/{base}/kernel/row" in gen:
      x = x @ gen[f"compactors/{base}/kernel/row"]
    elif p.startswith("encoder/embeddings/") and p.endswith("/embedding"):
      x = x @ gen["compactors/embeddings"]
    out[p] = x
  return out


# ---------------------------------------------------------------- loss


def hinton_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                temperature: float, alpha: float) -> torch.Tensor:
  """alpha T^2 KL(softmax(z_t/T) || softmax(z_s/T)) + (1 - alpha) CE, batch means."""
  t = temperature
  log_ps = torch.log_softmax(student_logits / t, -1)
  log_pt = torch.log_softmax(teacher_logits / t, -1)
  kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1).mean()
  ce = torch.nn.functional.cross_entropy(student_logits, labels)
  return alpha * t * t * kl + (1 - alpha) * ce
