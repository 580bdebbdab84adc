"""Flamingo (Alayrac et al. 2022) as OpenFlamingo's code runs it: a Perceiver resampler's visual latents
condition the frozen LLM through tanh-gated cross-attention blocks inserted between its layers. Acts
inside the LLM through the decoder hook (inllm.py).

The lecture notes: the resampler "outputs a fixed number of visual outputs (64)"; "pretrained and
frozen text-only language model (LM) blocks are interleaved with blocks trained from scratch that
cross-attend to the visual output from the Perceiver Resampler" (GATED XATTN-DENSE); "a tanh-gating
mechanism ... multiplies the output of a newly added layer by tanh(α) before adding it to the input
representation from the residual connection, where α is a layer-specific learnable scalar
initialized to 0", so the model "yields the same results as the original language model at
initialization"; "at a given text token, the model attends only to the visual tokens of the image
that appeared just before it in the interleaved sequence".

Source: open-flamingo 2.0.1 (pip), open_flamingo/src/helpers.py (FeedForward l.15, PerceiverAttention
l.25, PerceiverResampler l.68, MaskedCrossAttention l.136, GatedCrossAttentionBlock l.236),
flamingo_lm.py (FlamingoLayer.forward l.39-66, the block placement l.100) and flamingo.py (the
resampler l.48, the vision features l.195). tests/test_flamingo_parity.py runs those modules on the
same weights and checks this file against them (float32, to about 1e-6).

Axis legend: B batch, P patches (grid²), D vision width, E LLM width, K latents (k), T text tokens (the
queries), S key rows, I images in a row, M = I·K the latents of a row's images, H heads, F head width
(H·F = Q the inner width), m the FFW multiplier, r = ceil(D / E).

Resampler (helpers.py l.25-132; OpenFlamingo builds it as PerceiverResampler(dim=D), flamingo.py l.48):
  X = the patches of hidden_states[layer] (B, P, D), CLS dropped (open_clip's output_tokens, l.195)
  L = latents (K, D) broadcast over B, initialised N(0, 1) (torch.randn)
  for each of num_layers layers:
    X' = LN_m(X), L' = LN_l(L)
    L <- L + Attn(q = L' W_q, k = [X'; L'] W_k, v = [X'; L'] W_v) W_o   W_q, W_k, W_v (D, Q), W_o (Q, D)
    L <- L + GELU(LN_f(L) W_1) W_2                                    W_1 (D, m·D), W_2 (m·D, D)
  Z = LN(L)                                                           (B, K, D): the latents
  No projection has a bias; heads H = num_heads of F = head_dim (8 of 64, an inner width of 512,
  whatever D); GELU is the exact (erf) one; every LN has γ and β, eps 1e-5. OpenFlamingo passes
  neither max_num_media nor max_num_frames, so it has no media-time or frame embeddings: neither
  does this one. No LL_O: the latents stay at the vision width D (below).
Gated block (helpers.py l.136-278), y (B, T, E) the LLM's hidden states, Z_i the latents of a row's images:
  y <- y + tanh(α_l) · Attn(q = LN(y) W_q, k = [Z_1..Z_I] W_k, v = [Z_1..Z_I] W_v, mask) W_o
       W_q (E, Q), W_k and W_v (D, Q) (OpenFlamingo's to_kv, dim_visual = D), W_o (Q, E), no biases
  y <- y + tanh(β_l) · GELU(LN(y) W_1) W_2,   W_1 (E, m·E), W_2 (m·E, E), no biases
  α_l = β_l = 0 at init, so the logits are exactly the frozen LM's (tests/test_bridges_inllm.py).
  mask, `media_attention`: the image of a token is the most recent whose <image> token is at or
  before it (its <image> token included: OpenFlamingo's text_time = cumsum(media_locations));
    "immediate" (default; OpenFlamingo's only_attend_immediate_media=True): its image's K latents;
    "all_previous" (only_attend_immediate_media=False): the latents of its image and every earlier one.
  A token before any image gets no attention output (zeroed, helpers.py l.223-229) in both modes;
  the FFW acts on every token. A text-only pass has no hook at all: the frozen LM's.
Placement (flamingo_lm.py l.100 and l.55-65): the block for LLM layer l runs BEFORE that layer
  (FlamingoLayer applies gated_cross_attn_layer to lang_x, then decoder_layer), at every l with
  (l + 1) % n == 0, n = cross_attention_every: [3, 7, 11, 15] of Gemma-2B's 18 layers for n = 4.
  n is capped at the LLM's depth (a 2-layer toy LLM with n = 4 gets one block, before layer 1, where
  OpenFlamingo would get none); block_placement="first" is this project's earlier rule, l % n == 0
  ([0, 4, 8, 12, 16]).

Choices and the differences that remain:
  * The keys/values read the resampler's latents at the vision width D, as OpenFlamingo's to_kv
    (dim_visual = vis_dim). The earlier LL_O (D -> E, a Linear with bias, in front of W_k and W_v) is
    gone: LL_O followed by W_k is again one (D, Q) map up to a constant key offset (which the softmax
    ignores) and a constant value offset, so it only added 2,099,200 parameters. The K latents
    travel in BridgeOutput.tokens as context rows of the LLM width E (inllm.py), so each latent takes
    r = ceil(D / E) rows (its D values, zero-padded to r·E): r = 1 for ViT-L/14 (1024) under
    Gemma-2B (2048); `before_layer` unpacks them.
  * [RET] retrieval (W_i) reads the mean of the K latents Z (D dims; retrieval_feature="mean") as
    before; the text pass has no image, so no block changes the [RET] token. FROMAGe's, not
    OpenFlamingo's (which has no retrieval).
  * The <image> token: one learned row (E, N(0, 0.02), with the LLM's embedding normaliser like
    every bridge's prefix) enters the sequence, marking where the image is. OpenFlamingo adds
    <image> and <|endofchunk|> to the tokenizer and by default trains the LM's whole input embedding
    table (factory.py, freeze_lm_embeddings=False); bridgejax keeps the LLM frozen.
  * Tokens before any image in "all_previous": OpenFlamingo masks every latent with -finfo.max and
    does not zero those rows (it does only for "immediate"), so they attend uniformly to ALL the
    row's latents, later images included; here they get nothing, as in "immediate", so no token
    reads an image after it. bridgejax puts every row's first <image> at column 0 (model.py's
    llm_hook), so this case does not arise in its own layouts.
  * The vision features: OpenFlamingo 2.0.1 reads open_clip's output tokens, which skip ln_post up
    to open_clip 2.22 (what OpenFlamingo trained with; 2.23 applies ln_post to every token), so
    configs/flamingo.py sets post_norm=False; post_norm=True gives the newer open_clip's features.
  * OpenFlamingo's cross_attn_every_n_layers defaults to 1 and its released models use 1, 2 or 4;
    configs/flamingo.py keeps this bridge's 4 (OpenFlamingo-9B's).
Parameters (Q = xattn_heads·xattn_head_dim, Q_r = num_heads·head_dim, m the FFW multipliers, n_x the
  blocks, one per layer in `block_layers`):
  resampler R = K·D + num_layers·(3·2D + 4·D·Q_r + 2·mlp_ratio·D²) + 2D (+ the attention pool)
  block     G = 2·2E + E·Q + 2·D·Q + Q·E + 2·ff_mult·E² + 2
  total     R + E (the <image> row) + n_x·G
  ViT-L/14 (D 1024) + Gemma-2B (E 2048, 18 layers), defaults (n = 4: 4 blocks, before layers 3, 7,
  11, 15): R = 63,019,008, G = 36,708,354, total 63,019,008 + 2,048 + 4·36,708,354 = 209,854,472
  (210,643,465 with W_i, W_t, [RET] and the logit scale, as `python -m bridgejax.param_count` prints).
  OpenFlamingo's modules for the same backbones (PerceiverResampler(dim=1024) and its 4
  GatedCrossAttentionBlock(dim=2048, dim_visual=1024)), counted by the parity test:
  63,019,008 + 4·36,708,354 = 209,852,424. The 2,048 more here are the <image> row (OpenFlamingo
  trains embedding rows of the LLM instead, above); the retrieval heads are FROMAGe's.
  Before this parity work: 266,543,114 (267,332,107 with the heads): blocks before layers 0, 4, 8,
  12, 16 (5 of them), keys/values from E-wide latents (LL_O), a resampler with biases and heads of D/8.
Prefix: 1 token (<image>); context: r·k rows (the latents), so num_tokens = 1 + r·k.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bridgejax.bridges import alltokens, base, inllm
from bridgejax.bridges.base import BridgeOutput
from bridgejax.errors import UserError
from bridgejax.models.decoder import attend

BLOCK_PLACEMENTS = ("openflamingo", "first")  # before layers l with (l + 1) % n == 0, or with l % n == 0
MEDIA_ATTENTION = ("immediate", "all_previous")  # OpenFlamingo's only_attend_immediate_media True, False


def block_layers(llm_layers: int, every: int, placement: str = "openflamingo") -> tuple[int, ...]:
  """The LLM layers that get a gated block (it runs before the layer): the module docstring's Placement."""
  if placement == "first":
    return tuple(range(0, llm_layers, every))
  if placement != "openflamingo":
    raise UserError(f"block_placement={placement!r} is not one of {', '.join(map(repr, BLOCK_PLACEMENTS))}")
  n = min(every, llm_layers)  # a shallower LLM than n still gets one block, before its last layer
  return tuple(layer for layer in range(llm_layers) if (layer + 1) % n == 0)


def _dense(features: int, name: str, **kw) -> nn.Dense:
  return nn.Dense(features, use_bias=False, kernel_init=base.torch_linear_kernel, name=name, **kw)


def _feed_forward(x, mult: int, **kw):
  """helpers.py's FeedForward: LN, Linear (no bias), exact GELU, Linear (no bias); (.., W) -> (.., W)."""
  width = x.shape[-1]
  hidden = _dense(mult * width, "ff_in", **kw)(base.layer_norm("ff_norm", **kw)(x))
  return _dense(width, "ff_out", **kw)(jax.nn.gelu(hidden, approximate=False))


def _feed_forward_params(width: int, mult: int) -> int:
  return base.ln_params(width) + 2 * mult * width * width


def _attention(q_in, kv_in, visible, heads: int, head_dim: int, out_width: int, **kw):
  """q_in (B, T, ·), kv_in (B, S, ·), visible (B, T, S) -> (B, T, out_width): bias-free projections."""
  inner = heads * head_dim
  split = lambda t: t.reshape(*t.shape[:-1], heads, head_dim)
  q = split(_dense(inner, "q_proj", **kw)(q_in))  # (B, T, H, F)
  k, v = split(_dense(inner, "k_proj", **kw)(kv_in)), split(_dense(inner, "v_proj", **kw)(kv_in))  # (B, S, H, F)
  out, _ = attend(q, k, v, None, visible, None, head_dim**-0.5, kw.get("dtype", jnp.float32))
  return _dense(out_width, "o_proj", **kw)(out)


class ResamplerLayer(nn.Module):
  """One PerceiverAttention + FeedForward pair (helpers.py l.25-65, l.128-131): latents (B, K, D), patches (B, P, D)."""

  heads: int
  head_dim: int
  mlp_ratio: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, latents, patches):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = base.layer_norm("media_norm", **kw)(patches)
    q = base.layer_norm("latent_norm", **kw)(latents)
    kv = jnp.concatenate([x, q], axis=1)  # (B, P + K, D)
    visible = jnp.ones((q.shape[0], q.shape[1], kv.shape[1]), bool)
    latents = latents + _attention(q, kv, visible, self.heads, self.head_dim, latents.shape[-1], **kw)
    return latents + _feed_forward(latents, self.mlp_ratio, **kw)

  @staticmethod
  def num_params(width: int, heads: int, head_dim: int, mlp_ratio: int) -> int:
    return 2 * base.ln_params(width) + 4 * width * heads * head_dim + _feed_forward_params(width, mlp_ratio)


class PerceiverResampler(alltokens._AllTokens):
  """OpenFlamingo's PerceiverResampler (helpers.py l.68-132): tower features -> latents Z (B, K, D)."""

  registry_name = "flamingo"
  vision_width: int
  grid_size: int
  k: int = 64
  num_layers: int = 6
  num_heads: int = 8
  head_dim: int = 64
  mlp_ratio: int = 4
  layer: int = -1
  post_norm: bool = False
  retrieval_feature: str = "mean"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @property
  def num_params(self) -> int:
    d = self.vision_width
    layer = ResamplerLayer.num_params(d, self.num_heads, self.head_dim, self.mlp_ratio)
    return self.k * d + self.num_layers * layer + base.ln_params(d) + self._pool_params

  @nn.compact
  def __call__(self, features: base.VisionFeatures):
    """-> (latents Z (B, K, D) after the final LN, W_i's input (B, D))."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = self._tokens(features)  # (B, N, D)
    patches = x[:, 1:]  # (B, P, D)
    latents = self.param("latents", nn.initializers.normal(1.0), (self.k, self.vision_width), self.param_dtype)
    h = jnp.broadcast_to(latents.astype(self.dtype), (x.shape[0], *latents.shape))  # (B, K, D)
    for i in range(self.num_layers):
      h = ResamplerLayer(self.num_heads, self.head_dim, self.mlp_ratio, name=f"layer_{i}", **kw)(h, patches)
    h = base.layer_norm("norm", **kw)(h)
    return h, self._feature(x, h)


class GatedCrossAttentionDense(nn.Module):
  """GatedCrossAttentionBlock (helpers.py l.236-278): y (B, T, E), media (B, M, D), visible (B, T, M) -> (B, T, E)."""

  heads: int
  head_dim: int
  ff_mult: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, y, media, visible):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = y.astype(self.dtype)
    out = _attention(base.layer_norm("attn_norm", **kw)(x), media.astype(self.dtype), visible, self.heads,
                     self.head_dim, x.shape[-1], **kw)
    out = out * jnp.any(visible, axis=-1, keepdims=True)  # no image yet: nothing (helpers.py l.223-229)
    x = x + jnp.tanh(self.param("attn_gate", nn.initializers.zeros, (), self.param_dtype)) * out
    ff = _feed_forward(x, self.ff_mult, **kw)
    x = x + jnp.tanh(self.param("ff_gate", nn.initializers.zeros, (), self.param_dtype)) * ff
    return x.astype(y.dtype)  # α = β = 0: y itself, bit for bit

  @staticmethod
  def num_params(width: int, media_width: int, heads: int, head_dim: int, ff_mult: int) -> int:
    inner = heads * head_dim
    attention = base.ln_params(width) + 2 * width * inner + 2 * media_width * inner
    return attention + _feed_forward_params(width, ff_mult) + 2


class Flamingo(inllm.InLLMBridge):
  grid_size: int
  vision_layers: int
  llm_layers: int = 0  # set by BridgeModel from the LLM
  k: int = 64  # the resampler's latents (OpenFlamingo's num_latents)
  num_layers: int = 6  # its depth
  num_heads: int = 8  # its heads (and the attention pool's, with retrieval_feature="attention_pool")
  head_dim: int = 64  # its dim_head
  mlp_ratio: int = 4  # its ff_mult
  layer: int = -1
  post_norm: bool = False  # open_clip <= 2.22's output tokens, as OpenFlamingo trained (module docstring)
  retrieval_feature: str = "mean"
  cross_attention_every: int = 4  # n: a block before LLM layers l with (l + 1) % n == 0
  block_placement: str = "openflamingo"  # BLOCK_PLACEMENTS
  media_attention: str = "immediate"  # MEDIA_ATTENTION
  xattn_heads: int = 8
  xattn_head_dim: int = 64
  ff_mult: int = 4

  @property
  def num_prefix_tokens(self) -> int:
    return 1

  @property
  def rows_per_latent(self) -> int:
    """r = ceil(D / E): the E-wide context rows that carry one D-wide latent."""
    return -(-self.vision_width // self.llm_width)

  @property
  def num_context_tokens(self) -> int:
    return self.k * self.rows_per_latent

  @property
  def block_layers(self) -> tuple[int, ...]:
    return block_layers(self.llm_layers, self.cross_attention_every, self.block_placement)

  def _resampler(self, **kw) -> PerceiverResampler:
    return PerceiverResampler(self.vision_width, self.grid_size, self.k, self.num_layers, self.num_heads,
                              self.head_dim, self.mlp_ratio, self.layer, self.post_norm, self.retrieval_feature, **kw)

  @property
  def num_params(self) -> int:
    block = GatedCrossAttentionDense.num_params(self.llm_width, self.vision_width, self.xattn_heads,
                                                self.xattn_head_dim, self.ff_mult)
    return self._resampler(parent=None).num_params + self.llm_width + len(self.block_layers) * block

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.resampler = self._resampler(**kw)
    self.image_marker = self.param("image_marker", nn.initializers.normal(0.02), (1, self.llm_width),
                                   self.param_dtype)
    self.blocks = [GatedCrossAttentionDense(self.xattn_heads, self.xattn_head_dim, self.ff_mult,
                                            name=f"xattn_{layer}", **kw) for layer in self.block_layers]

  def pack(self, latents):
    """(B, K, D) latents -> (B, r·K, E) context rows: each latent's D values zero-padded to r·E."""
    rows = self.rows_per_latent
    padded = jnp.pad(latents, ((0, 0), (0, 0), (0, rows * self.llm_width - self.vision_width)))
    return padded.reshape(latents.shape[0], latents.shape[1] * rows, self.llm_width)

  def unpack(self, context):
    """(B, I·r·K, E) context rows -> (B, I·K, D) latents, the inverse of `pack`."""
    rows = self.rows_per_latent
    return context.reshape(context.shape[0], -1, rows * self.llm_width)[..., :self.vision_width]

  def __call__(self, features: base.VisionFeatures) -> BridgeOutput:
    latents, image_feature = self.resampler(features)  # (B, K, D), (B, D)
    marker = jnp.broadcast_to(self.image_marker.astype(latents.dtype), (latents.shape[0], 1, self.llm_width))
    if self.is_initializing():  # the blocks' parameters exist only once called
      for block in self.blocks:
        block(marker[:1], latents[:1], jnp.ones((1, 1, self.k), bool))
    return BridgeOutput(jnp.concatenate([marker, self.pack(latents)], axis=1), image_feature)

  def visible(self, markers, width: int, columns, images: int):
    """(B, P) markers, S = width key columns, (B, T) the queries' columns -> (B, T, I·K): the latents each
    query reads (`media_attention`)."""
    token_images = inllm.at_columns(inllm.column_images(markers, width), columns)  # (B, T), -1: none yet
    latent_images = jnp.arange(images * self.k) // self.k  # (I·K,)
    if self.media_attention == "immediate":
      return token_images[:, :, None] == latent_images[None, None, :]
    return token_images[:, :, None] >= latent_images[None, None, :]  # -1 (no image yet) sees none

  def before_layer(self, layer, x, mask, columns, context, markers):
    """Before a block's layer: each token cross-attends to its image's latents (module docstring)."""
    if layer not in self.block_layers:
      return x, mask
    media = self.unpack(context)  # (B, I·K, D)
    visible = self.visible(markers, mask.shape[-1], columns, media.shape[1] // self.k)
    return self.blocks[self.block_layers.index(layer)](x, media, visible), mask


def _check(name, dims, *, k, num_layers, num_heads, head_dim, mlp_ratio, layer, post_norm, retrieval_feature,
           cross_attention_every, block_placement, media_attention, xattn_heads, xattn_head_dim, ff_mult):
  for key, value in dict(k=k, num_layers=num_layers, head_dim=head_dim, mlp_ratio=mlp_ratio,
                         cross_attention_every=cross_attention_every, xattn_heads=xattn_heads,
                         xattn_head_dim=xattn_head_dim, ff_mult=ff_mult).items():
    base.check_positive_int(name, key, value)
  base.check_positive_int(name, "num_heads", num_heads)
  base.check_choice(name, "block_placement", block_placement, BLOCK_PLACEMENTS)
  base.check_choice(name, "media_attention", media_attention, MEDIA_ATTENTION)
  alltokens._check_common(name, dims, layer=layer, post_norm=post_norm, num_heads=num_heads,
                          retrieval_feature=retrieval_feature)


base.register("flamingo", Flamingo, check=_check,
              doc="Flamingo as OpenFlamingo runs it: Perceiver resampler (64 latents at the vision width) read by "
                  "tanh-gated cross-attention + FFW blocks before LLM layers l with (l + 1) % cross_attention_every "
                  "== 0; one <image> token in the sequence")
