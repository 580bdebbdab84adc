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
from bridgejax.config_values import check_config_values
from bridgejax.evaluation.run import evaluate as evaluate_checkpoint
from bridgejax.evaluation.tasks import quick_validation
from bridgejax.experiment import build
from bridgejax.toy.prepare import ensure_toy_data
from bridgejax.train.loop import format_summary, lock_workdir, train, train_iterator
from bridgejax.train.metric_writer import MetricWriter


def run(config, workdir: str) -> dict:
  """Build, stream the data, train (with periodic validation), print a summary; then, with
  config.eval_after_training, evaluate the final checkpoint (eval/*.json, eval/report.html)."""
  check_config_values(config)
  ensure_toy_data(config)
  check_val_split(config)  # before any weight loads, not 1000 steps in at the first validation
  lock = lock_workdir(workdir)  # and before minutes of loading backbones
  writer = None
  try:
    writer = MetricWriter.for_run(config, workdir)  # config.wandb without wandb fails here, before the backbones
    setup = build(config)
    evaluate = quick_validation if config.data.val_split else None
    summary = train(config, workdir, train_iterator(config, setup), setup=setup, evaluate=evaluate, locked=True,
                    writer=writer)
    if jax.process_index() == 0:
      print(format_summary(summary, workdir))
    if config.get("eval_after_training") and not summary["preempted"]:
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


def check_val_split(config) -> None:
  """data.val_split ("" = no validation) names a captioned split of data.dir."""
  if config.data.get("val_split"):
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
