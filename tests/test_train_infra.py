"""Training plumbing: mesh from config, optimizer schedule, checkpoints with the data position."""

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
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


def _grouped_optim(**groups):
  cfg = base.get_config().optim
  cfg.update(lr=2e-5, init_lr_fraction=0.5, warmup_steps=4, schedule="cosine", decay_steps=10, final_lr_fraction=0.05,
             grad_clip=0.0, weight_decay=0.0)
  cfg.groups = groups
  return cfg


def _params():
  return {"bridge": {"prompt": jnp.ones((2, 3)), "prompt_in": {"kernel": jnp.ones((3, 3))},
                     "projection_kernel": jnp.ones((2, 3)), "adapter_0_attn": {"up": {"bias": jnp.ones(3)}}},
          "ret": {"logit_scale": jnp.ones(())}}


def test_groups_get_their_own_learning_rates():
  """AdamW's first update is -lr·g/(|g| + eps) = -lr·sign(g): each group's update is minus its own
  learning rate at that step (the default group warms up from 1e-5, the prompt group stays at 1e-5),
  and a group's weight decay acts on its parameters only."""
  from bridgejax.train.optimizer import group_labels
  cfg = _grouped_optim(prompt={"params": "prompt|adapter", "lr": 1e-5, "schedule": "constant", "warmup_steps": 0,
                               "weight_decay": 0.5})
  params = _params()
  assert group_labels(cfg, params) == {
      "bridge": {"prompt": "prompt", "prompt_in": {"kernel": "prompt"}, "projection_kernel": "default",
                 "adapter_0_attn": {"up": {"bias": "prompt"}}}, "ret": {"logit_scale": "default"}}
  tx = make_optimizer(cfg)
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  schedule = learning_rate_schedule(cfg)
  for step in range(3):
    updates, state = tx.update(grads, state, params)
    default_lr, prompt_lr = float(schedule(step)), 1e-5
    assert default_lr == pytest.approx(1e-5 * (1 + step / 4))  # 1e-5 warmed up to 2e-5 over 4 steps
    np.testing.assert_allclose(updates["bridge"]["projection_kernel"], -default_lr, rtol=1e-5)
    np.testing.assert_allclose(updates["ret"]["logit_scale"], -default_lr, rtol=1e-5)
    np.testing.assert_allclose(updates["bridge"]["prompt"], -prompt_lr * (1 + 0.5), rtol=1e-5)  # + lr·wd·p
    np.testing.assert_allclose(updates["bridge"]["adapter_0_attn"]["up"]["bias"], -prompt_lr * 1.5, rtol=1e-5)
  assert float(schedule(4 + 10)) == pytest.approx(1e-6)  # cosine to 2e-5 · 0.05


def test_without_groups_the_optimizer_is_one_adamw_as_before():
  cfg = base.get_config().optim
  params = _params()
  reference = optax.chain(optax.clip_by_global_norm(cfg.grad_clip),
                          optax.adamw(learning_rate_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                                      weight_decay=cfg.weight_decay))
  tx, grads = make_optimizer(cfg), jax.tree.map(lambda p: jnp.full_like(p, 0.3), params)
  assert jax.tree.structure(tx.init(params)) == jax.tree.structure(reference.init(params))
  state, expected_state = tx.init(params), reference.init(params)
  for _ in range(3):
    updates, state = tx.update(grads, state, params)
    expected, expected_state = reference.update(grads, expected_state, params)
    assert jax.tree.all(jax.tree.map(np.array_equal, updates, expected))


def test_grouped_clipping_is_global():
  """The global norm is taken over every group together, as torch's clip_grad_norm_ over all parameters:
  gradients 3 and 4 (norm 5) clipped to 1 are 0.6 and 0.8, where per-group clipping would give 1 and 1."""
  cfg = _grouped_optim(prompt={"params": "^bridge/prompt$", "lr": 1e-5, "schedule": "constant", "warmup_steps": 0})
  cfg.update(grad_clip=1.0, b1=0.0, b2=0.0, eps=1.0)  # update = -lr·g/(|g| + 1): it sees the clipped g
  params = {"bridge": {"prompt": jnp.zeros(1)}, "ret": {"w": jnp.zeros(1)}}
  tx = make_optimizer(cfg)
  updates, _ = tx.update({"bridge": {"prompt": jnp.full(1, 3.0)}, "ret": {"w": jnp.full(1, 4.0)}}, tx.init(params),
                         params)
  assert float(updates["bridge"]["prompt"][0]) == pytest.approx(-1e-5 * 0.6 / 1.6, rel=1e-5)
  assert float(updates["ret"]["w"][0]) == pytest.approx(-1e-5 * 0.8 / 1.8, rel=1e-5)  # the default group at step 0


@pytest.mark.parametrize("groups,message", [
    ({"p": {"params": "prompt"}, "q": {"params": "prompt_in"}}, r"parameter bridge/prompt_in/kernel matches optim"
                                                                   r".groups \['p', 'q'\]; make their params"),
    ({"p": {"params": "prompt", "grad_clip": 1.0}}, r"optim.groups.p has no key\(s\) \['grad_clip'\]"),
    ({"p": {"lr": 1e-5}}, r"optim.groups.p needs params: a regular expression"),
    ({"p": {"params": "prompt("}}, r"optim.groups.p.params='prompt\(' is not a regular expression"),
    ({"default": {"params": "prompt"}}, r"optim.groups.default: the name is taken"),
])
def test_group_errors_are_one_line(groups, message):
  from bridgejax.errors import UserError
  with pytest.raises(UserError, match=message) as e:
    make_optimizer(_grouped_optim(**groups)).init(_params())
  assert "\n" not in str(e.value)
