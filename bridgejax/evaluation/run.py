"""eval.py's library side: load a checkpoint, run the configured tasks, write JSON and the report.

    results = evaluate(config, workdir, step=None)   # -> {task: the dict written to eval/<task>.json}

Each entry of config.evals is one task (bridgejax.evaluation.evaluators: its type, keys, data and protocol).
Writes WORKDIR/eval/<name>.json (metrics, type, protocol, config name, checkpoint step, dataset dir
and split, counts, settings: the task's dict and what the runner derived, wall time),
WORKDIR/eval/<name>_predictions.json (per-example outputs) and WORKDIR/eval/report.html, and prints
a summary table.

Evaluation runs on the training mesh (setup.mesh): every batch is split over its 'data' axis on all
devices of all processes, every process gets the whole outputs and computes the metrics, and process
0 writes.
"""

from __future__ import annotations

import datetime
import os
import time

import jax
import numpy as np

from bridgejax import mesh as mesh_lib, paths, preemption
from bridgejax.errors import UserError
from bridgejax.engine import Engine
from bridgejax.evaluation import report as report_lib, table
from bridgejax.evaluation.evaluators import REGISTRY, check_task, eval_tasks, protocol_of, task_data
from bridgejax.experiment import build
from bridgejax.train.checkpoint import Checkpointer, param_differences
from bridgejax.train.loop import changed_keys


def load_params(setup, workdir: str, step: int | None = None) -> tuple[int, dict]:
  """(step, full parameter dict): the checkpoint's trainable subtree, replicated on setup.mesh,
  joined to the frozen backbones (already on the mesh).
  Without `step`, the newest intact checkpoint (a damaged newer one is skipped with a warning)."""
  if not (paths.path(workdir) / "checkpoints").is_dir():
    raise FileNotFoundError(f"{workdir} has no checkpoints/ directory; train first "
                            f"(python train.py --config ... --workdir {workdir}) or pass the run's --workdir")
  checkpointer = Checkpointer(workdir)
  try:
    step, trainable = checkpointer.load_params(step)
  finally:
    checkpointer.close()
  check_fits(setup, trainable, workdir, step)
  # restored on the first device; one host hop puts it on the mesh, on every process alike
  trainable = jax.device_put(jax.tree.map(lambda x: np.asarray(x, np.float32), trainable),
                             mesh_lib.replicated(setup.mesh))
  return int(step), {**setup.frozen, **trainable}


def check_fits(setup, trainable: dict, workdir: str, step: int) -> None:
  """The checkpoint's trainable parameters have the shapes this config's model makes, else one
  line naming the config keys that differ from the run's config.json (or the parameters)."""
  wanted = jax.eval_shape(setup.model.init_trainable, jax.random.key(0), setup.frozen)
  differences = param_differences(trainable, wanted)
  if differences:
    what = "; ".join(changed_keys(setup.config, workdir) or differences[:6])
    raise UserError(f"checkpoint {step} in {workdir} does not fit this config: {what}. Evaluate with the run's "
                    "own config (its config.json)")


def evaluate(config, workdir: str, step: int | None = None, *, tasks=None, setup=None,
             report: bool = True, quiet: bool = False) -> dict[str, dict]:
  """Runs every entry of config.evals (or those named in `tasks`) on checkpoint `step` (default:
  the latest) of `workdir`. Inside a sweep's catch_sigterm() a SIGTERM stops it between tasks."""
  if config.stage == "representation":
    raise UserError(f"{workdir} is a stage-1 run (config.stage='representation'): its Q-Former has not met the LLM "
                    "yet; evaluate the stage-2 run that starts from it (config.init_from)")
  evals = eval_tasks(config, tasks)
  for name, cfg in evals.items():  # a missing dataset or a bad setting fails before any weights load
    check_task(name, cfg)
  data = {name: task_data(name, cfg) for name, cfg in evals.items()}
  if setup is None:
    setup = build(config)
  step, params = load_params(setup, workdir, step)
  engine = Engine(setup.model, params, setup.tokenizer, mesh=setup.mesh)
  out_dir = paths.path(workdir) / "eval"
  writer = jax.process_index() == 0
  if writer:
    out_dir.mkdir(parents=True, exist_ok=True)
  results = {}
  for name, cfg in evals.items():
    if preemption.requested():  # inside a sweep that got SIGTERM: the tasks left wait for its resume
      break
    data_dir, split = data[name]
    start = time.time()
    result = REGISTRY[cfg.type].run(engine, data_dir, split, cfg, config)
    summary = {
        "task": name, "type": cfg.type, "protocol": protocol_of(cfg), "metrics": result.metrics,
        "config": config.name, "checkpoint_step": step,
        "workdir": str(paths.path(workdir)), "dataset": {"dir": os.path.abspath(data_dir), "split": split},
        "counts": result.counts, "settings": {**cfg.to_dict(), **result.settings}, "notes": result.notes,
        "wall_time_s": round(time.time() - start, 2),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "backbones": {"vision": config.vision.path, "llm": config.llm.path},
        "bridge": config.bridge.to_dict(),
    }
    if writer:
      _write_json(out_dir / f"{name}.json", summary)
      _write_json(out_dir / f"{name}_predictions.json",
                  {"task": name, "type": cfg.type, "checkpoint_step": step, "dataset": summary["dataset"],
                   "settings": summary["settings"], "predictions": result.predictions})
    results[name] = summary
  if writer and results:
    if not quiet:
      print(table.format_task_metrics(results, title=f"{config.name} @ step {step} ({workdir})"))
    if report:
      path = report_lib.write_report(workdir)
      if not quiet:
        print(f"wrote {out_dir}/<task>.json and {path}")
  return results


def _write_json(path, obj) -> None:
  paths.write_json(path, obj, indent=1, ensure_ascii=False, allow_nan=False)
