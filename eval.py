"""Evaluate a trained bridge: python eval.py --config configs/X.py[:eval=thesis] --workdir DIR
                                 [--checkpoint STEP|best] [--tasks=caption,vqa] [--config.evals.caption.data=...]

Runs every entry of config.evals (--tasks picks some by name), each with its own keys
(bridgejax/evaluation/evaluators/). Writes DIR/eval/<task>.json, DIR/eval/<task>_predictions.json and
DIR/eval/report.html, and prints a summary. The backbones, datasets, splits and checkpoint are
checked before anything loads; a bad one is reported on one line (`error: ...`, exit status 2);
--debug adds the traceback.
"""

from absl import flags
from ml_collections import config_flags

from bridgejax import cli

config_flags.DEFINE_config_file("config", None, "experiment config file (configs/*.py[:args])", lock_config=True)
flags.DEFINE_string("workdir", None, "the training run's directory (checkpoints/); eval/ is written there")
flags.DEFINE_string("checkpoint", None, "checkpoint step to evaluate, or 'best' (the best validation step, "
                    "config.best_metric); default: the latest")
flags.DEFINE_list("tasks", None, "entries of config.evals to run, by name (default: all)")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
  del argv
  cli.quiet_library_logs()
  from bridgejax.checks import check_checkpoint, check_config_paths
  check_checkpoint(FLAGS.workdir, FLAGS.checkpoint)
  check_config_paths(FLAGS.config, for_training=False, tasks=FLAGS.tasks)
  from bridgejax.evaluation.run import evaluate
  evaluate(FLAGS.config, FLAGS.workdir, FLAGS.checkpoint, tasks=FLAGS.tasks)


if __name__ == "__main__":
  cli.run_absl(main)
