"""eval.py's library side: load a checkpoint, run the configured tasks, write JSON and the report.

    results = evaluate(config, workdir, step=None)   # -> {task: the dict written to eval/<task>.json}

Writes WORKDIR/eval/<task>.json (metrics, config name, checkpoint step, dataset dir and split,
counts, settings, wall time), WORKDIR/eval/<task>_predictions.json (per-example outputs) and
WORKDIR/eval/report.html, and prints a summary table.

Which data each task reads (config.eval):
  caption, retrieval   eval.data ("" = data.dir), split eval.split
  vqa                  eval.vqa_data ("" = eval.data), split eval.vqa_split ("" = eval.split, or
                       vqa_<eval.split> when the directory has it, as the toy world does)
  visdial              eval.visdial_data / eval.visdial_split, likewise

Evaluation is replicated: every process computes everything and process 0 writes.
"""

from __future__ import annotations

import datetime
import json
import os
import time

import jax
import jax.numpy as jnp

from bridgejax.evaluation import tasks as tasks_lib
from bridgejax.evaluation.engine import Engine


def parse_tasks(tasks) -> list[str]:
  names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
  unknown = [t for t in names if t not in tasks_lib.TASKS]
  if unknown or not names:
    raise ValueError(f"unknown eval task(s) {unknown or names!r}; choose from {sorted(tasks_lib.TASKS)} "
                     f"(e.g. --config.eval.tasks=caption,retrieval)")
  return list(dict.fromkeys(names))


def task_data(config, task: str) -> tuple[str, str]:
  """(dataset dir, split) a task reads; see the module docstring."""
  cfg = config.eval
  base = cfg.get("data") or config.data.dir
  kind, prefix = tasks_lib.KINDS[task]
  data_dir = (cfg.get(f"{prefix}_data") if prefix else "") or base
  if not data_dir:
    raise ValueError(f"no dataset for task {task!r}: set --config.eval.data (or --config.data.dir) to a prepared "
                     "directory (python -m bridgejax.data.prepare ...)")
  explicit = cfg.get(f"{prefix}_split") if prefix else ""
  key = f"eval.{prefix}_split" if prefix else "eval.split"
  if explicit:
    return data_dir, tasks_lib.resolve_split(data_dir, explicit, kind, key=key)
  return data_dir, tasks_lib.resolve_split(data_dir, cfg.split, kind, prefix=prefix, key=key)


def load_params(setup, workdir: str, step: int | None = None) -> tuple[int, dict]:
  """(step, full parameter dict): the checkpoint's trainable subtree joined to the frozen backbones."""
  from bridgejax.train.checkpoint import Checkpointer
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"{workdir} has no checkpoints/ directory; train first "
                            f"(python train.py --config ... --workdir {workdir}) or pass the run's --workdir")
  checkpointer = Checkpointer(workdir)
  try:
    step, trainable = checkpointer.load_params(step)
  finally:
    checkpointer.close()
  trainable = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), trainable)
  return int(step), {**setup.frozen, **trainable}


def make_engine(setup, params, config) -> Engine:
  cfg = config.eval
  return Engine(setup.model, params, setup.tokenizer, max_new_tokens=int(cfg.max_new_tokens),
                num_beams=int(cfg.get("num_beams", 1)))


def evaluate(config, workdir: str, step: int | None = None, *, tasks=None, setup=None,
             report: bool = True, quiet: bool = False) -> dict[str, dict]:
  """Runs config.eval.tasks (or `tasks`) on checkpoint `step` (default: the latest) of `workdir`."""
  names = parse_tasks(tasks if tasks is not None else config.eval.tasks)
  for name in names:  # fail on a missing dataset before loading any weights
    task_data(config, name)
  if setup is None:
    from bridgejax.train.loop import build
    setup = build(config)
  step, params = load_params(setup, workdir, step)
  engine = make_engine(setup, params, config)
  out_dir = os.path.join(workdir, "eval")
  writer = jax.process_index() == 0
  if writer:
    os.makedirs(out_dir, exist_ok=True)
  results = {}
  for name in names:
    data_dir, split = task_data(config, name)
    start = time.time()
    if name == "retrieval":
      result = tasks_lib.retrieval_task(engine, data_dir, split, config.eval,
                                        max_caption_tokens=int(config.data.max_caption_tokens))
    else:
      result = tasks_lib.TASKS[name](engine, data_dir, split, config.eval)
    summary = {
        "task": name, "metrics": result.metrics, "config": config.get("name", ""), "checkpoint_step": step,
        "workdir": os.path.abspath(workdir), "dataset": {"dir": os.path.abspath(data_dir), "split": split},
        "counts": result.counts, "settings": result.settings, "notes": result.notes,
        "wall_time_s": round(time.time() - start, 2),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "backbones": {"vision": config.vision.path, "llm": config.llm.path},
        "bridge": config.bridge.to_dict(),
    }
    if writer:
      _write_json(os.path.join(out_dir, f"{name}.json"), summary)
      _write_json(os.path.join(out_dir, f"{name}_predictions.json"),
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


def _write_json(path: str, obj) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1, ensure_ascii=False, allow_nan=False)
  os.replace(tmp, path)
