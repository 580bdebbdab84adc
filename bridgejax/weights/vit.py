"""What the CLIP and SigLIP readers share (weights/clip.py, weights/siglip.py): a `Family` holds a
vision family's checkpoint conventions as data and reads its config.json and its directories (HF or
converted); `name_map` names the HF tensors of the ViT both towers are (models/vit.py). Each family
module adds what its tower has beyond that ViT (CLIP's projection, SigLIP's pooling head)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import jax.numpy as jnp

from bridgejax.models.families import vision_class
from bridgejax.models.vit import ViTConfig
from bridgejax.weights import converted, safetensors_io
from bridgejax.weights.errors import CheckpointError
from bridgejax.weights.tree import Source, abstract_init, assemble, check_tree

# Our ViTConfig field -> the key of transformers' vision config.json (CLIPVisionConfig, SiglipVisionConfig).
HF_KEYS = dict(hidden_size="hidden_size", intermediate_size="intermediate_size", num_layers="num_hidden_layers",
               num_heads="num_attention_heads", image_size="image_size", patch_size="patch_size",
               num_channels="num_channels", layer_norm_eps="layer_norm_eps", hidden_act="hidden_act")

Sources = dict[tuple[str, ...], Source]


@dataclasses.dataclass(frozen=True)
class Family:
  """One vision family's checkpoints (weights/clip.py and weights/siglip.py each hold one)."""

  kind: str  # a converted directory's kind
  config_class: type[ViTConfig]  # its defaults are transformers': what a config.json omits
  architectures: tuple[str, ...]  # config.json `architectures` it reads
  model_types: Mapping[str, str]  # model_type -> architecture, for a config.json saved without `architectures`
  two_tower: str  # the architecture whose config.json nests the tower's under `vision_config`

  def architecture(self, hf: dict) -> str | None:
    """What a HF config.json dict names: its first `architectures` entry, else its model_type's."""
    arch = (hf.get("architectures") or [None])[0]
    return self.model_types.get(hf.get("model_type")) if arch is None else arch

  def accepts(self, hf: dict) -> bool:
    """Whether a HF config.json describes a checkpoint this family reads."""
    return self.architecture(hf) in self.architectures

  def vision_config(self, hf: dict) -> tuple[str, dict]:
    """(architecture, the tower's own config.json fields: a two-tower model's `vision_config`)."""
    arch = self.architecture(hf)
    if arch not in self.architectures:
      raise CheckpointError(f"unknown vision architecture {arch!r} (model_type={hf.get('model_type')!r}); "
                            f"load_vision_tower reads {', '.join(self.architectures)}")
    return arch, (hf.get("vision_config", {}) if arch == self.two_tower else hf)

  def config(self, fields: dict, **own) -> ViTConfig:
    """Our config from the tower's config.json fields (transformers' defaults for those it omits)
    and the family's `own` fields."""
    default = self.config_class()
    try:
      return self.config_class(**{ours: fields.get(theirs, getattr(default, ours)) for ours, theirs in HF_KEYS.items()},
                               **own)
    except (ValueError, TypeError) as e:  # our checks; non-square image or patch sizes (lists)
      raise CheckpointError(f"config.json describes a {self.kind} tower bridgejax cannot build: {e}") from e

  def read_checkpoint(self, path: str, param_dtype, config_from_hf: Callable[[dict], ViTConfig],
                      name_map: Callable[[ViTConfig, str], Sources]) -> tuple[ViTConfig, dict]:
    """(config, params) of a HF or converted directory, checked against the module's shapes."""
    if converted.is_converted(path):
      config_dict, params = converted.load(path, self.kind)
      config = self.config_class(**config_dict)
      return config, check_tree(params, _abstract(config), checkpoint=path, param_dtype=param_dtype)
    config = config_from_hf(safetensors_io.read_hf_config(path))
    tensors = safetensors_io.read_hf_tensors(path)
    prefix = "vision_model." if any(n.startswith("vision_model.") for n in tensors) else ""  # a two-tower model
    params = assemble(name_map(config, prefix), tensors, _abstract(config), checkpoint=path,
                      param_dtype=param_dtype, ignore=_ignored)
    return config, params


def _abstract(config: ViTConfig):
  c = config
  return abstract_init(vision_class(c)(c), jnp.zeros((1, c.num_channels, c.image_size, c.image_size)))


def _ignored(name: str) -> bool:
  """Tensors a two-tower checkpoint (CLIPModel, SiglipModel) carries that its vision tower does not use."""
  return (name.startswith(("text_model.", "text_projection.")) or name in ("logit_scale", "logit_bias")
          or name.endswith("position_ids"))


def linear_sources(name: str) -> Sources:
  """A torch Linear's tensors: weights are (out, in) in torch, (in, out) here."""
  return {("kernel",): Source(f"{name}.weight", (1, 0)), ("bias",): Source(f"{name}.bias")}


def norm_sources(name: str) -> Sources:
  return {("scale",): Source(f"{name}.weight"), ("bias",): Source(f"{name}.bias")}


def prefixed(modules: dict[tuple[str, ...], Sources], prefix: str) -> Sources:
  """{module path: {leaf: Source}} -> {parameter path: Source}, every tensor name behind `prefix`."""
  return {mod + leaf: dataclasses.replace(src, name=prefix + src.name)
          for mod, leaves in modules.items() for leaf, src in leaves.items()}


def name_map(config: ViTConfig, prefix: str) -> Sources:
  """Our parameter path -> HF tensor, for the ViT's modules (models/vit.VisionTransformer and the
  towers' post_norm), as CLIP and SigLIP both name them; the config's class attributes say which exist."""
  patch = {("kernel",): Source("embeddings.patch_embedding.weight", (2, 3, 1, 0))}  # OIHW -> HWIO
  embeddings = {("pos_embed",): Source("embeddings.position_embedding.weight")}
  if config.patch_bias:
    patch[("bias",)] = Source("embeddings.patch_embedding.bias")
  if config.has_cls_token:
    embeddings[("cls_embed",)] = Source("embeddings.class_embedding")
  modules = {("patch_embed",): patch, (): embeddings, ("post_norm",): norm_sources("post_layernorm")}
  if config.pre_norm:
    modules[("pre_norm",)] = norm_sources("pre_layrnorm")  # sic: transformers' spelling
  for i in range(config.num_layers):
    hf = f"encoder.layers.{i}"
    modules[(f"layer_{i}", "norm1")] = norm_sources(f"{hf}.layer_norm1")
    modules[(f"layer_{i}", "norm2")] = norm_sources(f"{hf}.layer_norm2")
    modules[(f"layer_{i}", "fc1")] = linear_sources(f"{hf}.mlp.fc1")
    modules[(f"layer_{i}", "fc2")] = linear_sources(f"{hf}.mlp.fc2")
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
      modules[(f"layer_{i}", "attn", proj)] = linear_sources(f"{hf}.self_attn.{proj}")
  return prefixed(modules, prefix)
