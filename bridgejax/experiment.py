"""What a run is built from: the frozen backbones and the bridge model on the mesh, from a config.

    setup = build(config)    # Setup(config, mesh, model, frozen, tokenizer)

Training, evaluation and inference all start here, so it sits below each of them.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from bridgejax import mesh as mesh_lib, weights
from bridgejax.model import BridgeModel


@dataclasses.dataclass
class Setup:
  """Everything a run needs, built once from the config."""

  config: object
  mesh: jax.sharding.Mesh
  model: BridgeModel
  frozen: dict  # {vision, llm}, placed on the mesh
  tokenizer: object


def build(config) -> Setup:
  """Loads the frozen backbones and assembles the model; places frozen weights on the mesh once."""
  mesh = mesh_lib.make_mesh(config.mesh.data, config.mesh.model)
  param_dtype = jnp.dtype(config.frozen_param_dtype)
  compute_dtype = jnp.dtype(config.compute_dtype)
  # loaded straight onto the mesh: no second copy of the weights on the first device
  on_mesh = lambda tree: mesh_lib.frozen_shardings(tree, mesh, config.frozen_sharding)
  vision = weights.load_vision_tower(config.vision.path, param_dtype=param_dtype, sharding=on_mesh)
  lm = weights.load_language_model(config.llm.path, param_dtype=param_dtype, sharding=on_mesh)
  tokenizer = weights.load_tokenizer(config.llm.get("tokenizer") or config.llm.path)
  model = BridgeModel.create(config, vision.config, lm.config, compute_dtype=compute_dtype,
                             frozen_param_dtype=param_dtype, tokenizer=tokenizer)
  frozen = {"vision": vision.params, "llm": lm.params}
  return Setup(config, mesh, model, frozen, tokenizer)
