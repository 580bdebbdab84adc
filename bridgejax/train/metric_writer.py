"""Metrics to `WORKDIR/metrics.jsonl` (one object per logged step) and TensorBoard."""

from __future__ import annotations

import json
import math
import os

import jax


class MetricWriter:

  def __init__(self, workdir: str, tensorboard: bool = True):
    self.enabled = jax.process_index() == 0  # one writer per job
    self._tb = None
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
    if tensorboard:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: dict, prefix: str = "") -> None:
    if not self.enabled:
      return
    values = {prefix + k: _jsonable(v) for k, v in metrics.items()}
    self._jsonl.write(json.dumps({"step": int(step), **values}) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for name, value in values.items():
        if isinstance(value, float) and math.isfinite(value):
          self._tb.add_scalar(name, value, step)

  def close(self):
    if self.enabled:
      self._jsonl.close()
      if self._tb is not None:
        self._tb.close()


def _jsonable(value):
  value = float(value) if hasattr(value, "__float__") else value
  return value if not isinstance(value, float) or math.isfinite(value) else str(value)
