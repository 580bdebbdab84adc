"""What Orbax, TensorStore and asyncio print around a full disk or a damaged checkpoint, reduced to
the one report bridgejax.train.checkpoint gives (a DiskFullError, or a warning naming the damaged
step): whether an error is a full disk, and the hooks and log filters that drop the rest. The
Checkpointer installs them; each installs once per process.
"""

from __future__ import annotations

import errno
import logging as logging_lib
import sys
import threading


def disk_full(exc) -> bool:
  """Whether `exc` (or what caused it) is a write that ran out of space: ENOSPC / EDQUOT, or
  TensorStore's RESOURCE_EXHAUSTED for the same."""
  seen = set()
  while exc is not None and id(exc) not in seen:
    seen.add(id(exc))
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
      return True
    if "No space left on device" in str(exc) or "Disk quota exceeded" in str(exc):
      return True
    exc = exc.__cause__ or exc.__context__
  return False


class _DiskFullReports(logging_lib.Filter):
  """Orbax's background save threads log a full disk with a traceback from each of them (hundreds
  of lines); bridgejax reports it once, as a DiskFullError: drop those."""

  def filter(self, record) -> bool:
    exc = record.exc_info[1] if record.exc_info else None
    return not (disk_full(exc) or "No space left on device" in str(record.msg))


def quiet_disk_full_reports() -> None:
  if getattr(threading.excepthook, "bridgejax", False):
    return
  previous = threading.excepthook

  def hook(args):
    if not disk_full(args.exc_value):
      previous(args)

  hook.bridgejax = True
  threading.excepthook = hook
  logging_lib.getLogger("absl").addFilter(_DiskFullReports())


def _tensorstore_read_error(exc) -> bool:
  return isinstance(exc, ValueError) and any(w in str(exc) for w in ("OCDBT", "tensorstore", "zarr"))


class _UnretrievedReadErrors(logging_lib.Filter):
  """asyncio's '... exception was never retrieved' for the sibling reads of a failed restore, or the
  sibling writes of a save that found the disk full (reported once, as DiskFullError)."""

  def filter(self, record) -> bool:
    exc = record.exc_info[1] if record.exc_info else None
    return not ("exception was never retrieved" in str(record.msg)
                and (_tensorstore_read_error(exc) or disk_full(exc)))


def drop_closed_loop_noise() -> None:
  """A failed read (a damaged checkpoint, which the fallback handles) makes TensorStore's pending
  callbacks reach Orbax's already closed event loop, and asyncio report the sibling reads' errors
  as never retrieved: hundreds of lines of tracebacks around the one warning that matters. Drop
  just those two. Installed before any read, since the callbacks print from other threads."""
  previous = sys.unraisablehook
  if getattr(previous, "bridgejax", False):
    return

  def hook(unraisable):
    if not (isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"):
      previous(unraisable)

  hook.bridgejax = True
  sys.unraisablehook = hook
  logging_lib.getLogger("asyncio").addFilter(_UnretrievedReadErrors())
