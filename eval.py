"""Evaluate a trained bridge: python eval.py --config configs/X.py --workdir DIR [--checkpoint STEP]
                                           [--config.eval.tasks=caption,retrieval,vqa,visdial]

Writes DIR/eval/<task>.json, DIR/eval/<task>_predictions.json and DIR/eval/report.html, and prints
a summary; see bridgejax/evaluation/run.py for which dataset each task reads. The backbones,
datasets, splits and checkpoint are checked before anything loads; a bad one is reported on one
line (`error: ...`, exit status 2); --debug adds the traceback.
"""

from absl import flags
from ml_collections import config_flags

from bridgejax import cli

config_flags.DEFINE_config_file("config", None, "experiment config file (configs/*.py[:args])", lock_config=True)
flags.DEFINE_string("workdir", None, "the training run's directory (checkpoints/); eval/ is written there")
flags.DEFINE_integer("checkpoint", None, "checkpoint step to evaluate (default: the latest)")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
  del argv
  cli.quiet_library_logs()
  from bridgejax.checks import check_checkpoint, check_config_paths
  check_checkpoint(FLAGS.workdir, FLAGS.checkpoint)
  check_config_paths(FLAGS.config, for_training=False)
  from bridgejax.evaluation.run import evaluate
  evaluate(FLAGS.config, FLAGS.workdir, FLAGS.checkpoint)


if __name__ == "__main__":
  cli.run_absl(main)
