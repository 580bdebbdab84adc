"""What the entry points share: one-line user errors, configs read with every declared key
(config_schema.complete: a config file, --config), quiet library logs, starting a multi-host job.

Errors. A *user error* is one the user fixes by changing a flag, a config value, a path, the input
data or the disk: bridgejax.errors.UserError and its subclasses (the config, path and data checks,
RecordError, ImageError, the checkpoint errors, a non-finite training loss), absl's flag errors,
and the OS errors that mean a path or the disk (a missing file, a permission, a full disk). train.py,
eval.py, `python -m bridgejax.predict` and `python -m bridgejax.prepare` print those as one
line, `error: <message>` (the message says what to fix), and exit with status 2. Anything else, a
plain ValueError included, is taken for a bug: its traceback is printed, with a line asking to
report it, and the status is 1. `--debug` prints the traceback of user errors too.
"""

from __future__ import annotations

import difflib
import errno
import importlib.util
import os
import re
import sys
import traceback
from collections.abc import Callable, Sequence

from absl import app, flags, logging

from bridgejax import config_schema
from bridgejax.errors import UserError

USER_ERRORS: tuple[type[BaseException], ...] = (UserError, flags.Error, app.UsageError, FileNotFoundError,
                                                 PermissionError, IsADirectoryError, NotADirectoryError)
# OS errors about the disk rather than the code: full, over quota, read-only.
USER_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.ENOENT}


def is_user_error(e: BaseException) -> bool:
  return isinstance(e, USER_ERRORS) or (isinstance(e, OSError) and e.errno in USER_ERRNOS)


def one_line(e: BaseException) -> str:
  """The message on one line (some messages list things on several)."""
  text = " ".join(str(e).split())
  return text or type(e).__name__


def report_error(e: BaseException, *, debug: bool = False) -> int:
  """Print `e` as the CLIs do (see the module doc) and return the exit status."""
  if isinstance(e, KeyboardInterrupt):
    print("error: interrupted", file=sys.stderr)
    return 130
  user = is_user_error(e)
  if debug or not user:
    shown = e if e.__traceback__ is not None else (e.__cause__ or e)  # a UserError made to explain another
    traceback.print_exception(type(shown), shown, shown.__traceback__, file=sys.stderr)
  if user:
    print(f"error: {one_line(e)}", file=sys.stderr)
    return 2
  print(f"error: unexpected {type(e).__name__}: {one_line(e)} -- this looks like a bug in bridgejax; "
        "please report it with the traceback above", file=sys.stderr)
  return 1


def call(fn: Callable[[], int | None], *, debug: bool = False) -> int:
  """fn() -> its exit status (0 for None), or report_error's for an exception it raises."""
  try:
    return fn() or 0
  except (Exception, KeyboardInterrupt) as e:  # pylint: disable=broad-except
    return report_error(e, debug=debug)


def pop_debug(argv: Sequence[str]) -> tuple[list[str], bool]:
  """argparse CLIs: take --debug from anywhere on the command line (before or after the subcommand)."""
  argv = list(argv)
  return [a for a in argv if a != "--debug"], "--debug" in argv


# --- absl entry points (train.py, eval.py) ------------------------------------------------------

def _debug_in(argv: Sequence[str]) -> bool:
  """--debug as absl reads it, from the raw command line (for errors while flags are parsed)."""
  debug = False
  for a in argv[1:]:
    if a in ("--debug", "-debug"):
      debug = True
    elif a in ("--nodebug", "-nodebug"):
      debug = False
    elif a.startswith("--debug="):
      debug = a.partition("=")[2].lower() in ("1", "true", "t", "yes", "y")
  return debug


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with every failure (an unknown config key included) as one line."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    error: BaseException = UserError(f"{one_line(e)} (--helpshort lists the flags)")
    error.__cause__ = e
  except Exception as e:  # pylint: disable=broad-except
    # config_flags reports an unknown --config.a.b as a bare AttributeError('b'): name it, with near matches.
    error = config_override_error(argv) or e
    error.__cause__ = error.__cause__ or (e if error is not e else None)
  sys.exit(report_error(error, debug=_debug_in(argv)))


def run_absl(main: Callable[[list[str]], int | None], argv: list[str] | None = None) -> None:
  """app.run(main) with --debug, and errors reported as the module doc says."""
  if "debug" not in flags.FLAGS:
    flags.DEFINE_bool("debug", False, "show the traceback of a user error (a bad flag, config value or path) "
                      "too; by default it is one line")

  full_argv = list(sys.argv if argv is None else argv)

  def wrapped(args: list[str]) -> int:
    # config_flags defers a missing config file's error to the first use of FLAGS.config
    return call(lambda: _config_file_check(full_argv) or _complete_config_flag() or main(args),
                debug=flags.FLAGS.debug)

  app.run(wrapped, argv=argv, flags_parser=_parse_flags)


def _complete_config_flag() -> None:
  """--config's ConfigDict with every declared key (config_schema.complete), as load_config_file's."""
  if "config" in flags.FLAGS and flags.FLAGS.config is not None:
    config_schema.complete(flags.FLAGS.config)


# --- config overrides ---------------------------------------------------------------------------

def _config_file_arg(argv: Sequence[str], name: str) -> str | None:
  for i, a in enumerate(argv):
    if a in (f"--{name}", f"-{name}") and i + 1 < len(argv):
      return argv[i + 1]
    if a.startswith((f"--{name}=", f"-{name}=")):
      return a.partition("=")[2]
  return None


def load_config_file(spec: str):
  """configs/X.py[:arg] -> its get_config(arg), as config_flags loads it, with every declared key."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise UserError(f"config file {path!r} does not exist (e.g. --config configs/demo.py)")
  module_spec = importlib.util.spec_from_file_location("bridgejax_user_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return config_schema.complete(module.get_config(arg) if arg else module.get_config())


def flat_keys(config, prefix: str = "") -> list[str]:
  """Every key of a ConfigDict, nested ones dotted: ['batch_size', 'bridge', 'bridge.k', ...]."""
  keys = []
  for key, value in config.items():
    keys.append(prefix + key)
    if hasattr(value, "items") and not isinstance(value, dict):  # a nested ConfigDict
      keys += flat_keys(value, f"{prefix}{key}.")
  return keys


def unknown_key_message(key: str, keys: Sequence[str], containers: Sequence[str] = (), flag: str = "config") -> str:
  """One line: the unknown key and its near matches among `keys` (leaves first looked for next to
  it: 'bridge.kk' -> 'bridge.k'), else the keys next to it. `containers` are never suggested."""
  leaves = [k for k in keys if k not in set(containers)]
  parent, _, leaf = key.rpartition(".")
  siblings = {k.rpartition(".")[2]: k for k in leaves if k.rpartition(".")[0] == parent}
  near = [siblings[n] for n in difflib.get_close_matches(leaf, list(siblings), n=3, cutoff=0.5)]
  if not near:  # a key under another parent: 'data.cut_rule' -> 'evals.caption.cut_rule'
    by_leaf = [k.rpartition(".")[2] for k in leaves]
    near = [k for k, l in zip(leaves, by_leaf) if l in difflib.get_close_matches(leaf, by_leaf, n=3, cutoff=0.75)]
  if near:
    return f"unknown config key --{flag}.{key}; did you mean " + " or ".join(f"--{flag}.{k}" for k in near) + "?"
  where = f"under {parent} " if parent in containers else ""
  names = sorted(siblings) if where or not parent else sorted(k for k in leaves if "." not in k)
  return f"unknown config key --{flag}.{key}; the keys {where}are: " + ", ".join(names)


def _config_file_check(argv: Sequence[str], flag: str = "config") -> None:
  spec = _config_file_arg(argv, flag)
  if spec is not None and not os.path.isfile(spec.partition(":")[0]):
    raise UserError(f"config file {spec.partition(':')[0]!r} does not exist (e.g. --{flag} configs/demo.py)")


def config_override_error(argv: Sequence[str], flag: str = "config") -> UserError | None:
  """Why config_flags failed, as a UserError: a missing config file, or the first --config.KEY
  override the config lacks; None when it is neither."""
  spec = _config_file_arg(argv, flag)
  if spec is None:
    return None
  try:
    _config_file_check(argv, flag)
  except UserError as e:
    return e
  overrides = [m.group(1) for a in argv for m in [re.match(rf"^--?{flag}\.([^=\s]+)", a)] if m]
  if not overrides:
    return None
  try:
    config = load_config_file(spec)
  except Exception:  # pylint: disable=broad-except
    return None  # the original error says more
  keys = flat_keys(config)  # configs/base.py's keys are config_schema's, so the hints are the schema's
  containers = [k for k in keys if any(other.startswith(k + ".") for other in keys)]
  for key in overrides:
    if key not in keys:
      return UserError(unknown_key_message(key, keys, containers, flag))
  return None


# --- logs and multi-host ------------------------------------------------------------------------

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
    import jax  # lazy: jax, seconds of every CLI's start
    jax.distributed.initialize(*manual)
