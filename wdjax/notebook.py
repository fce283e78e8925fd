"""Small helpers the Colab notebooks (`colab/`) share, so that no notebook carries its own copy."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

# A seconds-long run of any config (the notebooks' TINY mode, which the test suite executes).
TINY = ["data.max_train_examples=128", "data.max_eval_examples=32", "data.max_length=32",
        "data.pad_to_multiple=32", "finetune.steps=2", "finetune.batch_size=16",
        "finetune.eval_batch_size=32", "distill.steps=4", "distill.batch_size=16",
        "distill.eval_batch_size=32", "distill.eval_every=4", "student.num_layers=2",
        "student.hidden_size=96", "student.num_heads=12", "student.intermediate_size=256",
        "log.progress=false"]
TINY_METHOD = {"mlm_head_steps": 2, "cores": 2}  # of the method sections that have them (WID, OPDF)


def tiny(cfg):
  """`cfg` with TINY_METHOD's values for the fields its method section has."""
  own = {f.name for f in dataclasses.fields(cfg.method)}
  return dataclasses.replace(cfg, method=dataclasses.replace(
      cfg.method, **{k: v for k, v in TINY_METHOD.items() if k in own}))


def hardware() -> str:
  """"gpu" (the big configs) on a GPU or TPU runtime, "cpu" otherwise."""
  import jax
  return "cpu" if jax.devices()[0].platform == "cpu" else "gpu"


def expand(extra: list[str], hardware: str, tiny: bool = False) -> list[str]:
  """`--set` overrides with "SAME_WIDTH" replaced by the teacher-width student of `hardware`
  (one layer of it when `tiny`)."""
  from wdjax import presets
  out = [a for a in extra if a != "SAME_WIDTH"]
  if "SAME_WIDTH" in extra:
    out += [f"student.{k}={v}" for k, v in presets.SAME_WIDTH[hardware].items()]
    out += ["student.num_layers=1"] if tiny else []
  return out


def metrics(workdir: Path, phase: str) -> dict[str, list[dict]]:
  """`{phase: rows}` of a run's metrics.jsonl, its phase 2 included (two-phase methods)."""
  from wdjax.train.run import PHASE2
  out = {}
  for name in (phase, phase + PHASE2):
    path = Path(workdir) / name / "metrics.jsonl"
    if path.exists():
      out[name] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  return out


def table(teacher: dict, results: dict[str, dict]) -> str:
  lines = ["| model | test accuracy | validation accuracy | trainable params (training) | params |",
           "|---|---|---|---|---|",
           f"| teacher | {100 * teacher['test_accuracy']:.2f} | "
           f"{100 * teacher['validation_accuracy']:.2f} | | {teacher['model_params'] / 1e6:.2f}M |"]
  for label, r in results.items():
    lines.append(f"| {label} | {100 * r['test_accuracy']:.2f} | {100 * r['validation_accuracy']:.2f} "
                 f"| {r['trainable_params'] / 1e6:.2f}M | {r['model_params'] / 1e6:.2f}M |")
  return "\n".join(lines)
