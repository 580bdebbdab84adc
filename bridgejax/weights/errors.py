"""Errors raised while reading checkpoints: each names the problem and how to fix it."""

from bridgejax.errors import UserError


class CheckpointError(UserError):
  """A checkpoint cannot be turned into a parameter tree (wrong architecture, tensors, shapes)."""


class MissingCheckpointError(CheckpointError, FileNotFoundError):
  """A checkpoint directory or one of its files does not exist."""
