"""How hard OPDF's constraint pulls: the gradient norm of its loss beside the KD loss's, at the
student's start, for each start and form of the constraint (`wdjax/configs/opdf.py`'s setting).

    python benchmarks/quality/opdf_gradients.py            # cpu: MiniLM 6x384 -> 3x384, 4 batches

For every variant it builds the run's OPDF generator on the fine-tuned teacher (the quality
table's, `benchmarks/quality/run.py` trains it), and over the first training batches computes
||d L_KD / d cores|| and ||d (lambda L_aux) / d cores|| at the generator's initial parameters.
Writes `opdf_gradients_<hardware>.json` and `.md` beside this file.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
from pathlib import Path

import jax
import numpy as np
import optax
from flax import nnx

from wdjax import config as config_lib, losses, tasks
from wdjax.data import pipeline
from wdjax.generators import StudentSpec
from wdjax.train import run as run_lib

HERE = Path(__file__).resolve().parent
VARIANTS = {  # label -> --set assignments of the opdf preset
    "selection, mse (the paper's lambda)": [],
    "selection, relative, lambda 10": ["method.constraint=relative", "method.constraint_lambda=10"],
    "random, mse (the paper's lambda)": ["method.init=random"],
    "random, relative, lambda 10": ["method.init=random", "method.constraint=relative",
                                    "method.constraint_lambda=10"],
}


def measure(cfg, batches: int) -> dict[str, float]:
  cfg = run_lib.start(cfg)
  task = tasks.for_dataset(cfg.data.dataset)
  teacher = task.load_teacher(cfg)
  data = task.load_data(cfg, teacher, lambda _: None)
  objective = task.objective(cfg)
  s_cfg = task.student_config(cfg, teacher.config)
  init = nnx.to_pure_dict(nnx.state(objective.build(s_cfg, cfg.seed)))
  steps, steps1 = run_lib.phase_steps(cfg, data)
  gen = run_lib.make_generator(cfg, task, init, teacher, data, steps1, lambda _: None)
  params, state = gen.init(jax.random.key(cfg.seed), teacher.params, StudentSpec(s_cfg, init))
  student_apply = objective.apply(nnx.split(objective.build(s_cfg))[0])
  teacher_apply = objective.apply(nnx.split(objective.build(teacher.config))[0])

  @jax.jit
  def norms(params, batch):
    t_logits = teacher_apply(teacher.params, batch, None)
    kd = lambda p: losses.hinton(student_apply(gen.generate(p, teacher.params, state), batch, None),
                                 t_logits, batch["labels"], batch["weights"],
                                 temperature=cfg.kd.temperature, alpha=cfg.kd.alpha)[0]
    aux = lambda p: gen.aux_loss(p, teacher.params, state)
    cores = lambda g: optax.global_norm(g["cores"])
    return cores(jax.grad(kd)(params)), cores(jax.grad(aux)(params)), aux(params)

  order = pipeline.TrainBatches(data.train, cfg.distill.batch_size, seed=cfg.seed,
                                pad_to_multiple=cfg.data.pad_to_multiple)
  got = np.array([[float(x) for x in norms(params, order.batch(i))] for i in range(batches)])
  kd, aux, value = got.mean(0)
  return {"kd_grad_norm": kd, "constraint_grad_norm": aux, "constraint_loss": value,
          "ratio": aux / kd, "constraint_lambda": gen.constraint_lambda,
          "constrained_cores": sum(len(v) for v in gen.constrained.values())}


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--hardware", choices=["cpu", "gpu"], default="cpu")
  ap.add_argument("--batches", type=int, default=4)
  args = ap.parse_args()
  base = config_lib.load(f"kd:{args.hardware}")
  run_lib.finetune(base, log=lambda _: None)  # the quality table's teacher (done once per workdir)
  teacher_dir = Path(base.teacher_dir)
  rows = {}
  for label, sets in VARIANTS.items():
    cfg = config_lib.load(f"opdf:{args.hardware}", sets + [f"teacher.path={teacher_dir}"])
    rows[label] = measure(cfg, args.batches)
    print(f"{label:40s} KD {rows[label]['kd_grad_norm']:.3e}  constraint "
          f"{rows[label]['constraint_grad_norm']:.3e}  ratio {rows[label]['ratio']:.2e}", flush=True)
  commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          cwd=HERE).stdout.strip()
  info = {"date": datetime.date.today().isoformat(), "commit": commit, "hardware": args.hardware,
          "device": jax.devices()[0].device_kind, "jax": jax.__version__, "batches": args.batches,
          "student": f"{cfg.student.num_layers}x{cfg.student.hidden_size}"}
  stem = HERE / f"opdf_gradients_{args.hardware}"
  stem.with_suffix(".json").write_text(json.dumps({"info": info, "rows": rows}, indent=2))
  lines = [f"OPDF constraint vs KD gradient norms over the cores at the start, mean of {args.batches} "
           f"training batches; student {info['student']}; {info['date']}, commit {commit}, "
           f"{info['device']}, jax {info['jax']}.", "",
           "| start, constraint | lambda | constraint loss | KD grad norm | constraint grad norm | ratio |",
           "|---|---|---|---|---|---|"]
  for label, r in rows.items():
    lines.append(f"| {label} | {r['constraint_lambda']:.3g} | {r['constraint_loss']:.3e} | "
                 f"{r['kd_grad_norm']:.3e} | {r['constraint_grad_norm']:.3e} | {r['ratio']:.2e} |")
  stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
