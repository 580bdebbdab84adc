"""Compile a config's training and evaluation programs for a real TPU topology on any CPU, and report what fits.

    pip install --no-deps --target .tpu libtpu==0.0.42.1      # the TPU compiler (matches jax 0.10.2)
    PYTHONPATH=.tpu python bench/tpu_compile.py --config configs/crossatt_k12.py --topology v5e:2x4 \
        [--batch 176] [--remat llm] [--text-len 24] [--programs train,encode,caption,text] [--max-batch]
        [--hbm-gib 16] [--cpu-reference] [--json]

XLA's TPU compiler runs on this machine once libtpu is importable; jax.experimental.topologies gives
the devices of a real topology, and each program is lowered and compiled on a mesh of them: the
program a TPU VM would run. They are what train.py and eval.py run, reached through the same
functions: the abstract setup (bridgejax.experiment.build_abstract: the backbones' shapes from their
config.json or named architecture, frozen trees laid out by config.frozen_sharding), the jitted
train step (bridgejax.train.program.train_programs) and the evaluation engine's functions
(bridgejax.engine.Engine.programs); bench/tpu_programs.py says which and on what inputs. Nothing
is loaded or allocated.

Reported per program and device: XLA's memory analysis (temp, arguments, output; total = temp +
arguments + output - aliased) against the device's HBM (--hbm-gib overrides it), and whether it
fits (a program the compiler refuses for HBM does not); for the train step, its FLOPs counted
analytically (bench/train_step_flops.py's flops_per_step: XLA's cost model misses the TPU's GEMMs
and its optimal_seconds came out negative here), the step time they take at the chip's bf16 peak
and at 50% of it, and on a topology of several hosts the rows each process loads. --max-batch
finds the largest global batch whose train step fits (largest_fitting: one compile per try, each
printed on stderr). A compile of Gemma-2B + ViT-L/14 takes minutes on 2 cores.

Chips (Google Cloud TPU documentation, "TPU v4", "TPU v5e", "TPU v5p", "TPU v6e (Trillium)" system
architecture pages, read 2026-12): bf16 peak per chip and HBM per chip.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tpu_programs import PROGRAMS, TrainStep, compile_program, eval_programs, process_batches  # noqa: E402
from train_step import load_config  # noqa: E402
from train_step_flops import flops_per_step  # noqa: E402

GIB = 2**30
# device_kind -> (bf16 peak FLOP/s per chip, HBM bytes per chip)
CHIPS = {
    "TPU v4": (275e12, 32 * GIB),
    "TPU v5 lite": (197e12, 16 * GIB),  # v5e
    "TPU v5": (459e12, 95 * GIB),  # v5p
    "TPU v6 lite": (918e12, 32 * GIB),  # v6e, Trillium
}
EVAL_INPUTS = ("images", "visual_tokens", "prompt", "max_new_tokens", "num_beams", "text_ids")
LIBTPU = "pip install --no-deps --target .tpu libtpu==0.0.42.1 and run with PYTHONPATH=.tpu"


def topology_devices(name: str, chips_per_host: str | None = None):
  """The devices of a TPU topology ('v5e:2x4', 'v4:2x2x1', ...) without a TPU; chips_per_host ('2x4x1')
  sets how many chips each host has (libtpu's default puts v5e:2x4 and v6e:2x4 on 2 hosts of 2x2,
  where Cloud's v5litepod-8 and v6e-8 are one host)."""
  if importlib.util.find_spec("libtpu") is None:
    raise SystemExit(f"no libtpu: the TPU compiler is needed ({LIBTPU})")
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no metadata server off a TPU VM
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compile-only: no chip to guard from another process
  from jax.experimental import topologies
  hosts = {} if chips_per_host is None else {"chips_per_host_bounds": [int(n) for n in chips_per_host.split("x")]}
  return topologies.get_topology_desc(platform="tpu", topology_name=name, **hosts).devices


def train_compile(config, devices, *, batch_size: int, text_len: int) -> dict:
  """Compiles config's train step alone on a mesh of `devices` (the --cpu-reference figure)."""
  from bridgejax.experiment import build_abstract
  return TrainStep(build_abstract(config, devices)).compile(batch_size, text_len)


def largest_fitting(measure, hbm: int, multiple: int, start: int, limit: int = 1 << 16) -> int:
  """The largest multiple of `multiple` (up to `limit`) whose record measure(batch) fits (its "fits"),
  0 if none does; memory grows with the batch. Bisection between the largest batch that fits and the
  smallest that does not, each probe placed where a line through the measured total bytes meets
  `hbm` (rounded down, strictly inside the bracket; the midpoint where a total is missing: a program
  the compiler refused), so that a near-linear memory takes a few compiles, not log2 of the range."""
  records, top = {}, max(limit // multiple, 1)
  total = lambda j: records.get(j, {}).get("total_bytes")
  lo, hi, k = 0, None, min(max(start // multiple, 1), top)  # in units of `multiple`; lo fits (0 trivially)
  while hi is None or hi - lo > 1:
    records[k] = r = measure(k * multiple)
    if r["fits"]:
      lo = k
      if k == top:
        break
    else:
      hi = k
    if hi is None:  # all fit so far: extrapolate from the largest, its non-temp bytes held fixed
      grow = 2 * lo
      if r.get("temp_bytes"):
        grow = int(lo * (hbm - (r["total_bytes"] - r["temp_bytes"])) / r["temp_bytes"])
      k = min(max(grow, lo + 1), 8 * lo, top)
    elif hi - lo > 1:
      k = (lo + hi) // 2
      if lo and total(lo) and total(hi):
        k = lo + int((hbm - total(lo)) / (total(hi) - total(lo)) * (hi - lo))
      k = min(max(k, lo + 1), hi - 1)
  return lo * multiple


def report(config, topology: str, *, batch_size: int, text_len: int, programs=PROGRAMS, hbm_gib: float | None = None,
           max_batch: bool = False, chips_per_host: str | None = None, log=None) -> dict:
  """Compiles the `programs` on the topology: per program its memory per device against the HBM and
  the fit; the train step's analytic time; with max_batch, the largest batch whose train step fits."""
  from bridgejax.errors import UserError
  from bridgejax.experiment import build_abstract
  from bridgejax.mesh import batch_multiple
  from bridgejax.param_count import backbone_configs

  devices = topology_devices(topology, chips_per_host)
  kind = devices[0].device_kind
  if kind not in CHIPS:
    raise SystemExit(f"{topology}: device kind {kind!r} has no entry in CHIPS ({sorted(CHIPS)})")
  peak, hbm = CHIPS[kind]
  chips = math.prod(int(n) for n in topology.split(":")[1].split("x"))
  notes = []
  if len(devices) > chips:  # libtpu shows a v4 chip as its 2 TensorCores, which jax.make_mesh refuses
    devices = [d for d in devices if d.core_on_chip == 0]
    notes.append(f"compiled on TensorCore 0 of each chip: one device per chip, as a megacore {kind} VM has; its "
                 f"memory is the chip's program's, but the compiler refuses above one core's share of the HBM")
  hbm_device = int(hbm_gib * GIB) if hbm_gib else hbm
  setup = build_abstract(config, devices)
  processes = len({d.process_index for d in devices})
  out = {"config": config.get("name", ""), "topology": topology, "device_kind": kind, "chips": chips,
         **({"chips_per_host": chips_per_host} if chips_per_host else {}),
         "devices": len(devices), "mesh": dict(setup.mesh.shape), "processes": processes, "hbm_bytes": hbm_device,
         "batch": batch_size, "text_len": text_len, "remat": config.get("remat", "none"), "programs": {},
         **({"notes": notes} if notes else {})}
  fits = lambda r: "error" not in r and r["total_bytes"] <= hbm_device
  if "train" in programs:
    try:  # train.py's own check, and each process's rows as its loader reads them
      per_process = process_batches(setup, batch_size, text_len, processes)
    except UserError as e:
      raise SystemExit(f"error: {str(e).replace('--config.batch_size', '--batch')}") from None
    if processes > 1:
      out["per_process"] = per_process
    step, tried = TrainStep(setup), {}

    def measure(batch: int) -> dict:
      if batch not in tried:
        tried[batch] = r = step.compile(batch, text_len)
        r["fits"] = fits(r)
        if log and max_batch:
          log(f"batch {batch}: " + (r["error"] if "error" in r else f"{_size(r['total_bytes'])} per device")
              + f", {'fits' if r['fits'] else 'does not fit'} (compiled in {r['compile_s']:.0f} s)")
      return tried[batch]

    out["programs"]["train"] = measure(batch_size)
    vision, llm = backbone_configs(config)
    flops = flops_per_step(config, vision, llm, batch_size, text_len)
    out.update(flops=flops, step_s_at_peak=flops / (chips * peak), step_s_at_half_peak=2 * flops / (chips * peak))
    if max_batch:
      multiple = batch_multiple(setup.mesh.shape["data"], processes, config.concat_prob > 0)
      out["max_batch"] = largest_fitting(measure, hbm_device, multiple, batch_size)
  for name, (fn, args, inputs) in eval_programs(setup, programs).items():
    r = out["programs"][name] = {**inputs, **compile_program(fn, args, setup.mesh)}
    r["fits"] = fits(r)
  out["fits"] = all(r["fits"] for r in out["programs"].values())
  return out


def _size(b: int) -> str:
  return f"{b / GIB:.2f} GiB" if b >= GIB // 10 else f"{b / 2**20:.1f} MiB"


def format_table(r: dict) -> str:
  gib = _size
  lines = [f"{r['config']} on {r['topology']} ({r['chips']} chips, {r['devices']} devices of {r['device_kind']}, "
           f"{r['processes']} hosts), mesh {r['mesh']}, {gib(r['hbm_bytes'])} HBM per device"]
  for name, p in r["programs"].items():
    what = {"train": f"batch {r['batch']} x {r['text_len']} tokens, remat {r['remat']}"}.get(name) or ", ".join(
        f"{k} {'x'.join(map(str, v)) if isinstance(v, list) else v}" for k, v in p.items() if k in EVAL_INPUTS)
    lines.append(f"  {name} ({what}): " + (f"DOES NOT FIT: {p['error'].rstrip('.')}" if "error" in p else (
        f"temp {gib(p['temp_bytes'])} + arguments {gib(p['argument_bytes'])} + output {gib(p['output_bytes'])} - "
        f"aliased {gib(p['alias_bytes'])} = {gib(p['total_bytes'])} per device: "
        f"{'fits' if p['fits'] else 'DOES NOT FIT'}")) + f"; compiled in {p['compile_s']:.0f} s")
  if "flops" in r:
    lines.append(f"  train step: {r['flops'] / 1e12:.1f} TFLOP, {r['step_s_at_peak'] * 1e3:.0f} ms at the bf16 peak, "
                 f"{r['step_s_at_half_peak'] * 1e3:.0f} ms at half of it")
  if "per_process" in r:
    pp = r["per_process"]
    first = ", ".join(f"{a}:{b}" for a, b in pp["row_ranges"][0])
    lines.append(f"  each of {pp['processes']} processes loads {pp['rows']} rows (its loader's batch: "
                 + ", ".join(f"{k} {'x'.join(map(str, v))}" for k, v in pp["inputs"].items())
                 + f"); process 0's go to rows {first} of the global batch")
  if "max_batch" in r:
    lines.append(f"  largest train batch that fits: {r['max_batch']}")
  lines += [f"  note: {n}" for n in r.get("notes", [])]
  if "cpu_total_bytes" in r:
    lines.append(f"  the same step on one CPU device at the per-device batch: {gib(r['cpu_total_bytes'])}")
  return "\n".join(lines)


def parse_programs(text: str) -> tuple[str, ...]:
  names = tuple(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
  unknown = [n for n in names if n not in PROGRAMS]
  if unknown or not names:
    raise argparse.ArgumentTypeError(f"unknown program(s) {unknown or text!r}; choose from {','.join(PROGRAMS)}")
  return names


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", required=True, help="configs/X.py[:arg]")
  p.add_argument("--topology", default="v5e:2x2", help="a TPU topology name: v4:2x2x1, v5e:2x4, v5p:2x2x1, v6e:2x4, ...")
  p.add_argument("--chips-per-host", default=None, metavar="AxBxC",
                 help="chips per host (default: libtpu's, which splits v5e:2x4 and v6e:2x4 over 2 hosts; Cloud's "
                      "v5litepod-8 and v6e-8 are one host: 2x4x1)")
  p.add_argument("--batch", type=int, default=None, help="global batch (default: the config's batch_size)")
  p.add_argument("--text-len", type=int, default=None, help="caption tokens (default: data.max_caption_tokens)")
  p.add_argument("--remat", choices=("none", "llm", "all"), default=None, help="default: the config's")
  p.add_argument("--programs", type=parse_programs, default=PROGRAMS,
                 help=f"which programs to compile, comma-separated (default: all, {','.join(PROGRAMS)})")
  p.add_argument("--max-batch", action="store_true",
                 help="also find the largest global batch whose train step fits (one compile per try)")
  p.add_argument("--hbm-gib", type=float, default=None, help="HBM per device to fit into (default: the chip's)")
  p.add_argument("--cpu-reference", action="store_true",
                 help="also compile on one CPU device at the per-device batch (bench/train_step.py --memory-only's "
                      "figure), for comparison")
  p.add_argument("--json", action="store_true", help="print one JSON object")
  a = p.parse_args(argv)
  if (a.max_batch or a.cpu_reference) and "train" not in a.programs:
    p.error("--max-batch and --cpu-reference need the train program (--programs train,...)")
  config = load_config(a.config)
  if a.remat:
    config.remat = a.remat
  batch, text_len = a.batch or config.batch_size, a.text_len or config.data.max_caption_tokens
  log = lambda line: print(line, file=sys.stderr, flush=True)  # progress; stdout keeps the result
  result = report(config, a.topology, batch_size=batch, text_len=text_len, programs=a.programs, hbm_gib=a.hbm_gib,
                  max_batch=a.max_batch, chips_per_host=a.chips_per_host, log=log)
  if a.cpu_reference:
    import jax
    config.mesh.data, config.mesh.model = 1, 1
    cpu = train_compile(config, jax.devices("cpu")[:1], batch_size=batch // result["mesh"]["data"], text_len=text_len)
    result["cpu_total_bytes"] = cpu["total_bytes"]
  print(json.dumps(result) if a.json else format_table(result))
  return result


if __name__ == "__main__":
  main()
