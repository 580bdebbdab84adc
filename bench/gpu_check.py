"""The prepared accelerator check: train-step speed and memory at real size, and decoding.

    python bench/gpu_check.py                 # on the GPU machine: at most ~8 minutes, a table last
    BENCH_TINY=1 python bench/gpu_check.py    # anywhere: the same items at toy sizes (tests this script)

Items, each its own process (so that each peak is its own), in priority order; an item starts
only while BENCH_BUDGET_S (default 480) seconds have not passed, and the table says what was skipped:
  1. fromage, batch 180, 24-token captions, ViT-L/14 + Gemma-2B, concat_prob 0, with the
     transformers eager peer, and the bf16 GEMM rate every item's utilisation is measured against;
  2. crossatt_k12, the same; 3-4. both again with config.remat="llm";
  5. greedy decoding at Gemma-2B shapes, batch 1 and 8 (bench/decode_random.py, with its peer);
  6. crossatt_k12 with concat_prob 0.5 (the concat trick's memory).
Each item's JSON goes to $OUT/gpu_check.json when $OUT is set, and to stdout.

The configs need ml_collections, which the device machine lacks. Carry this checkout's copy (pure
Python; its absl-py and PyYAML are there), and give the command time past the budget:
  run(command="python bench/gpu_check.py", timeout_s=560,
      carry=[".venv/lib/python3.11/site-packages/ml_collections"])
A carried copy found there is put on the subprocesses' path (that package alone, not the venv).
"""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.environ.get("BENCH_TINY", "") not in ("", "0")
BUDGET_S = float(os.environ.get("BENCH_BUDGET_S", 480))


def carried_ml_collections(env: dict) -> None:
  """Puts a carried ml_collections (see the docstring) on the subprocesses' PYTHONPATH."""
  try:
    import ml_collections  # noqa: F401
    return
  except ImportError:
    pass
  found = sorted(glob.glob(os.path.join(ROOT, ".venv", "lib", "python3*", "site-packages", "ml_collections")))
  if not found:
    raise SystemExit("ml_collections is not installed and no carried copy is in .venv/lib/python3*/site-packages: "
                     "carry it (see bench/gpu_check.py's docstring) or pip install ml_collections")
  shim = tempfile.mkdtemp(prefix="bench_path_")
  os.symlink(found[-1], os.path.join(shim, "ml_collections"))  # only this package, not the venv's jax
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [shim, ROOT, env.get("PYTHONPATH")]))


def train_items() -> list[tuple[str, list[str]]]:
  shape = (["--size", "reduced", "--batch-size", "4", "--text-len", "8", "--warmup", "1", "--steps", "2"] if TINY
           else ["--size", "real", "--batch-size", "180", "--text-len", "24", "--warmup", "2", "--steps", "5"])
  item = lambda config, *extra: [sys.executable, "bench/train_step.py", "--config", f"configs/{config}.py",
                                 "--json", *shape, *extra]
  return [
      ("fromage", item("fromage", "--concat-prob", "0", "--peer")),
      ("crossatt_k12", item("crossatt_k12", "--concat-prob", "0", "--no-matmul")),
      ("fromage remat=llm", item("fromage", "--concat-prob", "0", "--remat", "llm", "--no-matmul")),
      ("crossatt_k12 remat=llm", item("crossatt_k12", "--concat-prob", "0", "--remat", "llm", "--no-matmul")),
      ("decode", [sys.executable, "bench/decode_random.py", "--json", "--peer", "--batch", "1", "8", *(
          ["--size", "reduced", "--new-tokens", "8", "--repeats", "1"] if TINY else ["--size", "real"])]),
      ("crossatt_k12 concat=0.5", item("crossatt_k12", "--concat-prob", "0.5", "--no-matmul")),
  ]


def failure(stderr: str) -> str:
  for marker in ("RESOURCE_EXHAUSTED", "Out of memory", "OutOfMemoryError"):
    if marker in stderr:
      return f"failed: {marker}"
  lines = [line for line in stderr.strip().splitlines() if line.strip()]
  return "failed: " + (lines[-1][:120] if lines else "no output")


def gib(x) -> str:
  return "-" if x is None else f"{x / 2**30:.1f}"


def table(results: list[dict], start: float) -> str:
  first = next((r for r in results if "jax" in r), {})
  rate = first.get("matmul_bf16_flops_per_s")
  get = lambda key: first.get(key, "?")
  lines = [f"bridgejax accelerator check ({'TINY: toy sizes' if TINY else 'real size'}): {get('device_kind')}, "
           f"jax {get('jax')}, torch {get('torch')}, transformers {get('transformers')}, "
           f"{time.perf_counter() - start:.0f} s",
           f"bf16 GEMM rate: {rate / 1e12:.1f} TFLOP/s" if rate else "bf16 GEMM rate: not measured",
           f"{'item':26s} {'step s':>8s} {'samp/s':>8s} {'compile':>8s} {'temp GiB':>8s} {'peak GiB':>8s} "
           f"{'TFLOP':>7s} {'TFLOP/s':>8s} {'util':>6s}  peer"]
  for r in results:
    name = r["item"]
    if "status" in r:
      lines.append(f"{name:26s} {r['status']}")
    elif name == "decode":
      for row in r["rows"]:
        lines.append(f"{'decode ' + row['impl']:40s} batch {row['batch']:2d}: {row['tokens_per_s']:9.1f} tokens/s")
    else:
      tflops = r["flops_per_step"] / 1e12
      util = f"{100 * r['flops_per_s'] / rate:5.1f}%" if rate else "-"
      peer = (f"{r['peer_step_s']:.3f} s, {r['peer_samples_per_s']:.0f}/s, peak {gib(r['peer_peak_bytes'])} GiB, "
              f"speedup {r['speedup']:.2f}x") if "peer_step_s" in r else ""
      lines.append(f"{name:26s} {r['step_s']:8.4f} {r['samples_per_s']:8.1f} {r['compile_s']:8.1f} "
                   f"{gib(r['temp_bytes']):>8s} {gib(r['peak_bytes']):>8s} {tflops:7.2f} "
                   f"{r['flops_per_s'] / 1e12:8.1f} {util:>6s}  {peer}")
  return "\n".join(lines)


def main() -> None:
  start = time.perf_counter()
  env = dict(os.environ)
  carried_ml_collections(env)
  results = []
  for name, command in train_items():
    left = BUDGET_S - (time.perf_counter() - start)
    if left < 45:
      results.append({"item": name, "status": f"skipped: {BUDGET_S:.0f} s budget spent"})
      continue
    print(f"[{time.perf_counter() - start:5.0f} s] {name}: {' '.join(command[1:])}", flush=True)
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env,
                            start_new_session=True)  # its own group: a peer worker is stopped with it
    try:
      stdout, stderr = proc.communicate(timeout=left)
    except subprocess.TimeoutExpired:
      os.killpg(proc.pid, signal.SIGKILL)
      proc.communicate()
      results.append({"item": name, "status": f"stopped after {left:.0f} s (budget)"})
      continue
    if proc.returncode:
      print(stderr[-2000:], flush=True)
      results.append({"item": name, "status": failure(stderr)})
      continue
    result = {"item": name, **json.loads(stdout.strip().splitlines()[-1])}
    print(json.dumps(result), flush=True)
    results.append(result)
  if os.environ.get("OUT"):
    with open(os.path.join(os.environ["OUT"], "gpu_check.json"), "w") as f:
      json.dump(results, f, indent=1)
  print(table(results, start))


if __name__ == "__main__":
  main()
