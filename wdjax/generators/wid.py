"""Weight-Inherited Distillation (Wu et al., NAACL 2024 Findings), as `docs/methods.md` §3.

Every linear layer of the (depth-selected) teacher is wrapped in two identity-initialised square
*compactors*, a column compactor on its input and a row compactor on its output. In Flax layout
(`y = x K + b`):

    y = ((x C) K + b) R        ==  x (C K R) + b R           C [in, in], R [out, out]

so the training-time network is a plain network *of the teacher's width* whose kernels are
`C K R` and biases `b R` (`generate`), and the embeddings (summed, before their LayerNorm) carry
one row compactor, which distributes over the three tables. The teacher's own weights train too,
at `teacher_lr_scale` times the compactors' learning rate (§3.4: 1e-6 vs 5e-5).

Masks (non-trainable state, full-size 0/1 vectors, so shapes are static) pick the units to drop
in each space: `hidden` (one, global), `attn/layer_l`, `ffn/layer_l` (one per layer) and
`pooled` (the classifier head's space; the MLM head's `M` in the paper). Every `w_step` steps
they are recomputed in jit from the column compactors' per-input norms (`hidden`: layer 0's V;
`attn/layer_l`: layer l's O; `ffn/layer_l`: layer l's down; `pooled`: the classifier), growing
as §3.4's schedule says:

- `dim`: `hidden` and `attn` drop the same number of units in every head-sized chunk, growing by
  `max(1, cut // 8)` per `w_step` up to `cut = (d_t - d_s) / heads` (the reference's `cut // 8`
  is 0, and nothing is ever pruned, when `cut < 8`);
- `head`: `attn` drops whole heads, one more every `2 w_step`; `hidden` drops whole head-sized
  blocks the same way (the reference's behaviour);
- `ffn` and `pooled`: unstructured, `(k * delta) // 16` after `k` boundaries, up to `delta`.

The paper spaces its boundaries for 400k steps. Here `w_step` follows phase 1's length unless
set: the largest spacing with which every space is at its target by `reach` of phase 1 (half by
default), leaving the rest of the phase for the penalty to bring the masked entries to zero
before the cut (`diagnostics` reports how far they are).

The masks are used twice: every LayerNorm over the hidden space takes its statistics over the
kept units only (`model_kwargs`), and the optimizer's first transform (`gradient_surgery`)
replaces the task gradient of every masked compactor row/column, masked bias entry and masked
LayerNorm gain/shift by a penalty pulling it to zero (until the first boundary every compactor
gets `g + C`, the reference's plain L2): by default the reference's momentum form (`p` in the
gradient, `(lambda - 1) p` injected into Adam's first moment), or the clean `lambda p` (see
`gradient_surgery`). Masked entries therefore decay to zero, at which point the cut is exact.

`materialize` cuts every compactor to the `d_s` kept units of each space (the current masks,
completed by largest norm while the schedule is still growing) and merges it: a plain student of
the target width. In `dim` mode the student's heads are narrower, so the attention scale
`1/sqrt(head_dim)` changes; `sqrt(head_dim_s / head_dim_t)` is folded into the query kernel and
bias so the student computes what the training network did (the reference converter leaves it
out, §3.5).

Layout: the weights and compactors of the L layers are stored stacked (`encoder/layers/...`,
`[L, ...]`), so a stack's L products are one batched product and one optimizer update; masks
(state) stay per layer, and `flat_params` / `keep_tree` map between the two.

Depth: WID keeps the teacher's depth; a shallower student takes its layers from the teacher by
a layer map first (`every_k` by default; an extension, as in weight selection), or with
`method.init=importance` the layers of highest block influence (`generators/importance.py`).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from wdjax import trees
from wdjax.config import RankedStartMethod, TwoPhaseMethod
from wdjax.generators import paths
from wdjax.models import contract
from wdjax.generators.base import Generator, OptimizerHooks, Params, StudentSpec
from wdjax.generators.registry import Method, register
from wdjax.generators.select import DEPTH, SelectionPlan

STRATEGIES = ("dim", "head")
SURGERIES = ("momentum", "clean")


def _rank(x: jax.Array) -> jax.Array:
  """Rank of each entry along the last axis, 0 = smallest (stable: ties by index)."""
  return jnp.argsort(jnp.argsort(x, axis=-1, stable=True), axis=-1, stable=True)


def drop_smallest(norms: jax.Array, n: jax.Array) -> jax.Array:
  """0/1 keep mask dropping the `n` smallest entries of the last axis (`n` may be traced)."""
  return (_rank(norms) >= n).astype(jnp.float32)


class WeightInherited(Generator):
  name = "wid"

  def __init__(self, student_shapes: Params, teacher_shapes: Params, *, teacher_heads: int,
               student_heads: int, strategy: str = "dim", w_step: int = 500, targets_at: int = 0,
               l2_lambda: float = 20.0, surgery: str = "momentum", teacher_lr_scale: float = 0.02,
               layer_map: str = "every_k", indices: dict | None = None):
    """`w_step`: steps between mask boundaries; or, with `targets_at > 0`, the largest `w_step`
    with which every space reaches its target by step `targets_at`."""
    if strategy not in STRATEGIES:
      raise ValueError(f"WID strategy must be one of {STRATEGIES}, got {strategy!r}")
    if surgery not in SURGERIES:
      raise ValueError(f"WID surgery must be one of {SURGERIES}, got {surgery!r}")
    if w_step < 1 and targets_at < 1:
      raise ValueError(f"w_step must be >= 1, got {w_step}")
    # depth: the layer map, or the teacher layers `indices[DEPTH]` names (importance's ranking);
    # widths are WID's own to cut
    depth = {DEPTH: indices[DEPTH]} if indices and DEPTH in indices else None
    plan = SelectionPlan(teacher_shapes, student_shapes, layer_map, depth)
    self.sources = {p: srcs[-1] for p, srcs in plan.sources.items()}
    self.sizes = plan.sizes  # role -> (d_teacher, d_student)
    self.n_layers = plan.n_student
    t_flat = trees.flatten(teacher_shapes)
    self.train_shapes = {p: tuple(np.shape(t_flat[q])) for p, q in self.sources.items()}
    d_t, d_s = self.sizes["hidden"]
    if "relative_bias/embedding" in " ".join(self.sources) and strategy == "head":
      raise ValueError("WID's head strategy drops different heads in different layers, which "
                       "MPNet's shared relative-position bias cannot express; use strategy='dim'")
    self.heads_t = teacher_heads
    # head sizes from the attention space (a Llama's may differ from hidden / heads)
    self.hd_t = self.sizes.get("attn", self.sizes["hidden"])[0] // teacher_heads
    if strategy == "dim":
      if student_heads != teacher_heads or d_s % student_heads:
        raise ValueError(f"WID strategy 'dim' keeps the teacher's {teacher_heads} heads and "
                         f"narrows each; the student has {student_heads} heads of width {d_s}")
      self.hd_s = self.sizes.get("attn", self.sizes["hidden"])[1] // student_heads
    else:
      if d_s % self.hd_t or d_s // self.hd_t != student_heads:
        raise ValueError(f"WID strategy 'head' keeps whole heads of {self.hd_t}: a student of "
                         f"width {d_s} needs {d_s // self.hd_t} heads, it has {student_heads}")
      self.hd_s = self.hd_t
    self.strategy, self.w_step, self.l2_lambda = strategy, w_step, l2_lambda
    self.surgery = surgery
    self.teacher_lr_scale = teacher_lr_scale
    # Compactor sides: (kernel path, axis) for every kernel axis with a dimension role.
    self.compacted: dict[str, tuple[str | None, str | None]] = {}
    for p, shape in self.train_shapes.items():
      if p.endswith("/kernel"):
        r = contract.roles(p, 2)
        if any(r):
          self.compacted[p] = (paths.space_of(p, r[0]) if r[0] else None,
                               paths.space_of(p, r[1]) if r[1] else None)
    self.spaces = sorted({s for pair in self.compacted.values() for s in pair if s}
                         | {"hidden"})
    # where each space's units are ranked: the residual stream at the first block's value
    # projection, every other space at the kernel that reads it (the family's tags)
    hidden = sorted((trees.layer_of(p) or 0, p) for p in self.compacted
                    if contract.has(p, contract.RANKS_HIDDEN))
    self.norm_source = {"hidden": (hidden[0][1] if hidden else "", "col")}
    for p, (s_in, _) in self.compacted.items():
      if contract.has(p, contract.RANKS_INPUT):
        self.norm_source[s_in] = (p, "col")
    # spaces the student keeps whole (a Llama's KV heads when it keeps the heads) are never masked
    self.cut_spaces = [s for s in self.spaces if self.space_size(s)[0] != self.space_size(s)[1]]
    missing = [s for s in self.cut_spaces if s not in self.norm_source]
    if missing:
      raise ValueError(f"WID has no compactor to rank the units of {missing}")
    if targets_at > 0:
      self.w_step = max(1, targets_at // max(1, self.boundaries_to_targets()))

  # --- sizes -----------------------------------------------------------------------------------

  def space_size(self, space: str) -> tuple[int, int]:
    return self.sizes[space.split("/")[0]]

  def training_config(self, student):
    """The training-time network: the student's depth at the teacher's width and head layout."""
    return dataclasses.replace(student, hidden_size=self.sizes["hidden"][0],
                               num_heads=self.heads_t,
                               intermediate_size=self.sizes["ffn"][0])

  # --- contract ---------------------------------------------------------------------------------

  def init(self, rng, teacher_params, spec: StudentSpec):
    del rng
    t_flat = trees.flatten(teacher_params)
    weights = {p: jnp.asarray(t_flat[q], jnp.float32) for p, q in self.sources.items()}
    comp = {}
    if any(contract.has(p, contract.SUMMED_EMBEDDING) for p in weights):  # BERT's summed tables share one compactor
      comp["embeddings"] = jnp.eye(self.sizes["hidden"][0], dtype=jnp.float32)
    for p, (s_in, s_out) in self.compacted.items():
      d_in, d_out = self.train_shapes[p]
      if s_in:
        comp[p + "/col"] = jnp.eye(d_in, dtype=jnp.float32)
      if s_out:
        comp[p + "/row"] = jnp.eye(d_out, dtype=jnp.float32)
    masks = {s: jnp.ones((self.space_size(s)[0],), jnp.float32) for s in self.spaces}
    # weights and compactors stacked over the layers (`encoder/layers/...`, [L, ...]): a stack's
    # L products are one batched product and one optimizer update; the masks stay per layer
    stack = lambda flat: trees.unflatten(trees.stack_layers(flat))
    return ({"weights": stack(weights), "compactors": stack(comp)},
            {"masks": trees.unflatten(masks), "active": jnp.zeros((), jnp.float32)})

  def _flat(self, gen_params):
    """Weights and compactors, flat and per layer (slices of the stacked storage)."""
    return (trees.unstack_layers(trees.flatten(gen_params["weights"])),
            trees.unstack_layers(trees.flatten(gen_params["compactors"])))

  def generate(self, gen_params, teacher_params, gen_state):
    """The teacher-width training network `{C K R, b R, E R_emb, ...}` (per stack: batched)."""
    del teacher_params, gen_state
    w, c = trees.flatten(gen_params["weights"]), trees.flatten(gen_params["compactors"])
    out = {}
    for p, x in w.items():
      base = p.rsplit("/", 1)[0]
      if p.endswith("/kernel"):
        if p + "/col" in c:
          x = c[p + "/col"] @ x  # [..., in, in] @ [..., in, out]
        if p + "/row" in c:
          x = x @ c[p + "/row"]
      elif p.endswith("/bias") and base + "/kernel/row" in c:
        x = jnp.einsum("...i,...ij->...j", x, c[base + "/kernel/row"])
      elif contract.has(p, contract.SUMMED_EMBEDDING):
        x = x @ c["embeddings"]
      out[p] = x
    return trees.unflatten(trees.unstack_layers(out))

  def model_kwargs(self, gen_state) -> dict:
    return {"hidden_keep": gen_state["masks"]["hidden"]}

  def optimizer_hooks(self, gen_params, gen_state) -> OptimizerHooks:
    """The gradient surgery, the teacher weights' slower learning rate, and (momentum surgery)
    the nudge of Adam's first moment."""
    del gen_state
    return OptimizerHooks(surgery=self.gradient_surgery(), lr_factors=self.lr_factors(gen_params),
                          inject=self.moment_injection())

  def lr_factors(self, gen_params) -> Params:
    return {"weights": jax.tree_util.tree_map(lambda _: self.teacher_lr_scale,
                                              gen_params["weights"]),
            "compactors": jax.tree_util.tree_map(lambda _: 1.0, gen_params["compactors"])}

  # --- masks ----------------------------------------------------------------------------------

  def unit_norms(self, gen_params) -> dict[str, jax.Array]:
    """Per-unit L2 norm of each space's ranking compactor (its rows: one per input unit)."""
    c = self._flat(gen_params)[1]
    return {s: jnp.linalg.norm(c[f"{p}/{side}"], axis=1) for s, (p, side) in self.norm_source.items()
            if s in self.cut_spaces}

  def boundaries_to_targets(self) -> int:
    """How many mask boundaries the schedule takes until every space drops `d_t - d_s` units:
    `dim` spaces need `ceil(cut / max(1, cut // 8))`, `head` spaces two per dropped head, the
    unstructured ones 16."""
    need = [0]
    for space in self.spaces:
      d_t, d_s = self.space_size(space)
      delta = d_t - d_s
      if delta == 0:
        continue
      if space.split("/")[0] in ("hidden", "attn"):
        if self.strategy == "dim":
          cut = delta // self.heads_t
          need.append(-(-cut // max(1, cut // 8)))
        else:
          need.append(2 * (delta // self.hd_t))
      else:
        need.append(16)
    return max(need)

  def diagnostics(self, gen_params, teacher_params, gen_state) -> dict[str, jax.Array]:
    """How close the training network is to the student the cut will make: the L2 norm of the
    masked compactor entries (`masked_norm`; the cut is exact at 0), that norm over all the
    compactors' (`masked_share`), and the fraction of spaces whose masks are at their targets
    (`at_target`)."""
    del teacher_params
    masks = trees.flatten(gen_state["masks"])
    keep = self.keep_tree(gen_params, masks)["compactors"]
    sq = lambda tree: sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree_util.tree_leaves(tree))
    masked = sq(jax.tree_util.tree_map(lambda c, k: c * (1 - k), gen_params["compactors"], keep))
    total = sq(gen_params["compactors"])
    at_target = [jnp.sum(1 - masks[s]) == self.space_size(s)[0] - self.space_size(s)[1]
                 for s in self.spaces]
    return {"masked_norm": jnp.sqrt(masked), "masked_share": jnp.sqrt(masked / total),
            "at_target": jnp.mean(jnp.stack(at_target).astype(jnp.float32))}

  def dropped(self, space: str, k: jax.Array, step: jax.Array) -> jax.Array:
    """How many units of `space` are masked after `k = step // w_step` boundaries (per chunk for
    the chunked spaces, heads for `head` mode)."""
    d_t, d_s = self.space_size(space)
    delta = d_t - d_s
    kind = space.split("/")[0]
    if kind in ("hidden", "attn"):
      if self.strategy == "dim":
        cut = delta // self.heads_t
        return jnp.minimum(k * max(1, cut // 8), cut)
      return jnp.minimum(step // (2 * self.w_step), delta // self.hd_t)
    return jnp.minimum((k * delta) // 16, delta)

  def masks_for(self, norms: dict[str, jax.Array], n: dict[str, jax.Array]) -> dict[str, jax.Array]:
    out = {}
    for s, v in norms.items():
      kind = s.split("/")[0]
      if kind in ("hidden", "attn"):
        chunks = v.reshape(self.heads_t, -1)  # one chunk per head
        if self.strategy == "dim":
          out[s] = drop_smallest(chunks, n[s]).reshape(-1)
        else:
          keep = drop_smallest(chunks.sum(axis=1), n[s])
          out[s] = jnp.repeat(keep, self.hd_t)
      else:
        out[s] = drop_smallest(v, n[s])
    return out

  def update_state(self, gen_params, gen_state, step):
    """At every boundary `step = k w_step` (k >= 1), recompute every mask from scratch."""
    def recompute(_):
      k = step // self.w_step
      n = {s: self.dropped(s, k, step) for s in self.cut_spaces}
      masks = {**trees.flatten(gen_state["masks"]), **self.masks_for(self.unit_norms(gen_params), n)}
      return {"masks": trees.unflatten(masks), "active": jnp.ones((), jnp.float32)}
    boundary = (step >= self.w_step) & (step % self.w_step == 0)
    return jax.lax.cond(boundary, recompute, lambda _: gen_state, None)

  def final_keep(self, gen_params, gen_state) -> dict[str, np.ndarray]:
    """Indices (sorted, static count d_s) of the units each space keeps in the student: the
    current masks' kept units, completed by largest norm while the schedule still grows."""
    norms = self.unit_norms(gen_params)
    masks = trees.flatten(gen_state["masks"])
    out = {s: jnp.arange(self.space_size(s)[0]) for s in self.spaces if s not in self.cut_spaces}
    for s, v in norms.items():
      d_t, d_s = self.space_size(s)
      score = v + masks[s] * (1.0 + jnp.max(v))  # kept units first, then by norm
      kind = s.split("/")[0]
      if kind in ("hidden", "attn"):
        if self.strategy == "dim":
          n = jnp.asarray((d_t - d_s) // self.heads_t)
        else:
          n = jnp.asarray((d_t - d_s) // self.hd_t)
      else:
        n = jnp.asarray(d_t - d_s)
      keep = self.masks_for({s: score}, {s: n})[s]
      out[s] = jnp.nonzero(keep, size=d_s)[0]
    return out

  def materialize(self, gen_params, teacher_params, gen_state):
    """Cut and merge: the plain student of the target width (§3.5)."""
    net = trees.flatten(self.generate(gen_params, teacher_params, gen_state))
    keep = self.final_keep(gen_params, gen_state)
    q_scale = math.sqrt(self.hd_s / self.hd_t)
    out = {}
    for p, x in net.items():
      for axis, role in enumerate(contract.roles(p, x.ndim)):
        if role is not None and role != "heads":
          x = jnp.take(x, keep[paths.space_of(p, role)], axis=axis)
      if q_scale != 1.0 and contract.has(p, contract.QUERY):
        x = x * q_scale
      out[p] = x
    return trees.unflatten(out)

  # --- gradient surgery -------------------------------------------------------------------------

  def keep_tree(self, gen_params_like, masks: dict[str, jax.Array]) -> Params:
    """For every generator leaf, the 0/1 array (broadcastable to it) of its unmasked entries:
    compactor columns (`col`: its rows, the input units) and rows (`row`: its columns), biases
    and LayerNorm gains/shifts of a masked space; 1 for everything else."""
    w, c = self._flat(gen_params_like)
    kw = {}
    for p, x in w.items():
      r = contract.roles(p, np.ndim(x))
      # ones of the leaf's rank: stacked over layers, still broadcastable to the stacked leaf
      kw[p] = (masks[paths.space_of(p, r[0])] if np.ndim(x) == 1 and r[0]
               else jnp.ones((1,) * np.ndim(x), jnp.float32))
    kc = {}
    for p in c:
      kernel, side = p.rsplit("/", 1) if p != "embeddings" else ("embeddings", "row")
      if kernel == "embeddings":
        kc[p] = masks["hidden"][None, :]
      elif side == "col":
        kc[p] = masks[self.compacted[kernel][0]][:, None]
      else:
        kc[p] = masks[self.compacted[kernel][1]][None, :]
    # stacked as the leaves are: every keep has its per-layer leaf's rank, so [L, ...] broadcasts
    stack = lambda keep: trees.unflatten(trees.stack_layers(keep))
    return {"weights": stack(kw), "compactors": stack(kc)}

  def gradient_surgery(self) -> optax.GradientTransformationExtraArgs:
    """Masked entries' task gradient replaced by a penalty once masks exist; `g + C` on every
    compactor before that. Reads the current masks from the `gen_state` extra argument.

    `clean`: `g' = where(keep, g, lambda p)`. `momentum` (the reference's form, default):
    `g' = where(keep, g, min(lambda, 1) p)` and `moment_injection` adds the rest to Adam's first
    moment. Why momentum is the default: Adam divides by the gradient's own scale, so the clean
    form's lambda cancels and masked entries shrink by about `lr` per step whatever lambda is;
    the injected momentum is not in Adam's second moment, so they shrink by about `lambda lr`
    per step (20x faster) and reach zero within a short run's phase 1.
    """
    lam = self.l2_lambda if self.surgery == "clean" else min(self.l2_lambda, 1.0)

    def init_fn(params):
      del params
      return optax.EmptyState()

    def update_fn(updates, state, params=None, *, gen_state=None, **extra):
      del extra
      if params is None or gen_state is None:
        raise ValueError("WID's gradient surgery needs params and gen_state")
      keep = self.keep_tree(params, trees.flatten(gen_state["masks"]))

      def surgery(_):
        return jax.tree_util.tree_map(
            lambda g, p, k: jnp.where(k > 0, g, lam * p).astype(g.dtype), updates, params, keep)

      def warm(_):
        return {"weights": updates["weights"],
                "compactors": jax.tree_util.tree_map(lambda g, p: g + p, updates["compactors"],
                                                     params["compactors"])}

      # cond, not a select of both: one pass over the generator's leaves per step, not three.
      return jax.lax.cond(gen_state["active"] > 0, surgery, warm, None), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)

  def moment_injection(self):
    """`momentum` surgery: masked entries get `mu <- b1 mu + (1 - b1)(lambda - 1) p` before each
    Adam update once masks exist (only the masked entries: the reference also decays every other
    entry's momentum by b1, a side effect not copied)."""
    if self.surgery != "momentum" or self.l2_lambda <= 1.0:
      return None
    extra = self.l2_lambda - 1.0

    def inject(params, gen_state):
      if params is None or gen_state is None:
        raise ValueError("WID's momentum injection needs params and gen_state")
      keep = self.keep_tree(params, trees.flatten(gen_state["masks"]))
      active = gen_state["active"] > 0
      keep = jax.tree_util.tree_map(lambda k: jnp.where(active, k, 1.0), keep)
      return keep, jax.tree_util.tree_map(lambda p: extra * p, params)

    return inject


@dataclasses.dataclass(frozen=True)
class WIDMethod(TwoPhaseMethod, RankedStartMethod):
  """Weight-Inherited Distillation: phase 1 trains compactors around the teacher's kernels while
  their masks narrow them to the student's width; phase 2 trains the cut-and-merged student."""

  name: str = "wid"
  strategy: str = "dim"  # "dim" narrows every head | "head" drops whole heads
  reach: float = 0.5  # fraction of phase 1 by which every mask is at its target (the rest lets the
  #                    penalty bring the masked entries to zero before the cut)
  w_step: int = 0  # steps between mask boundaries; 0: derived from `reach` and phase 1's length
  penalty: float = 20.0  # lambda of the penalty on masked compactor rows/columns
  objective: str = "task"  # "task" (compactors on the task loss) | "mlm" (task-agnostic)
  mlm_head_steps: int = 300  # objective=mlm: steps that fit an MLM head to a teacher that ships none
  surgery: str = "momentum"  # "momentum" (the reference's form) | "clean" (g' = lambda p)
  teacher_lr_scale: float = 0.02  # teacher weights' lr / compactors' lr (1e-6 / 5e-5)
  init: str = "selection"  # a shallower student's teacher layers: the layer map ("selection") or
  #                          the most influential ones ("importance", generators/importance.py)

  @property
  def label(self) -> str:
    return "wid_mlm" if self.objective == "mlm" else "wid"

  @property
  def task_agnostic(self) -> bool:
    return self.objective == "mlm"


def _options(method: WIDMethod, context) -> dict:
  return {"teacher_heads": context.teacher_heads, "student_heads": context.student_heads,
          "strategy": method.strategy,
          **({"w_step": method.w_step} if method.w_step else
             {"targets_at": max(1, round(method.reach * context.phase1_steps))}),
          "l2_lambda": method.penalty, "surgery": method.surgery,
          "teacher_lr_scale": method.teacher_lr_scale,
          "layer_map": method.layer_map or "every_k"}


def _check(method: WIDMethod) -> list[str]:
  bad = []
  if method.init == "importance" and method.objective == "mlm":
    bad.append("method.init='importance' (task-agnostic WID starts from the pretrained teacher, "
               "whose layers are ranked on no task; use selection)")
  if method.w_step < 0:
    bad.append(f"method.w_step={method.w_step} (must be >= 0; 0 = derived from method.reach)")
  if not 0 < method.reach <= 1:
    bad.append(f"method.reach={method.reach} (must be in (0, 1])")
  if method.mlm_head_steps < 1:
    bad.append(f"method.mlm_head_steps={method.mlm_head_steps} (must be at least 1)")
  return bad


register(Method("wid", WeightInherited, section=WIDMethod, options=_options, check=_check, two_phase=True,
                choices={"strategy": STRATEGIES, "objective": ("task", "mlm"), "surgery": SURGERIES,
                         "init": ("selection", "importance")}))
