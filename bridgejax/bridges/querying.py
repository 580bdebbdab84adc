"""Querying transformers: learned queries read the patch tokens through several attention layers.

Axis legend: B batch, N tokens (1 + P), P patches (grid²), D vision width, E LLM width, K learned
queries (k), M = mlp_ratio·D the feed-forward width.

Both families keep the queries at the vision width D (every attention is MultiHeadCrossAttention,
torch's nn.MultiheadAttention: q/k/v/out projections (D, D) with biases) and end in LL_O(Y) = Y W + b,
W (D, E), which makes the k visual-prefix tokens. FFN(Y) = GELU(Y W_1 + b_1) W_2 + b_2, W_1 (D, M)
(projector.GeluMLP); LN is a LayerNorm with its own γ, β (eps 1e-5, torch's default).

`perceiver_resampler` (Flamingo, Alayrac et al. 2022)
  The lecture notes: the resampler "takes a variable number of image or video features from the
  vision encoder and produces a fixed number of visual outputs (64)"; it "learns a predefined number
  of latent input queries which are fed to a Transformer and cross-attend to the visual features".
  The paper adds what the notes leave open: 6 layers (width 1536, 16 heads, a squared-ReLU FFN on
  its NFNet), and in each the latents attend to the keys/values [X; latents], the patches and the
  latents together, so one softmax does the cross- and the self-attention (its Fig. 5 pseudo-code);
  OpenFlamingo's code (on CLIP ViT-L/14: 8 heads of 64, a GELU FFN of 4·D) adds pre-LN residual
  blocks and a final LayerNorm:
    X' = LN_x(X), L' = LN_l(L)
    L ← L + Attn(q = L', kv = [X'; L'])       (B, K, D), kv (B, P + K, D)
    L ← L + FFN(LN_f(L))
    Z = LL_O(LN(L))                           (B, K, E)
  X is hidden_states[layer][:, 1:] (the patches, CLS dropped, after the tower's post-LayerNorm with
  post_norm=True), as OpenFlamingo feeds CLIP ViT-L/14's patch tokens; Flamingo's NFNet has no CLS.
  bridgejax chooses: k=64, num_layers=6, 8 heads, mlp_ratio=4 with GELU (OpenFlamingo's), layer=-1,
  post_norm=True. Differences from OpenFlamingo: heads of D/8 = 128 (it projects to 8 heads of 64,
  an inner width of 512, and back), biases on every projection (torch MHA and nn.Linear; it has
  none), no temporal embeddings (one image, not a video), and LL_O, as the tokens go in front of the
  text here. The `flamingo` bridge (flamingo.py) does not reuse this one: it carries OpenFlamingo's
  own resampler (8 heads of 64, no biases, no LL_O), read inside the LM by gated cross-attention.
  Parameters: K·D + num_layers·(3·2D + 4·(D² + D) + 2·D·M + M + D) + 2D + D·E + E (+ pool).
    ViT-L/14 + Gemma-2B, defaults: 77,756,416 (78,545,409 with W_i, W_t, [RET] and the logit scale).

`qformer` (BLIP-2, Li et al. 2023)
  The lecture notes: the Q-Former's learned embeddings "are passed to the LLM through a projection
  layer" and "serve as a soft visual prompt"; its layers are not described. The paper: 32 learned
  queries of width 768 (a BERT-base initialised Q-Former, 12 layers, cross-attention to the frozen
  ViT's penultimate-layer features, all tokens with CLS, through a trainable LayerNorm `ln_vision`,
  in every other layer). Each layer is post-LN (BERT):
    Q ← LN(Q + SelfAttn(Q))                   (B, K, D)
    Q ← LN(Q + CrossAttn(q = Q, kv = LN_v(X)))   in layers i with i % cross_attention_every == 0
    Q ← LN(Q + FFN(Q))
    Z = LL_O(Q)                               (B, K, E),  Q starts as LN_q(queries), queries ~ N(0, 0.02²)
  bridgejax chooses: k=32 (BLIP-2's), width D (no BERT to start from, so the queries take the vision
  width and no key/value width adapter is needed), num_layers=2 with cross-attention in every layer
  (cross_attention_every=1; BLIP-2's is 12 and 2), 16 heads (64-wide like BERT's), mlp_ratio=4,
  layer=-2 and every token of it, CLS included, through LN_v. No text branch: the Q-Former's
  stage-1 losses (ITC, ITM, ITG) are replaced by this project's captioning and retrieval losses.
  Parameters, C = len(range(0, num_layers, cross_attention_every)) cross-attention layers:
    K·D + 2D (LN_q) + 2D (LN_v) + num_layers·(4·(D² + D) + 2·D·M + M + D + 2·2D) + C·(4·(D² + D) + 2D)
    + D·E + E (+ pool). ViT-L/14 + Gemma-2B, defaults: 35,729,408 (36,518,401 with the heads).

image_feature (for W_i), `retrieval_feature` as in alltokens.py:
  "mean" (default): the mean of the K query outputs that LL_O consumes (D dims), thesis 6.3's rule
    for bridges that make several tokens (BLIP-2's ITC instead takes the best of its 32 queries);
  "attention_pool": a separate 1-query attention (num_heads heads) over all N tokens of the layer,
    + D + 4·(D² + D) parameters.

Config keys and defaults are the module fields below (`bridgejax.bridges.describe()` lists them).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from bridgejax.bridges import alltokens, base
from bridgejax.bridges.base import BridgeOutput, MultiHeadCrossAttention
from bridgejax.bridges.projector import GeluMLP

# MultiHeadCrossAttention shares its queries over the batch; vmapped over B with one parameter set
# it takes per-example queries, which every layer after the first needs (and self-attention).
_PerExampleAttention = nn.vmap(MultiHeadCrossAttention, in_axes=0, out_axes=0, variable_axes={"params": None},
                               split_rngs={"params": False})


def layer_norm(name: str, **kw) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=1e-5, name=name, **kw)  # torch's nn.LayerNorm eps


def ln_params(width: int) -> int:
  return 2 * width  # γ and β


class _QueryLayer(nn.Module):
  """What both layer kinds share: heads, the FFN width, and their LayerNorm, attention and FFN."""

  num_heads: int
  mlp_ratio: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def _norm(self, name: str, x):
    return layer_norm(name, dtype=self.dtype, param_dtype=self.param_dtype)(x)

  def _attend(self, name: str, queries, tokens):
    """queries (B, K, D) over tokens (B, T, D) -> (B, K, D); per example (K, D) x (1, T, D)."""
    attention = _PerExampleAttention(self.num_heads, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    return attention(queries, tokens[:, None])[:, 0]

  def _ffn(self, x):  # (B, K, D) -> (B, K, D)
    width = x.shape[-1]
    return GeluMLP(self.mlp_ratio * width, width, dtype=self.dtype, param_dtype=self.param_dtype, name="ffn")(x)

  @staticmethod
  def _block_params(width: int, mlp_ratio: int) -> int:
    """One attention and one FFN."""
    return MultiHeadCrossAttention.num_params(width) + GeluMLP.num_params(width, mlp_ratio * width, width)


class ResamplerLayer(_QueryLayer):
  """One Perceiver-resampler layer (pre-LN): latents (B, K, D), patches (B, P, D) -> latents (B, K, D)."""

  @nn.compact
  def __call__(self, latents, patches):
    x = self._norm("media_norm", patches)
    q = self._norm("latent_norm", latents)
    latents = latents + self._attend("attn", q, jnp.concatenate([x, q], axis=1))  # kv: (B, P + K, D)
    return latents + self._ffn(self._norm("ffn_norm", latents))

  @staticmethod
  def num_params(width: int, mlp_ratio: int) -> int:
    return 3 * ln_params(width) + _QueryLayer._block_params(width, mlp_ratio)


class QFormerLayer(_QueryLayer):
  """One BERT-style (post-LN) Q-Former layer: queries (B, K, D), tokens (B, N, D) -> queries (B, K, D)."""

  cross_attention: bool = True

  @nn.compact
  def __call__(self, queries, tokens):
    h = self._norm("self_attn_norm", queries + self._attend("self_attn", queries, queries))
    if self.cross_attention:
      h = self._norm("cross_attn_norm", h + self._attend("cross_attn", h, tokens))
    return self._norm("ffn_norm", h + self._ffn(h))

  @staticmethod
  def num_params(width: int, mlp_ratio: int, cross_attention: bool) -> int:
    cross = MultiHeadCrossAttention.num_params(width) + ln_params(width) if cross_attention else 0
    return 2 * ln_params(width) + _QueryLayer._block_params(width, mlp_ratio) + cross


class PerceiverResampler(alltokens._AllTokens):
  registry_name = "perceiver_resampler"
  vision_width: int
  llm_width: int
  grid_size: int
  k: int = 64  # latents = output tokens (Flamingo's 64)
  num_layers: int = 6
  num_heads: int = 8  # every attention's heads, and the attention pool's
  mlp_ratio: int = 4
  layer: int = -1
  post_norm: bool = True
  retrieval_feature: str = "mean"  # alltokens.RETRIEVAL_FEATURES
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @property
  def num_tokens(self) -> int:
    return self.k

  @property
  def num_params(self) -> int:
    d, e = self.vision_width, self.llm_width
    return (self.k * d + self.num_layers * ResamplerLayer.num_params(d, self.mlp_ratio) + ln_params(d)
            + d * e + e + self._pool_params)

  @nn.compact
  def __call__(self, features: base.VisionFeatures) -> BridgeOutput:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = self._tokens(features)  # (B, N, D)
    patches = x[:, 1:]  # (B, P, D)
    latents = self.param("latents", nn.initializers.normal(0.02), (self.k, self.vision_width), self.param_dtype)
    h = jnp.broadcast_to(latents.astype(self.dtype), (x.shape[0], *latents.shape))  # (B, K, D)
    for i in range(self.num_layers):
      h = ResamplerLayer(self.num_heads, self.mlp_ratio, name=f"layer_{i}", **kw)(h, patches)
    h = layer_norm("norm", **kw)(h)
    z = base.dense(self.llm_width, self.vision_width, name="proj", **kw)(h)  # LL_O: (B, K, E)
    return BridgeOutput(z, self._feature(x, h))


class QFormer(alltokens._AllTokens):
  registry_name = "qformer"
  vision_width: int
  llm_width: int
  grid_size: int
  k: int = 32  # learned queries = output tokens (BLIP-2's 32)
  num_layers: int = 2  # BLIP-2: 12
  cross_attention_every: int = 1  # BLIP-2: 2 (layers 0, 2, 4, ...)
  num_heads: int = 16  # every attention's heads, and the attention pool's
  mlp_ratio: int = 4
  layer: int = -2  # BLIP-2: the ViT's penultimate layer
  post_norm: bool = False
  retrieval_feature: str = "mean"  # alltokens.RETRIEVAL_FEATURES
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @property
  def num_tokens(self) -> int:
    return self.k

  def _cross_attends(self, i: int) -> bool:
    return i % self.cross_attention_every == 0

  @property
  def num_params(self) -> int:
    d, e = self.vision_width, self.llm_width
    layers = sum(QFormerLayer.num_params(d, self.mlp_ratio, self._cross_attends(i)) for i in range(self.num_layers))
    return self.k * d + 2 * ln_params(d) + layers + d * e + e + self._pool_params

  @nn.compact
  def __call__(self, features: base.VisionFeatures) -> BridgeOutput:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = self._tokens(features)  # (B, N, D), CLS included
    tokens = layer_norm("vision_norm", **kw)(x)  # BLIP-2's ln_vision
    queries = self.param("queries", nn.initializers.normal(0.02), (self.k, self.vision_width), self.param_dtype)
    h = layer_norm("query_norm", **kw)(queries.astype(self.dtype))  # (K, D)
    h = jnp.broadcast_to(h, (x.shape[0], *h.shape))  # (B, K, D)
    for i in range(self.num_layers):
      layer = QFormerLayer(self.num_heads, self.mlp_ratio, cross_attention=self._cross_attends(i), name=f"layer_{i}", **kw)
      h = layer(h, tokens)
    z = base.dense(self.llm_width, self.vision_width, name="proj", **kw)(h)  # LL_O: (B, K, E)
    return BridgeOutput(z, self._feature(x, h))


# --- registry ----------------------------------------------------------------------------------------

def _check_resampler(name, dims, *, k, num_layers, num_heads, mlp_ratio, **kw):
  for key, value in dict(k=k, num_layers=num_layers, mlp_ratio=mlp_ratio).items():
    base.check_positive_int(name, key, value)
  base.check_heads(name, num_heads, dims["vision_width"])  # the layers' attention, whatever W_i reads
  alltokens._check_common(name, dims, num_heads=num_heads, **kw)


def _check_qformer(name, dims, *, cross_attention_every, **kw):
  base.check_positive_int(name, "cross_attention_every", cross_attention_every)
  _check_resampler(name, dims, **kw)


base.register("perceiver_resampler", PerceiverResampler, check=_check_resampler,
              doc="Flamingo: k latents attend to [patches; latents], num_layers pre-LN blocks, Linear(D, E)")
base.register("qformer", QFormer, check=_check_qformer,
              doc="BLIP-2 Q-Former: k queries, self-attention + cross-attention to all tokens + FFN, Linear(D, E)")
