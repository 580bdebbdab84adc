"""The LLaMA decoder family (LLaMA 2/3, Mistral, Qwen2) in Flax Linen, numerically equal to
transformers' LlamaForCausalLM, MistralForCausalLM and Qwen2ForCausalLM. One module; the families
differ only in config switches (GQA, RoPE theta and scaling, q/k/v biases, sliding window, tied head).

Axis legend (einsum letters):
  B batch, T query positions, S key positions (the sequence itself, or the KV cache), D width,
  H query heads, K key/value heads, G query heads per key/value head (H = K * G), F head dim,
  M MLP width, V vocabulary rows (frozen table), X extra rows ([RET], trainable, outside the params).

The interface is the shared decoder's (models/decoder.py: CausalLM), so generation and the multimodal
model take any family: `embed`, `decode(inputs_embeds, positions, attention_mask, cache, segment_ids)`,
`split_logits`, `logits`, `__call__`, `embed_scale`, the same `LayerCache`/`init_cache` layout.
Differences from Gemma that callers may notice:
  * No embedding normaliser: `embed(ids) = table[ids]` and `embed_scale` is 1.
  * The LM head may be untied (`lm_head`, (V, D)); the extra logit columns still come from
    `extra_embeddings`, as FROMAGe ties the [RET] row whatever the head.
  * RMSNorm is transformers' LLaMA one: x / rms(x) in float32, cast back, times w (not 1 + w).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bridgejax.models.activations import ACTIVATIONS
from bridgejax.models import decoder
from bridgejax.models.decoder import FULL, CausalDecoder, LayerCache, LMOutput, attend, settle_decoder_config
from bridgejax.models.decoder import init_cache as _init_cache
from bridgejax.models.precision import matmul_precision

Array = jax.Array
ROPE_TYPES = ("default", "linear", "llama3")
__all__ = ["Llama", "LlamaConfig", "LayerCache", "LMOutput", "init_cache"]


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """One LLaMA-family decoder. Defaults are LLaMA-2-7B; `weights.llama` reads the rest from files."""

  family: str = "llama"  # "llama" | "mistral" | "qwen2": informative, the switches below decide
  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_layers: int = 32
  num_heads: int = 32
  num_kv_heads: int = 32
  head_dim: int = 128
  rms_norm_eps: float = 1e-5
  hidden_act: str = "silu"
  rope_theta: float = 10_000.0
  rope_type: str = "default"  # ROPE_TYPES
  rope_factor: float = 1.0  # "linear" and "llama3"
  rope_low_freq_factor: float = 1.0  # "llama3"
  rope_high_freq_factor: float = 4.0  # "llama3"
  rope_original_max_positions: int = 8192  # "llama3": the pre-training context
  layer_types: tuple[str, ...] = ()  # FULL or SLIDING per layer; () means all FULL
  sliding_window: int | None = None  # a sliding layer's query sees keys with q - k < window
  qkv_bias: bool = False  # biases on q/k/v (Qwen2; LLaMA's attention_bias)
  o_bias: bool = False  # bias on o_proj (LLaMA's attention_bias)
  mlp_bias: bool = False
  tie_word_embeddings: bool = False  # False: a separate (V, D) `lm_head`
  max_position_embeddings: int = 4096
  bos_token_id: int = 1
  eos_token_ids: tuple[int, ...] = (2,)
  pad_token_id: int = 0

  def __post_init__(self):
    settle_decoder_config(self, (FULL,) * self.num_layers)
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
    if self.rope_type not in ROPE_TYPES:
      raise ValueError(f"rope_type={self.rope_type!r} is not supported; use one of {ROPE_TYPES}")


def init_cache(config: LlamaConfig, batch: int, length: int, dtype=jnp.float32) -> tuple[LayerCache, ...]:
  """An empty KV cache of `length` positions for every layer (the shared decoder's layout)."""
  return _init_cache(config, batch, length, dtype)


def inv_frequencies(c: LlamaConfig) -> np.ndarray:
  """(F/2,) float32 RoPE inverse frequencies, computed as transformers does (float32, then scaled)."""
  exponent = np.arange(0, c.head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(c.head_dim)
  inv_freq = (1.0 / (np.float32(c.rope_theta) ** exponent)).astype(np.float32)
  if c.rope_type == "linear":
    return (inv_freq / np.float32(c.rope_factor)).astype(np.float32)
  if c.rope_type == "llama3":  # LLaMA 3.1: long wavelengths divided by factor, a smooth ramp between
    low_wavelen = c.rope_original_max_positions / c.rope_low_freq_factor
    high_wavelen = c.rope_original_max_positions / c.rope_high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / c.rope_factor, inv_freq).astype(np.float32)
    smooth = (c.rope_original_max_positions / wavelen - c.rope_low_freq_factor) / (
        c.rope_high_freq_factor - c.rope_low_freq_factor)
    smoothed = (1 - smooth) * scaled / c.rope_factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)
  return inv_freq


def rope(x, positions, inv_freq: np.ndarray):
  """Rotary embedding, half-split layout (transformers' rotate_half). x (B, T, N, F), positions (B, T)."""
  angles = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)  # (B, T, F/2)
  cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class RMSNorm(nn.Module):
  """LLaMA's RMSNorm: w * (x / rms(x)), statistics in float32, the product in x's dtype (as transformers)."""

  eps: float
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    normed = (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)).astype(x.dtype)
    return scale.astype(x.dtype) * normed


def _dense(features, bias, name, dtype, param_dtype):
  return nn.Dense(features, use_bias=bias, dtype=dtype, param_dtype=param_dtype, name=name)


class Attention(nn.Module):
  config: LlamaConfig
  layer_type: str
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, positions, mask, cache: LayerCache | None = None):
    """x (B, T, D), positions (B, T), mask (B, T, S) -> ((B, T, D), updated cache or None); the
    cache semantics are `decoder.attend`'s."""
    c = self.config
    dense = lambda n, bias, name: _dense(n, bias, name, self.dtype, self.param_dtype)
    heads = lambda t, n: t.reshape(*t.shape[:-1], n, c.head_dim)
    q = heads(dense(c.num_heads * c.head_dim, c.qkv_bias, "q_proj")(x), c.num_heads)  # (B, T, H, F)
    k = heads(dense(c.num_kv_heads * c.head_dim, c.qkv_bias, "k_proj")(x), c.num_kv_heads)  # (B, T, K, F)
    v = heads(dense(c.num_kv_heads * c.head_dim, c.qkv_bias, "v_proj")(x), c.num_kv_heads)
    inv_freq = inv_frequencies(c)
    q, k = rope(q, positions, inv_freq), rope(k, positions, inv_freq)

    out, cache = attend(q, k, v, positions, mask, cache, c.head_dim**-0.5, self.dtype)
    return dense(c.hidden_size, c.o_bias, "o_proj")(out), cache


class MLP(nn.Module):
  config: LlamaConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):  # (B, T, D) -> (B, T, D), SwiGLU
    c = self.config
    dense = lambda n, name: _dense(n, c.mlp_bias, name, self.dtype, self.param_dtype)
    gate = ACTIVATIONS[c.hidden_act](dense(c.intermediate_size, "gate_proj")(x))  # (B, T, M)
    return dense(c.hidden_size, "down_proj")(gate * dense(c.intermediate_size, "up_proj")(x))


class DecoderLayer(decoder.DecoderLayer):
  """The shared pre-norm layer with LLaMA's attention (biases, RoPE scaling), SwiGLU and RMSNorm."""

  config: LlamaConfig
  attention_class = Attention
  mlp_class = MLP
  norm_class = RMSNorm  # x * w


class Llama(CausalDecoder):
  """The decoder. `__call__` is the full forward pass; `embed`, `decode` and `logits` are its parts,
  used separately by generation (prefill and cached steps) and by the multimodal model."""

  config: LlamaConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat: bool = False  # recompute each layer in the backward pass, keeping only its input

  @property
  def embed_scale(self) -> float:
    """The embedding normaliser `embed` applies (Gemma's sqrt(D)); LLaMA has none."""
    return 1.0

  layer_class, norm_class = DecoderLayer, RMSNorm

  def setup(self):
    super().setup()
    c = self.config
    if not c.tie_word_embeddings:  # (V, D) as the table, so both heads are the same product
      self.lm_head = self.param("lm_head", nn.initializers.normal(0.02), (c.vocab_size, c.hidden_size),
                                self.param_dtype)

  def split_logits(self, hidden, extra_embeddings=None):
    """(..., D) final-norm hidden states -> ((..., V) logits of the LM head, (..., X) logits of the
    extra rows or None), both float32; the GEMMs as in Gemma.split_logits (compute-dtype operands)."""
    head = self.embedding if self.config.tie_word_embeddings else self.lm_head
    with matmul_precision(self.dtype):
      vocab = jnp.einsum("...D,VD->...V", hidden.astype(self.dtype), head.astype(self.dtype)).astype(jnp.float32)
      if extra_embeddings is None:
        return vocab, None
      extra = jnp.einsum("...D,XD->...X", hidden.astype(self.dtype), extra_embeddings.astype(self.dtype),
                         preferred_element_type=jnp.float32)
      return vocab, extra
