"""The SigLIP vision tower in Flax Linen, numerically equal to transformers' SiglipVisionModel (and
SiglipModel's vision half).

The ViT is models/vit.py's (CLIP's encoder layers, a different activation); SigLIP's own, as
transformers' modeling_siglip.py:
  * No CLS token and no pre-LayerNorm: hidden_states[0] is patches + positions (the patch
    convolution has a bias).
  * The post-LayerNorm applies to every token: last_hidden_state = post_norm(layer L).
  * pooler_output is the attention-pool ("MAP") head over last_hidden_state: a learned probe
    attends to every token (torch nn.MultiheadAttention, its packed in-projection kept as is), then
    probe + MLP(LayerNorm(probe)).
Bridges read a CLS token; for SigLIP `bridges.VisionFeatures.from_tower(..., cls_equivalent=...)`
puts a documented stand-in in its place (the mean of the patches, or the pooled output).

Axis legend (einsum letters):
  B batch, N tokens (the patches), D width, H heads, F head dim, Q the attention-pool head's probe (one query).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from bridgejax.models.activations import ACTIVATIONS
from bridgejax.models.vit import VisionOutput, VisionTransformer, ViTConfig, ViTModule, layer_norm

__all__ = ["SiglipVisionConfig", "SiglipVisionTransformer", "VisionOutput"]


@dataclasses.dataclass(frozen=True)
class SiglipVisionConfig(ViTConfig):
  """One SigLIP vision tower. Defaults are siglip-base-patch16-224's; `weights.siglip` reads the rest."""

  has_cls_token: ClassVar[bool] = False  # bridges get a stand-in (bridges.base.CLS_EQUIVALENTS)
  patch_bias: ClassVar[bool] = True
  pre_norm: ClassVar[bool] = False

  patch_size: int = 16
  layer_norm_eps: float = 1e-6
  hidden_act: str = "gelu_pytorch_tanh"
  use_head: bool = True  # transformers' vision_use_head: the attention-pool head gives pooler_output


class AttentionPoolHead(ViTModule):
  """SiglipMultiheadAttentionPoolingHead: tokens (B, N, D) -> (B, D)."""

  config: SiglipVisionConfig

  @nn.compact
  def __call__(self, x):
    c = self.config
    width, head_dim = c.hidden_size, c.hidden_size // c.num_heads
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    probe = self.param("probe", nn.initializers.normal(1.0), (1, 1, width), self.param_dtype)[0]  # (Q, D)
    # torch's packed in-projection: (D, 3D) columns [q | k | v] (in_proj_weight transposed), (3D,) bias
    kernel = self.param("in_proj_kernel", nn.initializers.lecun_normal(), (width, 3 * width), self.param_dtype)
    bias = self.param("in_proj_bias", nn.initializers.zeros, (3 * width,), self.param_dtype)
    (wq, wk, wv), (bq, bk, bv) = jnp.split(kernel.astype(self.dtype), 3, 1), jnp.split(bias.astype(self.dtype), 3)
    heads = lambda t: t.reshape(*t.shape[:-1], c.num_heads, head_dim)
    x = x.astype(self.dtype)
    q = heads(probe.astype(self.dtype) @ wq + bq) * head_dim**-0.5  # (Q, H, F)
    k, v = heads(x @ wk + bk), heads(x @ wv + bv)  # (B, N, H, F)
    probs = jax.nn.softmax(jnp.einsum("QHF,BNHF->BHQN", q, k).astype(jnp.float32), axis=-1).astype(self.dtype)
    out = jnp.einsum("BHQN,BNHF->BQHF", probs, v).reshape(x.shape[0], 1, width)
    out = nn.Dense(width, name="out_proj", **kw)(out)  # (B, Q, D)
    h = layer_norm(self, "norm")(out)
    h = nn.Dense(c.hidden_size, name="fc2", **kw)(
        ACTIVATIONS[c.hidden_act](nn.Dense(c.intermediate_size, name="fc1", **kw)(h)))
    return (out + h)[:, 0]


class SiglipVisionTransformer(VisionTransformer):
  """pixel_values (B, C, H, W) float, SigLIP-normalised ((x - 0.5) / 0.5) -> VisionOutput."""

  config: SiglipVisionConfig

  def outputs(self, x, hidden_states) -> VisionOutput:  # x: (B, N, D)
    last = layer_norm(self, "post_norm")(x)
    pooled = (AttentionPoolHead(self.config, name="head", dtype=self.dtype, param_dtype=self.param_dtype)(last)
              if self.config.use_head else None)  # (B, D)
    return VisionOutput(last, pooled, hidden_states)
