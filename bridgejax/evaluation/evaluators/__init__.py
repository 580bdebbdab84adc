"""Every eval task type behind one registry, big_vision style: `config.evals` holds one dict per
task, each with a `type` naming an evaluator here and that evaluator's keys.

    config.evals = {"caption": eval_task("caption", "thesis", data="data/coco2017"), ...}
    eval_tasks(config, "caption,vqa")   # {name: its dict}, checked: a known type, exactly its keys
    task_data("vqa", cfg)               # (dataset dir, split), or RecordError listing the splits it has
    protocol_of(cfg)                    # "standard", "thesis", or "custom" once a protocol key changed
    REGISTRY["vqa"].run(engine, data_dir, split, cfg, config)   # -> TaskResult

One module per task type (caption, retrieval, vqa, visdial, compose) declares an `EVALUATOR`
(base.Evaluator: its keys and defaults, protocol presets, the kind of split it reads, its runner,
table columns and report section); this package finds every module that does, so adding a task type
is one new file here. Every key is the task's own; nothing falls back to another task or to the
training data, so an override (`--config.evals.caption.max_new_tokens=16`) changes that task alone
and an empty `data` is an error. A protocol names the settings that make numbers comparable (split,
image geometry, decoding, scoring); the eval JSON records which one a task's numbers follow.
"""

from __future__ import annotations

import importlib
import pkgutil

from bridgejax.config_schema import RESIZES
from bridgejax.data.records import RecordError, load_info
from bridgejax.errors import UserError
from bridgejax.evaluation.evaluators.base import COMMON_KEYS, CUSTOM, Evaluator, TaskResult

__all__ = ["COMMON_KEYS", "CUSTOM", "REGISTRY", "THESIS_TASKS", "Evaluator", "TaskResult", "check_task",
           "eval_task", "eval_tasks", "names", "protocol_of", "protocols", "task_data"]

_RUNTIME = {"base", "common"}  # this package's modules that are not task types


def _discover() -> dict[str, Evaluator]:
  found = {}
  for info in pkgutil.iter_modules(__path__):
    if info.name in _RUNTIME:
      continue
    evaluator = getattr(importlib.import_module(f"{__name__}.{info.name}"), "EVALUATOR", None)
    if isinstance(evaluator, Evaluator):
      if evaluator.type in found:
        raise ImportError(f"two evaluators declare type {evaluator.type!r}")
      if "standard" not in evaluator.protocols:
        raise ImportError(f"evaluator {evaluator.type!r} has no 'standard' protocol")
      found[evaluator.type] = evaluator
  return dict(sorted(found.items(), key=lambda kv: (kv[1].order, kv[0])))


REGISTRY: dict[str, Evaluator] = _discover()
THESIS_TASKS = ("caption", "retrieval", "vqa", "visdial")  # what every thesis config evaluates (configs/base.py)


def names() -> list[str]:
  """Task types in display order (tables, reports)."""
  return list(REGISTRY)


def protocols() -> list[str]:
  """Protocol names every task type has presets for."""
  return sorted(set.intersection(*(set(e.protocols) for e in REGISTRY.values())))


def _choices(what: str, value, known) -> None:
  if value not in known:
    raise UserError(f"{what}={value!r} is unknown; choose from {sorted(known)}")


def eval_task(task_type: str, protocol: str = "standard", **keys) -> dict:
  """One entry of config.evals: the type's keys at their defaults, the protocol's values, then `keys`."""
  _choices("eval task type", task_type, REGISTRY)
  evaluator = REGISTRY[task_type]
  _choices("config argument eval", protocol, evaluator.protocols)
  out = {**COMMON_KEYS, **evaluator.keys, **evaluator.protocols[protocol], "type": task_type, "protocol": protocol}
  unknown = sorted(set(keys) - set(out))
  if unknown:
    raise UserError(f"eval task type {task_type!r} has no key(s) {unknown}; its keys: {sorted(out)}")
  return {**out, **keys}


def eval_tasks(config, names=None) -> dict:
  """config.evals, or its entries `names` (a comma-separated string or a list), each checked: a
  known type and exactly that type's keys. {name: its ConfigDict}, in config order."""
  evals = config.get("evals") or {}
  wanted = list(evals) if names is None else [
      t.strip() for t in (names.split(",") if isinstance(names, str) else names) if t.strip()]
  unknown = [t for t in wanted if t not in evals]
  if unknown or not wanted:
    raise UserError(f"unknown eval task(s) {unknown or wanted!r}; config.evals has {list(evals)} "
                    "(eval.py --tasks=NAME,...)")
  out = {}
  for name in dict.fromkeys(wanted):
    cfg = evals[name]
    _choices(f"--config.evals.{name}.type", cfg.get("type"), REGISTRY)
    want = set(COMMON_KEYS) | set(REGISTRY[cfg.type].keys)
    missing, extra = sorted(want - set(cfg)), sorted(set(cfg) - want)
    if missing or extra:
      raise UserError(f"--config.evals.{name} (type {cfg.type!r}) " + (f"lacks {missing}" if missing else "")
                      + (" and " if missing and extra else "") + (f"has unknown key(s) {extra}" if extra else "")
                      + "; build it with bridgejax.evaluation.evaluators.eval_task")
    _choices(f"--config.evals.{name}.protocol", cfg.protocol, set(REGISTRY[cfg.type].protocols) | {CUSTOM})
    out[name] = cfg
  return out


def check_task(name: str, cfg) -> None:
  """What a runner would reject only when its turn comes, checked before any weights load."""
  if cfg.image_resize not in RESIZES:
    raise UserError(f"--config.evals.{name}.image_resize={cfg.image_resize!r} is unknown; choose from {list(RESIZES)}")
  check = REGISTRY[cfg.type].check
  if check is not None:
    check(name, cfg)


def protocol_of(cfg) -> str:
  """The task's declared protocol while its protocol-defining keys still hold that protocol's
  values, else "custom" (a changed split, geometry, decoding, scoring or a subset of the split)."""
  defining = REGISTRY[cfg.type].protocols.get(cfg.protocol)
  if defining is None or any(cfg[k] != v for k, v in defining.items()):
    return CUSTOM
  return cfg.protocol


def task_data(name: str, cfg) -> tuple[str, str]:
  """(dataset dir, split) of the eval task `name`: its `data` and `split`, a split of its type's
  kind. Errors name the key and list the splits the directory has."""
  kind = REGISTRY[cfg.type].kind
  if not cfg.data:
    raise UserError(f"--config.evals.{name}.data is empty; set it to a prepared dataset folder "
                    "(python -m bridgejax.prepare ...)")
  info = load_info(cfg.data)["splits"]
  if cfg.split in info and info[cfg.split]["kind"] == kind:
    return cfg.data, cfg.split
  have = ", ".join(f"{n} ({s['kind']})" for n, s in sorted(info.items()))
  raise RecordError(f"{cfg.data} has no {kind} split named {cfg.split!r}; it has: {have}. Set "
                    f"--config.evals.{name}.split=NAME (or prepare the split with python -m bridgejax.prepare)")
