"""Errors raised while reading checkpoints: each names the problem and how to fix it."""

import contextlib

from bridgejax.errors import UserError


class CheckpointError(UserError):
  """A checkpoint cannot be turned into a parameter tree (wrong architecture, tensors, shapes)."""


class MissingCheckpointError(CheckpointError, FileNotFoundError):
  """A checkpoint directory or one of its files does not exist."""


@contextlib.contextmanager
def config_json_errors():
  """Around a loader's config builder: a KeyError (a field config.json lacks) or a ValueError (the
  model config's own checks) becomes a CheckpointError; the builder's own CheckpointErrors pass as they are."""
  try:
    yield
  except CheckpointError:
    raise
  except KeyError as e:
    raise CheckpointError(f"config.json lacks {e}") from e
  except ValueError as e:
    raise CheckpointError(f"config.json describes a model bridgejax cannot build: {e}") from e
