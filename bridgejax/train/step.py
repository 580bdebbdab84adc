"""The jitted train step: differentiate the trainable subtree only, skip non-finite updates."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from bridgejax.data import features as feature_cache
from bridgejax.heads import rescale_ret_row
from bridgejax.model import BridgeModel


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: updates attempted so far
  params: Any  # {bridge, ret}: the trainable subtree, float32
  opt_state: Any  # optimizer state of `params` only: frozen weights have none
  nonfinite_run: jax.Array  # int32: current run of consecutive skipped (non-finite) steps
  nonfinite_max_run: jax.Array  # int32: longest such run so far (read at log steps, no sync per step)
  nonfinite_total: jax.Array  # int32: skipped steps so far

  @classmethod
  def create(cls, params, optimizer: optax.GradientTransformation) -> "TrainState":
    zero = jnp.zeros((), jnp.int32)
    return cls(zero, params, optimizer.init(params), zero, zero, zero)


def make_train_step(model: BridgeModel, optimizer: optax.GradientTransformation, *, seed: int,
                    rescale_ret: bool = True):
  """step(state, frozen, batch, ret_norm) -> (state, metrics); jit it once with donated state."""
  base_key = jax.random.key(seed)

  def step(state: TrainState, frozen, batch, ret_norm):
    rng = jax.random.fold_in(base_key, state.step)  # a pure function of (seed, step): resumes exactly
    if feature_cache.is_cached(batch):  # cached tower features (data.features): the tower does not run
      batch = {**batch, "vision_features": feature_cache.vision_features(model, frozen, batch)}
    (loss, metrics), grads = jax.value_and_grad(model.loss, has_aux=True)(state.params, frozen, batch, rng)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if rescale_ret:
      params = rescale_ret_row(params, ret_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    run = jnp.where(finite, 0, state.nonfinite_run + 1)
    new_state = TrainState(
        step=state.step + 1, params=keep(params, state.params), opt_state=keep(opt_state, state.opt_state),
        nonfinite_run=run, nonfinite_max_run=jnp.maximum(state.nonfinite_max_run, run),
        nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32))
    return new_state, {**metrics, "grad_norm": grad_norm, "skipped": (~finite).astype(jnp.float32)}

  return step
