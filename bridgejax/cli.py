"""What train.py and eval.py share: quiet library logs unless the user asks for them."""

from absl import flags, logging


def quiet_library_logs() -> None:
  """Orbax logs every checkpoint read and write at INFO, burying our progress bar and summary:
  show warnings and errors only, unless --verbosity was given on the command line."""
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
