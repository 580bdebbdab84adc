"""The CLIP ViT vision tower in Flax Linen, numerically equal to transformers' CLIPVisionModel.

Axis legend (einsum letters):
  B batch, C channels, N tokens (1 + patches), D width, H heads, F head dim, M MLP width.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from bridgejax.models.activations import ACTIVATIONS
from bridgejax.models.precision import matmul_precision

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_layers: int = 12
  num_heads: int = 12
  image_size: int = 224
  patch_size: int = 32
  num_channels: int = 3
  layer_norm_eps: float = 1e-5
  hidden_act: str = "quick_gelu"
  projection_dim: int | None = None  # set when the checkpoint carries `visual_projection`

  def __post_init__(self):
    if self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
    if self.image_size % self.patch_size:
      raise ValueError(f"image_size={self.image_size} is not divisible by patch_size={self.patch_size}")
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f"hidden_act={self.hidden_act!r} is not supported; use one of {sorted(ACTIVATIONS)}")

  @property
  def grid_size(self) -> int:
    return self.image_size // self.patch_size

  @property
  def num_tokens(self) -> int:
    return self.grid_size**2 + 1




class VisionOutput(NamedTuple):
  last_hidden_state: Array  # (B, N, D), output of the last layer, no post-LayerNorm
  pooler_output: Array  # (B, D), post-LayerNorm of the last layer's CLS
  hidden_states: tuple[Array, ...]  # num_layers + 1 entries of (B, N, D); [0] = after pre-LayerNorm
  image_embeds: Array | None = None  # (B, P), visual_projection(pooler_output) when the checkpoint has it


class Attention(nn.Module):
  config: CLIPVisionConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):  # x: (B, N, D)
    c = self.config
    head_dim = c.hidden_size // c.num_heads
    dense = lambda name: nn.Dense(c.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    split = lambda t: t.reshape(*t.shape[:-1], c.num_heads, head_dim)
    q = split(dense("q_proj")(x)) * head_dim**-0.5
    k, v = split(dense("k_proj")(x)), split(dense("v_proj")(x))
    logits = jnp.einsum("BNHF,BMHF->BHNM", q, k).astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum("BHNM,BMHF->BNHF", probs, v)
    return dense("out_proj")(out.reshape(*x.shape[:-1], c.hidden_size))


class EncoderLayer(nn.Module):
  config: CLIPVisionConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):  # x: (B, N, D)
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    norm = lambda name: nn.LayerNorm(epsilon=c.layer_norm_eps, name=name, **kw)
    x = x + Attention(c, name="attn", **kw)(norm("norm1")(x))
    h = nn.Dense(c.intermediate_size, name="fc1", **kw)(norm("norm2")(x))  # (B, N, M)
    h = nn.Dense(c.hidden_size, name="fc2", **kw)(ACTIVATIONS[c.hidden_act](h))
    return x + h


def embed_patches(config, pixel_values, *, use_bias: bool, dtype, param_dtype) -> Array:
  """pixel_values (B, C, H, W), checked against the config -> (B, grid², D) patch embeddings in
  row-major grid order, by a convolution named "patch_embed" in the calling module (call it from a
  tower's compact __call__: CLIP's has no bias, SigLIP's has one)."""
  c = config
  if pixel_values.ndim != 4 or pixel_values.shape[1:] != (c.num_channels, c.image_size, c.image_size):
    raise ValueError(f"pixel_values must be (B, {c.num_channels}, {c.image_size}, {c.image_size}) (NCHW), "
                     f"got {tuple(pixel_values.shape)}")
  images = jnp.transpose(pixel_values, (0, 2, 3, 1)).astype(dtype)  # NCHW -> NHWC
  patches = nn.Conv(c.hidden_size, (c.patch_size, c.patch_size), strides=c.patch_size, padding="VALID",
                    use_bias=use_bias, name="patch_embed", dtype=dtype, param_dtype=param_dtype)(images)
  return patches.reshape(patches.shape[0], -1, c.hidden_size)


class CLIPVisionTransformer(nn.Module):
  """pixel_values (B, C, H, W) float, CLIP-normalised as transformers expects -> VisionOutput."""

  config: CLIPVisionConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pixel_values) -> VisionOutput:
    with matmul_precision(self.dtype):  # float32 means float32 (models/precision.py)
      c = self.config
      kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
      patches = embed_patches(c, pixel_values, use_bias=False, **kw)  # (B, N-1, D)
      cls = self.param("cls_embed", nn.initializers.normal(0.02), (c.hidden_size,), self.param_dtype)
      pos = self.param("pos_embed", nn.initializers.normal(0.02), (c.num_tokens, c.hidden_size),
                       self.param_dtype)
      cls = jnp.broadcast_to(cls.astype(self.dtype), (patches.shape[0], 1, c.hidden_size))
      x = jnp.concatenate([cls, patches], axis=1) + pos.astype(self.dtype)  # (B, N, D)

      x = nn.LayerNorm(epsilon=c.layer_norm_eps, name="pre_norm", **kw)(x)
      hidden_states = [x]
      for i in range(c.num_layers):
        x = EncoderLayer(c, name=f"layer_{i}", **kw)(x)
        hidden_states.append(x)
      pooled = nn.LayerNorm(epsilon=c.layer_norm_eps, name="post_norm", **kw)(x[:, 0])
      image_embeds = None
      if c.projection_dim is not None:
        image_embeds = nn.Dense(c.projection_dim, use_bias=False, name="visual_projection", **kw)(pooled)
      return VisionOutput(x, pooled, tuple(hidden_states), image_embeds)
