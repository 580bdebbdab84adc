"""The device mesh and how each tree is laid out on it.

Axes are ('data', 'model'): the batch is split over 'data'; frozen weights are replicated, or
FSDP-sharded over both axes (each large array split along its largest divisible dimension), which
is what lets Gemma-2B + ViT-L fit next to activations on small accelerators.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from bridgejax.errors import UserError

AXES = ("data", "model")


def mesh_shape(data: int, model: int, num_devices: int) -> tuple[int, int]:
  """(data, model) of a mesh over num_devices devices; -1 on one axis takes all remaining devices."""
  n = num_devices
  if data == -1 and model == -1:
    raise UserError("mesh.data and mesh.model cannot both be -1; set one of them")
  if data == -1:
    data = n // model if model > 0 and n % model == 0 else 0
  if model == -1:
    model = n // data if data > 0 and n % data == 0 else 0
  if data <= 0 or model <= 0 or data * model != n:
    raise UserError(f"mesh.data={data} x mesh.model={model} does not use the {n} available devices "
                     f"exactly; choose sizes whose product is {n} (or -1 for one of them)")
  return data, model


def make_mesh(data: int = -1, model: int = 1, devices=None) -> jax.sharding.Mesh:
  """A ('data', 'model') mesh; -1 on one axis takes all remaining devices."""
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(data, model, len(devices))
  return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * 2, devices=devices)


def batch_multiple(data: int, processes: int = 1, even: bool = False) -> int:
  """What a global batch must be a multiple of: split evenly over `data` devices and `processes`
  hosts, and into pairs when `even` (the concat trick)."""
  return math.lcm(data, processes, 2 if even else 1)


def batch_size_problem(batch_size: int, data: int, processes: int = 1, even: bool = False) -> str | None:
  """Why a global batch is not a batch_multiple, naming the nearest sizes that are; None when it is."""
  multiple = batch_multiple(data, processes, even)
  if batch_size % multiple == 0:
    return None
  below = batch_size // multiple * multiple
  near = [b for b in (below, below + multiple) if b > 0]
  why = [f"mesh.data={data}"] + ([f"{processes} processes"] if processes > 1 else []) + (
      ["pairs for the concat trick (concat_prob > 0)"] if even else [])
  return (f"batch_size={batch_size} does not split evenly over {', '.join(why)}: it must be a multiple of "
          f"{multiple}; the nearest that do are {' and '.join(map(str, near))} (--config.batch_size={near[0]})")


def batch_sharding(mesh) -> NamedSharding:
  """Leading (batch) axis over 'data', everything else replicated."""
  return NamedSharding(mesh, P("data"))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def fsdp_spec(shape, mesh, min_size: int = 2**14) -> P:
  """Shards an array's largest dimension divisible by the whole mesh (else by one axis)."""
  if math.prod(shape) < min_size:
    return P()
  order = sorted(range(len(shape)), key=lambda i: -shape[i])
  for axes in (AXES, ("data",), ("model",)):
    size = math.prod(mesh.shape[a] for a in axes)
    if size == 1:
      continue
    for i in order:
      if shape[i] % size == 0:
        spec = [None] * len(shape)
        spec[i] = axes if len(axes) > 1 else axes[0]
        return P(*spec)
  return P()


def frozen_shardings(tree, mesh, strategy: str):
  """NamedShardings for a frozen tree: 'replicate' or 'fsdp'."""
  if strategy == "replicate":
    return jax.tree.map(lambda _: replicated(mesh), tree)
  if strategy == "fsdp":
    return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(np.shape(x), mesh)), tree)
  raise UserError(f"unknown frozen sharding {strategy!r}; use 'replicate' or 'fsdp'")
