"""The run's record is never damaged: a damaged newest checkpoint falls back to the newest intact
one, a config that does not fit the checkpoints changes nothing in the workdir, a lower
total_steps keeps the summary, one training per workdir (lock), hosts agree on the SIGTERM stop
step, and a wrong data.val_split is found before step 1."""

import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import grain
import jax.numpy as jnp
import numpy as np
import pytest

import tiny_world
from bridgejax import experiment, main, paths
from bridgejax.errors import UserError
from bridgejax.train import loop
from bridgejax.train.checkpoint import CheckpointError, Checkpointer, abstract_like


def _snapshot(workdir) -> dict:
  """{relative path: sha1} of every file in a workdir."""
  out = {}
  for root, _, files in os.walk(workdir):
    for name in files:
      p = os.path.join(root, name)
      with open(p, "rb") as f:
        out[os.path.relpath(p, workdir)] = hashlib.sha1(f.read()).hexdigest()
  return out


# --------------------------------------------------------------------------- checkpoints alone


def _saved_run(root) -> tuple[str, dict, grain.DatasetIterator]:
  """A workdir with steps 1 and 2 of a small state and a data position; (workdir, state@2, data)."""
  dataset = grain.MapDataset.range(100).shuffle(seed=1).batch(4).to_iter_dataset()
  iterator = iter(dataset)
  checkpointer = Checkpointer(str(root), keep=3, every_steps=1)
  for step in (1, 2):
    next(iterator)
    state = {"step": jnp.array(step), "params": {"w": jnp.full((4, 3), float(step)), "b": step * jnp.arange(5.0)}}
    checkpointer.save(step, state, iterator, force=True)
  checkpointer.close()
  return str(root), state, dataset


def test_damaged_newest_checkpoint_falls_back_to_the_intact_one(tmp_path, caplog):
  """Each file of the newest step deleted in turn: the restore either still reads step 2 exactly,
  or falls back to step 1 (warning names step 2), never a traceback or zeros filled in."""
  workdir, state, dataset = _saved_run(tmp_path / "run")
  files = [os.path.relpath(os.path.join(r, f), f"{workdir}/checkpoints/2")
           for r, _, fs in os.walk(f"{workdir}/checkpoints/2") for f in fs]
  fell_back = []
  for name in files:
    copy = tmp_path / "copy"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(workdir, copy)
    os.remove(copy / "checkpoints" / "2" / name)
    checkpointer = Checkpointer(str(copy))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
      restored = checkpointer.restore(abstract_like(state), iter(dataset))
    step = int(restored["step"])
    np.testing.assert_array_equal(restored["params"]["w"], np.full((4, 3), float(step)), err_msg=name)
    if step == 1:
      fell_back.append(name)
      assert [s for s, _ in checkpointer.damaged] == [2]
      assert "checkpoint 2 in" in caplog.text and "cannot be read" in caplog.text
      if name.startswith("state/"):  # eval and predict read the params only, and fall back alike
        assert checkpointer.load_params()[0] == 1
        with pytest.raises(CheckpointError, match=r"checkpoint 2 in .* cannot be read \(.*\); pick another step"):
          checkpointer.load_params(2)
    checkpointer.close()
  assert fell_back, "deleting no file of the checkpoint damaged it: the test lost its meaning"

  for step in (1, 2):  # nothing intact: one error that names the directory
    os.remove(os.path.join(workdir, "checkpoints", str(step), "state", "manifest.ocdbt"))
  checkpointer = Checkpointer(workdir)
  with pytest.raises(CheckpointError, match=rf"no intact checkpoint in {workdir}/checkpoints: step 2: .*; step 1: "):
    checkpointer.restore(abstract_like(state))
  with pytest.raises(CheckpointError, match="no intact checkpoint"):
    checkpointer.load_params()
  checkpointer.close()


# --------------------------------------------------------------------------- whole runs


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  return tiny_world.make(str(tmp_path_factory.mktemp("tiny_world")))


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory):
  """A finished 4-step run (checkpoints at steps 2 and 4), copied by each test that changes it."""
  workdir = str(tmp_path_factory.mktemp("trained") / "run")
  config = tiny_world.config(world, total_steps=4)
  setup = experiment.build(config)
  loop.train(config, workdir, loop.train_iterator(config, setup), setup=setup)
  return workdir


def _copy(trained, tmp_path) -> str:
  workdir = str(tmp_path / "run")
  shutil.copytree(trained, workdir)
  return workdir


def _train(world, workdir, **overrides):
  config = tiny_world.config(world, **overrides)
  setup = experiment.build(config)
  return loop.train(config, workdir, loop.train_iterator(config, setup), setup=setup)


def test_config_that_does_not_fit_changes_nothing(world, trained, tmp_path):
  workdir = _copy(trained, tmp_path)
  before = _snapshot(workdir)
  with pytest.raises(loop.ConfigMismatchError, match=r"does not fit the checkpoints in .*: bridge\.k: 4 \(saved\) -> "
                     r"8 \(now\)\. Resume with the run's own config"):
    _train(world, workdir, total_steps=8, **{"bridge.k": 8})
  assert _snapshot(workdir) == before
  config = json.loads(open(os.path.join(workdir, "config.json")).read())
  assert config["bridge"]["k"] == 4  # so predict --workdir still builds the model that fits


def test_lower_total_steps_keeps_the_summary(world, trained, tmp_path):
  workdir = _copy(trained, tmp_path)
  before = _snapshot(workdir)
  summary = _train(world, workdir, total_steps=2)
  assert summary["already_trained"] and summary["step"] == 4
  assert loop.format_summary(summary, workdir).startswith(f"already trained to step 4 in {workdir}")
  assert _snapshot(workdir) == before
  saved = json.load(open(os.path.join(workdir, "train_summary.json")))
  assert saved["step"] == 4 and "loss" in saved["train"]


def test_second_training_on_a_live_workdir_refuses(world, trained, tmp_path):
  """Before the lock both trainings 'succeeded' and metrics.jsonl held every step twice."""
  workdir = _copy(trained, tmp_path)
  before = _snapshot(workdir)
  with paths.WorkdirLock(workdir):  # a live training of this process holds the workdir
    with pytest.raises(paths.WorkdirLockedError, match=rf"{workdir} is in use by another training \(pid "
                       rf"{os.getpid()} on host .*\); wait for it to finish or use another --workdir"):
      _train(world, workdir, total_steps=8)
  assert _snapshot(workdir) == before  # the lock was released with the training


def test_stale_lock_of_a_dead_process_is_taken_over(world, trained, tmp_path, caplog):
  workdir = _copy(trained, tmp_path)
  dead = subprocess.Popen(["true"])
  dead.wait()
  with open(os.path.join(workdir, "lock"), "w") as f:
    json.dump({"pid": dead.pid, "host": socket.gethostname(), "started": "earlier", "heartbeat": time.time()}, f)
  with caplog.at_level(logging.WARNING):
    summary = _train(world, workdir, total_steps=4)  # already trained: cheap, but takes the lock first
  assert summary["already_trained"]
  assert f"taking over the stale lock {workdir}/lock of pid {dead.pid}" in caplog.text
  assert not os.path.exists(os.path.join(workdir, "lock"))


def test_lock_of_another_host_counts_while_its_heartbeat_is_fresh(tmp_path):
  lock_path = tmp_path / "lock"
  lock_path.write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "now", "heartbeat": time.time()}))
  with pytest.raises(paths.WorkdirLockedError, match="pid 1 on host elsewhere"):
    paths.WorkdirLock(str(tmp_path)).acquire()
  lock_path.write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "then", "heartbeat": time.time() - 3600}))
  lock = paths.WorkdirLock(str(tmp_path)).acquire()  # a hard-killed host: its run resumes elsewhere
  assert json.loads(lock_path.read_text())["pid"] == os.getpid()
  lock.release()
  assert not lock_path.exists()


def test_an_unreadable_lock_is_live_for_a_moment_then_stale(tmp_path):
  """A creator writes its record right after creating the file; an empty one older than that was left
  by a crash (it used to refuse forever, naming 'pid None')."""
  lock_path = tmp_path / "lock"
  lock_path.write_text("")
  with pytest.raises(paths.WorkdirLockedError, match="pid unknown"):  # being written this instant
    paths.WorkdirLock(str(tmp_path)).acquire()
  os.utime(lock_path, (time.time() - 30, time.time() - 30))
  lock = paths.WorkdirLock(str(tmp_path)).acquire()
  assert json.loads(lock_path.read_text())["pid"] == os.getpid()
  lock.release()


def test_rewind_moves_the_rows_of_later_steps_aside(tmp_path):
  from bridgejax.train.metric_writer import REWOUND_FILE, MetricWriter
  writer = MetricWriter(str(tmp_path), tensorboard=False)
  for step in (1, 2, 3, 4):
    writer.write(step, {"loss": float(step)}, prefix="train/")
  writer.close()
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 5, "train/lo')  # cut short by a hard kill
  writer = MetricWriter(str(tmp_path), tensorboard=False)
  writer.rewind(2)
  writer.write(3, {"loss": 30.0}, prefix="train/")
  writer.close()
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert [(r["step"], r["train/loss"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 30.0)]
  aside = (tmp_path / REWOUND_FILE).read_text().splitlines()
  assert [json.loads(line)["step"] for line in aside[:2]] == [3, 4] and aside[2] == '{"step": 5, "train/lo'
  writer = MetricWriter(str(tmp_path), tensorboard=False)
  writer.rewind(3)  # nothing after 3: nothing moves
  writer.close()
  assert len((tmp_path / REWOUND_FILE).read_text().splitlines()) == 3


def test_damaged_newest_checkpoint_resumes_from_the_intact_one(world, trained, tmp_path, caplog):
  """Was: every restart stopped with a long Orbax/TensorStore traceback."""
  workdir = _copy(trained, tmp_path)
  os.remove(os.path.join(workdir, "checkpoints", "4", "state", "manifest.ocdbt"))
  with caplog.at_level(logging.WARNING):
    summary = _train(world, workdir, total_steps=5, log_every_steps=2)  # harmless changes are fine
  assert "checkpoint 4 in" in caplog.text and "cannot be read" in caplog.text
  assert summary["step"] == 5 and not summary["preempted"]
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4", "5", "damaged_step_4"]  # keep 3
  steps = [json.loads(l)["step"] for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert steps == [1, 2, 4, 5]  # steps 3-4 retrained from step 2: their first rows moved aside, logged once
  assert [json.loads(l)["step"] for l in open(os.path.join(workdir, "metrics_rewound.jsonl"))] == [3, 4]
  checkpointer = Checkpointer(workdir)
  assert checkpointer.load_params()[0] == 5 and checkpointer.all_steps() == [2, 4, 5]
  checkpointer.close()


def test_wrong_val_split_fails_before_anything_loads(world, monkeypatch):
  monkeypatch.setattr(loop, "build", lambda config: pytest.fail("built before checking data.val_split"))
  with pytest.raises(UserError, match=r"--config\.data\.val_split='valid': .* has no image_text split .*\bval\b"):
    main.run(tiny_world.config(world, **{"data.val_split": "valid"}), "/nonexistent/never/written")


# --------------------------------------------------------------------------- SIGTERM on one host


def test_any_process_single_process():
  assert loop.any_process(True) and not loop.any_process(False)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_sigterm_on_one_host_stops_both_at_the_same_step(world, tmp_path):
  """2 processes x 2 CPU devices; only process 1 gets SIGTERM. Both agree at the next log step,
  save it together and exit 0 (before, process 0 trained on and both hung in the save)."""
  workdir = tmp_path / "multihost"
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  command = [sys.executable, "train.py", *tiny_world.train_py_flags(
      world, total_steps=10_000, log_every_steps=3, checkpoint_every_steps=10_000, **{"mesh.data": 4}),
             f"--workdir={workdir}", "--multihost", f"--coordinator_address=127.0.0.1:{_free_port()}",
             "--num_processes=2"]
  processes = [subprocess.Popen(command + [f"--process_id={i}"], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for i in range(2)]
  try:
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and metrics.read_text().count("\n") >= 1):
      assert time.time() < deadline and all(p.poll() is None for p in processes), "training did not start"
      time.sleep(0.2)
    processes[1].send_signal(signal.SIGTERM)
    outputs = [p.communicate(timeout=180)[0] for p in processes]  # before the fix: a hang here
  finally:
    for p in processes:
      if p.poll() is None:
        p.kill()
  for i, (p, output) in enumerate(zip(processes, outputs)):  # saved and stopped: 143, never 0 (bridgejax.preemption)
    assert p.returncode == 143, f"process {i} failed:\n{output[-4000:]}"
  steps = [json.loads(line)["step"] for line in open(metrics)]
  stopped = steps[-1]
  assert stopped % 3 == 0 and stopped < 10_000  # a log step: where the hosts agree
  assert f"trained to step {stopped} in {workdir} (stopped by SIGTERM" in outputs[0]
  checkpointer = Checkpointer(str(workdir))
  assert checkpointer.latest_step() == stopped
  checkpointer.close()
  assert json.load(open(workdir / "train_summary.json"))["preempted"]
