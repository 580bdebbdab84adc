"""Compile the training step of a config for a real TPU topology on any CPU, and report what fits.

    pip install --no-deps --target .tpu libtpu==0.0.42.1      # the TPU compiler (matches jax 0.10.2)
    PYTHONPATH=.tpu python bench/tpu_compile.py --config configs/crossatt_k12.py --topology v5e:2x4 \
        [--batch 176] [--remat llm] [--text-len 24] [--json]

XLA's TPU compiler runs on this machine once libtpu is importable; jax.experimental.topologies gives
the devices of a real topology, and the step is lowered and compiled on a mesh of them: the program
a TPU VM would run. It is what train.py runs, reached through the same functions: the abstract setup
(bridgejax.experiment.build_abstract: the backbones' shapes from their config.json or named
architecture, frozen trees laid out by config.frozen_sharding) and the jitted programs
(bridgejax.train.program.train_programs). Nothing is loaded or allocated.

Reported per device: XLA's memory analysis (temp, arguments, output; total = temp + arguments +
output - aliased) against the device's HBM, and whether it fits; the step's FLOPs counted
analytically (bench/train_step_flops.py's flops_per_step: XLA's cost model misses the TPU's GEMMs and its
optimal_seconds came out negative here) and the step time they take at the chip's bf16 peak and at
50% of it. A compile of Gemma-2B + ViT-L/14 takes minutes on 2 cores.

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
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_step import load_config, memory_fields  # noqa: E402
from train_step_flops import flops_per_step  # noqa: E402

GIB = 2**30
# device_kind -> (bf16 peak FLOP/s per chip, HBM bytes per chip)
CHIPS = {
    "TPU v4": (275e12, 32 * GIB),
    "TPU v5 lite": (197e12, 16 * GIB),  # v5e
    "TPU v5": (459e12, 95 * GIB),  # v5p
    "TPU v6 lite": (918e12, 32 * GIB),  # v6e, Trillium
}
LIBTPU = "pip install --no-deps --target .tpu libtpu==0.0.42.1 and run with PYTHONPATH=.tpu"


def topology_devices(name: str):
  """The devices of a TPU topology ('v5e:2x4', 'v4:2x2x1', ...) without a TPU."""
  if importlib.util.find_spec("libtpu") is None:
    raise SystemExit(f"no libtpu: the TPU compiler is needed ({LIBTPU})")
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no metadata server off a TPU VM
  from jax.experimental import topologies
  return topologies.get_topology_desc(platform="tpu", topology_name=name).devices


def compile_step(config, devices, *, batch_size: int, text_len: int) -> dict:
  """Lowers and compiles config's train step on a mesh of `devices`: memory per device, compile time."""
  import jax
  import jax.numpy as jnp

  from bridgejax.experiment import build_abstract
  from bridgejax.mesh import batch_size_problem, replicated
  from bridgejax.train.optimizer import make_optimizer
  from bridgejax.train.program import abstract_batch, train_programs

  setup = build_abstract(config, devices)
  data = setup.mesh.shape["data"]
  processes = len({d.process_index for d in devices})
  problem = batch_size_problem(batch_size, data, processes, even=config.concat_prob > 0)  # train.py's own check
  if problem:
    raise SystemExit(f"error: {problem.replace('--config.batch_size', '--batch')}")
  init, step = train_programs(setup, make_optimizer(config.optim))
  on_mesh = lambda tree: jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated(setup.mesh)), tree)
  state = on_mesh(jax.eval_shape(init, jax.random.key(0), setup.frozen))
  ret_norm = jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated(setup.mesh))
  start = time.perf_counter()
  with jax.set_mesh(setup.mesh):
    compiled = step.lower(state, setup.frozen, abstract_batch(setup, batch_size, text_len), ret_norm).compile()
  out = memory_fields(compiled)
  out["total_bytes"] = out["temp_bytes"] + out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"]
  out.update(compile_s=round(time.perf_counter() - start, 1), devices=len(devices), mesh=dict(setup.mesh.shape),
             processes=processes)
  return out


def report(config, topology: str, *, batch_size: int, text_len: int) -> dict:
  """compile_step on the topology, with the HBM, the fit and the analytic step time."""
  from bridgejax.param_count import backbone_configs

  devices = topology_devices(topology)
  kind = devices[0].device_kind
  if kind not in CHIPS:
    raise SystemExit(f"{topology}: device kind {kind!r} has no entry in CHIPS ({sorted(CHIPS)})")
  peak, hbm = CHIPS[kind]
  chips = math.prod(int(n) for n in topology.split(":")[1].split("x"))
  per_chip = len(devices) // chips  # devices a chip shows (a v4 chip's two TensorCores, when split)
  out = {"config": config.get("name", ""), "topology": topology, "device_kind": kind, "chips": chips,
         "batch": batch_size, "text_len": text_len, "remat": config.get("remat", "none"),
         **compile_step(config, devices, batch_size=batch_size, text_len=text_len)}
  hbm_device = hbm // per_chip
  vision, llm = backbone_configs(config)
  flops = flops_per_step(config, vision, llm, batch_size, text_len)
  out.update(hbm_bytes=hbm_device, fits=out["total_bytes"] <= hbm_device, flops=flops,
             step_s_at_peak=flops / (chips * peak), step_s_at_half_peak=2 * flops / (chips * peak))
  return out


def _size(b: int) -> str:
  return f"{b / GIB:.2f} GiB" if b >= GIB // 10 else f"{b / 2**20:.1f} MiB"


def format_table(r: dict) -> str:
  gib = _size
  return "\n".join([
      f"{r['config']} on {r['topology']} ({r['chips']} chips, {r['devices']} devices of {r['device_kind']}, "
      f"{r['processes']} hosts), batch {r['batch']} x {r['text_len']} tokens, remat {r['remat']}",
      f"  per device: temp {gib(r['temp_bytes'])} + arguments {gib(r['argument_bytes'])} + output "
      f"{gib(r['output_bytes'])} - aliased {gib(r['alias_bytes'])} = {gib(r['total_bytes'])} of "
      f"{gib(r['hbm_bytes'])} HBM: {'fits' if r['fits'] else 'DOES NOT FIT'}",
      f"  step: {r['flops'] / 1e12:.1f} TFLOP, {r['step_s_at_peak'] * 1e3:.0f} ms at the bf16 peak, "
      f"{r['step_s_at_half_peak'] * 1e3:.0f} ms at half of it; compiled in {r['compile_s']:.0f} s"]
      + ([f"  the same step on one CPU device at the per-device batch: {gib(r['cpu_total_bytes'])}"]
         if "cpu_total_bytes" in r else []))


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", required=True, help="configs/X.py[:arg]")
  p.add_argument("--topology", default="v5e:2x2", help="a TPU topology name: v4:2x2x1, v5e:2x4, v5p:2x2x1, v6e:2x4, ...")
  p.add_argument("--batch", type=int, default=None, help="global batch (default: the config's batch_size)")
  p.add_argument("--text-len", type=int, default=None, help="caption tokens (default: data.max_caption_tokens)")
  p.add_argument("--remat", choices=("none", "llm", "all"), default=None, help="default: the config's")
  p.add_argument("--cpu-reference", action="store_true",
                 help="also compile on one CPU device at the per-device batch (bench/train_step.py --memory-only's "
                      "figure), for comparison")
  p.add_argument("--json", action="store_true", help="print one JSON object")
  a = p.parse_args(argv)
  config = load_config(a.config)
  if a.remat:
    config.remat = a.remat
  batch, text_len = a.batch or config.batch_size, a.text_len or config.data.max_caption_tokens
  result = report(config, a.topology, batch_size=batch, text_len=text_len)
  if a.cpu_reference:
    import jax
    config.mesh.data, config.mesh.model = 1, 1
    cpu = compile_step(config, jax.devices("cpu")[:1], batch_size=batch // result["mesh"]["data"], text_len=text_len)
    result["cpu_total_bytes"] = cpu["total_bytes"]
  print(json.dumps(result) if a.json else format_table(result))
  return result


if __name__ == "__main__":
  main()
