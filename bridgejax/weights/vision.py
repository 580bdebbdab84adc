"""`load_vision_tower`: the vision family of a checkpoint, then that family's reader.

    HF directory        config.json's `architectures` (else `model_type`): weights.clip (CLIPVisionModel,
                        CLIPModel, CLIPVisionModelWithProjection) or weights.siglip (SiglipVisionModel,
                        SiglipModel); anything else is named in the error
    converted directory its header's kind ("clip_vision" or "siglip_vision")
"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp

from bridgejax.models.families import vision_class
from bridgejax.weights import clip, converted, safetensors_io, siglip
from bridgejax.weights.bound import VisionTower
from bridgejax.weights.errors import CheckpointError
from bridgejax.weights.tree import place

# Each family has KIND, ARCHITECTURES, accepts(hf_config), config_from_hf(hf_config) and
# read_checkpoint(path, param_dtype); weights/vit.py holds what the two share.
FAMILIES = (clip, siglip)


def family_of(path: str):
  """The weights module (clip or siglip) that reads `path`."""
  path = str(path)
  if converted.is_converted(path):
    with open(os.path.join(path, converted.HEADER)) as f:
      kind = json.load(f).get("kind")
    return next((family for family in FAMILIES if family.KIND == kind), clip)  # clip names a wrong kind
  return family_of_config(safetensors_io.read_hf_config(path))  # reports a missing directory or config.json


def family_of_config(hf: dict):
  """The weights module that reads a HF config.json dict, or a CheckpointError naming what it is."""
  for family in FAMILIES:
    if family.accepts(hf):
      return family
  arch = (hf.get("architectures") or [None])[0]
  raise CheckpointError(
      f"unknown vision architecture {arch!r} (model_type={hf.get('model_type')!r}); "
      f"load_vision_tower reads {', '.join(a for family in FAMILIES for a in family.ARCHITECTURES)}")


def config_from_hf(hf: dict):
  """The tower config (CLIPVisionConfig or SiglipVisionConfig) of a HF config.json dict."""
  return family_of_config(hf).config_from_hf(hf)


def load_vision_tower(path: str, *, dtype=jnp.float32, param_dtype=jnp.float32, sharding=None) -> VisionTower:
  """The frozen vision tower (CLIP or SigLIP) of a HF or converted directory, its params on device.

  dtype is the compute dtype; param_dtype the dtype the parameters are stored in (bfloat16 halves
  the memory of a frozen tower). sharding places the params (see `tree.place`): by default this
  process's first device; pass the mesh's shardings to load straight onto a mesh.
  """
  config, params = family_of(path).read_checkpoint(str(path), param_dtype)
  module = vision_class(config)(config, dtype=dtype, param_dtype=param_dtype)
  return VisionTower(module, place(params, sharding), config)
