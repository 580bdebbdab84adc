"""The CLIP ViT vision tower in Flax Linen, numerically equal to transformers' CLIPVisionModel.

The ViT is models/vit.py's; CLIP's own, as transformers' modeling_clip.py: a class token, a patch
convolution without bias, a pre-LayerNorm (`pre_layrnorm`) before the first layer, and the
post-LayerNorm on the last layer's CLS only (pooler_output; last_hidden_state stays as it is), then
`visual_projection` when the checkpoint has one.

Axis legend: B batch, N tokens (1 + patches), D width, P projection width.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.linen as nn

from bridgejax.models.vit import EncoderLayer, VisionOutput, VisionTransformer, ViTConfig, layer_norm

__all__ = ["CLIPVisionConfig", "CLIPVisionTransformer", "EncoderLayer", "VisionOutput"]


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig(ViTConfig):
  """One CLIP vision tower. Defaults are clip-vit-base-patch32's; `weights.clip` reads the rest."""

  has_cls_token: ClassVar[bool] = True
  patch_bias: ClassVar[bool] = False
  pre_norm: ClassVar[bool] = True

  patch_size: int = 32
  layer_norm_eps: float = 1e-5
  hidden_act: str = "quick_gelu"
  projection_dim: int | None = None  # set when the checkpoint carries `visual_projection`

  def __post_init__(self):
    super().__post_init__()
    if self.image_size % self.patch_size:
      raise ValueError(f"image_size={self.image_size} is not divisible by patch_size={self.patch_size}")


class CLIPVisionTransformer(VisionTransformer):
  """pixel_values (B, C, H, W) float, CLIP-normalised as transformers expects -> VisionOutput."""

  config: CLIPVisionConfig

  def outputs(self, x, hidden_states) -> VisionOutput:  # x: (B, N, D)
    c = self.config
    pooled = layer_norm(self, "post_norm")(x[:, 0])  # (B, D)
    image_embeds = None
    if c.projection_dim is not None:
      image_embeds = nn.Dense(c.projection_dim, use_bias=False, name="visual_projection", dtype=self.dtype,
                              param_dtype=self.param_dtype)(pooled)  # (B, P)
    return VisionOutput(x, pooled, hidden_states, image_embeds)
