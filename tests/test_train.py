"""Training end to end on a tiny world: sharding equivalence, exact resume after SIGTERM, frozen
weights untouched, optimizer state only for the trainable subtree, non-finite losses handled."""

import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

import tiny_world
from bridgejax import experiment
from bridgejax.train import loop


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
  return tiny_world.make(str(tmp_path_factory.mktemp("tiny_world")))


def _params(state):
  return jax.tree.map(np.asarray, state.params)


class _SigtermAfter:
  """Yields batches; sends this process SIGTERM after the n-th, as a preempted TPU VM would."""

  def __init__(self, iterator, n):
    self.iterator, self.n, self.count = iterator, n, 0

  def __iter__(self):
    return self

  def __next__(self):
    self.count += 1
    if self.count == self.n + 1:
      os.kill(os.getpid(), signal.SIGTERM)
    return next(self.iterator)

  def __getattr__(self, name):  # get_state/set_state for the checkpoint
    return getattr(self.iterator, name)


def test_sigterm_then_resume_equals_uninterrupted_run(paths, tmp_path):
  config = tiny_world.config(paths, checkpoint_every_steps=100)
  setup = experiment.build(config)
  straight = loop.train(config, str(tmp_path / "straight"), loop.train_iterator(config, setup), setup=setup)

  workdir = str(tmp_path / "interrupted")
  first = loop.train(config, workdir, _SigtermAfter(loop.train_iterator(config, setup), 3), setup=setup)
  assert first["preempted"] and first["step"] == 4  # the step in flight finishes, is saved, then it stops
  resumed = loop.train(config, workdir, loop.train_iterator(config, setup), setup=setup)
  assert resumed["step"] == 6 and not resumed["preempted"]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               _params(resumed["state"]), _params(straight["state"]))
  losses = lambda w: [json.loads(l)["train/loss"] for l in open(os.path.join(w, "metrics.jsonl"))]
  np.testing.assert_allclose(losses(workdir), losses(str(tmp_path / "straight")), rtol=1e-6)


def test_frozen_untouched_and_optimizer_holds_only_trainable(paths, tmp_path):
  config = tiny_world.config(paths, total_steps=2)
  setup = experiment.build(config)
  before = jax.tree.map(np.array, setup.frozen)
  summary = loop.train(config, str(tmp_path), loop.train_iterator(config, setup), setup=setup)
  after = jax.tree.map(np.asarray, setup.frozen)
  assert jax.tree.all(jax.tree.map(np.array_equal, before, after))
  state = summary["state"]
  assert sorted(state.params) == ["bridge", "ret"]
  # AdamW keeps mu and nu shaped like the trainable tree, plus step counts: nothing of the frozen trees
  is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)
  adam = [s for s in jax.tree.leaves(state.opt_state, is_leaf=is_adam) if is_adam(s)]
  assert len(adam) == 1
  assert jax.tree.structure(adam[0].mu) == jax.tree.structure(adam[0].nu) == jax.tree.structure(state.params)
  size = lambda tree: sum(np.size(x) for x in jax.tree.leaves(tree))
  assert size(state.opt_state) <= 2 * size(state.params) + 8
  records = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert [r["step"] for r in records] == [1, 2] and all("train/loss" in r for r in records)


def test_nonfinite_losses_are_skipped_then_stop(paths, tmp_path):
  config = tiny_world.config(paths, total_steps=5, max_nonfinite_steps=3)
  config.optim.lr = 1e30  # (a NaN one is refused up front) the first update overflows: every later loss is
  # non-finite, its update skipped and counted, then a clear stop
  setup = experiment.build(config)
  with pytest.raises(loop.NonFiniteLossError, match="3 consecutive steps had a non-finite"):
    loop.train(config, str(tmp_path), loop.train_iterator(config, setup), setup=setup)


@pytest.mark.slow
def test_sharded_runs_equal_single_device(paths, tmp_path):
  """The same 3 steps on 1 device, on 8 fake CPU devices (data=8), and data=4 x model=2 with
  FSDP-sharded frozen weights give the same losses and trainable params."""
  runs = {"single": ("1", "1", "1", "replicate"), "data8": ("8", "8", "1", "replicate"),
          "data4_model2_fsdp": ("8", "4", "2", "fsdp")}
  results = {}
  for name, (devices, data, model, frozen) in runs.items():
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    out = tmp_path / f"{name}.npz"
    subprocess.run([sys.executable, "tests/train_helper.py", json.dumps(paths), str(tmp_path / name), str(out),
                    data, model, frozen], check=True, env=env, capture_output=True)
    results[name] = dict(np.load(out))
    assert int(results[name].pop("devices")) == int(devices)
  single = results.pop("single")
  for name, result in results.items():
    assert set(result) == set(single)
    for key in single:
      np.testing.assert_allclose(result[key], single[key], rtol=1e-5, atol=1e-6, err_msg=f"{name}: {key}")


def _free_port() -> int:
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_multihost_run_equals_single_process(paths, tmp_path):
  """train.py --multihost as 2 processes x 2 CPU devices (jax.distributed on 127.0.0.1, gloo
  collectives), each reading its own data shard, equals one process on 4 devices fed the same
  global batches: same losses, same trainable params in the checkpoint."""
  from bridgejax.train.checkpoint import Checkpointer
  workdir = tmp_path / "multihost"
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  command = [sys.executable, "train.py", *tiny_world.train_py_flags(paths, total_steps=3, checkpoint_every_steps=3,
                                                                    **{"mesh.data": 4}),
             f"--workdir={workdir}", "--multihost", f"--coordinator_address=127.0.0.1:{_free_port()}",
             "--num_processes=2"]
  processes = [subprocess.Popen(command + [f"--process_id={i}"], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outputs = [p.communicate(timeout=600)[0] for p in processes]
  for i, (p, output) in enumerate(zip(processes, outputs)):
    assert p.returncode == 0, f"process {i} failed:\n{output[-4000:]}"

  reference = tmp_path / "single.npz"
  subprocess.run([sys.executable, "tests/train_helper.py", json.dumps(paths), str(tmp_path / "single"),
                  str(reference), "4", "1", "replicate", "2"], check=True, capture_output=True,
                 env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
  single = dict(np.load(reference))
  assert int(single.pop("devices")) == 4

  losses = [json.loads(line)["train/loss"] for line in open(workdir / "metrics.jsonl")]
  np.testing.assert_allclose(losses, single.pop("losses"), rtol=1e-5)
  step, params = Checkpointer(str(workdir)).load_params()
  assert step == 3
  flat = {"/".join(str(k.key) for k in path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(params)}
  assert set(flat) == set(single)
  for key in single:
    np.testing.assert_allclose(flat[key], single[key], rtol=1e-5, atol=1e-6, err_msg=key)
