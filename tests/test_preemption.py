"""SIGTERM inside catch_sigterm(): a flag, not death; nested contexts share it (a SIGTERM that lands
between two trainings of a sweep is not lost); the outermost restores the handler and clears it."""

import os
import signal

from bridgejax import preemption


def test_sigterm_sets_the_flag_and_nested_contexts_share_it():
  before = signal.getsignal(signal.SIGTERM)
  assert not preemption.requested()
  with preemption.catch_sigterm():
    os.kill(os.getpid(), signal.SIGTERM)  # the default action would end pytest here
    assert preemption.requested()
    with preemption.catch_sigterm():  # a training starting after the signal still sees it
      assert preemption.requested()
    assert preemption.requested() and signal.getsignal(signal.SIGTERM) is not before
  assert not preemption.requested() and signal.getsignal(signal.SIGTERM) is before


def test_the_outermost_context_restores_the_handler_on_an_exception():
  before = signal.getsignal(signal.SIGTERM)
  try:
    with preemption.catch_sigterm():
      os.kill(os.getpid(), signal.SIGTERM)
      raise RuntimeError("boom")
  except RuntimeError:
    pass
  assert not preemption.requested() and signal.getsignal(signal.SIGTERM) is before
