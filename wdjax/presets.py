"""Shared starting points for the config files in `wdjax/configs/` (one place for the common settings).

`rotten_tomatoes(hardware)` is the distillation set-up of the quality benchmark:

- `cpu`: the fine-tuned all-MiniLM-L6-v2 teacher (6 x 384) -> a 3 x 192 student (12 heads of 16,
  FFN 768: docs/data.md's reference student), two epochs, docs/data.md's teacher recipe (~15 min once);
- `gpu`: all-mpnet-base-v2 (12 x 768) -> 6 x 384, bf16, six epochs.

Every method config starts from it and changes only `method` (and the learning rate where the
method's trainable parameters need another one), so all methods share teacher, data, student
shape and step budget.
"""

from __future__ import annotations

import dataclasses

from wdjax import generators
from wdjax.config import (Config, DataConfig, KDConfig, OptimConfig, StudentConfig,
                          TeacherConfig, TrainConfig)
from wdjax.tasks.causal_lm import CausalLMConfig
from wdjax.tasks.image_classification import VisionConfig
from wdjax.tasks.translation import TranslationConfig

HARDWARE = ("cpu", "gpu")


def rotten_tomatoes(hardware: str = "cpu") -> Config:
  if hardware == "cpu":
    return Config(
        workdir="runs/rt_minilm",
        # docs/data.md's PyTorch reference recipe (4 epochs, lr 5e-5, dropout 0.1), word embeddings
        # frozen for speed: 83.2 test (the quickstart's 1-epoch recipe gives 82.4).
        teacher=TeacherConfig(model="all-MiniLM-L6-v2", hidden_dropout=0.1, attention_dropout=0.0),
        finetune=TrainConfig(batch_size=32, epochs=4.0, eval_every=163,
                             optim=OptimConfig(lr=5e-5, frozen=("embeddings/word",))),
        student=StudentConfig(num_layers=3, hidden_size=192, num_heads=12, intermediate_size=768,
                              hidden_dropout=0.1, attention_dropout=0.0),
        distill=TrainConfig(batch_size=32, epochs=2.0, eval_every=163, optim=OptimConfig(lr=3e-4)),
        kd=KDConfig(temperature=2.0, alpha=0.9),
        data=DataConfig(dataset="rotten-tomatoes", max_length=64),
    )
  if hardware == "gpu":
    return Config(
        workdir="runs/rt_mpnet",
        teacher=TeacherConfig(model="all-mpnet-base-v2", dtype="bfloat16"),
        finetune=TrainConfig(batch_size=32, epochs=3.0, optim=OptimConfig(lr=3e-5)),
        student=StudentConfig(num_layers=6, hidden_size=384, num_heads=12, intermediate_size=1536,
                              dtype="bfloat16"),
        distill=TrainConfig(batch_size=32, epochs=6.0, eval_every=164, optim=OptimConfig(lr=3e-4)),
        kd=KDConfig(temperature=2.0, alpha=0.9),
        data=DataConfig(dataset="rotten-tomatoes", max_length=64),
    )
  raise ValueError(f"hardware must be one of {HARDWARE}, got {hardware!r}")


def bible_translation(hardware: str = "cpu") -> Config:
  """Bible En-De (data/bible.py), a teacher trained from scratch, students that keep its encoder
  and shrink its decoder (WD's setting, docs/methods.md §1.2-1.4):

  - `cpu`: what 2 CPU cores train in about an hour for the whole table: teacher 2+2 layers x 128
    (4 heads, FFN 512, pre-LN, BPE 4k, pairs up to 48 tokens a side: 79% of the verses), 2,000
    steps of 64 pairs; student decoder 1 x 64 (FFN 256), 1,500 steps; beam 4 (KD data, BLEU);
  - `gpu`: the paper's transformer_wmt_en_de teacher (6+6 x 512, 8 heads, FFN 2048, post-LN,
    warm-up 4,000) in bf16; student decoder 1 x 256 (FFN 1024, the reference's `stu1`); the
    KD data with beam 6 as the reference.
  Adam b2 = 0.98 and label smoothing 0.1 as the reference; linear decay instead of its
  inverse-sqrt schedule (wdjax's schedules), and far fewer steps than its 30k per phase.
  """
  adam = dict(b2=0.98, weight_decay=0.0)
  if hardware == "cpu":
    return Config(
        workdir="runs/bible_en_de",
        data=DataConfig(dataset="bible", max_length=48, pad_to_multiple=16),
        task=TranslationConfig(pair="en-de", vocab_size=4000, layers=2, encoder_layers=2,
                               hidden_size=128, num_heads=4, intermediate_size=512, pre_ln=True, beam=4, kd_beam=4),
        teacher=TeacherConfig(hidden_dropout=0.1, attention_dropout=0.1),
        finetune=TrainConfig(batch_size=64, steps=2000, eval_every=500, eval_batch_size=128,
                             optim=OptimConfig(lr=1.5e-3, warmup_ratio=0.05, **adam)),
        student=StudentConfig(num_layers=1, hidden_size=64, num_heads=4, intermediate_size=256),
        distill=TrainConfig(batch_size=64, steps=1500, eval_every=500, eval_batch_size=128,
                            optim=OptimConfig(lr=1.5e-3, warmup_ratio=0.05, **adam)),
        kd=KDConfig(alpha=0.0),
    )
  if hardware == "gpu":
    return Config(
        workdir="runs/bible_en_de_gpu",
        data=DataConfig(dataset="bible", max_length=128, pad_to_multiple=16),
        task=TranslationConfig(pair="en-de", vocab_size=16000, layers=6, encoder_layers=6,
                               hidden_size=512, num_heads=8, intermediate_size=2048, pre_ln=False, beam=5, kd_beam=6),
        teacher=TeacherConfig(hidden_dropout=0.1, attention_dropout=0.1, dtype="bfloat16"),
        finetune=TrainConfig(batch_size=128, steps=30000, eval_every=2000, eval_batch_size=256,
                             optim=OptimConfig(lr=7e-4, warmup_ratio=4000 / 30000, **adam)),
        student=StudentConfig(num_layers=1, hidden_size=256, num_heads=4, intermediate_size=1024,
                              dtype="bfloat16"),
        distill=TrainConfig(batch_size=128, steps=30000, eval_every=2000, eval_batch_size=256,
                            optim=OptimConfig(lr=7e-4, warmup_ratio=1000 / 30000, **adam)),
        kd=KDConfig(alpha=0.0),
    )
  raise ValueError(f"hardware must be one of {HARDWARE}, got {hardware!r}")


def fashion_vit(hardware: str = "cpu") -> Config:
  """Fashion-MNIST (data/images.py), a ViT teacher trained from scratch, students of half its
  width at its depth (weight selection's ViT-S -> ViT-T setting):

  - `cpu`: teacher 4 x 128 (4 heads, FFN 512, 4x4 patches + class token = 50 tokens), 1,000
    steps of 128 images (2.3 epochs); students 4 x 64 (4 heads, as WID's head-keeping strategy
    needs; FFN 256), 500 steps of 128;
  - `gpu`: teacher 12 x 384 (6 heads, FFN 1536: ViT-S's width) for 30 epochs, students
    12 x 192 (3 heads, FFN 768: ViT-T's), 10 epochs, bf16.
  AdamW, cosine decay, no dropout (the data is small images; the reference ViT recipes use
  augmentation instead, which wdjax does not implement for images).
  """
  data = DataConfig(dataset="fashion-mnist", pad_to_multiple=1, length_grouping=0)
  no_dropout = dict(hidden_dropout=0.0, attention_dropout=0.0)
  if hardware == "cpu":
    return Config(
        workdir="runs/fashion_vit", data=data,
        task=VisionConfig(patch_size=4, hidden_size=128, num_layers=4, num_heads=4, intermediate_size=512),
        teacher=TeacherConfig(**no_dropout),
        finetune=TrainConfig(batch_size=128, steps=1000, eval_every=500, eval_batch_size=500,
                             optim=OptimConfig(lr=1e-3, schedule="cosine", warmup_ratio=0.05,
                                               weight_decay=0.05)),
        student=StudentConfig(num_layers=4, hidden_size=64, num_heads=4, intermediate_size=256, **no_dropout),
        distill=TrainConfig(batch_size=128, steps=500, eval_every=250, eval_batch_size=500,
                            optim=OptimConfig(lr=1e-3, schedule="cosine", warmup_ratio=0.05,
                                              weight_decay=0.05)),
    )
  if hardware == "gpu":
    return Config(
        workdir="runs/fashion_vit_gpu", data=data,
        task=VisionConfig(patch_size=4, hidden_size=384, num_layers=12, num_heads=6, intermediate_size=1536),
        teacher=TeacherConfig(dtype="bfloat16", **no_dropout),
        finetune=TrainConfig(batch_size=256, epochs=30.0, eval_every=1000, eval_batch_size=1000,
                             optim=OptimConfig(lr=1e-3, schedule="cosine", warmup_ratio=0.05,
                                               weight_decay=0.05)),
        student=StudentConfig(num_layers=12, hidden_size=192, num_heads=3, intermediate_size=768,
                              dtype="bfloat16", **no_dropout),
        distill=TrainConfig(batch_size=256, epochs=10.0, eval_every=1000, eval_batch_size=1000,
                            optim=OptimConfig(lr=1e-3, schedule="cosine", warmup_ratio=0.05,
                                              weight_decay=0.05)),
    )
  raise ValueError(f"hardware must be one of {HARDWARE}, got {hardware!r}")


def with_method(cfg: Config, lr: float | None = None, name: str = "kd", **options) -> Config:
  """`cfg` with method `name`'s section, `options` set in it (and the distill learning rate, if
  given)."""
  distill = cfg.distill if lr is None else dataclasses.replace(
      cfg.distill, optim=dataclasses.replace(cfg.distill.optim, lr=lr))
  return dataclasses.replace(cfg, method=generators.section(name, **options), distill=distill)


SAME_WIDTH = {  # the teacher's width and heads at half its depth (OPDF's setting)
    "cpu": dict(num_layers=3, hidden_size=384, num_heads=12, intermediate_size=1536),
    "gpu": dict(num_layers=6, hidden_size=768, num_heads=12, intermediate_size=3072),
}


def same_width(cfg: Config, hardware: str) -> Config:
  """`cfg` with the student at the teacher's width, half its depth (cpu 3x384, gpu 6x768)."""
  return dataclasses.replace(cfg, student=dataclasses.replace(cfg.student, **SAME_WIDTH[hardware]))


def smollm_bible(hardware: str = "cpu") -> Config:
  """SmolLM2-135M-Instruct (its 4-bit Q4_1 GGUF, dequantised: 30 x 576, 9 query / 3 KV heads)
  distilled into a half-depth student (15 x 576, the teacher's width and heads) on the World
  English Bible, documents packed into rows of 128 tokens; KD on the teacher's cached top-64
  logits per token (T = 1, alpha 0.9), AdamW with cosine decay:

  - `cpu`: 2,400 training rows (307k tokens, 300 steps of 8 rows), validation and test on their
    first 48 rows (6k tokens each);
  - `gpu`: every training row (938k tokens) for 3 epochs at batch 32, bf16, full validation
    and test books.
  """
  teacher = TeacherConfig(model="smollm2-135m", hidden_dropout=0.0, attention_dropout=0.0)
  student = StudentConfig(num_layers=15, hidden_size=576, num_heads=9, intermediate_size=1536,
                          hidden_dropout=0.0, attention_dropout=0.0)
  kd = KDConfig(temperature=1.0, alpha=0.9)
  optim = OptimConfig(lr=3e-4, schedule="cosine", warmup_ratio=0.05, weight_decay=0.01)
  method = generators.section("kd", init="importance")
  if hardware == "cpu":
    return Config(
        workdir="runs/smollm2_bible", teacher=teacher, student=student, kd=kd, method=method,
        data=DataConfig(dataset="bible-lm", max_length=128, pad_to_multiple=128, length_grouping=0,
                        max_train_examples=2400, max_eval_examples=48),
        task=CausalLMConfig(kd_top_k=64),
        distill=TrainConfig(batch_size=8, steps=300, eval_every=100, eval_batch_size=16, log_every=10,
                            optim=optim),
    )
  if hardware == "gpu":
    return Config(
        workdir="runs/smollm2_bible_gpu", teacher=dataclasses.replace(teacher, dtype="bfloat16"),
        student=dataclasses.replace(student, dtype="bfloat16"), kd=kd, method=method,
        data=DataConfig(dataset="bible-lm", max_length=128, pad_to_multiple=128, length_grouping=0),
        task=CausalLMConfig(kd_top_k=64),
        distill=TrainConfig(batch_size=32, epochs=3.0, eval_every=500, eval_batch_size=64, optim=optim),
    )
  raise ValueError(f"hardware must be one of {HARDWARE}, got {hardware!r}")
