"""Vision Transformer (Flax NNX): patch embedding, class token or mean pooling, pre-LN blocks.

The blocks reuse the shared attention and MLP modules (`models/layers.py`), and the parameter paths
follow the encoder's (`encoder/layer_l/attn/q/kernel`, `.../mlp/up/kernel`, `..._ln/scale`), so
every generator reads a ViT through the same path rules; only the patch embedding
(`embeddings/patch`), the class token (`embeddings/cls`) and the head (`head`) have rules of
their own (`generators/paths.py`).

    x = [cls; patches(image) @ P + b_P] + E_pos               [batch, 1 + n_patches, hidden]
    x = x + Attn(LN_1(x));  x = x + MLP(LN_2(x))               per block (pre-LN)
    logits = head(LN_f(x)[:, 0])      (pooling "cls"; "mean": the mean over patch tokens)

Saved as a `transformers` ViTForImageClassification directory (`save`/`load`: config.json +
model.safetensors, names and layouts converted; the patch embedding is HF's Conv2d with stride
= kernel = patch). Mean pooling has no HF counterpart: such a model saves with HF's names, no
class token and `"wdjax_pooling": "mean"` in its config; wdjax loads it, `transformers` does not.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
from einops import rearrange
import numpy as np
from flax import nnx

from wdjax.errors import WdjaxError
from wdjax.models.layers import (DTYPES, Attention, Mlp, Rows, activations, dense, dropout, layer_norm,
                                 masked_norm, model_apply, sow, split_keys, take_rows,
                                 unit_activations)
from wdjax.models.contract import OUTPUT, leaf

Array = jax.Array
POOLINGS = ("cls", "mean")
# the family's own leaves (models/contract.py): the patch projection writes, the class token lives
# in, and the head reads the residual stream; the blocks' are the shared layers'
PARAMETERS = (
    leaf(r"^embeddings/patch/kernel$", (None, "hidden")),
    leaf(r"^embeddings/patch/bias$", ("hidden",)),
    leaf(r"^embeddings/cls$", ("hidden",)),
    leaf(r"^embeddings/position/embedding$", (None, "hidden")),
    leaf(r"^head/kernel$", ("hidden", None), OUTPUT),
    leaf(r"^head/bias$", (None,), OUTPUT),
)


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """Shape and numerics of a ViT (teacher or student). Field names match `EncoderConfig`'s where
  the meaning is the same, so the generators' config surgery (WID's training width) applies."""

  image_size: int = 28  # square images, pixels per side
  patch_size: int = 4  # square patches; image_size must be a multiple
  num_channels: int = 1
  hidden_size: int = 192
  num_layers: int = 6
  num_heads: int = 3
  intermediate_size: int = 768
  num_labels: int = 10
  pooling: str = "cls"  # "cls" (class token, HF-compatible) | "mean" (mean of patch tokens)
  layer_norm_eps: float = 1e-12  # HF ViT's default
  hidden_dropout: float = 0.0
  attention_dropout: float = 0.0
  initializer_range: float = 0.02
  dtype: str = "float32"
  attention: str = "auto"  # as EncoderConfig.attention

  def __post_init__(self):
    if self.image_size % self.patch_size:
      raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
    if self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
    if self.pooling not in POOLINGS:
      raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
    if self.dtype not in DTYPES:
      raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def compute_dtype(self):
    return DTYPES[self.dtype]

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @property
  def num_tokens(self) -> int:
    return self.num_patches + (self.pooling == "cls")


def patchify(images: Array, patch: int) -> Array:
  """`[batch, h, w, c]` -> `[batch, (h/p)(w/p), p*p*c]`, patches in row-major order, each
  flattened (row, column, channel)."""
  return rearrange(images, "b (h p) (w q) c -> b (h w) (p q c)", p=patch, q=patch)


class Embeddings(nnx.Module):

  def __init__(self, cfg: ViTConfig, rngs: nnx.Rngs):
    init = nnx.initializers.truncated_normal(cfg.initializer_range)
    self.cfg = cfg
    self.patch = dense(cfg, cfg.patch_size ** 2 * cfg.num_channels, cfg.hidden_size, rngs)
    if cfg.pooling == "cls":
      self.cls = nnx.Param(init(rngs.params(), (cfg.hidden_size,), jnp.float32))
    self.position = nnx.Embed(cfg.num_tokens, cfg.hidden_size, param_dtype=jnp.float32,
                              embedding_init=init, rngs=rngs)

  def __call__(self, images: Array, dropout_key: Array | None) -> Array:
    cfg = self.cfg
    x = self.patch(patchify(images.astype(cfg.compute_dtype), cfg.patch_size))
    if cfg.pooling == "cls":
      cls = jnp.broadcast_to(self.cls[...].astype(x.dtype), (x.shape[0], 1, cfg.hidden_size))
      x = jnp.concatenate([cls, x], axis=1)
    x = x + self.position.embedding[...].astype(x.dtype)[None]
    return dropout(x, cfg.hidden_dropout, dropout_key)


class Block(nnx.Module):
  """Pre-LN block: x = x + Attn(LN(x)); x = x + MLP(LN(x))."""

  def __init__(self, cfg: ViTConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    self.attn_ln = layer_norm(cfg, cfg.hidden_size, rngs)
    self.attn = Attention(cfg, rngs)
    self.mlp_ln = layer_norm(cfg, cfg.hidden_size, rngs)
    self.mlp = Mlp(cfg, rngs)

  def __call__(self, x: Array, mask: Array, dropout_key: Array | None,
               hidden_keep: Array | None = None, rows: Rows = None) -> Array:
    """`[batch, tokens, hidden]` -> the same, or at `rows` only (`layers.take_rows`)."""
    k_attn, k_res1, k_res2 = split_keys(dropout_key, 3)
    rate, dt = self.cfg.hidden_dropout, self.cfg.compute_dtype
    h = masked_norm(self.attn_ln, x, hidden_keep).astype(dt)
    x = take_rows(x, rows) + dropout(self.attn(h, mask, None, k_attn, rows=rows), rate, k_res1)
    h = masked_norm(self.mlp_ln, x, hidden_keep).astype(dt)
    out = (x + dropout(self.mlp(h), rate, k_res2)).astype(dt)
    sow(self, "out", out)
    return out


class Encoder(nnx.Module):

  def __init__(self, cfg: ViTConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    for i in range(cfg.num_layers):
      setattr(self, f"layer_{i}", Block(cfg, rngs))
    self.final_ln = layer_norm(cfg, cfg.hidden_size, rngs)

  def __call__(self, x: Array, dropout_key: Array | None, hidden_keep: Array | None = None,
               rows: Rows = None) -> Array:
    """`[batch, tokens, hidden]` -> the final LayerNorm's output, float32; with `rows` only at
    those positions, which is all the last layer then computes (as `bert.Encoder`). Every
    space's activations are sown (`layers.activations` reads them)."""
    sow(self, "embedded", x)
    mask = jnp.ones((x.shape[0], 1, 1, x.shape[1]), bool)  # every token attends to every token
    last = self.cfg.num_layers - 1
    for i, key in enumerate(split_keys(dropout_key, self.cfg.num_layers)):
      x = getattr(self, f"layer_{i}")(x, mask, key, hidden_keep, rows if i == last else None)
    return masked_norm(self.final_ln, x, hidden_keep)  # float32


class ImageClassifier(nnx.Module):
  """ViT -> logits `[batch, labels]` (float32)."""

  def __init__(self, cfg: ViTConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embeddings = Embeddings(cfg, rngs)
    self.encoder = Encoder(cfg, rngs)
    self.head = dense(cfg, cfg.hidden_size, cfg.num_labels, rngs)

  def __call__(self, images: Array, *, dropout_key: Array | None = None,
               hidden_keep: Array | None = None, all_rows: bool = False) -> Array:
    """`images [batch, h, w, channels]` -> logits. `hidden_keep` (`[hidden]` 0/1) restricts the
    LayerNorms' statistics to the kept units (WID). With class-token pooling the last layer
    computes that token only, unless `all_rows` (for reading every token's activations)."""
    k_emb, k_enc = split_keys(dropout_key, 2)
    cls = self.cfg.pooling == "cls"  # the head reads the class token only: so does the last layer
    rows = slice(0, 1) if cls and not all_rows else None
    h = self.encoder(self.embeddings(images, k_emb), k_enc, hidden_keep, rows)
    pooled = h[:, 0] if cls else h.mean(axis=1)  # [batch, hidden]
    return self.head(pooled.astype(self.cfg.compute_dtype)).astype(jnp.float32)


def build(cfg: ViTConfig, seed: int = 0) -> ImageClassifier:
  return ImageClassifier(cfg, nnx.Rngs(params=seed))


def activation_fn(cfg: ViTConfig):
  """`fn(params, batch) -> (activations, weights)` of an `ImageClassifier` of `cfg` (float32), as
  `bert.activation_fn`: every space's activations at every token, and weights of 1 (every token
  of an image is real)."""
  graph = nnx.graphdef(nnx.eval_shape(lambda: build(dataclasses.replace(cfg, dtype="float32"))))

  def fn(params, batch):
    _, acts = activations(nnx.merge(graph, params), batch["image"], all_rows=True)
    return unit_activations(acts), jnp.ones(acts["hidden/embeddings"].shape[:2], jnp.float32)

  return fn


def apply_fn(graphdef):
  """`apply(params, batch, dropout_key, **kwargs) -> logits` for the training step and predictors
  (`layers.model_apply`)."""
  return model_apply(graphdef, lambda model, batch, dropout_key, **kwargs: model(
      batch["image"], dropout_key=dropout_key, **kwargs))


# --- transformers' ViTForImageClassification layout -------------------------------------------

def hf_config(cfg: ViTConfig, label_names: tuple[str, ...] = ()) -> dict:
  out = {
      "architectures": ["ViTForImageClassification"], "model_type": "vit",
      "image_size": cfg.image_size, "patch_size": cfg.patch_size, "num_channels": cfg.num_channels,
      "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads, "intermediate_size": cfg.intermediate_size,
      "hidden_act": "gelu", "layer_norm_eps": cfg.layer_norm_eps, "qkv_bias": True,
      "hidden_dropout_prob": cfg.hidden_dropout, "attention_probs_dropout_prob": cfg.attention_dropout,
      "initializer_range": cfg.initializer_range, "num_labels": cfg.num_labels,
      "wdjax_pooling": cfg.pooling, "wdjax_dtype": cfg.dtype,
  }
  if label_names:
    out["id2label"] = {str(i): n for i, n in enumerate(label_names)}
    out["label2id"] = {n: i for i, n in enumerate(label_names)}
  return out


def config_from_hf(hf: dict, **overrides) -> ViTConfig:
  if hf.get("model_type") != "vit":
    raise WdjaxError(f"model_type {hf.get('model_type')!r} is not a ViT")
  if hf.get("hidden_act", "gelu") != "gelu" or not hf.get("qkv_bias", True):
    raise WdjaxError("only ViTs with GELU and q/k/v biases are supported")
  cfg = dict(image_size=hf["image_size"], patch_size=hf["patch_size"],
             num_channels=hf.get("num_channels", 3), hidden_size=hf["hidden_size"],
             num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
             intermediate_size=hf["intermediate_size"],
             num_labels=hf.get("num_labels", len(hf.get("id2label", {})) or 2),
             pooling=hf.get("wdjax_pooling", "cls"), layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
             hidden_dropout=hf.get("hidden_dropout_prob", 0.0),
             attention_dropout=hf.get("attention_probs_dropout_prob", 0.0),
             initializer_range=hf.get("initializer_range", 0.02), dtype=hf.get("wdjax_dtype", "float32"))
  cfg.update(overrides)
  return ViTConfig(**cfg)


_LAYER_NAMES = {  # wdjax path inside a block -> HF name inside vit.encoder.layer.N
    "attn_ln": "layernorm_before", "mlp_ln": "layernorm_after",
    "attn/q": "attention.attention.query", "attn/k": "attention.attention.key",
    "attn/v": "attention.attention.value", "attn/o": "attention.output.dense",
    "mlp/up": "intermediate.dense", "mlp/down": "output.dense",
}


def to_hf(cfg: ViTConfig, params) -> dict[str, np.ndarray]:
  """wdjax parameters -> HF state-dict arrays (torch layouts: Linear `[out, in]`, Conv2d
  `[out, channels, p, p]`)."""
  from wdjax import trees
  flat = {k: np.asarray(v, np.float32) for k, v in trees.flatten(params).items()}
  p, c, d = cfg.patch_size, cfg.num_channels, cfg.hidden_size
  out = {
      "vit.embeddings.patch_embeddings.projection.weight":
          flat["embeddings/patch/kernel"].reshape(p, p, c, d).transpose(3, 2, 0, 1),
      "vit.embeddings.patch_embeddings.projection.bias": flat["embeddings/patch/bias"],
      "vit.embeddings.position_embeddings": flat["embeddings/position/embedding"][None],
      "vit.layernorm.weight": flat["encoder/final_ln/scale"],
      "vit.layernorm.bias": flat["encoder/final_ln/bias"],
      "classifier.weight": flat["head/kernel"].T, "classifier.bias": flat["head/bias"],
  }
  if cfg.pooling == "cls":
    out["vit.embeddings.cls_token"] = flat["embeddings/cls"][None, None]
  for l in range(cfg.num_layers):
    for ours, theirs in _LAYER_NAMES.items():
      pre, hf_pre = f"encoder/layer_{l}/{ours}", f"vit.encoder.layer.{l}.{theirs}"
      if ours.endswith("_ln"):
        out[f"{hf_pre}.weight"], out[f"{hf_pre}.bias"] = flat[f"{pre}/scale"], flat[f"{pre}/bias"]
      else:
        out[f"{hf_pre}.weight"], out[f"{hf_pre}.bias"] = flat[f"{pre}/kernel"].T, flat[f"{pre}/bias"]
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


def from_hf(cfg: ViTConfig, tensors: dict[str, np.ndarray]):
  """HF state-dict arrays -> wdjax parameters (the inverse of `to_hf`)."""
  from wdjax import trees
  get = lambda k: np.asarray(tensors[k], np.float32)
  p, c, d = cfg.patch_size, cfg.num_channels, cfg.hidden_size
  flat = {
      "embeddings/patch/kernel": get("vit.embeddings.patch_embeddings.projection.weight")
      .transpose(2, 3, 1, 0).reshape(p * p * c, d),
      "embeddings/patch/bias": get("vit.embeddings.patch_embeddings.projection.bias"),
      "embeddings/position/embedding": get("vit.embeddings.position_embeddings")[0],
      "encoder/final_ln/scale": get("vit.layernorm.weight"),
      "encoder/final_ln/bias": get("vit.layernorm.bias"),
      "head/kernel": get("classifier.weight").T, "head/bias": get("classifier.bias"),
  }
  if cfg.pooling == "cls":
    flat["embeddings/cls"] = get("vit.embeddings.cls_token")[0, 0]
  for l in range(cfg.num_layers):
    for ours, theirs in _LAYER_NAMES.items():
      pre, hf_pre = f"encoder/layer_{l}/{ours}", f"vit.encoder.layer.{l}.{theirs}"
      if ours.endswith("_ln"):
        flat[f"{pre}/scale"], flat[f"{pre}/bias"] = get(f"{hf_pre}.weight"), get(f"{hf_pre}.bias")
      else:
        flat[f"{pre}/kernel"], flat[f"{pre}/bias"] = get(f"{hf_pre}.weight").T, get(f"{hf_pre}.bias")
  return trees.unflatten(flat)


def preprocessor_config(cfg: ViTConfig, mean: float, std: float) -> dict:
  """`preprocessor_config.json` for transformers' `ViTImageProcessor`: the inputs this ViT was
  trained on, `(pixels / 255 - mean) / std` with the training split's statistics, no resizing."""
  return {"image_processor_type": "ViTImageProcessor", "do_resize": False, "do_rescale": True,
          "rescale_factor": 1 / 255, "do_normalize": True,
          "image_mean": [float(mean)] * cfg.num_channels, "image_std": [float(std)] * cfg.num_channels,
          "size": {"height": cfg.image_size, "width": cfg.image_size}}


def save(out: str | Path, cfg: ViTConfig, params, label_names: tuple[str, ...] = (),
         normalization: tuple[float, float] | None = None) -> None:
  """An HF ViTForImageClassification directory, written atomically; with `normalization`
  (mean, std of the training pixels in [0, 1]) also its image processor's config, so a
  transformers user feeds it what it was trained on."""
  from safetensors.numpy import save_file
  from wdjax.models.hf import atomic_directory
  with atomic_directory(Path(out)) as tmp:
    save_file(to_hf(cfg, params), str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(hf_config(cfg, label_names), indent=2) + "\n")
    if normalization is not None:
      (tmp / "preprocessor_config.json").write_text(
          json.dumps(preprocessor_config(cfg, *normalization), indent=2) + "\n")


def load(model_dir: str | Path, **overrides) -> tuple[ViTConfig, dict]:
  """(config, params) of a directory `save` wrote (or any HF ViT of the supported shape)."""
  from safetensors import SafetensorError
  from safetensors.numpy import load_file
  d = Path(model_dir)
  if not (d / "config.json").is_file() or not (d / "model.safetensors").is_file():
    raise WdjaxError(f"{d} is not a ViT model directory (config.json and model.safetensors)")
  try:
    cfg = config_from_hf(json.loads((d / "config.json").read_text()), **overrides)
    tensors = load_file(str(d / "model.safetensors"))
    return cfg, from_hf(cfg, tensors)
  except (json.JSONDecodeError, SafetensorError, OSError, KeyError, ValueError, TypeError) as e:
    raise WdjaxError(f"{d} holds an unreadable or incomplete ViT ({type(e).__name__}: {e})") from None
