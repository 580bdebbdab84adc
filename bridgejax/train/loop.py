"""The training loop: run the jitted step, log, validate through a callback, checkpoint, resume.

It knows nothing of evaluation: validation comes in as `train(..., evaluate=fn)`, and training then
evaluating the final checkpoint is bridgejax.main.run's job. After each validation the step with
the best `config.best_metric` so far is kept in checkpoints/best/ (bridgejax.train.checkpoint).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from tqdm import tqdm

from bridgejax import mesh as mesh_lib, paths, preemption
from bridgejax.config_schema import check_config_values, complete, harmless
from bridgejax.data import features as feature_cache
from bridgejax.data.pipeline import train_dataset
from bridgejax.errors import UserError
from bridgejax.experiment import Setup, build
from bridgejax.heads import frozen_row_norm
from bridgejax.train.checkpoint import (CheckpointError, CheckpointMismatchError, Checkpointer, abstract_like,
                                       warm_start)
from bridgejax.train.metric_writer import MetricWriter
from bridgejax.train.optimizer import make_optimizer
from bridgejax.train.program import MODEL_INPUTS, train_programs
from bridgejax.train.step import TrainState


class NonFiniteLossError(UserError):
  """Too many consecutive non-finite steps: the message says what to change."""


class ConfigMismatchError(UserError):
  """A restart whose config does not fit the run's checkpoints."""


# the progress bar's losses: (shown as, metric), each where the stage logs it
PROGRESS_METRICS = (("loss", "loss"), ("cap", "caption_loss"), ("ret", "contrastive_loss"), ("itc", "itc_loss"),
                    ("itm", "itm_loss"), ("itg", "itg_loss"))  # or, with data.features, hidden_<i> for image


def global_batch(batch: dict, mesh) -> dict:
  """This process's slice of the batch -> global arrays sharded over 'data' (any number of hosts)."""
  sharding = mesh_lib.batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()
          if k in MODEL_INPUTS or k.startswith(feature_cache.KEY_PREFIX)}


def check_batch_size(config, data_size: int | None = None, processes: int | None = None) -> int:
  """The per-process batch size (the rows each process's loader reads); the global one must split
  evenly over processes and 'data' (of the config's mesh on this job's devices and this job's
  processes unless given: bench/tpu_compile.py gives a TPU topology's), and into pairs for the
  concat trick. train.py calls it before any weight loads."""
  if data_size is None:
    data_size = mesh_lib.mesh_shape(config.mesh.data, config.mesh.model, jax.device_count())[0]
  processes = jax.process_count() if processes is None else processes
  problem = mesh_lib.batch_size_problem(config.batch_size, data_size, processes, config.concat_prob > 0)
  if problem:
    raise UserError(problem)
  return config.batch_size // processes


def train_iterator(config, setup: Setup, *, shard_index: int | None = None, shard_count: int | None = None):
  """This process's stream of training batches (a grain iterator: its position is checkpointed).

  shard_index/shard_count default to this process's; given, they read shard i of n (its share of
  the global batch), as process i of an n-process job would.
  """
  per_shard = check_batch_size(config, setup.mesh.shape["data"]) if shard_count is None else config.batch_size // shard_count
  # cached tower features (data.features), checked against this run's tower before step 1
  features = feature_cache.check_cache(config, setup) if feature_cache.cache_dir(config) else None
  dataset = train_dataset(config.data.dir, config.data.train_split, setup.tokenizer,
                          batch_size=per_shard, seed=config.seed, shard_index=shard_index, shard_count=shard_count,
                          image_size=setup.model.vision.config.image_size,
                          max_length=config.data.max_caption_tokens, worker_count=config.data.num_workers,
                          image_resize=config.data.image_resize, features=features)
  return iter(dataset)


# config.best_metric: a key of the validation dict (bridgejax.evaluation.validation.quick_validation) or
# R@1_mean, and whether a higher value is better. FROMAGe keeps the best t2i R@1 (base.py's default).
BEST_METRICS = {"t2i_R@1": True, "i2t_R@1": True, "R@1_mean": True, "t2i_R@5": True, "i2t_R@5": True,
                "caption_loss": False, "text_loss": False, "contrastive_loss": False}


def check_best_metric(name: str) -> None:
  if name and name not in BEST_METRICS:
    raise UserError(f"--config.best_metric={name!r} is not a validation metric; use one of "
                    f"{', '.join(BEST_METRICS)}, or '' to keep no best checkpoint")


def validation_score(val: dict, name: str) -> float:
  """The value of best_metric `name` in the validation dict `val`."""
  if name == "R@1_mean":
    return (val["i2t_R@1"] + val["t2i_R@1"]) / 2
  return val[name]


def is_better(value: float, best: dict | None, name: str) -> bool:
  """Whether `value` of best_metric `name` beats the best record so far (None: anything does)."""
  if best is None:
    return True
  return value > best["value"] if BEST_METRICS[name] else value < best["value"]


def format_summary(summary: dict, workdir: str) -> str:
  if summary.get("already_trained"):
    return (f"already trained to step {summary['step']} in {workdir} (total_steps={summary['total_steps']}): "
            "nothing to do; raise --config.total_steps to train on")
  lines = [f"trained to step {summary['step']} in {workdir}"
           + (" (stopped by SIGTERM; run again to resume)" if summary["preempted"] else "")]
  train_metrics = summary.get("train", {})
  for key in ("loss", "caption_loss", "text_loss", "contrastive_loss", "i2t_top1", "t2i_top1", "itc_loss", "itm_loss",
              "itg_loss"):
    if key in train_metrics:
      lines.append(f"  train {key:18s} {train_metrics[key]:.4f}")
  for key, value in sorted(summary.get("val", {}).items()):
    lines.append(f"  val   {key:18s} {value:.4f}")
  if summary.get("best"):
    best = summary["best"]
    lines.append(f"  best  {best['metric']:18s} {best['value']:.4f} at step {best['step']} (eval.py --checkpoint best)")
  if summary["skipped_steps"]:
    lines.append(f"  {summary['skipped_steps']} steps skipped for a non-finite loss")
  return "\n".join(lines)


def any_process(flag: bool) -> bool:
  """Whether `flag` is set on any process: one small all-gather, so call it at log steps only.
  Hosts receive SIGTERM at different moments; they stop (and save, a collective) at the step
  they agree on here, so no host waits alone in a save."""
  if jax.process_count() == 1:
    return bool(flag)
  return bool(np.any(multihost_utils.process_allgather(np.asarray([flag], np.int32))))


def lock_workdir(workdir: str) -> paths.WorkdirLock | None:
  """Process 0 takes WORKDIR/lock (one training per workdir); every process raises if it failed."""
  lock, error = None, ""
  if jax.process_index() == 0:
    try:
      lock = paths.WorkdirLock(workdir).acquire()
    except paths.WorkdirLockedError as e:
      error = str(e)
  if any_process(bool(error)):
    raise paths.WorkdirLockedError(error or f"{workdir} is in use by another training (see process 0's error)")
  return lock


def _flat(tree, prefix: str = "") -> dict:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[prefix + key] = value
  return out


def config_differences(saved: dict, config) -> list[str]:
  """'key: saved (saved) -> now (now)' for each config key that differs from the saved config.json."""
  saved, now = _flat(saved), _flat(json.loads(config.to_json_best_effort()))
  show = lambda d, k: repr(d[k]) if k in d else "absent"
  return [f"{k}: {show(saved, k)} (saved) -> {show(now, k)} (now)"
          for k in sorted(saved.keys() | now.keys()) if k not in saved or k not in now or saved[k] != now[k]]


def changed_keys(config, workdir: str) -> list[str]:
  """The config keys that differ from the run's saved config.json and change what its checkpoints
  hold (not config_schema.harmless: how a run is driven, not what its checkpoints hold), as
  'key: saved (saved) -> now (now)'; [] without a config.json."""
  saved_path = paths.path(workdir) / "config.json"
  saved = complete(paths.read_json(saved_path)) if saved_path.exists() else None  # absent keys ran as their defaults
  return [d for d in config_differences(saved, config) if not harmless(d.partition(":")[0])] if saved else []


def _resume_hint(workdir: str) -> str:
  return (f"Resume with the run's own config (its config.json) or use another --workdir; nothing in {workdir} "
          "was changed")


def mismatch_error(error: CheckpointMismatchError, config, workdir: str) -> ConfigMismatchError:
  """The one-line error for a config that does not fit the run's checkpoint: the config keys that
  differ from the saved config.json (else the parameters that differ)."""
  what = "; ".join(changed_keys(config, workdir) or error.differences[:6])
  return ConfigMismatchError(f"the config does not fit the checkpoints in {workdir}: {what}. {_resume_hint(workdir)}")


def train(config, workdir: str, train_data: Iterator[dict], *, setup: Setup | None = None,
          evaluate: Callable[[Setup, dict, int], dict] | None = None, locked: bool = False,
          writer: MetricWriter | None = None) -> dict:
  """Runs (or resumes) training to config.total_steps; returns the final summary.

  `train_data` yields this process's share of each batch as numpy arrays (a grain iterator, whose
  position is checkpointed too). `evaluate(setup, params, step)` returns validation metrics.

  The run's record is kept whole: one training per workdir (WORKDIR/lock); a damaged newest
  checkpoint falls back to the newest intact one; config.json and train_summary.json are written
  only once the restore has succeeded, so a config that does not fit changes nothing. `locked`:
  the caller holds the workdir's lock already (main.run takes it before loading the backbones).
  `writer`: the caller's MetricWriter, left open (main.run logs the final evaluation into it too);
  by default training opens and closes its own (MetricWriter.for_run).
  """
  check_config_values(config)
  lock = None if locked else lock_workdir(workdir)
  try:
    return _train(config, workdir, train_data, setup or build(config), evaluate, writer)
  finally:
    if lock is not None:
      lock.release()


def _restore(checkpointer: Checkpointer, state, train_data, config, workdir: str):
  """The newest intact checkpoint's state (or `state` if there is none); damaged newer steps are
  moved aside so that training can save those steps again."""
  if not checkpointer.all_steps():
    return state
  try:
    state = checkpointer.restore(abstract_like(state), train_data)
  except CheckpointMismatchError as e:
    raise mismatch_error(e, config, workdir) from None
  except CheckpointError:
    changed = changed_keys(config, workdir)  # e.g. another batch size: the data position no longer fits
    if changed:
      raise ConfigMismatchError(f"no checkpoint in {workdir} restores with this config, which differs from the "
                                f"run's: {'; '.join(changed)}. {_resume_hint(workdir)}") from None
    raise
  if checkpointer.damaged:
    if jax.process_index() == 0:
      checkpointer.set_aside(step for step, _ in checkpointer.damaged)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("bridgejax: damaged checkpoints set aside")
    checkpointer.reload()
  return state


def _best_so_far(checkpointer: Checkpointer, name: str) -> dict | None:
  """The best checkpoint's record if it was kept by `name` (a resumed run goes on from it)."""
  best = checkpointer.best() if name else None
  if best is not None and best.get("metric") != name:
    logging.warning("the best checkpoint (step %s) was kept by %s, not best_metric=%s: the next validation "
                    "replaces it", best.get("step"), best.get("metric"), name)
    return None
  return best


def _train(config, workdir: str, train_data, setup: Setup, evaluate, writer: MetricWriter | None) -> dict:
  mesh = setup.mesh
  work = paths.path(workdir)
  best_metric = config.best_metric if evaluate is not None else ""
  check_best_metric(best_metric)

  optimizer = make_optimizer(config.optim)
  replicated = mesh_lib.replicated(mesh)
  init, step_fn = train_programs(setup, optimizer)
  with jax.set_mesh(mesh):
    state = init(jax.random.key(config.seed), setup.frozen)
    ret_norm = jax.jit(frozen_row_norm, out_shardings=replicated)(setup.frozen)

  checkpointer = Checkpointer(workdir, keep=config.keep_checkpoints, every_steps=config.checkpoint_every_steps)
  try:
    state = _restore(checkpointer, state, train_data, config, workdir)
  except BaseException:
    checkpointer.close()
    raise
  start = int(state.step)
  if not start and config.init_from:  # a fresh run starts its bridge from another run (BLIP-2's stage 2)
    try:
      params, report = warm_start(jax.device_get(state.params), config.init_from)
    except BaseException:
      checkpointer.close()
      raise
    with jax.set_mesh(mesh):
      state = jax.jit(lambda p: TrainState.create(p, optimizer), out_shardings=replicated)(params)
    if jax.process_index() == 0:
      print(report)
  best = _best_so_far(checkpointer, best_metric)
  if start and start >= config.total_steps:  # keep the finished run's summary and config.json
    checkpointer.close()
    summary_path = work / "train_summary.json"
    summary = paths.read_json(summary_path) if summary_path.exists() else {}
    summary.update(step=start, preempted=False, already_trained=True, total_steps=config.total_steps,
                   skipped_steps=summary.get("skipped_steps", int(state.nonfinite_total)))
    summary["state"] = state
    return summary
  if jax.process_index() == 0:
    if start:
      print(f"resumed from step {start} in {workdir}")
    paths.write_text(work / "config.json", config.to_json_best_effort(indent=2))

  own_writer = writer is None
  writer = writer or MetricWriter.for_run(config, workdir)
  writer.rewind(start)  # rows of steps after the restored one (a fallback, a hard kill) are logged again
  # One process decides alone when to stop at any step; several agree at log steps (any_process).
  multihost = jax.process_count() > 1
  samples_per_step = config.batch_size
  progress = tqdm(total=config.total_steps, initial=start, desc="train", unit="step",
                  disable=jax.process_index() != 0, dynamic_ncols=True)
  last_time, last_step, summary, metrics, stop = time.time(), start, {}, {}, False
  # SIGTERM (also one that came before this run, inside a sweep): save this step and stop.
  with preemption.catch_sigterm():
    try:
      for step in range(start + 1, config.total_steps + 1):
        batch = global_batch(next(train_data), mesh)
        with jax.set_mesh(mesh):
          state, metrics = step_fn(state, setup.frozen, batch, ret_norm)
        is_last = step == config.total_steps
        log_step = step % config.log_every_steps == 0 or is_last
        if multihost:
          stop = any_process(preemption.requested()) if log_step else False
        else:
          stop = preemption.requested()
        if log_step or stop:
          metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}  # the only sync point
          now = time.time()
          rate = (step - last_step) / max(now - last_time, 1e-9)
          last_time, last_step = now, step
          metrics.update(steps_per_s=rate, samples_per_s=rate * samples_per_step,
                         skipped_total=int(state.nonfinite_total))
          writer.write(step, metrics, prefix="train/")
          shown = {name: metrics[key] for name, key in PROGRESS_METRICS if key in metrics}
          progress.set_postfix(**{name: f"{value:.3f}" for name, value in shown.items()},
                               samples_s=f"{rate * samples_per_step:.1f}")
          if int(state.nonfinite_max_run) >= config.max_nonfinite_steps:
            checkpointer.wait()
            raise NonFiniteLossError(
                f"{int(state.nonfinite_max_run)} consecutive steps had a non-finite loss or gradient (by step "
                f"{step}); updates were skipped. Lower optim.lr, check the data, or use float32 compute "
                f"(--config.compute_dtype=float32). The last good checkpoint is in {checkpointer.directory}.")
        progress.update(1)
        if evaluate is not None and (step % config.eval_every_steps == 0 or is_last):
          val = evaluate(setup, state.params, step)
          writer.write(step, val, prefix="val/")
          summary["val"] = val
          value = float(validation_score(val, best_metric)) if best_metric else None
          if best_metric and is_better(value, best, best_metric):
            best = {"metric": best_metric, "value": value, "step": step}
            checkpointer.save_best(step, state.params, best)
            if jax.process_index() == 0:
              progress.write(f"step {step}: best {best_metric} so far, {value:.4f} (kept in {checkpointer.best_directory})")
        checkpointer.save(step, state, train_data, force=is_last or stop)
        if stop:
          logging.warning("SIGTERM: saved step %d and stopped", step)
          break
    finally:
      progress.close()
      checkpointer.wait()
      checkpointer.close()
      if own_writer:
        writer.close()
  summary.update(step=int(state.step), preempted=stop, skipped_steps=int(state.nonfinite_total),
                 train={k: float(v) for k, v in jax.device_get(metrics).items()})
  if best is not None:
    summary["best"] = best
  if jax.process_index() == 0:
    paths.write_json(work / "train_summary.json", summary)
  summary["state"] = state
  return summary
