"""Training plumbing: mesh from config, optimizer schedule, checkpoints with the data position."""

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from bridgejax import mesh as mesh_lib
from bridgejax.train.checkpoint import Checkpointer, abstract_like
from bridgejax.train.optimizer import learning_rate_schedule, make_optimizer


def test_make_mesh_one_device_and_errors():
  mesh = mesh_lib.make_mesh(-1, 1)
  assert mesh.axis_names == ("data", "model") and mesh.devices.size == len(jax.devices())
  with pytest.raises(ValueError, match="does not use the 1 available devices"):
    mesh_lib.make_mesh(2, 1)
  with pytest.raises(ValueError, match="cannot both be -1"):
    mesh_lib.make_mesh(-1, -1)


def test_fsdp_spec_picks_a_divisible_dimension():
  class FakeMesh:
    shape = {"data": 4, "model": 2}
  assert mesh_lib.fsdp_spec((16,), FakeMesh()) == jax.sharding.PartitionSpec()  # small: replicated
  assert mesh_lib.fsdp_spec((2048, 256000), FakeMesh()) == jax.sharding.PartitionSpec(None, ("data", "model"))
  assert mesh_lib.fsdp_spec((1020, 2052), FakeMesh()) == jax.sharding.PartitionSpec(None, "data")  # 8 divides neither


def test_schedule_warmup_then_constant_or_cosine():
  cfg = base.get_config().optim
  cfg.warmup_steps, cfg.lr = 10, 1e-3
  schedule = learning_rate_schedule(cfg)
  assert float(schedule(0)) == 0.0 and float(schedule(5)) == pytest.approx(5e-4)
  assert float(schedule(10)) == pytest.approx(1e-3) and float(schedule(10_000)) == pytest.approx(1e-3)
  cfg.schedule, cfg.decay_steps = "cosine", 100
  schedule = learning_rate_schedule(cfg)
  assert float(schedule(60)) == pytest.approx(5e-4, rel=1e-4) and float(schedule(110)) == pytest.approx(0.0, abs=1e-9)
  cfg.schedule = "linear"
  with pytest.raises(ValueError, match="optim.schedule='linear'"):
    learning_rate_schedule(cfg)


def test_optimizer_clips_and_accumulates():
  cfg = base.get_config().optim
  cfg.warmup_steps, cfg.grad_clip, cfg.grad_accum_steps = 0, 1.0, 2
  tx = make_optimizer(cfg)
  params = {"w": jnp.zeros(3)}
  state = tx.init(params)
  updates, state = tx.update({"w": jnp.full(3, 100.0)}, state, params)
  assert np.all(np.asarray(updates["w"]) == 0)  # first micro-step: accumulated, not applied
  updates, state = tx.update({"w": jnp.full(3, 100.0)}, state, params)
  assert np.all(np.asarray(updates["w"]) < 0)


def test_checkpoint_restores_state_and_data_position(tmp_path):
  dataset = grain.MapDataset.range(100).shuffle(seed=1).batch(4).to_iter_dataset()
  iterator = iter(dataset)
  checkpointer = Checkpointer(str(tmp_path), keep=2, every_steps=2)
  state = {"step": jnp.array(0), "w": jnp.ones(3)}
  for step in range(1, 6):
    next(iterator)
    state = {"step": jnp.array(step), "w": state["w"] * 2}
    checkpointer.save(step, state, iterator)
  checkpointer.wait()
  assert checkpointer.manager.all_steps() == [2, 4]  # keep=2
  fresh = iter(dataset)
  restored = checkpointer.restore(abstract_like(state), fresh)
  assert int(restored["step"]) == 4 and np.allclose(restored["w"], 16)
  reference = iter(dataset)
  for _ in range(4):
    next(reference)
  np.testing.assert_array_equal(next(fresh), next(reference))  # the 5th batch, exactly
  with pytest.raises(FileNotFoundError, match="available steps: \\[2, 4\\]"):
    checkpointer.restore(abstract_like(state), step=3)
  checkpointer.close()
