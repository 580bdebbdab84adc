"""What the entry points share: quiet library logs, and starting a multi-host job."""

from absl import app, flags, logging


def quiet_library_logs() -> None:
  """Orbax logs every checkpoint read and write at INFO, burying our progress bar and summary:
  show warnings and errors only, unless --verbosity was given on the command line."""
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)


def start_distributed(multihost: bool, coordinator_address: str | None = None, num_processes: int | None = None,
                      process_id: int | None = None) -> None:
  """--multihost: jax.distributed.initialize(), from the three flags where given (all or none),
  else detected from the cluster (TPU pods, SLURM, ...)."""
  manual = (coordinator_address, num_processes, process_id)
  if any(v is not None for v in manual) and (not multihost or None in manual):
    raise app.UsageError("--coordinator_address, --num_processes and --process_id go together, with --multihost")
  if multihost:
    import jax  # pylint: disable=g-import-not-at-top
    jax.distributed.initialize(*manual)
