"""CLIP vision tower from a Hugging Face directory (CLIPVisionModel, CLIPModel's vision half,
CLIPVisionModelWithProjection) or from a bridgejax converted directory; `weights.vision.load_vision_tower`
dispatches here."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from bridgejax.models.clip import CLIPVisionConfig, CLIPVisionTransformer
from bridgejax.weights import converted, safetensors_io
from bridgejax.weights.errors import CheckpointError
from bridgejax.weights.tree import Source, abstract_init, assemble, check_tree, export

KIND = "clip_vision"
ARCHITECTURES = ("CLIPVisionModel", "CLIPModel", "CLIPVisionModelWithProjection")
# transformers' CLIPVisionConfig defaults: a CLIPModel's config.json may omit any of them.
_HF_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                    num_attention_heads=12, image_size=224, patch_size=32, num_channels=3,
                    layer_norm_eps=1e-5, hidden_act="quick_gelu")


def config_from_hf(hf: dict) -> tuple[CLIPVisionConfig, str]:
  """Our config and the architecture name, from a HF config.json dict."""
  arch = (hf.get("architectures") or [None])[0]
  if arch is None:  # a config saved without `architectures`: fall back on model_type
    arch = {"clip": "CLIPModel", "clip_vision_model": "CLIPVisionModel"}.get(hf.get("model_type"))
  if arch not in ARCHITECTURES:
    raise CheckpointError(
        f"unknown vision architecture {arch!r} (model_type={hf.get('model_type')!r}); "
        f"load_vision_tower reads {', '.join(ARCHITECTURES)}")
  v = {**_HF_DEFAULTS, **(hf.get("vision_config", {}) if arch == "CLIPModel" else hf)}
  projection_dim = None
  if arch == "CLIPModel":
    projection_dim = hf.get("projection_dim", 512)
  elif arch == "CLIPVisionModelWithProjection":
    projection_dim = v.get("projection_dim", 512)
  config = CLIPVisionConfig(
      hidden_size=v["hidden_size"], intermediate_size=v["intermediate_size"],
      num_layers=v["num_hidden_layers"], num_heads=v["num_attention_heads"],
      image_size=v["image_size"], patch_size=v["patch_size"], num_channels=v["num_channels"],
      layer_norm_eps=v["layer_norm_eps"], hidden_act=v["hidden_act"], projection_dim=projection_dim)
  return config, arch


def linear_sources(name: str) -> dict[tuple[str, ...], Source]:
  """A torch Linear's tensors: weights are (out, in) in torch, (in, out) here."""
  return {("kernel",): Source(f"{name}.weight", (1, 0)), ("bias",): Source(f"{name}.bias")}


def norm_sources(name: str) -> dict[tuple[str, ...], Source]:
  return {("scale",): Source(f"{name}.weight"), ("bias",): Source(f"{name}.bias")}


def encoder_layer_sources(num_layers: int) -> dict[tuple[str, ...], dict]:
  """Our encoder layer modules -> their tensors, as CLIP and SigLIP both name them (models/clip.EncoderLayer)."""
  modules = {}
  for i in range(num_layers):
    hf = f"encoder.layers.{i}"
    modules[(f"layer_{i}", "norm1")] = norm_sources(f"{hf}.layer_norm1")
    modules[(f"layer_{i}", "norm2")] = norm_sources(f"{hf}.layer_norm2")
    modules[(f"layer_{i}", "fc1")] = linear_sources(f"{hf}.mlp.fc1")
    modules[(f"layer_{i}", "fc2")] = linear_sources(f"{hf}.mlp.fc2")
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
      modules[(f"layer_{i}", "attn", proj)] = linear_sources(f"{hf}.self_attn.{proj}")
  return modules


def prefixed(modules: dict[tuple[str, ...], dict], prefix: str) -> dict[tuple[str, ...], Source]:
  """{module path: {leaf: Source}} -> {parameter path: Source}, every tensor name behind `prefix`."""
  return {mod + leaf: dataclasses.replace(src, name=prefix + src.name)
          for mod, leaves in modules.items() for leaf, src in leaves.items()}


def name_map(config: CLIPVisionConfig, prefix: str) -> dict[tuple[str, ...], Source]:
  """Our parameter path -> HF tensor."""
  norm = norm_sources
  modules = {
      ("patch_embed",): {("kernel",): Source("embeddings.patch_embedding.weight", (2, 3, 1, 0))},
      (): {("cls_embed",): Source("embeddings.class_embedding"),
           ("pos_embed",): Source("embeddings.position_embedding.weight")},
      ("pre_norm",): norm("pre_layrnorm"),  # sic: transformers' spelling
      ("post_norm",): norm("post_layernorm"),
  }
  sources = prefixed({**modules, **encoder_layer_sources(config.num_layers)}, prefix)
  if config.projection_dim is not None:  # sits outside `vision_model.` in every HF layout
    sources[("visual_projection", "kernel")] = Source("visual_projection.weight", (1, 0))
  return sources


def _ignored(name: str) -> bool:
  """Tensors a CLIP checkpoint may carry that the vision tower does not use."""
  return (name.startswith(("text_model.", "text_projection.")) or name == "logit_scale"
          or name.endswith("position_ids"))


def accepts(hf_config: dict) -> bool:
  """Whether a HF config.json describes a checkpoint this module reads."""
  return bool(set(hf_config.get("architectures") or []) & set(ARCHITECTURES)) or (
      hf_config.get("model_type") in ("clip", "clip_vision_model"))


def read_checkpoint(path: str, param_dtype=jnp.float32) -> tuple[CLIPVisionConfig, dict]:
  """(config, params) of a HF or converted directory, checked against the module's shapes."""
  if converted.is_converted(path):
    config_dict, params = converted.load(path, KIND)
    config = CLIPVisionConfig(**config_dict)
    params = check_tree(params, _abstract(config), checkpoint=path, param_dtype=param_dtype)
    return config, params
  config, _ = config_from_hf(safetensors_io.read_hf_config(path))
  tensors = safetensors_io.read_hf_tensors(path)
  prefix = "vision_model." if any(n.startswith("vision_model.") for n in tensors) else ""
  params = assemble(name_map(config, prefix), tensors, _abstract(config), checkpoint=path,
                    param_dtype=param_dtype, ignore=_ignored)
  return config, params


def _abstract(config: CLIPVisionConfig):
  c = config
  return abstract_init(CLIPVisionTransformer(c), jnp.zeros((1, c.num_channels, c.image_size, c.image_size)))


def save_hf(path: str, config: CLIPVisionConfig, params) -> None:
  """Writes a Hugging Face directory (config.json + model.safetensors) that transformers'
  CLIPVisionModel (or ...WithProjection) loads, with the hub's `vision_model.` tensor names."""
  arch = "CLIPVisionModel" if config.projection_dim is None else "CLIPVisionModelWithProjection"
  hf_config = {
      "architectures": [arch], "model_type": "clip_vision_model", "hidden_size": config.hidden_size,
      "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_layers,
      "num_attention_heads": config.num_heads, "image_size": config.image_size,
      "patch_size": config.patch_size, "num_channels": config.num_channels,
      "layer_norm_eps": config.layer_norm_eps, "hidden_act": config.hidden_act, "dtype": "float32"}
  if config.projection_dim is not None:
    hf_config["projection_dim"] = config.projection_dim
  os.makedirs(path, exist_ok=True)
  tensors = export(name_map(config, "vision_model."), jax.tree.map(lambda x: np.asarray(x, np.float32), params))
  save_file(tensors, os.path.join(path, safetensors_io.SINGLE_FILE), metadata={"format": "pt"})
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf_config, f, indent=2)
