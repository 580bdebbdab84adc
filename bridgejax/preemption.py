"""SIGTERM (a TPU preemption, a cluster's time limit, `kill`) asks long work to stop at a safe point.

Inside `catch_sigterm()` a SIGTERM sets a flag instead of killing the process; the work polls
`requested()` where stopping loses nothing: the training loop after a step (it saves, then stops),
a sweep or an ablation between runs. The contexts nest and share one flag, so a SIGTERM that lands
while a sweep evaluates, or between two trainings, is not lost when the next training starts: the
outermost context restores the previous handler and clears the flag on exit.

A command stopped this way exits with EXIT_STATUS (143, the shell's status for a SIGTERM), never 0,
so `train.py ... && eval.py ...` never evaluates an unfinished model; the same command resumes.
"""

from __future__ import annotations

import contextlib
import signal
import threading

EXIT_STATUS = 128 + signal.SIGTERM  # 143: stopped by SIGTERM at a safe point; run the same command to resume
_state = {"depth": 0, "requested": False, "previous": None}


def _handle(signum, frame):  # pylint: disable=unused-argument
  _state["requested"] = True


@contextlib.contextmanager
def catch_sigterm():
  """Within: SIGTERM sets requested(). A no-op off the main thread (only it may set handlers)."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  if _state["depth"] == 0:
    _state["previous"], _state["requested"] = signal.signal(signal.SIGTERM, _handle), False
  _state["depth"] += 1
  try:
    yield
  finally:
    _state["depth"] -= 1
    if _state["depth"] == 0:
      signal.signal(signal.SIGTERM, _state["previous"])
      _state["requested"] = False


def requested() -> bool:
  """Whether a SIGTERM arrived inside the current catch_sigterm()."""
  return _state["requested"]
