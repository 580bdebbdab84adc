"""Train a bridge: python train.py --config configs/X.py --workdir DIR [--config.key=value ...]

Resumes from the latest checkpoint in DIR if there is one. See README.md for the configs.
A SIGTERM saves the step in flight and exits with status 143 (bridgejax.preemption): run the
same command to resume.
Every path and split in the config is checked before anything loads; a bad one, or an unknown
config key, is reported on one line (`error: ...`, exit status 2); --debug adds the traceback.
"""

import sys

from absl import flags
from ml_collections import config_flags

from bridgejax import cli, preemption

config_flags.DEFINE_config_file("config", None, "experiment config file (configs/*.py[:args])", lock_config=True)
flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics.jsonl and eval outputs")
flags.DEFINE_bool("multihost", False, "call jax.distributed.initialize() first (TPU pods, SLURM/GPU clusters)")
flags.DEFINE_string("coordinator_address", None, "with --multihost where the cluster is not auto-detected: "
                    "host:port of process 0")
flags.DEFINE_integer("num_processes", None, "with --coordinator_address: how many processes in the job")
flags.DEFINE_integer("process_id", None, "with --coordinator_address: this process's index, 0..num_processes-1")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
  del argv
  cli.quiet_library_logs()
  cli.start_distributed(FLAGS.multihost, FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  from bridgejax.checks import check_config_paths, check_workdir
  from bridgejax.config_schema import check_config_values
  from bridgejax.main import run
  from bridgejax.train.loop import check_batch_size
  from bridgejax.toy.prepare import ensure_toy_data
  check_config_values(FLAGS.config)  # before the demo generates anything
  check_batch_size(FLAGS.config)
  check_workdir(FLAGS.workdir)
  ensure_toy_data(FLAGS.config)  # the demo's data is generated on first use, so check after it
  check_config_paths(FLAGS.config, for_training=True)
  summary = run(FLAGS.config, FLAGS.workdir)
  if summary["preempted"]:  # never 0: `train.py ... && eval.py ...` must not evaluate an unfinished model
    print(f"error: stopped by SIGTERM at step {summary['step']} of {FLAGS.config.total_steps} (saved); "
          "run the same command to resume", file=sys.stderr)
    return preemption.EXIT_STATUS
  return 0


if __name__ == "__main__":
  cli.run_absl(main)
