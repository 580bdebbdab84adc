"""The Gemma decoder family (Gemma 1, 2 and 3) in Flax Linen, numerically equal to transformers'
GemmaForCausalLM, Gemma2ForCausalLM and Gemma3ForCausalLM. One module; the families differ only in
config switches (post-norms, q/k-norm, soft-capping, sliding layers, RoPE thetas). The layer stack,
attention, KV cache and hook are the shared decoder's (models/decoder.py: its axis legend and the
conventions every family keeps); Gemma adds its config, its RMSNorm (x * (1 + w)), its attention
projections (q/k-norm, soft-capping, local and global RoPE), its GeGLU MLP, the sqrt(D) embedding
normaliser and its tied, soft-capped LM head.

Axis legend (einsum letters): models/decoder.py.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bridgejax.models import decoder
from bridgejax.models.activations import ACTIVATIONS
from bridgejax.models.decoder import FULL, SLIDING, CausalDecoder, LayerCache, attend, rope, settle_decoder_config, softcap
from bridgejax.models.precision import matmul_precision


@dataclasses.dataclass(frozen=True)
class GemmaConfig:
  """One Gemma decoder. Defaults are Gemma-2B (Gemma 1); `weights.gemma` reads the rest from files."""

  family: str = "gemma"  # "gemma" | "gemma2" | "gemma3": informative, the switches below decide
  vocab_size: int = 256000
  hidden_size: int = 2048
  intermediate_size: int = 16384
  num_layers: int = 18
  num_heads: int = 8
  num_kv_heads: int = 1
  head_dim: int = 256
  rms_norm_eps: float = 1e-6
  hidden_act: str = "gelu_pytorch_tanh"
  query_pre_attn_scalar: float = 256.0  # attention scores are scaled by its -1/2 power
  rope_theta: float = 10_000.0  # full-attention layers
  rope_local_theta: float = 10_000.0  # sliding-window layers (Gemma 3: 10k while global is 1M)
  rope_scaling_factor: float = 1.0  # "linear" RoPE scaling of full-attention layers (Gemma 3 4B+)
  layer_types: tuple[str, ...] = ()  # FULL or SLIDING per layer; () means all FULL
  sliding_window: int | None = None  # a sliding layer's query sees keys with q - k < window
  attn_logit_softcapping: float | None = None  # Gemma 2
  final_logit_softcapping: float | None = None  # Gemma 2
  post_norms: bool = False  # Gemma 2/3: RMSNorm after attention and after the MLP too
  qk_norm: bool = False  # Gemma 3: RMSNorm of each query and key head
  max_position_embeddings: int = 8192
  bos_token_id: int = 2
  eos_token_ids: tuple[int, ...] = (1,)
  pad_token_id: int = 0

  def __post_init__(self):
    settle_decoder_config(self, (FULL,) * self.num_layers)
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")


class RMSNorm(nn.Module):
  """Gemma's RMSNorm: x / rms(x) * (1 + scale), statistics in float32 (scale is stored as w, not 1 + w)."""

  eps: float
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.zeros, (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (normed * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)


class Attention(nn.Module):
  config: GemmaConfig
  layer_type: str
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, positions, mask, cache: LayerCache | None = None):
    """x (B, T, D), positions (B, T), mask (B, T, S) -> ((B, T, D), updated cache or None).

    Without a cache the keys are x's own positions (S = T). With one, this step's keys are written
    at `positions` and the query attends over the whole cache (S = cache length).
    """
    c = self.config
    dense = lambda features, name: nn.Dense(features, use_bias=False, dtype=self.dtype,
                                            param_dtype=self.param_dtype, name=name)
    heads = lambda t, n: t.reshape(*t.shape[:-1], n, c.head_dim)
    q = heads(dense(c.num_heads * c.head_dim, "q_proj")(x), c.num_heads)  # (B, T, H, F)
    k = heads(dense(c.num_kv_heads * c.head_dim, "k_proj")(x), c.num_kv_heads)  # (B, T, K, F)
    v = heads(dense(c.num_kv_heads * c.head_dim, "v_proj")(x), c.num_kv_heads)
    if c.qk_norm:
      q = RMSNorm(c.rms_norm_eps, self.param_dtype, name="q_norm")(q)
      k = RMSNorm(c.rms_norm_eps, self.param_dtype, name="k_norm")(k)
    if self.layer_type == SLIDING:
      theta, scaling = c.rope_local_theta, 1.0
    else:
      theta, scaling = c.rope_theta, c.rope_scaling_factor
    q, k = rope(q, positions, theta, scaling), rope(k, positions, theta, scaling)

    out, cache = attend(q, k, v, positions, mask, cache, c.query_pre_attn_scalar**-0.5, self.dtype,
                        c.attn_logit_softcapping)
    return dense(c.hidden_size, "o_proj")(out), cache


class MLP(nn.Module):
  config: GemmaConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):  # (B, T, D) -> (B, T, D), GeGLU
    c = self.config
    dense = lambda features, name: nn.Dense(features, use_bias=False, dtype=self.dtype,
                                            param_dtype=self.param_dtype, name=name)
    gate = ACTIVATIONS[c.hidden_act](dense(c.intermediate_size, "gate_proj")(x))  # (B, T, M)
    return dense(c.hidden_size, "down_proj")(gate * dense(c.intermediate_size, "up_proj")(x))



class DecoderLayer(decoder.DecoderLayer):
  """The shared pre-norm layer with Gemma's attention, GeGLU MLP and RMSNorm; Gemma 2/3's configs
  switch on its post-norms."""

  config: GemmaConfig
  attention_class = Attention  # class attributes, not fields
  mlp_class = MLP
  norm_class = RMSNorm  # Gemma's x * (1 + w)


class Gemma(CausalDecoder):
  """The decoder. `__call__` is the full forward pass; `embed`, `decode` and `logits` are its parts,
  used separately by generation (prefill and cached steps) and by the multimodal model."""

  config: GemmaConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat: bool = False  # recompute each layer in the backward pass, keeping only its input

  @property
  def embed_scale(self) -> float:
    """The embedding normaliser `embed` applies: sqrt(D) (LLaMA-family decoders have 1)."""
    return math.sqrt(self.config.hidden_size)

  layer_class, norm_class = DecoderLayer, RMSNorm

  def split_logits(self, hidden, extra_embeddings=None):
    """(..., D) final-norm hidden states -> ((..., V) logits of the frozen table, (..., X) logits of
    the extra rows or None), both float32 (soft-capped where the config says so).

    The vocabulary GEMM takes compute-dtype operands and returns the compute dtype (float32
    accumulation inside the GEMM), upcast afterwards, as transformers does. Its backward is then a
    compute-dtype GEMM too: a float32 output would make the cotangent float32 and upcast the
    (V, D) table to meet it (measured on an H200: two such GEMMs took 9% of a bf16 training step).
    The extra rows are their own small product, so no gradient of a joined table is ever formed.
    """
    with matmul_precision(self.dtype):
      vocab = jnp.einsum("...D,VD->...V", hidden.astype(self.dtype), self.embedding.astype(self.dtype))
      vocab = softcap(vocab.astype(jnp.float32), self.config.final_logit_softcapping)
      if extra_embeddings is None:
        return vocab, None
      extra = jnp.einsum("...D,XD->...X", hidden.astype(self.dtype), extra_embeddings.astype(self.dtype),
                         preferred_element_type=jnp.float32)
      return vocab, softcap(extra, self.config.final_logit_softcapping)
