"""eval.py's library side: load a checkpoint, run the configured tasks, write JSON and the report.

    results = evaluate(config, workdir, step=None)   # -> {task: the dict written to eval/<task>.json}

Writes WORKDIR/eval/<task>.json (metrics, config name, checkpoint step, dataset dir and split,
counts, settings, wall time), WORKDIR/eval/<task>_predictions.json (per-example outputs) and
WORKDIR/eval/report.html, and prints a summary table.

Which data each task reads (config.eval) is bridgejax.data.splits.task_data's to say.

Evaluation runs on the training mesh (setup.mesh): every batch is split over its 'data' axis on all
devices of all processes, every process gets the whole outputs and computes the metrics, and process
0 writes.
"""

from __future__ import annotations

import datetime
import os
import time

import jax
import ml_collections
import numpy as np

from bridgejax import mesh as mesh_lib, paths
from bridgejax.data.splits import parse_tasks, task_data
from bridgejax.evaluation import tasks as tasks_lib
from bridgejax.evaluation.engine import Engine
from bridgejax.experiment import build


def load_params(setup, workdir: str, step: int | None = None) -> tuple[int, dict]:
  """(step, full parameter dict): the checkpoint's trainable subtree, replicated on setup.mesh,
  joined to the frozen backbones (already on the mesh).
  Without `step`, the newest intact checkpoint (a damaged newer one is skipped with a warning)."""
  from bridgejax.train.checkpoint import Checkpointer
  if not (paths.path(workdir) / "checkpoints").is_dir():
    raise FileNotFoundError(f"{workdir} has no checkpoints/ directory; train first "
                            f"(python train.py --config ... --workdir {workdir}) or pass the run's --workdir")
  checkpointer = Checkpointer(workdir)
  try:
    step, trainable = checkpointer.load_params(step)
  finally:
    checkpointer.close()
  # restored on the first device; one host hop puts it on the mesh, on every process alike
  trainable = jax.device_put(jax.tree.map(lambda x: np.asarray(x, np.float32), trainable),
                             mesh_lib.replicated(setup.mesh))
  return int(step), {**setup.frozen, **trainable}


def make_engine(setup, params, config) -> Engine:
  cfg = config.eval
  return Engine(setup.model, params, setup.tokenizer, mesh=setup.mesh, max_new_tokens=int(cfg.max_new_tokens),
                num_beams=int(cfg.get("num_beams", 1)))


def resolved_eval_config(config):
  """config.eval with its fallbacks filled in from the training config: a copy, the caller's is kept.
  image_resize "" = data.image_resize (how the model was trained to see images)."""
  cfg = ml_collections.ConfigDict(config.eval.to_dict())
  if not cfg.get("image_resize"):
    cfg.image_resize = config.data.get("image_resize", "clip")
  return cfg


def evaluate(config, workdir: str, step: int | None = None, *, tasks=None, setup=None,
             report: bool = True, quiet: bool = False) -> dict[str, dict]:
  """Runs config.eval.tasks (or `tasks`) on checkpoint `step` (default: the latest) of `workdir`."""
  names = parse_tasks(tasks if tasks is not None else config.eval.tasks)
  for name in names:  # fail on a missing dataset before loading any weights
    task_data(config, name)
  if setup is None:
    setup = build(config)
  step, params = load_params(setup, workdir, step)
  engine = make_engine(setup, params, config)
  eval_cfg = resolved_eval_config(config)
  out_dir = paths.path(workdir) / "eval"
  writer = jax.process_index() == 0
  if writer:
    out_dir.mkdir(parents=True, exist_ok=True)
  results = {}
  for name in names:
    data_dir, split = task_data(config, name)
    start = time.time()
    if name == "retrieval":
      result = tasks_lib.retrieval_task(engine, data_dir, split, eval_cfg,
                                        max_caption_tokens=int(config.data.max_caption_tokens))
    else:
      result = tasks_lib.TASKS[name](engine, data_dir, split, eval_cfg)
    summary = {
        "task": name, "metrics": result.metrics, "config": config.get("name", ""), "checkpoint_step": step,
        "workdir": str(paths.path(workdir)), "dataset": {"dir": os.path.abspath(data_dir), "split": split},
        "counts": result.counts, "settings": result.settings, "notes": result.notes,
        "wall_time_s": round(time.time() - start, 2),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "backbones": {"vision": config.vision.path, "llm": config.llm.path},
        "bridge": config.bridge.to_dict(),
    }
    if writer:
      _write_json(out_dir / f"{name}.json", summary)
      _write_json(out_dir / f"{name}_predictions.json",
                  {"task": name, "checkpoint_step": step, "dataset": summary["dataset"],
                   "predictions": result.predictions})
    results[name] = summary
  if writer:
    from bridgejax.evaluation import report as report_lib, table
    if not quiet:
      print(table.format_task_metrics(results, title=f"{config.get('name', '')} @ step {step} ({workdir})"))
    if report:
      path = report_lib.write_report(workdir, examples=int(config.eval.get("report_examples", 16)))
      if not quiet:
        print(f"wrote {out_dir}/<task>.json and {path}")
  return results


def _write_json(path, obj) -> None:
  paths.write_json(path, obj, indent=1, ensure_ascii=False, allow_nan=False)
