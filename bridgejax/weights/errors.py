"""Errors raised while reading checkpoints: each names the problem and how to fix it."""


class CheckpointError(ValueError):
  """A checkpoint cannot be turned into a parameter tree (wrong architecture, tensors, shapes)."""


class MissingCheckpointError(CheckpointError, FileNotFoundError):
  """A checkpoint directory or one of its files does not exist."""
