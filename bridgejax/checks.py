"""Checks of every path and split in a config, run before any weight is loaded or step taken.

    check_config_paths(config, for_training=True)    # train.py, before step 1
    check_config_paths(config, for_training=False)   # eval.py, before loading
    check_checkpoint(workdir, step)                  # eval.py / predict: a checkpoint to read
    check_workdir(workdir)                           # train.py: a path bridgejax can write

Each failure is a UserError on one line naming the config key, the bad value and what exists
(the splits a dataset has, the folders next to a missing checkpoint), so a typo costs seconds
instead of the minutes it takes to load a 2B-parameter LM first. Remote paths (gs://...) are
left to the loaders.
"""

from __future__ import annotations

import difflib
import json
import os

from bridgejax import paths
from bridgejax.config_schema import check_config_values
from bridgejax.data.features import check_present
from bridgejax.data.records import INFO_FILE
from bridgejax.errors import UserError
from bridgejax.evaluation.evaluators import REGISTRY, eval_tasks
from bridgejax.toy.prepare import toy_pending


def _nearby(path: str, n: int = 6) -> str:
  """What is next to a missing path: the entries of its folder named like it (or all, if few)."""
  parent = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(parent):
    return f"its folder {parent} does not exist either"
  entries = sorted(e for e in os.listdir(parent) if not e.startswith("."))
  if not entries:
    return f"its folder {parent} is empty"
  near = difflib.get_close_matches(os.path.basename(path), entries, n=n, cutoff=0.6)
  if near:
    return f"{parent} holds " + ", ".join(near)
  if len(entries) <= n:
    return f"{parent} holds only " + ", ".join(entries)
  return f"{parent} holds {len(entries)} entries, none named like it"


def check_path(key: str, value: str, what: str) -> None:
  """`--config.KEY=value` must name an existing file or folder (`what` says which kind of thing)."""
  if not value:
    raise UserError(f"--config.{key} is empty; set it to {what}")
  if paths.is_remote(value) or os.path.exists(value):
    return
  raise UserError(f"--config.{key}={value!r} does not exist ({_nearby(value)}); set it to {what}")


def _dataset_info(key: str, data_dir: str) -> dict | None:
  """dataset_info.json of `--config.KEY=data_dir` (None for a remote one)."""
  if not data_dir:
    raise UserError(f"--config.{key} is empty; set it to a prepared dataset folder "
                    "(python -m bridgejax.prepare ... --out DIR)")
  if paths.is_remote(data_dir):
    return None
  if not os.path.isdir(data_dir):
    raise UserError(f"--config.{key}={data_dir!r} does not exist ({_nearby(data_dir)}); "
                    "prepare it with python -m bridgejax.prepare ... --out DIR")
  path = os.path.join(data_dir, INFO_FILE)
  if not os.path.exists(path):
    inside = sorted(d for d in os.listdir(data_dir) if os.path.exists(os.path.join(data_dir, d, INFO_FILE)))
    hint = (f"it holds the datasets {', '.join(inside)}: point at one of them" if inside else
            "prepare one with python -m bridgejax.prepare ... --out DIR")
    raise UserError(f"--config.{key}={data_dir!r} is not a prepared dataset (no {INFO_FILE}); {hint}")
  with open(path) as f:
    return json.load(f)


def check_split(key: str, data_dir: str, split: str, kind: str = "image_text", *, dir_key: str = "data.dir") -> None:
  """`--config.KEY=split` must be a `kind` split of the dataset at data_dir (named by dir_key)."""
  info = _dataset_info(dir_key, data_dir)
  if info is None:
    return
  splits = info.get("splits", {})
  if split in splits and splits[split].get("kind") == kind:
    return
  same = {n: s for n, s in splits.items() if s.get("kind") == kind}
  near = difflib.get_close_matches(split, list(same), n=1)
  if same:
    have = f"its {kind} splits are: " + ", ".join(f"{n} ({s.get('num_examples', '?')} examples)"
                                                  for n, s in sorted(same.items()))
  else:
    have = f"it has no {kind} split, only: " + ", ".join(f"{n} ({s.get('kind')})" for n, s in sorted(splits.items()))
  raise UserError(f"--config.{key}={split!r}: {data_dir} has no {kind} split of that name"
                  + (f" (did you mean {near[0]!r}?)" if near else "") + f"; {have}")


def check_backbones(config) -> None:
  """vision.path, llm.path and llm.tokenizer exist."""
  check_path("vision.path", config.vision.path, "a CLIP checkpoint folder (Hugging Face, or converted "
             "with python -m bridgejax.weights.convert)")
  check_path("llm.path", config.llm.path, "a Gemma checkpoint folder (Hugging Face or converted) or a .gguf file")
  tokenizer = config.llm.tokenizer
  if tokenizer:
    check_path("llm.tokenizer", tokenizer, "the Hugging Face folder holding the tokenizer (or a .gguf file)")


def check_training_data(config) -> None:
  """data.dir, data.train_split, data.val_split ("" = no validation) and data.features (a cache of the
  train split; whether it fits the tower is checked once the tower is loaded)."""
  if toy_pending(config):
    return
  check_split("data.train_split", config.data.dir, config.data.train_split)
  if config.data.val_split:
    check_split("data.val_split", config.data.dir, config.data.val_split)
  check_present(config)


def check_eval_data(config, tasks=None) -> None:
  """Every entry of config.evals (or those named in `tasks`): its type and keys, dataset folder and
  split. The toy world the demo generates on first use is not there to check yet."""
  for name, cfg in eval_tasks(config, tasks).items():
    if not (toy_pending(config) and cfg.data == config.data.dir):
      check_split(f"evals.{name}.split", cfg.data, cfg.split, REGISTRY[cfg.type].kind, dir_key=f"evals.{name}.data")


def check_config_paths(config, *, for_training: bool, backbones: bool = True, tasks=None) -> None:
  """Every path and split the run will read: backbones; for training the train/val splits (and the
  eval data when eval_after_training); for evaluation the eval data (of the entries `tasks`, default
  all of config.evals). Raises UserError. Every value's type and range is checked first (config_schema)."""
  check_config_values(config)
  if backbones:
    check_backbones(config)
  if for_training:
    check_training_data(config)
  if not for_training or config.eval_after_training:
    check_eval_data(config, tasks)


def check_workdir(workdir: str) -> None:
  """A workdir bridgejax can reach: no URL with a slash missing (gs:/bucket), no remote scheme
  whose package is absent (bridgejax.paths.path says which)."""
  paths.path(workdir)


def _steps(directory: str) -> list[int]:
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit()) if os.path.isdir(directory) else []


def check_checkpoint(workdir: str, step: int | str | None = None) -> None:
  """WORKDIR/checkpoints holds a checkpoint (step `step` when given: a number, or "best")."""
  from bridgejax.train.checkpoint import BEST, checkpoint_step  # lazy: jax and orbax; checks fail fast, before them
  step = checkpoint_step(step)
  check_workdir(workdir)
  if paths.is_remote(workdir):
    return
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(workdir):
    raise UserError(f"--workdir {workdir!r} does not exist ({_nearby(workdir)}); pass a training run's folder")
  steps = _steps(directory)
  if not steps:
    raise UserError(f"--workdir {workdir!r} has no checkpoint in checkpoints/; train first "
                    f"(python train.py --config ... --workdir {workdir}) or pass the run's folder")
  if step == BEST and not _steps(os.path.join(directory, BEST)):
    raise UserError(f"--workdir {workdir!r} has no best checkpoint (checkpoints/best/): training keeps one while it "
                    f"validates (data.val_split) with config.best_metric set; evaluate the latest or a step of {steps}")
  if step not in (None, BEST) and step not in steps:
    raise UserError(f"--workdir {workdir!r} has no checkpoint for step {step}; available steps: {steps}")
