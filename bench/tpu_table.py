"""Configs x TPU topologies x remat, compiled ahead of time (bench/tpu_compile.py), one JSON record a
cell, resumable; prints the markdown table.

    PYTHONPATH=.tpu python bench/tpu_table.py --out bench/tpu_runs \
        [--configs crossatt_k12,fromage] [--topologies v5e-8,v4-8] [--remat none,llm] [--no-max-batch]
    python bench/tpu_table.py --out bench/tpu_runs --table-only       # the table of what is recorded

A cell is one config on one topology with one remat: its train step compiled at the config's batch
(or the nearest multiple of what the mesh, the hosts and the concat trick's pairs need), then, with
max batch on, the largest batch whose step fits (tpu_compile's --max-batch). Each finished cell is
written to OUT/<config>__<topology>__remat-<r>.json and the table to OUT/table.md; a cell already
recorded is skipped, so the same command resumes where a stopped one left off (a cell that fails is
logged and not recorded: it is tried again next time). Cells run config by config, each over the
topologies in the order given, each with the remat settings in the order given.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tpu_compile import CHIPS, GIB, ROOT, report, topology_devices  # noqa: E402
from train_step import load_config  # noqa: E402

# Cloud TPU slice names -> (topology name, chips per host): one host each, as on Cloud (libtpu's own
# description of v5e:2x4 and v6e:2x4 splits the 8 chips over 2 hosts of 2x2)
TOPOLOGIES = {"v4-8": ("v4:2x2x1", None), "v5e-8": ("v5e:2x4", "2x4x1"), "v5p-8": ("v5p:2x2x1", None),
              "v6e-8": ("v6e:2x4", "2x4x1")}
FIRST = "crossatt_k12"  # the thesis's best model leads


def topology_spec(name: str) -> tuple[str, str | None]:
  """A Cloud name (v5e-8) or a topology name (v5e:4x4, libtpu's hosts) -> (topology, chips per host)."""
  return TOPOLOGIES.get(name, (name, None))


def default_configs() -> list[str]:
  from bridgejax.ablate import known_configs  # the experiments: configs/*.py but base and the demos
  return sorted(known_configs(os.path.join(ROOT, "configs")), key=lambda n: n != FIRST)


def config_spec(name: str) -> str:
  """NAME[:arg] -> configs/NAME.py[:arg]; a path stays as it is."""
  base, sep, arg = name.partition(":")
  return (base if "/" in base or base.endswith(".py") else f"configs/{base}.py") + sep + arg


def cell_path(out: str, config: str, topology: str, remat: str) -> str:
  base, _, arg = config.partition(":")
  stem = os.path.basename(base).removesuffix(".py") + (f"_{arg}" if arg else "")
  stem = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in stem)
  return os.path.join(out, f"{stem}__{topology.replace(':', '-')}__remat-{remat}.json")


def cell_batch(config, topology: str) -> int:
  """The config's batch, or the nearest multiple of what the topology's mesh needs (the smaller on a tie)."""
  from bridgejax.mesh import batch_multiple, mesh_shape

  devices = topology_devices(*topology_spec(topology))
  data = mesh_shape(config.mesh.data, config.mesh.model, len(devices))[0]
  multiple = batch_multiple(data, len({d.process_index for d in devices}), config.concat_prob > 0)
  below = config.batch_size // multiple * multiple
  return max(multiple, below if config.batch_size - below <= below + multiple - config.batch_size else below + multiple)


def run_cell(config_name: str, topology: str, remat: str, *, max_batch: bool, log) -> dict:
  config = load_config(config_spec(config_name))
  config.remat = remat
  batch = cell_batch(config, topology)
  start = time.time()
  name, chips_per_host = topology_spec(topology)
  out = report(config, name, chips_per_host=chips_per_host, batch_size=batch, text_len=config.data.max_caption_tokens,
               programs=("train",), max_batch=max_batch, log=log)
  out.update(cell={"config": config_name, "topology": topology, "remat": remat}, wall_s=round(time.time() - start),
             created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
  return out


def _gib_per_chip(r: dict | None) -> str:
  if r is None:
    return "…"
  train = r["programs"]["train"]
  if "error" in train:
    return "OOM"
  gib = train["total_bytes"] * r["devices"] / r["chips"] / GIB  # per device -> per chip
  return f"{gib:.3g}" + ("" if train["fits"] else " (no fit)")


def _ms(seconds: float) -> str:
  return f"{seconds * 1e3:.3g} ms"


def table(out: str, configs, topologies, remats) -> str:
  """The markdown table of the grid's recorded cells (… where a cell is not recorded yet)."""
  def load(c, t, r):
    path = cell_path(out, c, t, r)
    return json.load(open(path)) if os.path.exists(path) else None

  head = ["config", "TPU (HBM per chip)", "batch", *[f"GiB per chip, remat {r}" for r in remats],
          "largest batch that fits (" + " / ".join(f"remat {r}" for r in remats) + ")",
          "step at the bf16 peak", "at half the peak"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for c in configs:
    for t in topologies:
      cells = [load(c, t, r) for r in remats]
      any_ = next((x for x in cells if x), None)
      hbm = f" ({CHIPS[any_['device_kind']][1] // GIB} GiB)" if any_ else ""
      row = [c, f"{t}{hbm}", str(any_["batch"]) if any_ else "…", *map(_gib_per_chip, cells),
             " / ".join(str(x["max_batch"]) if x and "max_batch" in x else "…" for x in cells),
             _ms(any_["step_s_at_peak"]) if any_ else "…", _ms(any_["step_s_at_half_peak"]) if any_ else "…"]
      lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", required=True, help="the records' directory (resumes from what it holds)")
  p.add_argument("--configs", default=",".join(default_configs()),
                 help="config names (configs/NAME.py) or paths[:arg], comma-separated (default: every experiment, "
                      f"{FIRST} first)")
  p.add_argument("--topologies", default=",".join(TOPOLOGIES),
                 help=f"Cloud TPU names ({', '.join(f'{k} = {v[0]}' for k, v in TOPOLOGIES.items())}, one host each) "
                      "or topology names (libtpu's hosts)")
  p.add_argument("--remat", default="none,llm", help="remat settings, comma-separated")
  p.add_argument("--no-max-batch", dest="max_batch", action="store_false", help="skip the largest-batch search")
  p.add_argument("--table-only", action="store_true", help="print the table of the recorded cells, compile nothing")
  a = p.parse_args(argv)
  split = lambda s: [x.strip() for x in s.split(",") if x.strip()]
  configs, topologies, remats = split(a.configs), split(a.topologies), split(a.remat)
  os.makedirs(a.out, exist_ok=True)
  log = lambda line: print(line, flush=True)
  if not a.table_only:
    for c in configs:
      for t in topologies:
        for r in remats:
          path = cell_path(a.out, c, t, r)
          if os.path.exists(path):
            log(f"skip {c} on {t}, remat {r}: recorded in {path}")
            continue
          log(f"cell {c} on {t}, remat {r}")
          try:
            record = run_cell(c, t, r, max_batch=a.max_batch, log=lambda line: log(f"  {line}"))
          except (Exception, SystemExit) as e:  # the next cell still runs; this one is tried again next time
            log(f"  failed, not recorded: {type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}")
            continue
          with open(path + ".tmp", "w") as f:
            json.dump(record, f, indent=1)
          os.replace(path + ".tmp", path)  # a cell is recorded whole or not at all
          train = record["programs"]["train"]
          log(f"  recorded: batch {record['batch']}, " + (train.get("error") or f"{train['total_bytes'] / GIB:.2f} GiB "
              f"per device") + (f", largest batch {record['max_batch']}" if "max_batch" in record else "")
              + f" ({record['wall_s']} s)")
          with open(os.path.join(a.out, "table.md"), "w") as f:
            f.write(table(a.out, configs, topologies, remats) + "\n")
  print(table(a.out, configs, topologies, remats))


if __name__ == "__main__":
  main()
