"""Train-step speed and memory of any config, with random weights made in memory (no files).

    python bench/train_step.py --config configs/fromage.py --size real [--batch-size 180] [--peer] [--json]
    python bench/train_step.py --config configs/crossatt.py:layer=-2,k=8 --size real --memory-only
    python bench/train_step.py --config configs/demo.py --steps 5 --json          # reduced, CPU-sized

It builds the config's model with `BridgeModel.create` in the config's compute dtype, makes random
frozen weights (uniform, std 0.02) on the first device once, stored in `frozen_param_dtype`, jits
the real `make_train_step` with donated state as training does, and feeds one random batch of
fixed shape, also placed once (the data pipeline is not timed). It reports:
  * step_s: the median of --steps steps after --warmup steps; compile_s separately;
  * samples_per_s = batch_size / step_s;
  * temp/argument/output bytes from XLA's memory analysis of the compiled step, and peak_bytes,
    the device's peak_bytes_in_use over the whole process (null where the backend has no stats);
  * residual_bytes: what the backward keeps from the forward, read from the traced program
    (before fusion: an upper bound, but it shows config.remat's saving on any backend);
  * flops_per_step (analytic, bench/train_step_flops.py), the achieved FLOP/s, and utilisation
    against a bf16 GEMM rate measured on the same device in the same run.
--memory-only compiles from abstract inputs (jax.ShapeDtypeStruct) and reports the memory
analysis without allocating or running anything: real-size memory figures on a CPU.

Sizes: --size real takes CLIP and Gemma shapes from the config's `arch` names (ViT-L/14 and
Gemma-2B in the thesis configs); --size reduced (the default on CPU) keeps a backbone whose
config.json exists at its path (the demo's toy backbones) and otherwise uses the toy backbones'
sizes.

--peer runs the same recipe in transformers eager PyTorch in a subprocess, first (JAX would
hold the accelerator's memory): CLIPVisionModel + GemmaForCausalLM with random weights and the same
shapes, frozen; a trainable Linear from the bridge's CLIP feature (the CLS of its layer, post-LN if
the bridge uses it) to k tokens (non-linear bridges are replaced by this linear one with the same
k, and the output says so); a trainable [RET] row and the W_t / W_i heads; captioning and text
cross-entropy plus InfoNCE; AdamW with clipping. It has no concat trick (peer_concat: false). On
a GPU it runs on CUDA in the compute dtype with SDPA attention.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.dirname(os.path.abspath(__file__))
if BENCH not in sys.path:
  sys.path.insert(0, BENCH)  # its helpers beside it (bench/ is not a package), also when loaded from its path

from train_step_flops import flops_breakdown  # noqa: E402
from train_step_model import backbone_sizes, build_model, frozen_init, random_batch, random_frozen  # noqa: E402
from train_step_peer import peer_spec, peer_worker  # noqa: E402


# ---------------------------------------------------------------------------------------- config


def load_config(spec: str):
  """'configs/x.py[:arg]' -> its get_config(arg), as train.py loads it (bridgejax.cli.load_config_file)."""
  if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # configs import `configs.base` and `bridgejax`
  from bridgejax.cli import load_config_file  # lazy: after ROOT is on sys.path, like every bridgejax import here
  from bridgejax.errors import UserError
  try:
    return load_config_file(spec)
  except UserError as e:
    raise SystemExit(f"--config {spec}: {e}") from None


# ------------------------------------------------------------------------------------- the bench


def matmul_rate(n: int, repeats: int = 5) -> float:
  """FLOP/s of an (n, n) x (n, n) bf16 GEMM on the default device (best of `repeats` bursts)."""
  import jax
  import jax.numpy as jnp

  a, b = (jax.random.normal(jax.random.key(i), (n, n), jnp.bfloat16) for i in (1, 2))
  f = jax.jit(jnp.matmul)
  f(a, b).block_until_ready()
  start = time.perf_counter()
  f(a, b).block_until_ready()
  calls = max(1, min(200, int(0.05 / max(time.perf_counter() - start, 1e-6))))  # ~50 ms per burst
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(calls):
      out = f(a, b)
    out.block_until_ready()
    best = min(best, (time.perf_counter() - start) / calls)
  return 2 * n**3 / best


def memory_fields(compiled) -> dict:
  analysis = compiled.memory_analysis()
  get = lambda name: None if analysis is None else int(getattr(analysis, name))
  return {"temp_bytes": get("temp_size_in_bytes"), "argument_bytes": get("argument_size_in_bytes"),
          "output_bytes": get("output_size_in_bytes"), "alias_bytes": get("alias_size_in_bytes")}


def residual_bytes(model, params, frozen, batch) -> int:
  """Bytes the backward pass keeps from the forward: the residuals of jax.vjp of model.loss with
  respect to the trainable params, frozen weights and the batch excluded (they are held anyway).
  Read from the traced program before XLA fuses anything, so it is backend-independent and
  overstates what a compiler keeps, but it shows what config.remat saves on any machine (XLA's
  CPU compiler drops remat's recomputation, so the CPU's temp buffer does not)."""
  import jax

  rng = jax.random.key(0)
  traced, shapes = jax.make_jaxpr(lambda p, f, b: jax.vjp(lambda q: model.loss(q, f, b, rng)[0], p),
                                  return_shape=True)(params, frozen, batch)
  jaxpr = traced.jaxpr
  count = len(jax.tree.leaves(shapes[1]))
  held = set(jaxpr.invars) | set(jaxpr.constvars)
  saved = {v for v in jaxpr.outvars[len(jaxpr.outvars) - count:] if not hasattr(v, "val") and v not in held}
  return sum(v.aval.size * v.aval.dtype.itemsize for v in saved)  # hasattr "val": a literal


def peak_bytes():
  import jax

  stats = jax.devices()[0].memory_stats()
  return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def benchmark(config, vision, llm, *, batch_size: int, text_len: int, warmup: int = 2, steps: int = 5,
              memory_only: bool = False, seed: int = 0) -> dict:
  """Compiles and times the config's train step on the first device; returns the result fields."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from bridgejax.heads import frozen_row_norm
  from bridgejax.train.optimizer import make_optimizer
  from bridgejax.train.step import TrainState, make_train_step

  if config.concat_prob > 0 and batch_size % 2:
    raise SystemExit(f"batch size {batch_size} must be even for the concat trick (or --concat-prob 0)")
  model = build_model(config, vision, llm)
  optimizer = make_optimizer(config.optim)
  step_fn = jax.jit(make_train_step(model, optimizer, seed=config.seed, rescale_ret=config.ret.rescale_row),
                    donate_argnums=(0,))
  make_state = lambda key, f: TrainState.create(model.init_trainable(key, f), optimizer)
  batch = random_batch(seed, batch_size, text_len, vision, llm)
  abstract = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
  frozen_abs = jax.eval_shape(frozen_init(model), jax.random.key(0))
  state = jax.eval_shape(make_state, jax.random.key(0), frozen_abs)
  result = {"residual_bytes": residual_bytes(model, state.params, frozen_abs, abstract(batch))}
  if memory_only:
    start = time.perf_counter()
    compiled = step_fn.lower(state, frozen_abs, abstract(batch), jax.ShapeDtypeStruct((), jnp.float32)).compile()
    result.update(compile_s=time.perf_counter() - start, step_s=None, samples_per_s=None, **memory_fields(compiled))
    return result

  frozen = random_frozen(model, seed)
  state = jax.jit(make_state)(jax.random.key(seed), frozen)
  ret_norm = jax.jit(frozen_row_norm)(frozen)
  batch = jax.device_put(batch)  # placed once, like the frozen weights: the step alone is timed
  jax.block_until_ready((frozen, state, batch))
  start = time.perf_counter()
  compiled = step_fn.lower(state, frozen, batch, ret_norm).compile()
  result["compile_s"] = time.perf_counter() - start
  result.update(memory_fields(compiled))
  times = []
  for i in range(warmup + steps):
    start = time.perf_counter()
    state, metrics = compiled(state, frozen, batch, ret_norm)
    jax.block_until_ready((state, metrics))
    if i >= warmup:
      times.append(time.perf_counter() - start)
  step_s = statistics.median(times)
  result.update(step_s=step_s, step_s_all=times, samples_per_s=batch_size / step_s,
                loss=float(np.asarray(metrics["loss"])), peak_bytes=peak_bytes())
  return result


# ------------------------------------------------------------------------------------------ peer


def run_peer(spec: dict, timeout: float = 1800) -> dict:
  """The torch recipe in a subprocess (torch and JAX never share a process)."""
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--peer-worker"], input=json.dumps(spec),
                        capture_output=True, text=True, timeout=timeout, cwd=ROOT)
  if proc.returncode:
    raise SystemExit(f"the torch peer failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------- CLI


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", help="configs/*.py[:args], as train.py takes it")
  parser.add_argument("--size", choices=("real", "reduced"), help="default: reduced on CPU, real elsewhere")
  parser.add_argument("--batch-size", type=int, help="default: the config's batch_size")
  parser.add_argument("--text-len", type=int, help="default: the config's data.max_caption_tokens")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--remat", choices=("none", "llm", "all"), help="sets config.remat")
  parser.add_argument("--concat-prob", type=float, help="sets config.concat_prob")
  parser.add_argument("--memory-only", action="store_true", help="compile from shapes and report memory only")
  parser.add_argument("--peer", action="store_true", help="also time transformers eager torch, same recipe")
  parser.add_argument("--no-matmul", action="store_true", help="skip measuring the bf16 GEMM rate")
  parser.add_argument("--json", action="store_true", help="print one JSON object")
  parser.add_argument("--peer-worker", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if not args.peer_worker and not args.config:
    parser.error("--config is required")
  if args.memory_only and args.peer:
    parser.error("--memory-only runs nothing: it cannot time a --peer")
  return args


def default_backend() -> str:
  """The JAX backend, probed in a subprocess so that this process leaves the accelerator to the peer."""
  out = subprocess.run([sys.executable, "-c", "import jax; print(jax.default_backend())"], capture_output=True,
                       text=True, check=True)
  return out.stdout.strip().splitlines()[-1]


def configure(args):
  """The config with the command line's overrides; whether this checkout's model has remat."""
  import contextlib
  import dataclasses

  from bridgejax.model import BridgeModel

  config = load_config(args.config)
  has_remat = "remat" in {f.name for f in dataclasses.fields(BridgeModel)}
  with config.unlocked() if hasattr(config, "unlocked") else contextlib.nullcontext():
    if args.remat is not None:
      config.remat = args.remat
    if args.concat_prob is not None:
      config.concat_prob = args.concat_prob
  return config, has_remat


def versions() -> dict:
  import flax
  import jax
  import jaxlib
  import optax

  return {"python": platform.python_version(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
          "flax": flax.__version__, "optax": optax.__version__}


def run(args) -> dict:
  config, has_remat = configure(args)
  size = args.size
  if size is None:  # with --peer, JAX must not touch the accelerator before the peer has run
    backend = default_backend() if args.peer else _backend_in_process()
    size = "reduced" if backend == "cpu" else "real"
  vision, llm = backbone_sizes(config, size)
  batch_size = args.batch_size or config.batch_size
  text_len = args.text_len or config.data.max_caption_tokens
  flops = flops_breakdown(config, vision, llm, batch_size, text_len)
  result = {"config": config.name, "config_arg": args.config, "size": size, "batch_size": batch_size,
            "text_len": text_len, "k": flops["k"], "concat_prob": float(config.concat_prob),
            "remat": config.get("remat", "none"), "compute_dtype": config.compute_dtype,
            "frozen_param_dtype": config.frozen_param_dtype, "bridge": config.bridge.to_dict(),
            "vision": f"{vision.num_layers} layers, width {vision.hidden_size}, {vision.num_tokens} tokens",
            "llm": f"{llm.num_layers} layers, width {llm.hidden_size}, vocab {llm.vocab_size}",
            "flops_per_step": flops["total"], "flops_by_part": flops["step"]}
  if args.remat not in (None, "none") and not has_remat:
    result["note"] = "this checkout's BridgeModel has no remat: --remat was ignored"
  if args.peer:  # first: JAX has not touched the accelerator yet
    result.update(run_peer(peer_spec(config, vision, llm, flops["k"], batch_size=batch_size, text_len=text_len,
                                     warmup=args.warmup, steps=args.steps)))
  import jax

  device = jax.devices()[0]
  result.update(backend=jax.default_backend(), device_kind=device.device_kind, devices=jax.device_count(),
                **versions())
  result.update(benchmark(config, vision, llm, batch_size=batch_size, text_len=text_len, warmup=args.warmup,
                          steps=args.steps, memory_only=args.memory_only))
  if args.memory_only:
    result.update(peak_bytes=None)
    return result
  result["flops_per_s"] = flops["total"] / result["step_s"]
  if not args.no_matmul:
    n = 512 if result["backend"] == "cpu" else 8192
    rate = matmul_rate(n)
    result.update(matmul_bf16_n=n, matmul_bf16_flops_per_s=rate, utilisation=result["flops_per_s"] / rate)
  if args.peer:
    result["speedup"] = result["peer_step_s"] / result["step_s"]
  return result


def _backend_in_process() -> str:
  import jax

  return jax.default_backend()


def _bytes(x):
  if x is None:
    return "n/a"
  return f"{x / 2**30:.2f} GiB" if x >= 2**30 else f"{x / 2**20:.1f} MiB"


def _flops(x, unit=""):
  scale, prefix = next((s, p) for s, p in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1, "")) if x >= s or s == 1)
  return f"{x / scale:.3g} {prefix}FLOP{unit}"


def format_table(r: dict) -> str:
  lines = [f"{r['config']} ({r['size']} size: vision {r['vision']}; llm {r['llm']})",
           f"  batch {r['batch_size']}, text {r['text_len']} tokens, k={r['k']}, concat_prob {r['concat_prob']}, "
           f"remat {r['remat']}, {r['compute_dtype']} compute; {r['backend']} {r['device_kind']}, jax {r['jax']}"]
  row = lambda name, value: lines.append(f"  {name:28s} {value}")
  if r.get("step_s") is not None:
    row("step", f"{r['step_s']:.4f} s (median of {len(r['step_s_all'])})")
    row("samples/s", f"{r['samples_per_s']:.1f}")
  row("compile", f"{r['compile_s']:.1f} s")
  row("XLA temp / argument / output", f"{_bytes(r['temp_bytes'])} / {_bytes(r['argument_bytes'])} / "
      f"{_bytes(r['output_bytes'])}")
  row("device peak", _bytes(r.get("peak_bytes")))
  row("backward residuals (traced)", _bytes(r.get("residual_bytes")))
  row("FLOPs per step (analytic)", _flops(r["flops_per_step"]))
  if "utilisation" in r:
    row("achieved", _flops(r["flops_per_s"], "/s"))
    row(f"bf16 GEMM rate (n={r['matmul_bf16_n']})", _flops(r["matmul_bf16_flops_per_s"], "/s"))
    row("utilisation", f"{100 * r['utilisation']:.1f}%")
  if "peer_step_s" in r:
    row("peer (transformers eager)", f"{r['peer_step_s']:.4f} s, {r['peer_samples_per_s']:.1f} samples/s, "
        f"peak {_bytes(r['peer_peak_bytes'])}, bridge {r['peer_bridge']}, no concat trick")
    row("speedup (peer / bridgejax)", f"{r['speedup']:.2f}x")
  if "note" in r:
    lines.append(f"  note: {r['note']}")
  return "\n".join(lines)


def main(argv=None) -> dict | None:
  args = parse_args(argv)
  if args.peer_worker:
    print(json.dumps(peer_worker(json.loads(sys.stdin.read()))))
    return None
  result = run(args)
  print(json.dumps(result) if args.json else format_table(result))
  return result


if __name__ == "__main__":
  main()
