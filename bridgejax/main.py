"""train.py's library side: train a config in a workdir, then evaluate the final checkpoint.

    summary = run(config, workdir)   # train_summary.json, checkpoints/, and with
                                     # config.eval_after_training eval/*.json and eval/report.html

It stands above training and evaluation and joins them: the training loop gets validation as a
callback and never imports bridgejax.evaluation.
"""

from __future__ import annotations

import jax

from bridgejax import paths
from bridgejax.checks import check_split
from bridgejax.config_schema import check_config_values
from bridgejax.errors import UserError
from bridgejax.evaluation.run import evaluate as evaluate_checkpoint
from bridgejax.evaluation.validation import quick_validation
from bridgejax.experiment import build
from bridgejax.toy.prepare import ensure_toy_data
from bridgejax.train.loop import check_batch_size, format_summary, lock_workdir, train, train_iterator
from bridgejax.train.metric_writer import MetricWriter


def run(config, workdir: str) -> dict:
  """Build, stream the data, train (with periodic validation), print a summary; then, with
  config.eval_after_training, evaluate the final checkpoint (eval/*.json, eval/report.html).
  With config.representation_share > 0 (BLIP-2, configs/qformer.py:blip2), stage 1 runs first in
  WORKDIR/representation and this run starts from it (`stages`)."""
  check_config_values(config)
  check_batch_size(config)  # a batch the mesh cannot split, before anything loads
  first, config = stages(config, workdir)
  if first is not None:
    summary = run(first, str(paths.path(workdir) / REPRESENTATION_DIR))
    if summary["preempted"]:  # SIGTERM in stage 1: the same command resumes it
      return summary
  ensure_toy_data(config)
  check_val_split(config)  # before any weight loads, not 1000 steps in at the first validation
  lock = lock_workdir(workdir)  # and before minutes of loading backbones
  writer = None
  try:
    writer = MetricWriter.for_run(config, workdir)  # config.wandb without wandb fails here, before the backbones
    setup = build(config)
    representation = config.stage == "representation"
    evaluate = None
    if config.data.val_split and not representation:
      evaluate = lambda setup, params, step: quick_validation(setup, params)  # the loop's callback gets the step too
    summary = train(config, workdir, train_iterator(config, setup), setup=setup, evaluate=evaluate, locked=True,
                    writer=writer)
    if jax.process_index() == 0:
      print(format_summary(summary, workdir))
    if config.eval_after_training and not summary["preempted"] and not representation:
      summary["eval"] = evaluate_checkpoint(config, workdir, setup=setup)
      samples = caption_samples(workdir, 50)
      if samples:  # W&B shows them as a table (config.wandb)
        writer.write_table(summary["step"], "sample_captions", ["id", "generated", "true"], samples)
      if jax.process_index() == 0:
        print(sample_captions(workdir))
  finally:
    if writer is not None:
      writer.close()
    if lock is not None:
      lock.release()
  return summary


REPRESENTATION_DIR = "representation"  # stage 1's run, inside stage 2's workdir


def stages(config, workdir: str):
  """(stage 1's config or None, the config this run trains). representation_share s > 0 on a generative
  config splits total_steps N: stage 1 (config.stage="representation", no validation or evaluation)
  trains round(s·N) steps in WORKDIR/representation, stage 2 the other steps with init_from pointing
  there. The same command derives the same two configs, so each stage resumes where it stopped."""
  share = config.representation_share
  if not share or config.stage != "generative":
    return None, config
  first_steps = min(max(1, round(share * config.total_steps)), config.total_steps - 1)
  if first_steps < 1:
    raise UserError(f"representation_share={share} needs total_steps >= 2 to train both stages "
                    f"(total_steps={config.total_steps})")
  first, second = config.copy_and_resolve_references(), config.copy_and_resolve_references()
  first.update(stage="representation", representation_share=0.0, total_steps=first_steps, eval_after_training=False,
               best_metric="", evals={})
  first.data.val_split = ""
  first.checkpoint_every_steps = min(first.checkpoint_every_steps, first_steps)
  second.update(total_steps=config.total_steps - first_steps,
                init_from=str(paths.path(workdir) / REPRESENTATION_DIR))
  return first, second


def check_val_split(config) -> None:
  """data.val_split ("" = no validation) names a captioned split of data.dir."""
  if config.data.val_split:
    check_split("data.val_split", config.data.dir, config.data.val_split)


def caption_samples(workdir: str, n: int) -> list[list[str]]:
  """[id, generated, a true caption] of the first n of eval/caption_predictions.json ([] without it)."""
  path = paths.path(workdir) / "eval" / "caption_predictions.json"
  predictions = paths.read_json(path)["predictions"] if path.exists() else []
  return [[str(p.get("id", p.get("index", ""))), p["caption"], p["references"][0]] for p in predictions[:n]]


def sample_captions(workdir: str, n: int = 5) -> str:
  """A few generated captions next to a true one, from eval/caption_predictions.json."""
  rows = caption_samples(workdir, n)
  lines = ["sample captions (generated | true):"] + [f"  {generated!r:50s} | {true!r}" for _, generated, true in rows]
  return "\n".join(lines) if rows else ""
