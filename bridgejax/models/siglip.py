"""The SigLIP vision tower in Flax Linen, numerically equal to transformers' SiglipVisionModel (and
SiglipModel's vision half).

Axis legend (einsum letters):
  B batch, C channels, N tokens (the patches: SigLIP has no CLS token), D width, H heads, F head
  dim, M MLP width, Q the attention-pool head's probe (one query).

What differs from CLIP (models/clip.py), as transformers' modeling_siglip.py:
  * No CLS token and no pre-LayerNorm: hidden_states[0] is patches + positions (the patch
    convolution has a bias).
  * The post-LayerNorm applies to every token: last_hidden_state = post_norm(layer L).
  * pooler_output is the attention-pool ("MAP") head over last_hidden_state: a learned probe
    attends to every token (torch nn.MultiheadAttention, its packed in-projection kept as is), then
    probe + MLP(LayerNorm(probe)).
The encoder layers are CLIP's (same LayerNorm/attention/MLP layout, a different activation).
Bridges read a CLS token; for SigLIP `bridges.VisionFeatures.from_tower(..., cls_equivalent=...)`
puts a documented stand-in in its place (the mean of the patches, or the pooled output).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from bridgejax.models.activations import ACTIVATIONS
from bridgejax.models.clip import EncoderLayer, VisionOutput, embed_patches
from bridgejax.models.precision import matmul_precision

__all__ = ["SiglipVisionConfig", "SiglipVisionTransformer", "VisionOutput"]


@dataclasses.dataclass(frozen=True)
class SiglipVisionConfig:
  """One SigLIP vision tower. Defaults are siglip-base-patch16-224's; `weights.siglip` reads the rest."""

  has_cls_token: ClassVar[bool] = False  # bridges get a stand-in (bridges.base.CLS_EQUIVALENTS)

  hidden_size: int = 768
  intermediate_size: int = 3072
  num_layers: int = 12
  num_heads: int = 12
  image_size: int = 224
  patch_size: int = 16
  num_channels: int = 3
  layer_norm_eps: float = 1e-6
  hidden_act: str = "gelu_pytorch_tanh"
  use_head: bool = True  # transformers' vision_use_head: the attention-pool head gives pooler_output

  def __post_init__(self):
    if self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
    if self.patch_size > self.image_size:
      raise ValueError(f"patch_size={self.patch_size} is larger than image_size={self.image_size}")
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f"hidden_act={self.hidden_act!r} is not supported; use one of {sorted(ACTIVATIONS)}")

  @property
  def grid_size(self) -> int:
    """Patches per side; pixels past grid_size * patch_size are dropped, as by transformers' patch
    convolution (so400m: 384 // 14 = 27, the last 6 rows and columns unseen)."""
    return self.image_size // self.patch_size

  @property
  def num_tokens(self) -> int:
    return self.grid_size**2


class AttentionPoolHead(nn.Module):
  """SiglipMultiheadAttentionPoolingHead: tokens (B, N, D) -> (B, D)."""

  config: SiglipVisionConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

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
    h = nn.LayerNorm(epsilon=c.layer_norm_eps, name="norm", **kw)(out)
    h = nn.Dense(c.hidden_size, name="fc2", **kw)(
        ACTIVATIONS[c.hidden_act](nn.Dense(c.intermediate_size, name="fc1", **kw)(h)))
    return (out + h)[:, 0]


class SiglipVisionTransformer(nn.Module):
  """pixel_values (B, C, H, W) float, SigLIP-normalised ((x - 0.5) / 0.5) -> VisionOutput."""

  config: SiglipVisionConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pixel_values) -> VisionOutput:
    with matmul_precision(self.dtype):  # float32 means float32 (models/precision.py)
      c = self.config
      kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
      patches = embed_patches(c, pixel_values, use_bias=True, **kw)  # (B, N, D)
      pos = self.param("pos_embed", nn.initializers.normal(0.02), (c.num_tokens, c.hidden_size), self.param_dtype)
      x = patches + pos.astype(self.dtype)
      hidden_states = [x]
      for i in range(c.num_layers):
        x = EncoderLayer(c, name=f"layer_{i}", **kw)(x)
        hidden_states.append(x)
      last = nn.LayerNorm(epsilon=c.layer_norm_eps, name="post_norm", **kw)(x)
      pooled = AttentionPoolHead(c, name="head", **kw)(last) if c.use_head else None
      return VisionOutput(last, pooled, tuple(hidden_states))
