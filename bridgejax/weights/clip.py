"""CLIP vision tower from a Hugging Face directory (CLIPVisionModel, CLIPModel's vision half,
CLIPVisionModelWithProjection) or from a bridgejax converted directory; `weights.vision.load_vision_tower`
dispatches here. What CLIP shares with SigLIP is weights/vit.py's."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from bridgejax.models.clip import CLIPVisionConfig
from bridgejax.weights import safetensors_io, vit
from bridgejax.weights.tree import Source, export

FAMILY = vit.Family(kind="clip_vision", config_class=CLIPVisionConfig,
                    architectures=("CLIPVisionModel", "CLIPModel", "CLIPVisionModelWithProjection"),
                    model_types={"clip": "CLIPModel", "clip_vision_model": "CLIPVisionModel"}, two_tower="CLIPModel")
KIND, ARCHITECTURES, accepts = FAMILY.kind, FAMILY.architectures, FAMILY.accepts


def config_from_hf(hf: dict) -> CLIPVisionConfig:
  """Our config from a HF config.json dict (a CLIPModel's `vision_config`, or the vision model's own)."""
  arch, v = FAMILY.vision_config(hf)
  projection_dim = {"CLIPModel": hf.get("projection_dim", 512),  # transformers' default, as for the rest
                    "CLIPVisionModelWithProjection": v.get("projection_dim", 512)}.get(arch)
  return FAMILY.config(v, projection_dim=projection_dim)


def name_map(config: CLIPVisionConfig, prefix: str) -> vit.Sources:
  """Our parameter path -> HF tensor."""
  sources = vit.name_map(config, prefix)
  if config.projection_dim is not None:  # sits outside `vision_model.` in every HF layout
    sources[("visual_projection", "kernel")] = Source("visual_projection.weight", (1, 0))
  return sources


def read_checkpoint(path: str, param_dtype=jnp.float32) -> tuple[CLIPVisionConfig, dict]:
  """(config, params) of a HF or converted directory, checked against the module's shapes."""
  return FAMILY.read_checkpoint(path, param_dtype, config_from_hf, name_map)


def save_hf(path: str, config: CLIPVisionConfig, params) -> None:
  """Writes a Hugging Face directory (config.json + model.safetensors) that transformers'
  CLIPVisionModel (or ...WithProjection) loads, with the hub's `vision_model.` tensor names."""
  arch = "CLIPVisionModel" if config.projection_dim is None else "CLIPVisionModelWithProjection"
  hf_config = {"architectures": [arch], "model_type": "clip_vision_model",
               **{theirs: getattr(config, ours) for ours, theirs in vit.HF_KEYS.items()}, "dtype": "float32"}
  if config.projection_dim is not None:
    hf_config["projection_dim"] = config.projection_dim
  os.makedirs(path, exist_ok=True)
  tensors = export(name_map(config, "vision_model."), jax.tree.map(lambda x: np.asarray(x, np.float32), params))
  save_file(tensors, os.path.join(path, safetensors_io.SINGLE_FILE), metadata={"format": "pt"})
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf_config, f, indent=2)
