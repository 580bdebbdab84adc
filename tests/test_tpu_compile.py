"""The demo's train step compiles for a real TPU topology (v5e:2x2, 4 chips) on this CPU through
libtpu, and its per-device memory is of the order of the same step's on one CPU device at the
per-device batch. bench/tpu_compile.py does it; libtpu lives in .tpu/ (pip install --no-deps
--target .tpu libtpu==0.0.42.1, as .ci/run does) and only this test's subprocess sees it, so every
other test stays on the CPU backend without the TPU runtime's start-up or its warnings."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIBTPU_DIR = os.environ.get("BRIDGEJAX_LIBTPU_DIR", os.path.join(REPO, ".tpu"))
_REASON = f"no libtpu in {LIBTPU_DIR}: pip install --no-deps --target .tpu libtpu==0.0.42.1"

if not os.path.isdir(os.path.join(LIBTPU_DIR, "libtpu")):
  if os.environ.get("CI"):  # .ci/run installs it: a skip there would hide the TPU compile
    raise RuntimeError(_REASON)
  pytest.skip(_REASON, allow_module_level=True)


def _tpu_compile(*args):
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([LIBTPU_DIR, REPO, os.environ.get("PYTHONPATH", "")]),
         "TPU_SKIP_MDS_QUERY": "1"}
  env.pop("JAX_PLATFORMS", None)
  return subprocess.run([sys.executable, os.path.join(REPO, "bench", "tpu_compile.py"), "--config",
                         "configs/demo.py", "--topology", "v5e:2x2", *args], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=900)


def test_a_batch_the_topology_cannot_split_names_the_nearest_sizes_before_compiling():
  proc = _tpu_compile("--batch", "30")
  assert proc.returncode == 1 and proc.stderr.splitlines()[-1] == (
      "error: batch_size=30 does not split evenly over mesh.data=4, pairs for the concat trick (concat_prob > 0): "
      "it must be a multiple of 4; the nearest that do are 28 and 32 (--batch=28)")


def test_demo_step_compiles_for_v5e_2x2_and_its_memory_matches_the_cpu_order():
  proc = _tpu_compile("--batch", "8", "--text-len", "16", "--cpu-reference", "--json")
  assert proc.returncode == 0, proc.stderr[-3000:]
  r = json.loads(proc.stdout.strip().splitlines()[-1])
  assert (r["device_kind"], r["chips"], r["devices"], r["mesh"]) == ("TPU v5 lite", 4, 4, {"data": 4, "model": 1})
  assert r["fits"] and r["hbm_bytes"] == 16 * 2**30 and r["flops"] > 0 and r["step_s_at_peak"] > 0
  assert 0.1 < r["total_bytes"] / r["cpu_total_bytes"] < 10, r
