"""Flamingo (Alayrac et al. 2022): the Perceiver resampler's visual tokens condition the frozen LLM
through tanh-gated cross-attention blocks inserted between its layers. Acts inside the LLM through
the decoder hook (inllm.py).

The lecture notes: the resampler "outputs a fixed number of visual outputs (64)"; "pretrained and
frozen text-only language model (LM) blocks are interleaved with blocks trained from scratch that
cross-attend to the visual output from the Perceiver Resampler" (GATED XATTN-DENSE); "a tanh-gating
mechanism ... multiplies the output of a newly added layer by tanh(α) before adding it to the input
representation from the residual connection, where α is a layer-specific learnable scalar
initialized to 0", so the model "yields the same results as the original language model at
initialization"; "at a given text token, the model attends only to the visual tokens of the image
that appeared just before it in the interleaved sequence".

Equations (y (B, T, E) the LLM's hidden states before layer l, X (B, 64, E) the image's latents):
  X = PerceiverResampler(tower)                       querying.py's bridge, reused as is (LL_O to E)
  y <- y + tanh(α_l) · Attn(q = LN(y), kv = X, mask)  heads xattn_heads of xattn_head_dim, no biases
  y <- y + tanh(β_l) · FFW(LN(y)),  FFW(z) = GELU(z W_1) W_2, W_1 (E, ff_mult·E), no biases
  before every LLM layer l with l % cross_attention_every == 0; α_l = β_l = 0 at init, so the
  logits are exactly the frozen LM's (tested bitwise).
  mask: a token attends to the 64 latents of the most recent image at or before it (its <image>
  token included); a token before any image gets no attention output (zeroed, as OpenFlamingo's),
  while the FFW acts on every token (as OpenFlamingo's). A text-only pass has no hook at all: the
  frozen LM's.
Choices: the visual tokens do not enter the LLM's sequence (Flamingo's): one learned <image> row per
  image does (the prefix, 1 token, with the LLM's embedding normaliser like every bridge's prefix),
  marking where the image is, as Flamingo's <image> tag; the cross-attention reads the resampler's
  output after its LL_O, at the LLM width (the keys/values project E -> heads·head dim). Blocks sit
  before layers 0, n, 2n, ... (OpenFlamingo's rule is (l + 1) % n == 0; layer 0 keeps a 1-layer toy
  LLM conditioned). Their FFW is OpenFlamingo's (ff_mult 4, GELU), heads 8 of 64 (its defaults).
  The resampler's defaults are querying.py's (k=64, 6 layers); W_i reads its mean latent.
  [RET] retrieval is FROMAGe's: the text pass has no image, so no block changes it.
Parameters (R the resampler's count in querying.py, Q = xattn_heads·xattn_head_dim, m = ff_mult,
  n_x = ceil(L / cross_attention_every) blocks):
  R + E (the <image> row) + n_x·(2·2E + 4·E·Q + 2·m·E² + 2).
  ViT-L/14 + Gemma-2B (L = 18), defaults (n = 4: 5 blocks): 77,756,416 + 2,048 + 5·37,756,930
  = 266,543,114 (267,332,107 with W_i, W_t, [RET] and the logit scale).
Prefix: 1 token (<image>); context: k rows (the latents), so num_tokens = 1 + k.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bridgejax.bridges import base, inllm, querying
from bridgejax.bridges.base import BridgeOutput
from bridgejax.models.gemma import attend


class GatedCrossAttentionDense(nn.Module):
  """Flamingo's GATED XATTN-DENSE: y (B, T, E), media (B, M, E), visible (B, T, M) -> y (B, T, E)."""

  heads: int
  head_dim: int
  ff_mult: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, y, media, visible):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    width, inner = y.shape[-1], self.heads * self.head_dim
    dense = lambda features, name: nn.Dense(features, use_bias=False, kernel_init=base.torch_linear_kernel,
                                            name=name, **kw)
    split = lambda t: t.reshape(*t.shape[:-1], self.heads, self.head_dim)
    x = y.astype(self.dtype)
    q = split(dense(inner, "q_proj")(querying.layer_norm("attn_norm", **kw)(x)))  # (B, T, H, F)
    k, v = split(dense(inner, "k_proj")(media)), split(dense(inner, "v_proj")(media))  # (B, M, H, F)
    out, _ = attend(q, k, v, None, visible, None, self.head_dim**-0.5, self.dtype)
    out = dense(width, "o_proj")(out) * jnp.any(visible, axis=-1, keepdims=True)  # no image yet: nothing
    x = x + jnp.tanh(self.param("attn_gate", nn.initializers.zeros, (), self.param_dtype)) * out
    ff = dense(width, "ff_out")(jax.nn.gelu(dense(self.ff_mult * width, "ff_in")(
        querying.layer_norm("ff_norm", **kw)(x)), approximate=False))
    x = x + jnp.tanh(self.param("ff_gate", nn.initializers.zeros, (), self.param_dtype)) * ff
    return x.astype(y.dtype)  # α = β = 0: y itself, bit for bit

  @staticmethod
  def num_params(width: int, heads: int, head_dim: int, ff_mult: int) -> int:
    inner = heads * head_dim
    return 2 * querying.ln_params(width) + 4 * width * inner + 2 * ff_mult * width * width + 2


class Flamingo(inllm.InLLMBridge):
  vision_width: int
  llm_width: int
  grid_size: int
  vision_layers: int
  llm_layers: int = 0  # set by BridgeModel from the LLM
  k: int = 64  # the resampler's (querying.PerceiverResampler) keys, with its defaults
  num_layers: int = 6
  num_heads: int = 8
  mlp_ratio: int = 4
  layer: int = -1
  post_norm: bool = True
  retrieval_feature: str = "mean"
  cross_attention_every: int = 4  # a block before LLM layers 0, n, 2n, ...
  xattn_heads: int = 8
  xattn_head_dim: int = 64
  ff_mult: int = 4
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @property
  def num_prefix_tokens(self) -> int:
    return 1

  @property
  def num_context_tokens(self) -> int:
    return self.k

  @property
  def block_layers(self) -> tuple[int, ...]:
    return tuple(range(0, self.llm_layers, self.cross_attention_every))

  def _resampler(self, **kw) -> querying.PerceiverResampler:
    return querying.PerceiverResampler(self.vision_width, self.llm_width, self.grid_size, self.k, self.num_layers,
                                       self.num_heads, self.mlp_ratio, self.layer, self.post_norm,
                                       self.retrieval_feature, **kw)

  @property
  def num_params(self) -> int:
    block = GatedCrossAttentionDense.num_params(self.llm_width, self.xattn_heads, self.xattn_head_dim, self.ff_mult)
    return self._resampler(parent=None).num_params + self.llm_width + len(self.block_layers) * block

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.resampler = self._resampler(**kw)
    self.image_marker = self.param("image_marker", nn.initializers.normal(0.02), (1, self.llm_width),
                                   self.param_dtype)
    self.blocks = [GatedCrossAttentionDense(self.xattn_heads, self.xattn_head_dim, self.ff_mult,
                                            name=f"xattn_{layer}", **kw) for layer in self.block_layers]

  def __call__(self, features: base.VisionFeatures) -> BridgeOutput:
    out = self.resampler(features)  # tokens (B, K, E): the latents
    marker = jnp.broadcast_to(self.image_marker.astype(out.tokens.dtype), (out.tokens.shape[0], 1, self.llm_width))
    if self.is_initializing():  # the blocks' parameters exist only once called
      for block in self.blocks:
        block(out.tokens[:1, :1], out.tokens[:1], jnp.ones((1, 1, self.k), bool))
    return BridgeOutput(jnp.concatenate([marker, out.tokens], axis=1), out.image_feature)

  def before_layer(self, layer, x, mask, columns, context, markers):
    """Before a block's layer: each token cross-attends to its image's latents (image-causal)."""
    if layer not in self.block_layers:
      return x, mask
    images = inllm.at_columns(inllm.column_images(markers, mask.shape[-1]), columns)  # (B, T), -1: none yet
    latent_images = jnp.arange(context.shape[1]) // self.k  # (I·K,)
    visible = images[:, :, None] == latent_images[None, None, :]  # (B, T, I·K)
    return self.blocks[self.block_layers.index(layer)](x, context, visible), mask


def _check(name, dims, *, cross_attention_every, xattn_heads, xattn_head_dim, ff_mult, **resampler):
  for key, value in dict(cross_attention_every=cross_attention_every, xattn_heads=xattn_heads,
                         xattn_head_dim=xattn_head_dim, ff_mult=ff_mult).items():
    base.check_positive_int(name, key, value)
  querying._check_resampler(name, dims, **resampler)


base.register("flamingo", Flamingo, check=_check,
              doc="Flamingo: Perceiver resampler (64 latents) read by tanh-gated cross-attention + FFW blocks "
                  "before every cross_attention_every-th LLM layer; one <image> token in the sequence")
