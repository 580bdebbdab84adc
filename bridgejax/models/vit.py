"""The ViT both vision towers are (CLIP: models/clip.py, SigLIP: models/siglip.py), in Flax Linen,
numerically equal to transformers' CLIPVisionTransformer and SiglipVisionTransformer: patch (and
class token) embeddings, pre-LN encoder layers, then the tower's own outputs.

What differs between the towers is data on their config (class attributes: a class token, a bias on
the patch convolution, a LayerNorm before the first layer) and each tower's `outputs` (where its
post-LayerNorm goes, how it pools). The encoder layers are the same in both but for the activation.

Axis legend (einsum letters):
  B batch, C channels, N tokens (the patches, after a class token where there is one), D width,
  H heads, F head dim, M MLP width.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from bridgejax.models.activations import ACTIVATIONS
from bridgejax.models.precision import matmul_precision

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """The fields both towers have (transformers' names in weights/vit.HF_KEYS); each tower's
  subclass sets the class attributes below and its own defaults, transformers' for that family."""

  has_cls_token: ClassVar[bool]  # a learned class token before the patches; else bridges get a stand-in
  patch_bias: ClassVar[bool]  # whether the patch convolution has a bias
  pre_norm: ClassVar[bool]  # a LayerNorm on the embeddings before the first layer (CLIP's `pre_layrnorm`)

  hidden_size: int = 768
  intermediate_size: int = 3072
  num_layers: int = 12
  num_heads: int = 12
  image_size: int = 224
  patch_size: int = 16
  num_channels: int = 3
  layer_norm_eps: float = 1e-6
  hidden_act: str = "gelu_pytorch_tanh"

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
    convolution (SigLIP so400m: 384 // 14 = 27, the last 6 rows and columns unseen)."""
    return self.image_size // self.patch_size

  @property
  def num_tokens(self) -> int:
    return self.grid_size**2 + int(self.has_cls_token)


class VisionOutput(NamedTuple):
  last_hidden_state: Array  # (B, N, D), the last layer's output (CLIP: as it is; SigLIP: post-LayerNorm'd)
  pooler_output: Array | None  # (B, D): CLIP's post-LayerNorm'd CLS; SigLIP's attention-pool head (None without)
  hidden_states: tuple[Array, ...]  # num_layers + 1 entries of (B, N, D); [0] = the embeddings (CLIP: pre-LayerNorm'd)
  image_embeds: Array | None = None  # (B, P), visual_projection(pooler_output) when a CLIP checkpoint has it


class ViTModule(nn.Module):
  """A module of a vision tower (the tower itself included): its config, compute and parameter dtypes."""

  config: ViTConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32


def layer_norm(module: ViTModule, name: str) -> nn.LayerNorm:
  """A LayerNorm of `module`'s config, dtypes and scope (call it from a compact method)."""
  return nn.LayerNorm(epsilon=module.config.layer_norm_eps, name=name, dtype=module.dtype,
                      param_dtype=module.param_dtype)


class Attention(ViTModule):
  """Multi-head self-attention over every token (no mask: an image has no padding)."""

  @nn.compact
  def __call__(self, x):  # x: (B, N, D)
    c = self.config
    head_dim = c.hidden_size // c.num_heads
    dense = lambda name: nn.Dense(c.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    split = lambda t: t.reshape(*t.shape[:-1], c.num_heads, head_dim)
    q = split(dense("q_proj")(x)) * head_dim**-0.5
    k, v = split(dense("k_proj")(x)), split(dense("v_proj")(x))
    logits = jnp.einsum("BNHF,BMHF->BHNM", q, k).astype(jnp.float32)  # softmax in float32 under bf16 too
    probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum("BHNM,BMHF->BNHF", probs, v)
    return dense("out_proj")(out.reshape(*x.shape[:-1], c.hidden_size))


class EncoderLayer(ViTModule):
  """A pre-LN layer: x + attn(LN(x)), then x + MLP(LN(x))."""

  @nn.compact
  def __call__(self, x):  # x: (B, N, D)
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = x + Attention(c, name="attn", **kw)(layer_norm(self, "norm1")(x))
    h = nn.Dense(c.intermediate_size, name="fc1", **kw)(layer_norm(self, "norm2")(x))  # (B, N, M)
    h = nn.Dense(c.hidden_size, name="fc2", **kw)(ACTIVATIONS[c.hidden_act](h))
    return x + h


class VisionTransformer(ViTModule):
  """pixel_values (B, C, H, W) float, normalised as the tower's image processor does -> VisionOutput.
  A tower subclasses it with its `outputs`."""

  @nn.compact
  def __call__(self, pixel_values) -> VisionOutput:
    with matmul_precision(self.dtype):  # float32 means float32 (models/precision.py)
      c = self.config
      kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
      if pixel_values.ndim != 4 or pixel_values.shape[1:] != (c.num_channels, c.image_size, c.image_size):
        raise ValueError(f"pixel_values must be (B, {c.num_channels}, {c.image_size}, {c.image_size}) (NCHW), "
                         f"got {tuple(pixel_values.shape)}")
      images = jnp.transpose(pixel_values, (0, 2, 3, 1)).astype(self.dtype)  # NCHW -> NHWC
      patches = nn.Conv(c.hidden_size, (c.patch_size, c.patch_size), strides=c.patch_size, padding="VALID",
                        use_bias=c.patch_bias, name="patch_embed", **kw)(images)
      x = patches.reshape(patches.shape[0], -1, c.hidden_size)  # (B, grid², D), row-major grid order
      if c.has_cls_token:
        cls = self.param("cls_embed", nn.initializers.normal(0.02), (c.hidden_size,), self.param_dtype)
        cls = jnp.broadcast_to(cls.astype(self.dtype), (x.shape[0], 1, c.hidden_size))
        x = jnp.concatenate([cls, x], axis=1)  # (B, 1 + grid², D)
      pos = self.param("pos_embed", nn.initializers.normal(0.02), (c.num_tokens, c.hidden_size), self.param_dtype)
      x = x + pos.astype(self.dtype)  # (B, N, D)
      if c.pre_norm:
        x = layer_norm(self, "pre_norm")(x)
      hidden_states = [x]
      for i in range(c.num_layers):
        x = EncoderLayer(c, name=f"layer_{i}", **kw)(x)
        hidden_states.append(x)
      return self.outputs(x, tuple(hidden_states))

  def outputs(self, x: Array, hidden_states: tuple[Array, ...]) -> VisionOutput:
    """The tower's post-LayerNorm and pooling of the last layer's output x (B, N, D). Called inside
    __call__, so the modules it makes are the tower's own (their names are checkpoint paths)."""
    raise NotImplementedError
