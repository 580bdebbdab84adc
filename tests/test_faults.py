"""The fault suite: bad input and faults as a user meets them, each a real command (fault_helper.Probe)
with the exit status and the one stderr line it must give, and the files it must leave byte for
byte. One tiny trained run (4 steps, checkpoints at 2 and 4) is shared; a probe that could change a
run works on its own copy. The data-preparation, export, serve and predict probes are in
test_faults_io.py; docs/guarantees.md ("What a run guarantees") lists what both prove."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

import tiny_world
from fault_helper import PROGRESS, ROOT, Probe, run, run_probe, tree_hash


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  root = tmp_path_factory.mktemp("faults")
  paths = tiny_world.make(str(root))
  run_dir = root / "run"
  result = run(["train.py", "--workdir", run_dir, *tiny_world.train_py_flags(paths, total_steps=4)])
  assert result.returncode == 0, result.stderr[-3000:]
  return {"paths": paths, "run": run_dir, "root": root}


def flags(world, **overrides):
  return tiny_world.train_py_flags(world["paths"], **{"total_steps": 4, **overrides})


def copy_run(world, tmp_path):
  shutil.copytree(world["run"], tmp_path / "run")
  return tmp_path / "run"


def steps_logged(workdir) -> list[int]:
  return [json.loads(line)["step"] for line in open(workdir / "metrics.jsonl")]


# --- config values: refused before anything loads, the run untouched ------------------------------

BAD_VALUES = {  # --config.KEY=VALUE: what the one line says of it
    "optim.lr=-1": r"--config\.optim\.lr=-1\.0 must be a finite number > 0 \(the peak learning rate\)",
    "optim.grad_clip=-1": r"--config\.optim\.grad_clip=-1\.0 must be a finite number >= 0",
    "log_every_steps=0": r"--config\.log_every_steps=0 must be an integer >= 1",
    "checkpoint_every_steps=0": r"--config\.checkpoint_every_steps=0 must be an integer >= 1",
    "keep_checkpoints=0": r"--config\.keep_checkpoints=0 must be an integer >= 1 \(0 would keep no checkpoint",
    "total_steps=0": r"--config\.total_steps=0 must be an integer >= 1",
}


def _all_of(phrases) -> str:
  return "^error: " + "".join(f"(?=.*{p})" for p in phrases)


def test_nonsense_config_values_are_refused_before_anything_loads(world):
  """Each used to train to exit 0 (a negative learning rate, no clipping), crash with a
  ZeroDivisionError (cadences of 0), or throw the model away (keep_checkpoints=0): one run names them all."""
  argv = ["train.py", "--workdir", world["run"], *flags(world), *(f"--config.{kv}" for kv in BAD_VALUES)]
  run_probe(Probe(argv, 2, _all_of(BAD_VALUES.values()), unchanged=[world["run"], world["paths"]["data.dir"]],
                  timeout=60))
  run_probe(Probe(["train.py", "--workdir", world["run"], *flags(world), "--config.optim.lr=nan"], 2,
                  r"^error: --config\.optim\.lr=nan must be a finite number > 0", unchanged=[world["run"]]))


def test_eval_values_out_of_range_are_refused(world):
  argv = ["eval.py", "--workdir", world["run"], *flags(world), "--config.evals.caption.max_examples=-1",
          "--config.evals.retrieval.batch_size=0"]
  run_probe(Probe(argv, 2, _all_of([r"--config\.evals\.caption\.max_examples=-1 must be an integer >= 0",
                                    r"--config\.evals\.retrieval\.batch_size=0 must be an integer >= 1"]),
                  unchanged=[world["run"]], timeout=60))


def test_eval_with_a_config_that_does_not_fit_the_checkpoint_names_the_key(world):
  argv = ["eval.py", "--workdir", world["run"], *flags(world), "--config.bridge.k=8"]
  run_probe(Probe(argv, 2, r"^error: checkpoint 4 in .* does not fit this config: bridge\.k: 4 \(saved\) -> 8 "
                           r"\(now\)\. Evaluate with the run's own config", unchanged=[world["run"]]))


@pytest.mark.parametrize("override, key", [("seed=3", r"seed: 0 \(saved\) -> 3 \(now\)"),
                                           ("batch_size=4", r"batch_size: 8 \(saved\) -> 4 \(now\)")])
def test_a_restart_with_another_seed_or_batch_size_names_the_keys(world, override, key):
  argv = ["train.py", "--workdir", world["run"], *flags(world, total_steps=6), f"--config.{override}"]
  run_probe(Probe(argv, 2, rf"^error: the config does not fit the checkpoints in .*: {key}\. Resume with the "
                           r"run's own config", unchanged=[world["run"]]))


def test_inspect_reports_bad_keys_and_configs_in_one_line():
  run_probe(Probe(["-m", "bridgejax.param_count", "--config", "configs/demo.py", "--config.bridge.kk=3"], 2,
                  r"^error: unknown config key --config\.bridge\.kk; did you mean --config\.bridge\.k\?$"))
  run_probe(Probe(["-m", "bridgejax.param_count", "--config", "configs/demo.py", "--config.bridge.name=nope"], 2,
                  r"^error: unknown bridge name 'nope'; set config\.bridge\.name to one of"))


# --- the demo writes its toy world only into its own folder ----------------------------------------

def test_the_demo_never_writes_its_toy_world_into_a_mistyped_or_foreign_data_dir(tmp_path):
  typo = tmp_path / "data" / "mnie"
  run_probe(Probe(["train.py", "--config", "configs/demo.py", "--workdir", tmp_path / "w",
                   f"--config.data.dir={typo}"], 2,
                  r"^error: --config\.data\.dir='.*mnie' does not exist; the demo generates its toy world only into "
                  r"--config\.data\.toy\.dir='/tmp/bridgejax_toy_data'", timeout=60))
  assert not typo.exists() and not (tmp_path / "w").exists()
  photos = tmp_path / "photos"  # the raw folder passed as data.dir, even as the toy world's own folder
  photos.mkdir()
  for name in ("img_0001.png", "img_0002.png", "train.csv"):
    (photos / name).write_bytes(name.encode())
  for extra in ([], [f"--config.data.toy.dir={photos}"]):
    run_probe(Probe(["train.py", "--config", "configs/demo.py", "--workdir", tmp_path / "w",
                     f"--config.data.dir={photos}", *extra], 2,
                    r"^error: --config\.data\.dir='.*photos' (is not a prepared dataset|holds 3 entries)",
                    unchanged=[photos], timeout=60))


# --- the features cache is refused when the images changed or the shard is cut short -------------

@pytest.fixture(scope="module")
def cached(world, tmp_path_factory):
  """A copy of the tiny dataset with a features cache of its train split."""
  data = tmp_path_factory.mktemp("cached") / "data"
  shutil.copytree(world["paths"]["data.dir"], data)
  result = run(["-m", "bridgejax.features", *flags(world, **{"data.dir": data}), "--data", data,
                "--split", "train"])
  assert result.returncode == 0, result.stderr[-3000:]
  return data


def test_a_features_cache_of_other_images_is_refused(world, cached, tmp_path):
  data = tmp_path / "data"
  shutil.copytree(cached, data)
  n = json.loads((data / "dataset_info.json").read_text())["splits"]["train"]["num_examples"]
  result = run(["-m", "bridgejax.prepare", "toy", "--out", data, "--num-train", n, "--num-val", 16,
                "--num-test", 8, "--seed", 1, "--overwrite", "--quiet"])  # the same count, other images
  assert result.returncode == 0, result.stderr[-3000:]
  argv = ["train.py", "--workdir", tmp_path / "w", *flags(world, **{"data.dir": data}), "--config.data.features=auto"]
  run_probe(Probe(argv, 2, r"^error: --config\.data\.features='auto' was built from other images: split 'train' of "
                           r".* was prepared again since; build it with: python -m bridgejax\.features",
                  unchanged=[data / "features"]))
  assert not (tmp_path / "w").exists()


def test_a_truncated_features_shard_is_refused_in_one_line(world, cached, tmp_path):
  data = tmp_path / "data"
  shutil.copytree(cached, data)
  shard = next((data / "features" / "train").glob("*.array_record"))
  shard.write_bytes(shard.read_bytes()[:1000])
  argv = ["train.py", "--workdir", tmp_path / "w", *flags(world, **{"data.dir": data}), "--config.data.features=auto"]
  run_probe(Probe(argv, 2, r"^error: --config\.data\.features='auto' holds 1000 bytes of shards, not the \d+ written "
                           r"\(truncated or damaged\); build it with", unchanged=[data]))


# --- paths ------------------------------------------------------------------------------------------

def test_a_url_with_a_slash_missing_is_not_a_local_folder(world):
  run_probe(Probe(["train.py", "--workdir", "gs:/bucket/run", *flags(world)], 2,
                  r"^error: 'gs:/bucket/run' looks like a gs:// URL with a slash missing; write gs://bucket/run"))
  assert not os.path.exists(os.path.join(ROOT, "gs:"))


def test_a_remote_workdir_without_its_package_is_one_line(world):
  import fsspec
  try:
    fsspec.get_filesystem_class("gs")
    pytest.skip("gcsfs is installed here: gs:// works")
  except ImportError:
    pass
  for script in ("train.py", "eval.py"):
    run_probe(Probe([script, "--workdir", "gs://bucket/run", *flags(world)], 2,
                    r"^error: 'gs://bucket/run': gs:// paths need the gcsfs package; pip install gcsfs$"))


# --- preemption, damage, a full disk, a stale lock ----------------------------------------------------

def test_sigterm_saves_and_exits_non_zero_so_a_chained_eval_never_runs(world, tmp_path):
  workdir = tmp_path / "run"
  process = subprocess.Popen([sys.executable, "train.py", "--workdir", str(workdir),
                              *flags(world, total_steps=500, checkpoint_every_steps=1000)],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 120
  metrics = workdir / "metrics.jsonl"
  while time.time() < deadline and not (metrics.exists() and metrics.stat().st_size):  # step 1 logged: in the loop
    time.sleep(0.2)
  process.send_signal(signal.SIGTERM)
  _, err = process.communicate(timeout=120)
  assert process.returncode == 143, err[-3000:]
  last = err.strip().splitlines()[-1]
  assert last.startswith("error: stopped by SIGTERM at step ") and last.endswith(
      "of 500 (saved); run the same command to resume"), err[-3000:]
  step = int(last.split("at step ")[1].split()[0])
  assert 0 < step < 500 and (workdir / "checkpoints" / str(step)).is_dir()


def test_a_damaged_checkpoint_falls_back_quietly_and_logs_each_step_once(world, tmp_path):
  workdir = copy_run(world, tmp_path)
  (workdir / "checkpoints" / "4" / "state" / "manifest.ocdbt").unlink()
  result = run(["train.py", "--workdir", workdir, *flags(world, total_steps=6)])
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Traceback" not in result.stderr and "Event loop is closed" not in result.stderr, result.stderr[-3000:]
  messages = [l for l in result.stderr.splitlines() if l.strip() and not PROGRESS.match(l)]
  assert len(messages) == 4, messages  # step 4 damaged, restored step 2, step 4 set aside, rows rewound
  assert "restored step 2" in result.stderr and (workdir / "checkpoints" / "damaged_step_4").is_dir()
  assert steps_logged(workdir) == [1, 2, 3, 4, 5, 6]  # 3 and 4 again, once each
  assert [json.loads(line)["step"] for line in open(workdir / "metrics_rewound.jsonl")] == [3, 4]


def test_an_empty_lock_left_by_a_crash_is_taken_over(world, tmp_path):
  workdir = copy_run(world, tmp_path)
  lock = workdir / "lock"
  lock.write_text("")
  os.utime(lock, (time.time() - 60, time.time() - 60))
  result = run(["train.py", "--workdir", workdir, *flags(world)])
  assert result.returncode == 0, result.stderr[-3000:]
  assert "already trained to step 4" in result.stdout and "empty or unreadable" in result.stderr
  assert not lock.exists()


@pytest.fixture
def small_disk(tmp_path):
  mount = tmp_path / "disk"
  mount.mkdir()
  if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(mount)],
                    capture_output=True).returncode:
    pytest.skip("cannot mount a small tmpfs here (needs root) to fill a disk")
  yield mount
  subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_is_one_line(world, small_disk):
  argv = ["train.py", "--workdir", small_disk / "run", *flags(world)]
  result = run_probe(Probe(argv, 2, r"^error: no space left on the disk of .*/checkpoints while writing checkpoint "
                                    r"\d+: free space or use another --workdir"))
  assert "Traceback" not in result.stderr


def test_fault_helper_sees_a_changed_file(tmp_path):
  (tmp_path / "a").write_text("x")
  before = tree_hash(tmp_path)
  (tmp_path / "a").write_text("y")
  assert tree_hash(tmp_path) != before
