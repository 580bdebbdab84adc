"""python -m bridgejax.features --config CONFIG --data DIR [--split train] [--out DIR] [--batch_size 64]
                              [--config.key=value ...]

Runs the config's frozen tower once over a prepared split and writes what training reads of it
(bridgejax.data.features has the format). A bad path or split is one line (`error: ...`, exit
status 2); --debug adds the traceback.
"""

import os

from absl import flags
from ml_collections import config_flags

from bridgejax import checks, cli, experiment
from bridgejax.data.features import check_out, summary, write_cache


def main(argv) -> None:
  del argv
  cli.quiet_library_logs()
  args = flags.FLAGS
  config = args.config
  config.data.dir = args.data or config.data.dir
  config.data.train_split = args.split or config.data.train_split
  checks.check_backbones(config)
  checks.check_split("data.train_split", config.data.dir, config.data.train_split)
  out = args.out or os.path.join(config.data.dir, "features", config.data.train_split)
  check_out(out)
  manifest = write_cache(config, experiment.build(config), config.data.dir, config.data.train_split, out,
                         batch_size=args.batch_size)
  print(summary(manifest, out))


def _define_flags() -> None:
  config_flags.DEFINE_config_file("config", None, "experiment config file (configs/*.py[:args])", lock_config=True)
  flags.DEFINE_string("data", None, "the prepared dataset (default: the config's data.dir)")
  flags.DEFINE_string("split", None, "its split to cache (default: the config's data.train_split)")
  flags.DEFINE_string("out", None, "the features folder (default: DATA/features/SPLIT, what data.features=auto reads)")
  flags.DEFINE_integer("batch_size", 64, "images per tower call")
  flags.mark_flags_as_required(["config"])


if __name__ == "__main__":
  _define_flags()
  cli.run_absl(main)
