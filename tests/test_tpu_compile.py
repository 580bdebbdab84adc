"""The demo's programs compile for real TPU topologies on this CPU through libtpu: the train step,
and the evaluation programs (image encoding, KV-cache caption generation, text embedding) on
v5e:2x2 (4 chips), the train step with each process's rows on v5e:4x4 (16 chips over 4 hosts),
through bench/tpu_table.py, whose recorded cell is skipped when it runs again. bench/tpu_compile.py
does the compiling; libtpu lives in .tpu/ (pip install --no-deps --target .tpu libtpu==0.0.42.1, as
.ci/run does) and only these tests' subprocesses see it, so every other test stays on the CPU backend
without the TPU runtime's start-up or its warnings. --max-batch's search is checked on a fake
compile here, without libtpu: a real one compiles a step per try."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIBTPU_DIR = os.environ.get("BRIDGEJAX_LIBTPU_DIR", os.path.join(REPO, ".tpu"))
_REASON = f"no libtpu in {LIBTPU_DIR}: pip install --no-deps --target .tpu libtpu==0.0.42.1"
HAVE_LIBTPU = os.path.isdir(os.path.join(LIBTPU_DIR, "libtpu"))
if not HAVE_LIBTPU and os.environ.get("CI"):  # .ci/run installs it: a skip there would hide the TPU compile
  raise RuntimeError(_REASON)
needs_libtpu = pytest.mark.skipif(not HAVE_LIBTPU, reason=_REASON)


def _python(*args):
  """python ARGS with libtpu, the repo and bench/ importable (only this subprocess sees .tpu/)."""
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([LIBTPU_DIR, REPO, os.path.join(REPO, "bench"),
                                                      os.environ.get("PYTHONPATH", "")]), "TPU_SKIP_MDS_QUERY": "1"}
  env.pop("JAX_PLATFORMS", None)
  return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def _bench(script, *args):
  return _python(os.path.join(REPO, "bench", script), *args)


def _tpu_compile(*args):
  return _bench("tpu_compile.py", "--config", "configs/demo.py", "--topology", "v5e:2x2", *args)


@needs_libtpu
def test_a_batch_the_topology_cannot_split_names_the_nearest_sizes_before_compiling():
  proc = _tpu_compile("--batch", "30")
  assert proc.returncode == 1 and proc.stderr.splitlines()[-1] == (
      "error: batch_size=30 does not split evenly over mesh.data=4, pairs for the concat trick (concat_prob > 0): "
      "it must be a multiple of 4; the nearest that do are 28 and 32 (--batch=28)")


@needs_libtpu
def test_cloud_slice_names_are_one_host_as_on_cloud():
  """libtpu's own v5e:2x4 and v6e:2x4 have 2 hosts of 2x2 chips; Cloud's v5litepod-8 and v6e-8 are one
  host, and the table's Cloud names (tpu_table.TOPOLOGIES) compile for that."""
  proc = _python("-c", "import tpu_compile, tpu_table\n"
                       "for name in ('v4-8', 'v5e-8', 'v5p-8', 'v6e-8', 'v5e:2x4'):\n"
                       "  devices = tpu_compile.topology_devices(*tpu_table.topology_spec(name))\n"
                       "  print(name, len({d.process_index for d in devices}), len(devices))")
  assert proc.returncode == 0, proc.stderr[-3000:]
  # v4-8 and v5p-8 are 4 chips of 2 TensorCores: libtpu lists v4's cores, v5p's chips (megacore)
  assert proc.stdout.splitlines() == ["v4-8 1 8", "v5e-8 1 8", "v5p-8 1 4", "v6e-8 1 8", "v5e:2x4 2 8"]


@needs_libtpu
def test_demo_train_and_eval_programs_compile_for_v5e_2x2_and_the_step_matches_the_cpu_order():
  proc = _tpu_compile("--batch", "8", "--text-len", "16", "--cpu-reference", "--json")
  assert proc.returncode == 0, proc.stderr[-3000:]
  r = json.loads(proc.stdout.strip().splitlines()[-1])
  assert (r["device_kind"], r["chips"], r["devices"], r["mesh"]) == ("TPU v5 lite", 4, 4, {"data": 4, "model": 1})
  assert r["fits"] and r["hbm_bytes"] == 16 * 2**30 and r["flops"] > 0 and r["step_s_at_peak"] > 0
  programs = r["programs"]
  assert list(programs) == ["train", "encode", "caption", "text"]
  for name, p in programs.items():
    assert p["fits"] and 0 < p["total_bytes"] < 2**30 and p["argument_bytes"] > 0, (name, p)
  assert 0.1 < programs["train"]["total_bytes"] / r["cpu_total_bytes"] < 10, r
  # the demo's caption and retrieval tasks (batch 32, 5 captions of 40 tokens), greedy for 32 tokens
  assert programs["encode"]["images"] == [32, 3, 112, 112] and programs["text"]["text_ids"] == [160, 40]
  assert programs["caption"]["prompt"] == [32, 8] and programs["caption"]["max_new_tokens"] == 32
  assert "per_process" not in r  # one host


@needs_libtpu
def test_table_runner_records_a_multihost_cell_with_each_process_rows_and_skips_it_when_resumed(tmp_path):
  out = str(tmp_path / "runs")
  args = ("--out", out, "--configs", "demo", "--topologies", "v5e:4x4", "--remat", "none", "--no-max-batch")
  proc = _bench("tpu_table.py", *args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  path = os.path.join(out, "demo__v5e-4x4__remat-none.json")
  r = json.load(open(path))
  assert (r["chips"], r["processes"], r["batch"], r["mesh"]["data"]) == (16, 4, 32, 16) and r["fits"]
  # each host's loader reads 32 / 4 rows; its devices hold 8 rows of the global batch between them
  pp = r["per_process"]
  assert pp["rows"] == 8 and pp["inputs"] == {"image": [8, 3, 112, 112], "text_ids": [8, 40], "text_mask": [8, 40]}
  held = sorted(i for ranges in pp["row_ranges"].values() for a, b in ranges for i in range(a, b))
  assert held == list(range(32)) and len(pp["row_ranges"]) == 4
  assert "| demo | v5e:4x4 (16 GiB) | 32 |" in proc.stdout and open(os.path.join(out, "table.md")).read()

  mtime = os.path.getmtime(path)
  again = _bench("tpu_table.py", *args)
  assert again.returncode == 0 and f"skip demo on v5e:4x4, remat none: recorded in {path}" in again.stdout
  assert os.path.getmtime(path) == mtime and "| demo | v5e:4x4 (16 GiB) | 32 |" in again.stdout


def _tpu_module(name):
  sys.path.insert(0, os.path.join(REPO, "bench"))
  try:
    return __import__(name)
  finally:
    sys.path.pop(0)


@pytest.mark.parametrize("fixed, per_row, refused_above, start, multiple, want", [
    (5.0, 0.05, None, 176, 8, 208),  # the start fits: extrapolated up, then bisected
    (5.0, 0.05, 300, 176, 8, 208),  # the compiler refuses large batches outright (no totals)
    (5.0, 0.2, None, 176, 8, 48),  # the start does not fit: bisected down
    (15.0, 2.0, None, 64, 16, 0),  # nothing fits
    (5.0, 0.003, None, 8, 4, 2332),  # far above the start
    (0.01, 1e-9, None, 32, 16, 1 << 16),  # capped at the limit
])
def test_max_batch_search_finds_the_largest_fitting_multiple_in_few_compiles(fixed, per_row, refused_above, start,
                                                                             multiple, want):
  tpu_compile = _tpu_module("tpu_compile")
  hbm, tried = 16 * 2**30, []

  def memory(batch):  # a fake compile: memory near-linear in the batch
    if refused_above and batch > refused_above:
      return {"error": "RESOURCE_EXHAUSTED: Ran out of memory", "fits": False}
    temp = per_row * batch * (1 + batch / 4096) * 2**30
    total = int(fixed * 2**30 + temp)
    return {"total_bytes": total, "temp_bytes": int(temp), "fits": total <= hbm}

  got = tpu_compile.largest_fitting(lambda b: tried.append(b) or memory(b), hbm, multiple, start)
  assert got == want == max((b for b in range(multiple, (1 << 16) + 1, multiple) if memory(b)["fits"]), default=0)
  assert all(b % multiple == 0 for b in tried) and len(tried) == len(set(tried)) and len(tried) <= 8, tried
