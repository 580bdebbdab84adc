"""The jitted programs of a training run on its mesh, made once and shared: the training loop runs
them, bench/tpu_compile.py compiles them ahead of time for a TPU topology.

    init, step = train_programs(setup, optimizer)
    state = init(rng, setup.frozen)                      # TrainState, replicated
    state, metrics = step(state, setup.frozen, batch, ret_norm)   # batch sharded over 'data'
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bridgejax import mesh as mesh_lib
from bridgejax.train.step import TrainState, make_train_step

MODEL_INPUTS = ("image", "text_ids", "text_mask")  # what the step reads of a batch (beside cached features)


def train_programs(setup, optimizer):
  """(init(rng, frozen) -> TrainState, step(state, frozen, batch, ret_norm) -> (state, metrics)),
  jitted with the run's shardings: state and metrics replicated, the state donated."""
  model, config = setup.model, setup.config
  replicated = mesh_lib.replicated(setup.mesh)
  init = jax.jit(lambda rng, frozen: TrainState.create(model.init_trainable(rng, frozen), optimizer),
                 out_shardings=replicated)
  step = jax.jit(make_train_step(model, optimizer, seed=config.seed, rescale_ret=config.ret.rescale_row),
                 donate_argnums=(0,), out_shardings=(replicated, replicated))
  return init, step


def abstract_batch(setup, batch_size: int, text_len: int) -> dict:
  """The global batch the step reads, as ShapeDtypeStructs sharded over 'data' (global_batch's layout)."""
  vision = setup.model.vision.config
  sharding = mesh_lib.batch_sharding(setup.mesh)
  shapes = {"image": ((batch_size, vision.num_channels, vision.image_size, vision.image_size), jnp.float32),
            "text_ids": ((batch_size, text_len), jnp.int32), "text_mask": ((batch_size, text_len), jnp.int32)}
  assert set(shapes) == set(MODEL_INPUTS), "abstract_batch must follow MODEL_INPUTS"
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding) for k, (shape, dtype) in shapes.items()}
