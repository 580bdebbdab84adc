"""Metrics to `WORKDIR/metrics.jsonl` (one object per logged step) and TensorBoard.

Both go through bridgejax.paths, so a gs:// workdir gets them in the bucket. TensorBoard writes
gs:// and s3:// itself (tensorboardX needs google-cloud-storage or boto3 for them); where it
cannot, the run goes on without TensorBoard, with a warning.
"""

from __future__ import annotations

import json
import math

import jax
from absl import logging

from bridgejax import paths

TENSORBOARD_SCHEMES = ("gs://", "s3://")  # the remote schemes tensorboardX writes itself


class MetricWriter:

  def __init__(self, workdir: str, tensorboard: bool = True):
    self.enabled = jax.process_index() == 0  # one writer per job
    self._tb = None
    if not self.enabled:
      return
    work = paths.makedirs(workdir)
    self._jsonl = paths.AppendFile(work / "metrics.jsonl")
    if tensorboard:
      self._tb = _tensorboard(str(work / "tensorboard"))

  def write(self, step: int, metrics: dict, prefix: str = "") -> None:
    if not self.enabled:
      return
    values = {prefix + k: _jsonable(v) for k, v in metrics.items()}
    self._jsonl.write(json.dumps({"step": int(step), **values}) + "\n")
    if self._tb is not None:
      for name, value in values.items():
        if isinstance(value, float) and math.isfinite(value):
          self._tb.add_scalar(name, value, step)

  def close(self):
    if self.enabled:
      self._jsonl.close()
      if self._tb is not None:
        self._tb.close()


def _tensorboard(directory: str):
  """A tensorboardX SummaryWriter, or None (with a warning) where it cannot write `directory`."""
  if paths.is_remote(directory) and not directory.startswith(TENSORBOARD_SCHEMES):
    logging.warning("no TensorBoard logs: tensorboardX cannot write to %s (it writes local, gs:// and s3:// "
                    "folders); metrics.jsonl has every metric", directory)
    return None
  from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  try:
    return SummaryWriter(directory)
  except Exception as e:  # pylint: disable=broad-except
    logging.warning("no TensorBoard logs: tensorboardX cannot write to %s (%s); metrics.jsonl has every metric",
                    directory, " ".join(str(e).split())[:200])
    return None


def _jsonable(value):
  value = float(value) if hasattr(value, "__float__") else value
  return value if not isinstance(value, float) or math.isfinite(value) else str(value)
