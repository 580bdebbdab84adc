"""The training loop: build everything from a config, run the jitted step, log, checkpoint, resume."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from tqdm import tqdm

from bridgejax.model import BridgeModel, frozen_row_norm
from bridgejax.train import mesh as mesh_lib
from bridgejax.train.checkpoint import Checkpointer, abstract_like
from bridgejax.train.metric_writer import MetricWriter
from bridgejax.train.optimizer import make_optimizer
from bridgejax.train.step import TrainState, make_train_step


class NonFiniteLossError(RuntimeError):
  pass


@dataclasses.dataclass
class Setup:
  """Everything a run needs, built once from the config."""

  config: object
  mesh: jax.sharding.Mesh
  model: BridgeModel
  frozen: dict  # {vision, llm}, placed on the mesh
  tokenizer: object


def build(config) -> Setup:
  """Loads the frozen backbones and assembles the model; places frozen weights on the mesh once."""
  from bridgejax import weights

  mesh = mesh_lib.make_mesh(config.mesh.data, config.mesh.model)
  param_dtype = jnp.dtype(config.frozen_param_dtype)
  compute_dtype = jnp.dtype(config.compute_dtype)
  vision = weights.load_vision_tower(config.vision.path, param_dtype=param_dtype)
  lm = weights.load_language_model(config.llm.path, param_dtype=param_dtype)
  tokenizer = weights.load_tokenizer(config.llm.get("tokenizer") or config.llm.path)
  model = BridgeModel.create(config, vision.config, lm.config, compute_dtype=compute_dtype,
                             frozen_param_dtype=param_dtype)
  frozen = {"vision": vision.params, "llm": lm.params}
  frozen = jax.device_put(frozen, mesh_lib.frozen_shardings(frozen, mesh, config.frozen_sharding))
  return Setup(config, mesh, model, frozen, tokenizer)


MODEL_INPUTS = ("image", "text_ids", "text_mask")


def global_batch(batch: dict, mesh) -> dict:
  """This process's slice of the batch -> global arrays sharded over 'data' (any number of hosts)."""
  sharding = mesh_lib.batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(batch[k])) for k in MODEL_INPUTS}


def check_batch_size(config, mesh) -> int:
  """The per-process batch size; the global one must split evenly over processes and 'data'."""
  data_size, processes = mesh.shape["data"], jax.process_count()
  if config.batch_size % data_size or config.batch_size % processes:
    raise ValueError(f"batch_size={config.batch_size} must be divisible by mesh.data={data_size} and by the "
                     f"{processes} processes; change --config.batch_size or --config.mesh.data")
  if config.concat_prob > 0 and config.batch_size % 2:
    raise ValueError(f"batch_size={config.batch_size} must be even for the concat trick (or set concat_prob=0)")
  return config.batch_size // processes


def train_iterator(config, setup: Setup, *, shard_index: int | None = None, shard_count: int | None = None):
  """This process's stream of training batches (a grain iterator: its position is checkpointed).

  shard_index/shard_count default to this process's; given, they read shard i of n (its share of
  the global batch), as process i of an n-process job would.
  """
  from bridgejax.data.pipeline import train_dataset
  per_shard = check_batch_size(config, setup.mesh) if shard_count is None else config.batch_size // shard_count
  dataset = train_dataset(config.data.dir, config.data.train_split, setup.tokenizer,
                          batch_size=per_shard, seed=config.seed, shard_index=shard_index, shard_count=shard_count,
                          image_size=setup.model.vision.config.image_size,
                          max_length=config.data.max_caption_tokens, worker_count=config.data.num_workers)
  return iter(dataset)


def ensure_toy_data(config) -> None:
  """configs/demo.py sets data.toy: the toy world is generated into data.dir when not there yet."""
  toy = config.data.get("toy")
  if not toy or os.path.exists(os.path.join(config.data.dir, "dataset_info.json")):
    return
  from bridgejax.data.prepare import prepare_toy
  if jax.process_index() == 0:
    print(f"preparing the toy world in {config.data.dir} ...")
    prepare_toy(config.data.dir, num_train=toy.num_train, num_val=toy.num_val, num_test=toy.num_test,
                seed=toy.seed, quiet=False)


def run(config, workdir: str) -> dict:
  """train.py: build, stream the data, train (with periodic validation), print a summary; then,
  with config.eval_after_training, evaluate the final checkpoint (eval/*.json, eval/report.html)."""
  ensure_toy_data(config)
  setup = build(config)
  evaluate = None
  if config.data.val_split:
    from bridgejax.evaluation.tasks import quick_validation
    evaluate = lambda setup, params, step: quick_validation(setup, params, step)
  summary = train(config, workdir, train_iterator(config, setup), setup=setup, evaluate=evaluate)
  if jax.process_index() == 0:
    print(format_summary(summary, workdir))
  if config.get("eval_after_training") and not summary["preempted"]:
    from bridgejax.evaluation.run import evaluate as evaluate_checkpoint
    summary["eval"] = evaluate_checkpoint(config, workdir, setup=setup)
    if jax.process_index() == 0:
      print(sample_captions(workdir))
  return summary


def sample_captions(workdir: str, n: int = 5) -> str:
  """A few generated captions next to a true one, from eval/caption_predictions.json."""
  path = os.path.join(workdir, "eval", "caption_predictions.json")
  if not os.path.exists(path):
    return ""
  with open(path) as f:
    predictions = json.load(f)["predictions"]
  lines = ["sample captions (generated | true):"]
  for p in predictions[:n]:
    lines.append(f"  {p['caption']!r:50s} | {p['references'][0]!r}")
  return "\n".join(lines)


def format_summary(summary: dict, workdir: str) -> str:
  lines = [f"trained to step {summary['step']} in {workdir}"
           + (" (stopped by SIGTERM; run again to resume)" if summary["preempted"] else "")]
  train_metrics = summary.get("train", {})
  for key in ("loss", "caption_loss", "text_loss", "contrastive_loss", "i2t_top1", "t2i_top1"):
    if key in train_metrics:
      lines.append(f"  train {key:18s} {train_metrics[key]:.4f}")
  for key, value in sorted(summary.get("val", {}).items()):
    lines.append(f"  val   {key:18s} {value:.4f}")
  if summary["skipped_steps"]:
    lines.append(f"  {summary['skipped_steps']} steps skipped for a non-finite loss")
  return "\n".join(lines)


class _Preemption:
  """SIGTERM (a TPU preemption, a cluster's time limit) asks the loop to save and stop."""

  def __init__(self):
    self.requested = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    self.requested = True

  def restore(self):
    signal.signal(signal.SIGTERM, self._previous)


def train(config, workdir: str, train_data: Iterator[dict], *, setup: Setup | None = None,
          evaluate: Callable[[Setup, dict, int], dict] | None = None) -> dict:
  """Runs (or resumes) training to config.total_steps; returns the final summary.

  `train_data` yields this process's share of each batch as numpy arrays (a grain iterator, whose
  position is checkpointed too). `evaluate(setup, params, step)` returns validation metrics.
  """
  setup = setup or build(config)
  model, mesh = setup.model, setup.mesh
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))

  optimizer = make_optimizer(config.optim)
  replicated = mesh_lib.replicated(mesh)
  with jax.set_mesh(mesh):
    init = jax.jit(lambda rng, frozen: TrainState.create(model.init_trainable(rng, frozen), optimizer),
                   out_shardings=replicated)
    state = init(jax.random.key(config.seed), setup.frozen)
    ret_norm = jax.jit(frozen_row_norm, out_shardings=replicated)(setup.frozen)

  checkpointer = Checkpointer(workdir, keep=config.keep_checkpoints, every_steps=config.checkpoint_every_steps)
  if checkpointer.latest_step() is not None:
    state = checkpointer.restore(abstract_like(state), train_data)
    if jax.process_index() == 0:
      print(f"resumed from step {int(state.step)} in {workdir}")
  start = int(state.step)

  step_fn = jax.jit(make_train_step(model, optimizer, seed=config.seed, rescale_ret=config.ret.rescale_row),
                    donate_argnums=(0,), out_shardings=(replicated, replicated))
  writer = MetricWriter(workdir, tensorboard=config.get("tensorboard", True))
  preemption = _Preemption()
  samples_per_step = config.batch_size
  progress = tqdm(total=config.total_steps, initial=start, desc="train", unit="step",
                  disable=jax.process_index() != 0, dynamic_ncols=True)
  last_time, last_step, summary, metrics = time.time(), start, {}, {}
  try:
    for step in range(start + 1, config.total_steps + 1):
      batch = global_batch(next(train_data), mesh)
      with jax.set_mesh(mesh):
        state, metrics = step_fn(state, setup.frozen, batch, ret_norm)
      is_last = step == config.total_steps
      if step % config.log_every_steps == 0 or is_last or preemption.requested:
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}  # the only sync point
        now = time.time()
        rate = (step - last_step) / max(now - last_time, 1e-9)
        last_time, last_step = now, step
        metrics.update(steps_per_s=rate, samples_per_s=rate * samples_per_step,
                       skipped_total=int(state.nonfinite_total))
        writer.write(step, metrics, prefix="train/")
        progress.set_postfix(loss=f"{metrics['loss']:.3f}", cap=f"{metrics['caption_loss']:.3f}",
                             ret=f"{metrics['contrastive_loss']:.3f}", samples_s=f"{rate * samples_per_step:.1f}")
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
      checkpointer.save(step, state, train_data, force=is_last or preemption.requested)
      if preemption.requested:
        logging.warning("SIGTERM: saved step %d and stopped", step)
        break
  finally:
    progress.close()
    checkpointer.wait()
    checkpointer.close()
    writer.close()
    preemption.restore()
  summary.update(step=int(state.step), preempted=preemption.requested, skipped_steps=int(state.nonfinite_total),
                 train={k: float(v) for k, v in jax.device_get(metrics).items()})
  with open(os.path.join(workdir, "train_summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  summary["state"] = state
  return summary
