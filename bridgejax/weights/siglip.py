"""SigLIP vision tower from a Hugging Face directory (SiglipVisionModel, or SiglipModel's vision
half: the text tower is ignored) or from a bridgejax converted directory."""

from __future__ import annotations

import jax.numpy as jnp

from bridgejax.models.siglip import SiglipVisionConfig, SiglipVisionTransformer
from bridgejax.weights import clip, converted, safetensors_io
from bridgejax.weights.errors import CheckpointError
from bridgejax.weights.tree import Source, abstract_init, assemble, check_tree

KIND = "siglip_vision"
ARCHITECTURES = ("SiglipVisionModel", "SiglipModel")
MODEL_TYPES = ("siglip", "siglip_vision_model")
# transformers' SiglipVisionConfig defaults: a SiglipModel's config.json may omit any of them.
_HF_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                    image_size=224, patch_size=16, num_channels=3, layer_norm_eps=1e-6,
                    hidden_act="gelu_pytorch_tanh", vision_use_head=True)


def config_from_hf(hf: dict) -> SiglipVisionConfig:
  """Our config from a HF config.json dict (a SiglipModel's `vision_config`, or the vision model's own)."""
  arch = (hf.get("architectures") or [None])[0]
  whole = arch == "SiglipModel" or (arch is None and hf.get("model_type") == "siglip")
  v = {**_HF_DEFAULTS, **(hf.get("vision_config", {}) if whole else hf)}
  try:
    return SiglipVisionConfig(
        hidden_size=v["hidden_size"], intermediate_size=v["intermediate_size"], num_layers=v["num_hidden_layers"],
        num_heads=v["num_attention_heads"], image_size=v["image_size"], patch_size=v["patch_size"],
        num_channels=v["num_channels"], layer_norm_eps=v["layer_norm_eps"], hidden_act=v["hidden_act"],
        use_head=bool(v["vision_use_head"]))
  except (ValueError, TypeError) as e:  # our checks; non-square image or patch sizes (lists)
    raise CheckpointError(f"config.json describes a SigLIP tower bridgejax cannot build: {e}") from e


def accepts(hf_config: dict) -> bool:
  """Whether a HF config.json describes a checkpoint this module reads."""
  return bool(set(hf_config.get("architectures") or []) & set(ARCHITECTURES)) or (
      not hf_config.get("architectures") and hf_config.get("model_type") in MODEL_TYPES)


def name_map(config: SiglipVisionConfig, prefix: str) -> dict[tuple[str, ...], Source]:
  """Our parameter path -> HF tensor (the encoder layers named as CLIP's)."""
  linear, norm = clip.linear_sources, clip.norm_sources
  modules = {
      ("patch_embed",): {("kernel",): Source("embeddings.patch_embedding.weight", (2, 3, 1, 0)),
                         ("bias",): Source("embeddings.patch_embedding.bias")},
      (): {("pos_embed",): Source("embeddings.position_embedding.weight")},
      ("post_norm",): norm("post_layernorm"),
      **clip.encoder_layer_sources(config.num_layers),
  }
  if config.use_head:
    modules[("head",)] = {("probe",): Source("head.probe"),
                          ("in_proj_kernel",): Source("head.attention.in_proj_weight", (1, 0)),
                          ("in_proj_bias",): Source("head.attention.in_proj_bias")}
    modules[("head", "out_proj")] = linear("head.attention.out_proj")
    modules[("head", "norm")] = norm("head.layernorm")
    modules[("head", "fc1")] = linear("head.mlp.fc1")
    modules[("head", "fc2")] = linear("head.mlp.fc2")
  return clip.prefixed(modules, prefix)


def _ignored(name: str) -> bool:
  """Tensors a SiglipModel checkpoint carries that the vision tower does not use."""
  return name.startswith("text_model.") or name in ("logit_scale", "logit_bias") or name.endswith("position_ids")


def read_checkpoint(path: str, param_dtype=jnp.float32) -> tuple[SiglipVisionConfig, dict]:
  """(config, params) of a HF or converted directory, checked against the module's shapes."""
  if converted.is_converted(path):
    config_dict, params = converted.load(path, KIND)
    config = SiglipVisionConfig(**config_dict)
    return config, check_tree(params, _abstract(config), checkpoint=path, param_dtype=param_dtype)
  config = config_from_hf(safetensors_io.read_hf_config(path))
  tensors = safetensors_io.read_hf_tensors(path)
  prefix = "vision_model." if any(n.startswith("vision_model.") for n in tensors) else ""
  params = assemble(name_map(config, prefix), tensors, _abstract(config), checkpoint=path,
                    param_dtype=param_dtype, ignore=_ignored)
  return config, params


def _abstract(config: SiglipVisionConfig):
  c = config
  return abstract_init(SiglipVisionTransformer(c), jnp.zeros((1, c.num_channels, c.image_size, c.image_size)))
