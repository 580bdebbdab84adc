"""Assembling a Flax parameter tree from named checkpoint tensors, with every check in one place."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import jax
import numpy as np
from flax import traverse_util

from bridgejax.weights.errors import CheckpointError

_MAX_LISTED = 20


@dataclasses.dataclass(frozen=True)
class Source:
  """Where a parameter comes from: a checkpoint tensor, optionally transposed into our layout."""

  name: str
  transpose: tuple[int, ...] | None = None

  def to_ours(self, array: np.ndarray) -> np.ndarray:
    return array if self.transpose is None else np.transpose(array, self.transpose)

  def to_stored(self, array: np.ndarray) -> np.ndarray:
    return array if self.transpose is None else np.transpose(array, np.argsort(self.transpose))

  def stored_shape(self, our_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape the checkpoint must have for our parameter to get `our_shape`."""
    if self.transpose is None:
      return tuple(our_shape)
    return tuple(our_shape[self.transpose.index(i)] for i in range(len(our_shape)))


def _listing(names) -> str:
  names = sorted(names)
  more = f" ... and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else ""
  return ", ".join(names[:_MAX_LISTED]) + more


def assemble(
    sources: Mapping[tuple[str, ...], Source],
    tensors: Mapping[str, np.ndarray],
    abstract_params,
    *,
    checkpoint: str,
    param_dtype,
    ignore: Callable[[str], bool] = lambda name: False,
):
  """Builds the nested param dict whose leaves match `abstract_params` (from jax.eval_shape).

  Raises CheckpointError listing every missing tensor, unexpected tensor (not mapped and not
  ignored), and shape mismatch, instead of failing on the first one deep inside Flax.
  """
  expected = traverse_util.flatten_dict(abstract_params)
  if set(expected) != set(sources):  # a bug in a name map, not in the user's checkpoint
    raise AssertionError(f"name map does not cover the module: {set(expected) ^ set(sources)}")
  used = {s.name for s in sources.values()}
  missing = used - set(tensors)
  unexpected = {n for n in tensors if n not in used and not ignore(n)}
  problems = []
  if missing:
    problems.append(f"missing tensors ({len(missing)}): {_listing(missing)}")
  if unexpected:
    problems.append(f"unexpected tensors ({len(unexpected)}): {_listing(unexpected)}")
  flat = {}
  mismatched = []
  for path, src in sources.items():
    if src.name not in tensors:
      continue
    want = src.stored_shape(expected[path].shape)
    got = tuple(tensors[src.name].shape)
    if got != want:
      mismatched.append(f"{src.name}: expected {want}, got {got}")
      continue
    flat[path] = np.asarray(src.to_ours(tensors[src.name])).astype(param_dtype)
  if mismatched:
    problems.append(f"shape mismatches ({len(mismatched)}; does config.json belong to these weights?): "
                    + "; ".join(mismatched[:_MAX_LISTED]))
  if problems:
    raise CheckpointError(f"checkpoint {checkpoint!r} does not fit the model: " + " | ".join(problems))
  return traverse_util.unflatten_dict(flat)


def abstract_init(module, *example_inputs):
  """Parameter shapes of `module` without allocating anything."""
  init = lambda: module.init(jax.random.key(0), *example_inputs)["params"]
  return jax.eval_shape(init)


def check_tree(params, abstract_params, *, checkpoint: str, param_dtype):
  """Checks a tree already in our layout (a converted checkpoint) against the module's shapes."""
  key = "/".join
  sources = {path: Source(key(path)) for path in traverse_util.flatten_dict(abstract_params)}
  named = {key(path): v for path, v in traverse_util.flatten_dict(params).items()}
  return assemble(sources, named, abstract_params, checkpoint=checkpoint, param_dtype=param_dtype)


def place(params, sharding=None):
  """Puts a parameter tree on device once, so that no later call sends it again.

  sharding: None (this process's first device), a jax Sharding, a pytree of Shardings matching
  `params` (or a prefix of it), or a function from the host tree to either (e.g. the training
  mesh's frozen_shardings, which need the shapes). Leaves come back as committed jax.Arrays.
  """
  if callable(sharding) and not isinstance(sharding, jax.sharding.Sharding):
    sharding = sharding(params)
  if sharding is None:
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.device_put(params, sharding)


def on_device(params):
  """`params` with every host leaf (numpy) put on this process's first device; device leaves kept."""
  here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(lambda x: x if isinstance(x, jax.Array) else jax.device_put(x, here), params)


def export(sources: Mapping[tuple[str, ...], Source], params) -> dict[str, np.ndarray]:
  """The inverse of `assemble`: checkpoint-named tensors in the checkpoint's layout."""
  flat = traverse_util.flatten_dict(params)
  return {src.name: np.ascontiguousarray(src.to_stored(np.asarray(flat[path]))) for path, src in sources.items()}
