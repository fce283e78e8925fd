"""`wdjax` command line: assets, finetune, distill, eval, export, pipeline, config.

A user mistake ends in one line on stderr and exit status 2 (`--debug` shows the traceback).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from wdjax import errors
from wdjax.errors import Stopped, WdjaxError


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="wdjax", description="Knowledge distillation through weights, in JAX.")
  p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
  sub = p.add_subparsers(dest="command", required=True)
  # --debug is also taken after the subcommand (`main` reads it from argv, wherever it is)
  debug = argparse.ArgumentParser(add_help=False)
  debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                     help="show tracebacks instead of one-line errors")

  a = sub.add_parser("assets", help="list or fetch the real teachers and datasets", parents=[debug])
  a.add_argument("action", choices=["list", "fetch"])
  a.add_argument("names", nargs="*", help="asset names for fetch ('all' for every asset)")
  a.add_argument("--cache-dir", default="", help="asset cache (default $WDJAX_CACHE or ~/.cache/wdjax)")

  def with_config(name: str, help: str) -> argparse.ArgumentParser:
    c = sub.add_parser(name, help=help, parents=[debug])
    c.add_argument("config", help="a preset's name (quickstart, wd:cpu, ...) or a Python config file with "
                                     "get_config(), e.g. my_config.py:gpu")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set distill.optim.lr=3e-4 (repeatable)")
    m = c.add_argument_group("multi-process (run the same command in every process)")
    m.add_argument("--distributed", action="store_true",
                   help="call jax.distributed.initialize() (auto-detected on TPU pods and SLURM)")
    m.add_argument("--coordinator", default="", metavar="HOST:PORT",
                   help="process 0's address (or $WDJAX_COORDINATOR)")
    m.add_argument("--num-processes", type=int, default=0, help="(or $WDJAX_NUM_PROCESSES)")
    m.add_argument("--process-id", type=int, default=-1, help="(or $WDJAX_PROCESS_ID)")
    return c

  with_config("finetune", "fine-tune the pretrained teacher on the task")
  d = with_config("distill", "distil the fine-tuned teacher into the student")
  d.add_argument("--phase", default="", help="run directory under the workdir "
                 "(default: distill for KD, distill_<method> for the others)")
  e = with_config("eval", "accuracy of an exported model on the config's data")
  e.add_argument("--model", default="", help="HF model directory (default: the config's student)")
  e.add_argument("--split", action="append", choices=["train", "validation", "test"])
  x = with_config("export", "write the dense model of a phase's latest checkpoint")
  x.add_argument("--phase", default="", help="finetune, or a distill phase (default: the config's; "
                 "a two-phase method's phase 2 is exported with its phase 1, once it has a checkpoint)")
  with_config("pipeline", "finetune, distill by weight transfer, with KD and with CE alone, print "
              "the comparison")
  with_config("config", "print the resolved config as JSON")
  return p


def _assets(args) -> None:
  from wdjax import assets
  if args.action == "list":
    root = assets.cache_dir(args.cache_dir)
    print(f"asset cache: {root}")
    for a in assets.ASSETS.values():
      state = "cached" if assets.is_cached(a.name, args.cache_dir) else f"{a.size_mb} MB to fetch"
      print(f"  {a.name:<20} {a.kind:<8} {state:<16} {a.description}")
    return
  names = list(assets.ASSETS) if args.names == ["all"] else args.names
  if not names:
    raise WdjaxError("name the assets to fetch (see `wdjax assets list`), or 'all'")
  for name in names:
    print(f"{name}: {assets.fetch(name, args.cache_dir)}")


UNSCALED = ("perplexity", "bleu")  # metrics the pipeline's table prints as they are (not x 100)


def _table(rows: list[tuple[str, dict]], metric: str = "accuracy") -> str:
  """The pipeline's summary: each model's test and validation `metric` (a share x 100;
  perplexity and BLEU as they are), and macro-F1 beside accuracy where the results have it (it
  exposes a majority-class predictor)."""
  names = [metric] + (["macro_f1"] if metric != "macro_f1" and "test_macro_f1" in rows[0][1] else [])
  head = " | ".join(f"{split} {n.replace('_', '-')}" for n in names for split in ("test", "validation"))
  lines = [f"| model | trainable params | {head} |", "|---|---|" + "---|" * 2 * len(names)]
  for name, r in rows:
    cells = " | ".join(f"{(1 if n in UNSCALED else 100) * r[f'{split}_{n}']:.2f}"
                       for n in names for split in ("test", "validation"))
    trainable = f"{r['trainable_params'] / 1e6:.2f}M" if r["trainable_params"] else "none"
    lines.append(f"| {name} | {trainable} | {cells} |")
  return "\n".join(lines)


def transfer_config(cfg):
  """The config of `wdjax pipeline`'s weight-transfer student (None: `pipeline.transfer=""`):
  the config's student, teacher, data and steps with the transfer method and its learning rate."""
  from wdjax import generators
  t = cfg.pipeline
  if not t.transfer:
    return None
  method = (generators.section("kd", init=t.transfer) if t.transfer in ("selection", "importance")
            else generators.section(t.transfer))
  optim = dataclasses.replace(cfg.distill.optim, lr=t.transfer_lr or cfg.distill.optim.lr)
  return dataclasses.replace(cfg, method=method, distill=dataclasses.replace(cfg.distill, optim=optim))


def _main_print(text: str) -> bool:
  """Print on process 0 only; True there."""
  import jax
  if jax.process_index() != 0:
    return False
  print(text)
  return True


def run(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  if args.command == "assets":
    _assets(args)
    return 0
  from wdjax import config as config_lib, validate
  if args.command != "config" and (args.distributed or args.coordinator or args.num_processes
                                   or args.process_id >= 0):
    from wdjax import distributed
    distributed.initialize(args.coordinator, args.num_processes, args.process_id)
  cfg = validate.load(args.config, args.set)
  if args.command == "config":
    print(config_lib.dumps(cfg))
    return 0
  from wdjax.train import run as run_lib
  if args.command == "finetune":
    run_lib.finetune(cfg)
  elif args.command == "distill":
    run_lib.distill(cfg, phase=args.phase)
  elif args.command == "export":
    if args.phase == "finetune":
      run_lib.finetune(cfg, export_only=True)
    else:
      run_lib.distill(cfg, phase=args.phase, export_only=True)
  elif args.command == "eval":
    model = args.model or str(run_lib.final_model_dir(cfg))  # a two-phase method's phase 2
    scores = run_lib.evaluate(cfg, model, tuple(args.split or ("validation", "test")))
    from wdjax import tasks
    metric = tasks.for_dataset(cfg.data.dataset).metric_name(cfg)
    _main_print(json.dumps({"model": model, **{f"{k}_{metric}": v for k, v in scores.items()}},
                           indent=2))
  elif args.command == "pipeline":
    from wdjax import tasks
    s = cfg.student
    shape = f"{s.num_layers}x{s.hidden_size}"
    task = tasks.for_dataset(cfg.data.dataset)
    rows = [(f"teacher (fine-tuned {cfg.teacher.model})", run_lib.finetune(cfg)) if task.trains_teacher
            else (f"teacher ({cfg.teacher.model}, as it is)", run_lib.score_teacher(cfg))]
    transfer = transfer_config(cfg)
    if transfer is not None and transfer.method.label != cfg.method.label:
      name = {"selection": "weight selection + KD",
              "importance": "importance selection + KD"}.get(cfg.pipeline.transfer, cfg.pipeline.transfer)
      rows.append((f"student {shape}, {name} (weight transfer)", run_lib.distill(transfer)))
    rows.append((f"student {shape}, {cfg.method.label} (T={cfg.kd.temperature}, alpha={cfg.kd.alpha})",
                 run_lib.distill(cfg)))
    ce_cfg = dataclasses.replace(cfg, kd=dataclasses.replace(cfg.kd, alpha=0.0))
    objective = task.objective(cfg)
    loss = "MSE" if objective.loss == "mse" else "CE"
    rows.append((f"student {shape}, {loss} only, same steps", run_lib.distill(ce_cfg, phase="distill_ce")))
    table = _table(rows, task.metric_name(cfg))
    if _main_print("\n" + table):
      Path(cfg.workdir, "results.md").write_text(table + "\n")
  return 0


def _exit(code: int, line: str = "") -> None:
  """Print `line` on stderr and leave at once. `os._exit` skips the interpreter's shutdown, where
  Orbax's and tensorstore's background writers, stopped by a failed or interrupted save, would
  print their pending coroutines' tracebacks; every file wdjax wrote is closed by then."""
  import os
  if line:
    print(line, file=sys.stderr)
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)


def main(argv: list[str] | None = None) -> None:
  debug = "--debug" in (argv if argv is not None else sys.argv[1:])
  try:
    code = run(argv)
  except WdjaxError as e:
    if debug:
      raise
    _exit(2, f"wdjax: error: {e}")
  except Stopped as e:
    import jax
    if jax.process_count() > 1:  # every process stopped at the same step: leave together
      jax.distributed.shutdown()
    _exit(128 + e.signum, f"wdjax: {e}")
  except BrokenPipeError:  # output piped into `head` and the like
    sys.stderr.close()
    sys.exit(0)
  except KeyboardInterrupt:
    _exit(130, "wdjax: interrupted; rerun the same command to resume from the last checkpoint")
  except Exception as e:
    cause = errors.disk_cause(e)
    if cause is None or debug:
      raise
    where = getattr(e, "filename", None)
    _exit(2, f"wdjax: error: cannot write{' ' + str(where) if where else ''}: {cause}; free space "
          "(or use a writable workdir) and rerun the same command")
  sys.stdout.flush()
  sys.exit(code)


if __name__ == "__main__":
  main()
