"""SigLIP vision tower from a Hugging Face directory (SiglipVisionModel, or SiglipModel's vision
half: the text tower is ignored) or from a bridgejax converted directory. What SigLIP shares with
CLIP is weights/vit.py's; its own tensors are the attention-pool head's."""

from __future__ import annotations

import jax.numpy as jnp

from bridgejax.models.siglip import SiglipVisionConfig
from bridgejax.weights import vit
from bridgejax.weights.tree import Source

FAMILY = vit.Family(kind="siglip_vision", config_class=SiglipVisionConfig,
                    architectures=("SiglipVisionModel", "SiglipModel"),
                    model_types={"siglip": "SiglipModel", "siglip_vision_model": "SiglipVisionModel"},
                    two_tower="SiglipModel")
KIND, ARCHITECTURES, accepts = FAMILY.kind, FAMILY.architectures, FAMILY.accepts


def config_from_hf(hf: dict) -> SiglipVisionConfig:
  """Our config from a HF config.json dict (a SiglipModel's `vision_config`, or the vision model's own)."""
  _, v = FAMILY.vision_config(hf)
  return FAMILY.config(v, use_head=bool(v.get("vision_use_head", True)))  # transformers' default


def name_map(config: SiglipVisionConfig, prefix: str) -> vit.Sources:
  """Our parameter path -> HF tensor: the ViT's, then the attention-pool head's (models/siglip.AttentionPoolHead)."""
  if not config.use_head:
    return vit.name_map(config, prefix)
  linear, norm = vit.linear_sources, vit.norm_sources
  head = {("head",): {("probe",): Source("head.probe"),
                      ("in_proj_kernel",): Source("head.attention.in_proj_weight", (1, 0)),
                      ("in_proj_bias",): Source("head.attention.in_proj_bias")},
          ("head", "out_proj"): linear("head.attention.out_proj"), ("head", "norm"): norm("head.layernorm"),
          ("head", "fc1"): linear("head.mlp.fc1"), ("head", "fc2"): linear("head.mlp.fc2")}
  return {**vit.name_map(config, prefix), **vit.prefixed(head, prefix)}


def read_checkpoint(path: str, param_dtype=jnp.float32) -> tuple[SiglipVisionConfig, dict]:
  """(config, params) of a HF or converted directory, checked against the module's shapes."""
  return FAMILY.read_checkpoint(path, param_dtype, config_from_hf, name_map)
