"""What an evaluator is: the declaration every task type's module makes, and the keys all share.

An evaluator module (one file per task type in this package) ends with

    EVALUATOR = Evaluator(type="caption", kind="image_text", keys={...}, protocols={...}, run=run,
                          columns=(...), section=section, check=None)

and the registry (`bridgejax.evaluation.evaluators`) finds it: nothing else is edited to add a task.
This module imports nothing heavy, so that configs (configs/base.py builds config.evals) and the
config checks read the declarations without loading jax; a module's `run` imports its runtime
(`common`: batches, the engine's helpers, jax) when it runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

# Every key all task types share, with its default (a type adds its own in Evaluator.keys).
COMMON_KEYS = {
    "type": "",
    "protocol": "standard",  # the protocol this dict was made for; the JSON says "custom" if it was changed
    "data": "",  # a prepared dataset folder (python -m bridgejax.prepare ...); required
    "split": "",
    "image_resize": "clip",  # "clip": short side + centre crop (FROMAGe's transform); "squash": no crop
    "batch_size": 64,  # rounded up to a multiple of mesh.data
    "max_examples": 0,  # 0 = the whole split
    "num_workers": 0,  # processes decoding eval images
    "report_examples": 16,  # examples shown in eval/report.html
    "progress": True,  # a progress bar
}
CUSTOM = "custom"  # the protocol of a task whose protocol-defining keys were changed


@dataclasses.dataclass
class TaskResult:
  """What `run` returns; evaluation.run writes it to eval/<task>.json and eval/<task>_predictions.json."""
  metrics: dict[str, Any]
  predictions: list[dict[str, Any]]
  counts: dict[str, int]
  settings: dict[str, Any] = dataclasses.field(default_factory=dict)  # what the runner derived
  notes: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Evaluator:
  """One task type.

  type       the name config.evals entries give as `type`
  kind       the kind of prepared split it reads (bridgejax.data.records: image_text, vqa, visdial, compose)
  keys       its own config keys with their defaults (beside COMMON_KEYS)
  protocols  {protocol name: the protocol-defining keys and their values}; "standard" is required
  run        run(engine, data_dir, split, cfg, config) -> TaskResult; `engine` the model's jitted
             functions (bridgejax.engine.Engine), `cfg` the task's dict, `config` the run's config
  columns    (metric, short header) in display order, for tables (unlisted metrics follow them)
  section    section(predictions_json, images, n) -> HTML of n examples for eval/report.html, or None
  check      check(name, cfg) raising UserError on a setting `run` would reject, before weights load
  """
  type: str
  kind: str
  keys: Mapping[str, Any]
  protocols: Mapping[str, Mapping[str, Any]]
  run: Callable[..., TaskResult]
  columns: tuple[tuple[str, str], ...] = ()
  section: Callable[..., str] | None = None
  check: Callable[[str, Any], None] | None = None
  order: int = 100  # position among the tasks in tables and reports (lower first)
