"""Metrics to `WORKDIR/metrics.jsonl` (one object per logged step), TensorBoard and Weights & Biases.

One logging path: MetricWriter hands each logged step to a list of sinks, so every sink gets the
same keys at the same steps. metrics.jsonl and TensorBoard go through bridgejax.paths, so a gs://
workdir gets them in the bucket. TensorBoard writes gs:// and s3:// itself (tensorboardX needs
google-cloud-storage or boto3 for them); where it cannot, the run goes on without TensorBoard,
with a warning.

W&B is on when `config.wandb.project` is set (`pip install -e '.[wandb]'`; WANDB_MODE=offline
writes the run under WORKDIR/wandb for a later `wandb sync`). Its run id is kept in
WORKDIR/wandb_run_id, so a resumed training goes on logging into the same W&B run. Tables (the
sample captions after the final evaluation) go to W&B only: metrics.jsonl holds scalars, and the
predictions are in eval/caption_predictions.json.
"""

from __future__ import annotations

import importlib.util
import json
import math
import uuid

import jax
from absl import logging

from bridgejax import paths
from bridgejax.errors import UserError

TENSORBOARD_SCHEMES = ("gs://", "s3://")  # the remote schemes tensorboardX writes itself
WANDB_ID_FILE = "wandb_run_id"


class MetricWriter:

  def __init__(self, workdir: str, tensorboard: bool = True, wandb_settings=None, run_config=None):
    """wandb_settings: config.wandb (project "" = off); run_config: the run's ConfigDict, shown in W&B."""
    self.enabled = jax.process_index() == 0  # one writer per job
    self._sinks = []
    if not self.enabled:
      return
    work = paths.makedirs(workdir)
    self._sinks.append(_JsonlSink(work / "metrics.jsonl"))
    board = _tensorboard(str(work / "tensorboard")) if tensorboard else None
    if board is not None:
      self._sinks.append(_TensorBoardSink(board))
    if wandb_settings is not None and wandb_settings.get("project"):
      self._sinks.append(_WandbSink(workdir, wandb_settings, run_config))

  @classmethod
  def for_run(cls, config, workdir: str) -> "MetricWriter":
    """The writer config asks for (config.tensorboard, config.wandb)."""
    return cls(workdir, tensorboard=config.tensorboard, wandb_settings=config.wandb,
               run_config=config)

  def write(self, step: int, metrics: dict, prefix: str = "") -> None:
    values = {prefix + k: float(v) if hasattr(v, "__float__") else v for k, v in metrics.items()}
    for sink in self._sinks:
      sink.write(int(step), values)

  def write_table(self, step: int, name: str, columns: list[str], rows: list[list]) -> None:
    for sink in self._sinks:
      sink.write_table(int(step), name, columns, rows)

  def rewind(self, step: int) -> None:
    """A run resumed at `step` (a checkpoint fallback, or a hard kill after the last save) logs the
    steps after it again: their old rows leave metrics.jsonl for metrics_rewound.jsonl, so each step
    appears once and nothing logged is lost."""
    for sink in self._sinks:
      sink.rewind(int(step))

  def close(self):
    for sink in self._sinks:
      sink.close()
    self._sinks = []


class _Sink:
  """Where logged steps go; tables are ignored unless the sink can show them."""

  def write(self, step: int, values: dict) -> None:
    raise NotImplementedError

  def write_table(self, step: int, name: str, columns: list[str], rows: list[list]) -> None:
    del step, name, columns, rows

  def rewind(self, step: int) -> None:
    del step

  def close(self) -> None:
    pass


REWOUND_FILE = "metrics_rewound.jsonl"


def _logged_after(line: str, step: int) -> bool:
  """Whether a metrics.jsonl line is of a step after `step` (a line cut short by a crash counts too)."""
  try:
    return int(json.loads(line)["step"]) > step
  except (ValueError, KeyError, TypeError):
    return True


class _JsonlSink(_Sink):

  def __init__(self, path):
    self._file = paths.AppendFile(path)

  def write(self, step, values):
    self._file.write(json.dumps({"step": step, **{k: _jsonable(v) for k, v in values.items()}}) + "\n")

  def rewind(self, step):
    path = self._file.path
    self._file.close()
    lines = paths.read_text(path).splitlines(keepends=True) if path.exists() else []
    later = [_logged_after(line, step) for line in lines]
    if any(later):
      aside = path.parent / REWOUND_FILE
      kept_aside = paths.read_text(aside) if aside.exists() else ""
      moved = "".join(line if line.endswith("\n") else line + "\n" for line, l in zip(lines, later) if l)
      paths.write_text(aside, kept_aside + moved)  # first, so a crash between the two loses no row
      paths.write_text(path, "".join(line for line, l in zip(lines, later) if not l))
      logging.warning("resumed at step %d: %d rows of later steps moved from %s to %s", step, sum(later),
                      path.name, REWOUND_FILE)
    self._file = paths.AppendFile(path)

  def close(self):
    self._file.close()


class _TensorBoardSink(_Sink):

  def __init__(self, board):
    self._board = board

  def write(self, step, values):
    for name, value in values.items():
      if isinstance(value, float) and math.isfinite(value):
        self._board.add_scalar(name, value, step)

  def close(self):
    self._board.close()


class _WandbSink(_Sink):
  """A W&B run, started at the first write (a run that restores nothing new logs no empty run)."""

  def __init__(self, workdir: str, settings, run_config):
    check_wandb(settings)
    self._workdir, self._settings, self._run_config, self._run = workdir, settings, run_config, None

  def _started(self):
    if self._run is None:
      import wandb  # lazy: wandb is optional (.[wandb])
      id_file = paths.path(self._workdir) / WANDB_ID_FILE
      run_id = paths.read_text(id_file).strip() if id_file.exists() else uuid.uuid4().hex[:12]
      paths.write_text(id_file, run_id + "\n")
      config = json.loads(self._run_config.to_json_best_effort()) if self._run_config is not None else None
      self._run = wandb.init(project=self._settings.project, entity=self._settings.get("entity") or None,
                             name=self._settings.get("name") or None, id=run_id, resume="allow", config=config,
                             dir=None if paths.is_remote(self._workdir) else str(self._workdir))
    return self._run

  def write(self, step, values):
    self._started().log(values, step=step)

  def write_table(self, step, name, columns, rows):
    import wandb  # lazy: wandb is optional (.[wandb])
    self._started().log({name: wandb.Table(columns=columns, data=rows)}, step=step)

  def close(self):
    if self._run is not None:
      self._run.finish()


def check_wandb(settings) -> None:
  """config.wandb.project set without wandb installed: one line, before any backbone loads."""
  if settings is not None and settings.get("project") and importlib.util.find_spec("wandb") is None:
    raise UserError(f"--config.wandb.project={settings.project!r} logs to Weights & Biases, but wandb is not "
                    "installed: pip install -e '.[wandb]' (or unset --config.wandb.project)")


def _tensorboard(directory: str):
  """A tensorboardX SummaryWriter, or None (with a warning) where it cannot write `directory`."""
  if paths.is_remote(directory) and not directory.startswith(TENSORBOARD_SCHEMES):
    logging.warning("no TensorBoard logs: tensorboardX cannot write to %s (it writes local, gs:// and s3:// "
                    "folders); metrics.jsonl has every metric", directory)
    return None
  from tensorboardX import SummaryWriter  # lazy: tensorboardX, ~1.5 s; only where TensorBoard logs are written
  try:
    return SummaryWriter(directory)
  except Exception as e:  # pylint: disable=broad-except
    logging.warning("no TensorBoard logs: tensorboardX cannot write to %s (%s); metrics.jsonl has every metric",
                    directory, " ".join(str(e).split())[:200])
    return None


def _jsonable(value):
  return value if not isinstance(value, float) or math.isfinite(value) else str(value)
