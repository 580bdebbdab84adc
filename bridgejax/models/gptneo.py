"""The GPT-Neo decoder (EleutherAI's GPT-Neo; Glória 1.3B, the thesis's chapter 5 backbone) in Flax
Linen, numerically equal to transformers' GPTNeoForCausalLM.

Axis legend (einsum letters):
  B batch, T query positions, S key positions (the sequence itself, or the KV cache), D width,
  H heads (every head has its own keys: K = H), F head dim, M MLP width, V vocabulary rows,
  X extra rows ([RET], trainable, outside the params), P learned positions.

The interface is the LLaMA module's (models/llama.py): no embedding normaliser (`embed_scale` 1),
a tied or untied LM head, the same `LayerCache`/`init_cache` layout. What GPT-Neo does differently,
as transformers' modeling_gpt_neo.py:
  * Learned absolute positions: the first layer's input is inputs_embeds + wpe[positions] (added in
    `decode`, so `inputs_embeds`, and visual tokens in them, are in the token-table space as in
    transformers). Positions must stay below max_position_embeddings.
  * Layers alternate global and local attention (`attention_types`, "global"/"local"); a local
    layer's query sees keys with q - k < window_size (its `bias` buffer: tril XOR tril(-window)).
  * Attention scores are NOT scaled by 1/sqrt(F) (GPTNeoSelfAttention._attn has no scaling).
  * q/k/v projections without bias, the output projection with one; LayerNorm (weight and bias,
    statistics in float32 here); the MLP is c_fc -> gelu_new -> c_proj, both with biases.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bridgejax.models.activations import ACTIVATIONS
from bridgejax.models.decoder import FULL, SLIDING, LayerCache, LMOutput, attend, settle_decoder_config
from bridgejax.models.decoder import init_cache as _init_cache
from bridgejax.models.llama import Llama

__all__ = ["GPTNeo", "GPTNeoConfig", "LayerCache", "LMOutput", "init_cache"]


@dataclasses.dataclass(frozen=True)
class GPTNeoConfig:
  """One GPT-Neo decoder. Defaults are GPT-Neo 1.3B (Glória 1.3B's shapes); `weights.gptneo` reads
  the rest from files."""

  family: str = "gpt_neo"
  vocab_size: int = 50257
  hidden_size: int = 2048
  intermediate_size: int = 8192  # transformers: config.intermediate_size, or 4 * hidden_size when null
  num_layers: int = 24
  num_heads: int = 16
  layer_norm_eps: float = 1e-5
  hidden_act: str = "gelu_new"
  layer_types: tuple[str, ...] = ()  # FULL (global) or SLIDING (local) per layer; () means global/local alternating
  sliding_window: int | None = 256  # transformers' window_size
  tie_word_embeddings: bool = True
  max_position_embeddings: int = 2048
  bos_token_id: int = 50256
  eos_token_ids: tuple[int, ...] = (50256,)
  pad_token_id: int = 50256

  def __post_init__(self):
    settle_decoder_config(self, tuple(FULL if i % 2 == 0 else SLIDING for i in range(self.num_layers)))
    if self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def num_kv_heads(self) -> int:  # the KV cache layout (init_cache) of the other families
    return self.num_heads


def init_cache(config: GPTNeoConfig, batch: int, length: int, dtype=jnp.float32) -> tuple[LayerCache, ...]:
  """An empty KV cache of `length` positions for every layer (the shared decoder's layout)."""
  return _init_cache(config, batch, length, dtype)


class LayerNorm(nn.Module):
  """torch's LayerNorm: (x - mean) / sqrt(var + eps) * w + b, statistics in float32, output in x's dtype."""

  eps: float
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    normed = (x32 - mean) * jax.lax.rsqrt(jnp.square(x32 - mean).mean(-1, keepdims=True) + self.eps)
    return (normed * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


class Attention(nn.Module):
  config: GPTNeoConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, positions, mask, cache: LayerCache | None = None):
    """x (B, T, D), positions (B, T), mask (B, T, S) (global or local) -> ((B, T, D), updated cache
    or None); the cache semantics are `decoder.attend`'s."""
    c = self.config
    dense = lambda bias, name: nn.Dense(c.hidden_size, use_bias=bias, dtype=self.dtype,
                                        param_dtype=self.param_dtype, name=name)
    heads = lambda t: t.reshape(*t.shape[:-1], c.num_heads, c.head_dim)  # (B, T, H, F)
    q, k, v = (heads(dense(False, name)(x)) for name in ("q_proj", "k_proj", "v_proj"))
    out, cache = attend(q, k, v, positions, mask, cache, 1.0, self.dtype)  # no 1/sqrt(F): GPT-Neo's own
    return dense(True, "o_proj")(out), cache


class DecoderLayer(nn.Module):
  config: GPTNeoConfig
  layer_type: str  # the mask CausalDecoder hands it is already the global or local one
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, positions, mask, cache: LayerCache | None = None, hook=None):  # hook: decoder.DecoderHook
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    norm = lambda name: LayerNorm(c.layer_norm_eps, self.param_dtype, name=name)
    h, cache = Attention(c, name="attn", **kw)(norm("pre_attn_norm")(x), positions, mask, cache)
    x = x + (h if hook is None else hook.after_sublayer("attn", h))
    h = nn.Dense(c.intermediate_size, name="fc_in", **kw)(norm("pre_ffw_norm")(x))  # (B, T, M)
    h = nn.Dense(c.hidden_size, name="fc_out", **kw)(ACTIVATIONS[c.hidden_act](h))
    return x + (h if hook is None else hook.after_sublayer("mlp", h)), cache


class GPTNeo(Llama):
  """The decoder: the LLaMA module's embedding (no normaliser), head and `split_logits`, with
  GPT-Neo's layers, LayerNorm and learned positions."""

  config: GPTNeoConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat: bool = False

  layer_class, norm_class = DecoderLayer, LayerNorm

  def setup(self):
    super().setup()
    c = self.config
    self.position_embedding = self.param("position_embedding", nn.initializers.normal(0.02),
                                         (c.max_position_embeddings, c.hidden_size), self.param_dtype)  # (P, D)

  @property
  def norm_eps(self) -> float:
    return self.config.layer_norm_eps

  def add_positions(self, x, positions):
    """(B, T, D) + wpe[positions]: transformers adds them to inputs_embeds before the first layer."""
    return x + jnp.take(self.position_embedding, positions, axis=0).astype(x.dtype)
