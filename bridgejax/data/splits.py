"""Which prepared split each eval task reads: shared by the config checks (before anything loads)
and by evaluation (when it runs), so both resolve a task's data the same way.

    parse_tasks("caption,vqa")       # ['caption', 'vqa'], or ValueError naming the known tasks
    task_data(config, "vqa")         # (dataset dir, split), or RecordError listing the splits it has

  caption, retrieval   eval.data ("" = data.dir), split eval.split
  vqa                  eval.vqa_data ("" = eval.data), split eval.vqa_split ("" = eval.split, or
                       vqa_<eval.split> when the directory has it, as the toy world does)
  visdial              eval.visdial_data / eval.visdial_split, likewise
"""

from __future__ import annotations

from bridgejax.data.records import RecordError, load_info

# task -> (the split kind it reads, the prefix of its eval.<prefix>_data / _split keys);
# bridgejax.evaluation.tasks.TASKS runs the same names.
TASK_DATA = {"caption": ("image_text", ""), "retrieval": ("image_text", ""), "vqa": ("vqa", "vqa"),
             "visdial": ("visdial", "visdial")}


def parse_tasks(tasks) -> list[str]:
  """A comma-separated string or a list of task names -> the names, once each, in order."""
  names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
  unknown = [t for t in names if t not in TASK_DATA]
  if unknown or not names:
    raise ValueError(f"unknown eval task(s) {unknown or names!r}; choose from {sorted(TASK_DATA)} "
                     f"(e.g. --config.eval.tasks=caption,retrieval)")
  return list(dict.fromkeys(names))


def resolve_split(data_dir: str, split: str, kind: str, *, prefix: str = "", key: str = "eval.split") -> str:
  """The split to read: `split` if it holds `kind` records, else `{prefix}_{split}` (the toy
  world's vqa_val / visdial_val next to val). Errors list the splits the directory has."""
  info = load_info(data_dir)["splits"]
  for name in ([f"{prefix}_{split}"] if prefix else []) + [split]:
    if name in info and info[name]["kind"] == kind:
      return name
  have = ", ".join(f"{n} ({s['kind']})" for n, s in sorted(info.items()))
  raise RecordError(f"{data_dir} has no {kind} split named {split!r}" + (f" or {prefix}_{split!r}" if prefix else "")
                    + f"; it has: {have}. Set --config.{key}=NAME (or prepare the split with "
                    "python -m bridgejax.data.prepare)")


def task_data(config, task: str) -> tuple[str, str]:
  """(dataset dir, split) a task reads; see the module docstring."""
  cfg = config.eval
  base = cfg.get("data") or config.data.dir
  kind, prefix = TASK_DATA[task]
  data_dir = (cfg.get(f"{prefix}_data") if prefix else "") or base
  if not data_dir:
    raise ValueError(f"no dataset for task {task!r}: set --config.eval.data (or --config.data.dir) to a prepared "
                     "directory (python -m bridgejax.data.prepare ...)")
  explicit = cfg.get(f"{prefix}_split") if prefix else ""
  key = f"eval.{prefix}_split" if prefix else "eval.split"
  if explicit:
    return data_dir, resolve_split(data_dir, explicit, kind, key=key)
  return data_dir, resolve_split(data_dir, cfg.split, kind, prefix=prefix, key=key)
