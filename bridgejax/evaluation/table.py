"""A thesis-style results table from the eval JSONs of several runs: one row per experiment.

    python -m bridgejax.evaluation.table runs/cls_k1 runs/crossatt_k12 ...   [--markdown | --json]
                                         [--tasks caption,retrieval] [--metrics BLEU-4,CIDEr,t2i_R@1]
    python -m bridgejax.evaluation.table runs/cls_k1/seed_*                  # one row: mean ± std

Rates are shown x100 with two decimals, as the thesis and FROMAGe report them (CIDEr too, as is
usual); R@k (stored in percent) and mean ranks as they are; a metric a run lacks is "-"; SPICE
(unavailable offline) "n/a".

Runs whose config.json differ only in `seed`, evaluated under the same protocol, are one row: the
mean ± the sample standard deviation (n - 1) over them, as the thesis reports the mean of 3 runs;
"seeds" says how many runs a row holds (`python -m bridgejax.sweep` makes such runs). "protocol"
is the eval JSONs' own ("-" where they have none).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections.abc import Callable

UNSCALED = {"mean_rank"}


def task_columns() -> dict[str, tuple[tuple[str, str], ...]]:
  """{task type: ((metric, short header), ...)} in display order, from each evaluator's declaration;
  any other metric in a JSON follows its task's known ones."""
  from bridgejax.evaluation.evaluators import REGISTRY  # lazy: numpy and the records reader, ~0.3 s of CLI start
  return {name: evaluator.columns for name, evaluator in REGISTRY.items()}



def load_workdir(workdir: str) -> dict[str, dict]:
  """{task: eval/<task>.json} of one run; raises if it has none."""
  from bridgejax import paths as paths_lib  # lazy: etils.epath, ~0.08 s of CLI start
  eval_dir = paths_lib.path(workdir) / "eval"
  paths = sorted(p for p in (eval_dir.glob("*.json") if eval_dir.is_dir() else [])
                 if not p.name.endswith("_predictions.json"))
  if not paths:
    raise FileNotFoundError(f"{workdir} has no eval/<task>.json; run python eval.py --config ... --workdir {workdir}")
  out = {}
  for p in paths:
    data = paths_lib.read_json(p)
    out[data.get("task", p.name[:-5])] = data
  return out


def load_config(workdir: str) -> dict | None:
  """The run's config.json (written by training), with the keys it lacks at their defaults
  (config_schema.complete: a run saved before a key existed ran as its default), or None."""
  from bridgejax import paths as paths_lib  # lazy: etils.epath, ~0.08 s of CLI start
  from bridgejax.config_schema import complete  # lazy: ml_collections, ~0.1 s of CLI start
  path = paths_lib.path(workdir) / "config.json"
  return complete(paths_lib.read_json(path)) if path.exists() else None


def protocol(run: dict[str, dict]) -> str:
  """The protocol(s) a run's eval JSONs declare, "-" if none does."""
  return "/".join(sorted({str(r["protocol"]) for r in run.values() if r.get("protocol")})) or "-"


def group_runs(workdirs: list[str], runs: list[dict[str, dict]]) -> list[list[int]]:
  """Indices of the runs that share a row: the same config.json but for `seed`, and the same
  protocol; a run without a config.json is a row of its own. Rows in first-seen order."""
  groups: dict[str, list[int]] = {}
  for i, (w, r) in enumerate(zip(workdirs, runs)):
    config = load_config(w)
    if config is None:
      key = f"#{i}"
    else:
      config.pop("seed", None)
      key = json.dumps([config, protocol(r)], sort_keys=True)
    groups.setdefault(key, []).append(i)
  return list(groups.values())


def fmt(metric: str, value) -> str:
  if value is None:
    return "n/a"
  if metric in UNSCALED or "R@" in metric:  # R@k is stored in percent already
    return f"{value:.2f}"
  return f"{100 * value:.2f}"


def columns_for(runs: list[dict[str, dict]], tasks=None, metrics=None) -> list[tuple[str, str, str]]:
  """[(task, metric, header)] present in at least one run, in display order."""
  out, columns = [], task_columns()
  for task in [t for t in columns if tasks is None or t in tasks] + sorted({t for r in runs for t in r} - set(columns)):
    if tasks is not None and task not in tasks:
      continue
    present = {m for r in runs if task in r for m in r[task]["metrics"]}
    known = [(m, h) for m, h in columns.get(task, ()) if m in present]
    extra = [(m, m) for m in sorted(present - {m for m, _ in columns.get(task, ())})]
    for m, h in known + extra:
      if metrics is None or m in metrics or h in metrics:
        out.append((task, m, h))
  return out


def rows_for(workdirs: list[str], runs: list[dict[str, dict]], groups: list[list[int]] | None = None) -> list[str]:
  """A name per row (per group of runs): config name @ checkpoint step(s)."""
  groups = groups or [[i] for i in range(len(runs))]
  names, places = [], []
  for group in groups:
    first = next(iter(runs[group[0]].values()))
    steps = {next(iter(runs[i].values())).get("checkpoint_step") for i in group}
    steps = sorted(steps) if all(isinstance(s, int) for s in steps) else sorted(steps, key=str)
    where = os.path.commonpath([os.path.abspath(workdirs[i]) for i in group]) if len(group) > 1 else workdirs[group[0]]
    place = os.path.basename(os.path.normpath(where))
    names.append(f"{first.get('config') or place} @{'/'.join(str(s) for s in steps)}")
    places.append(place)
  if len(set(names)) < len(names):  # the same config twice: tell the rows apart by their directory
    names = [f"{n} ({p})" for n, p in zip(names, places)]
  return names


def metric_values(runs: list[dict[str, dict]], task: str, metric: str) -> list | None:
  """The runs' values of task/metric (None where unavailable, e.g. SPICE); None if no run has it."""
  values = [r[task]["metrics"][metric] for r in runs if task in r and metric in r[task]["metrics"]]
  return values or None


def mean_std(values: list) -> tuple[float | None, float | None]:
  """(mean, sample std) of the available values; std is None for fewer than two."""
  present = [v for v in values if v is not None]
  if not present:
    return None, None
  return statistics.fmean(present), statistics.stdev(present) if len(present) > 1 else None


def cell(metric: str, values: list | None) -> str:
  if values is None:
    return "-"
  mean, std = mean_std(values)
  return fmt(metric, mean) if std is None else f"{fmt(metric, mean)} ± {fmt(metric, std)}"


def render(header: list[str], rows: list[list[str]], markdown: bool = False) -> str:
  if markdown:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
  widths = [max(len(header[i]), *(len(r[i]) for r in rows)) for i in range(len(header))]
  line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
  return "\n".join([line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in rows])


def table(workdirs: list[str], *, tasks=None, metrics=None, markdown: bool = False, as_json: bool = False) -> str:
  """The table of `workdirs`, one row per group of seeds (group_runs)."""
  runs = [load_workdir(w) for w in workdirs]
  cols = columns_for(runs, tasks, metrics)
  groups = group_runs(workdirs, runs)
  names = rows_for(workdirs, runs, groups)
  members = [[runs[i] for i in group] for group in groups]
  if as_json:
    rows = []
    for name, group, member_runs in zip(names, groups, members):
      row = {"run": name, "workdir": os.path.abspath(workdirs[group[0]]),
             "workdirs": [os.path.abspath(workdirs[i]) for i in group], "seeds": len(group),
             "protocol": protocol(member_runs[0])}
      for t, m, _ in cols:
        values = metric_values(member_runs, t, m)
        row[f"{t}/{m}"], row[f"{t}/{m} std"] = mean_std(values) if values else (None, None)
      rows.append(row)
    return json.dumps(rows, indent=1)
  rows = [[n, protocol(g[0]), str(len(g))] + [cell(m, metric_values(g, t, m)) for t, m, _ in cols]
          for n, g in zip(names, members)]
  return render(["run", "protocol", "seeds"] + [h for _, _, h in cols], rows, markdown)


def format_task_metrics(results: dict[str, dict], title: str = "") -> str:
  """One run's metrics, a line per task: what eval.py prints at the end."""
  lines = [title] if title else []
  for task, summary in results.items():
    cols = columns_for([{task: summary}], [task])
    cells = [f"{h} {fmt(m, summary['metrics'].get(m))}" for _, m, h in cols]
    lines.append(f"  {task:10s} " + "  ".join(cells) + f"   ({summary.get('wall_time_s', 0):.0f} s)")
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m bridgejax.evaluation.table", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("workdirs", nargs="+", help="run directories holding eval/<task>.json")
  p.add_argument("--tasks", default=None, help="comma-separated tasks to show (default: all present)")
  p.add_argument("--metrics", default=None, help="comma-separated metrics or headers to show")
  fmt_group = p.add_mutually_exclusive_group()
  fmt_group.add_argument("--markdown", action="store_true", help="a Markdown table")
  fmt_group.add_argument("--json", action="store_true", help="JSON rows of raw (0-1) values")
  a = p.parse_args(argv)
  split = lambda s: None if s is None else [x.strip() for x in s.split(",") if x.strip()]
  return print_or_fail(lambda: table(a.workdirs, tasks=split(a.tasks), metrics=split(a.metrics),
                                     markdown=a.markdown, as_json=a.json))


def print_or_fail(make: Callable[[], str]) -> int:
  """The tail of this CLI and of bridgejax.evaluation.report's: print what `make` returns (status 0),
  or, when an eval file is missing, the error on one line (status 2)."""
  try:
    print(make())
  except FileNotFoundError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
