"""What a run is built from: the frozen backbones and the bridge model on the mesh, from a config.

    setup = build(config)    # Setup(config, mesh, model, frozen, tokenizer)
    setup = build_abstract(config, devices)   # the same, shapes only: nothing loaded or allocated

Training, evaluation and inference all start here, so it sits below each of them. build_abstract
lays the frozen trees out on a mesh of any devices (a TPU topology's, bench/tpu_compile.py) as
ShapeDtypeStructs with their shardings, for ahead-of-time compilation.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from bridgejax import mesh as mesh_lib, param_count, weights
from bridgejax.model import BridgeModel


@dataclasses.dataclass
class Setup:
  """Everything a run needs, built once from the config."""

  config: object
  mesh: jax.sharding.Mesh
  model: BridgeModel
  frozen: dict  # {vision, llm}, placed on the mesh
  tokenizer: object


def _model(config, vision_config, llm_config, tokenizer=None) -> BridgeModel:
  return BridgeModel.create(config, vision_config, llm_config, compute_dtype=jnp.dtype(config.compute_dtype),
                            frozen_param_dtype=jnp.dtype(config.frozen_param_dtype), tokenizer=tokenizer)


def build(config) -> Setup:
  """Loads the frozen backbones and assembles the model; places frozen weights on the mesh once."""
  mesh = mesh_lib.make_mesh(config.mesh.data, config.mesh.model)
  param_dtype = jnp.dtype(config.frozen_param_dtype)
  # loaded straight onto the mesh: no second copy of the weights on the first device
  on_mesh = lambda tree: mesh_lib.frozen_shardings(tree, mesh, config.frozen_sharding)
  vision = weights.load_vision_tower(config.vision.path, param_dtype=param_dtype, sharding=on_mesh)
  lm = weights.load_language_model(config.llm.path, param_dtype=param_dtype, sharding=on_mesh)
  tokenizer = weights.load_tokenizer(config.llm.tokenizer or config.llm.path)
  model = _model(config, vision.config, lm.config, tokenizer)
  frozen = {"vision": vision.params, "llm": lm.params}
  return Setup(config, mesh, model, frozen, tokenizer)


def build_abstract(config, devices=None) -> Setup:
  """build(config) as shapes: the backbones' sizes from their config.json or named architecture
  (param_count.backbone_configs), the frozen trees as ShapeDtypeStructs in frozen_param_dtype with
  the shardings build() gives them, on a mesh of `devices` (default jax.devices()). No tokenizer."""
  mesh = mesh_lib.make_mesh(config.mesh.data, config.mesh.model, devices=devices)
  vision, llm = param_count.backbone_configs(config)
  param_dtype = jnp.dtype(config.frozen_param_dtype)
  model = _model(config, vision, llm)
  shapes = param_count.abstract_frozen(vision, llm)
  shardings = mesh_lib.frozen_shardings(shapes, mesh, config.frozen_sharding)
  frozen = jax.tree.map(lambda x, sharding: jax.ShapeDtypeStruct(x.shape, param_dtype, sharding=sharding),
                        shapes, shardings)
  return Setup(config, mesh, model, frozen, None)
