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
  X is `hidden_states[layer][:, 1:]` (the patches, CLS dropped, after the tower's post-LayerNorm with
  post_norm=True), as OpenFlamingo feeds CLIP ViT-L/14's patch tokens; Flamingo's NFNet has no CLS.
  bridgejax chooses: k=64, num_layers=6, 8 heads, mlp_ratio=4 with GELU (OpenFlamingo's), layer=-1,
  post_norm=True. Differences from OpenFlamingo: heads of D/8 = 128 (it projects to 8 heads of 64,
  an inner width of 512, and back), biases on every projection (torch MHA and nn.Linear; it has
  none), no temporal embeddings (one image, not a video), and LL_O, as the tokens go in front of the
  text here. The `flamingo` bridge (flamingo.py) does not reuse this one: it carries OpenFlamingo's
  own resampler (8 heads of 64, no biases, no LL_O), read inside the LM by gated cross-attention.
  Parameters: K·D + num_layers·(3·2D + 4·(D² + D) + 2·D·M + M + D) + 2D + D·E + E (+ pool).
    ViT-L/14 + Gemma-2B, defaults: 77,756,416 (78,545,409 with W_i, W_t, [RET] and the logit scale).

`qformer` (BLIP-2, Li et al. 2023; transformers' Blip2QFormerModel, LAVIS's Qformer.py)
  The lecture notes: the Q-Former's learned embeddings "are passed to the LLM through a projection
  layer" and "serve as a soft visual prompt"; its layers are not described. The paper: 32 learned
  queries of width 768 (a BERT-base initialised Q-Former, 12 layers, cross-attention to the frozen
  ViT's penultimate-layer features, all tokens with CLS, through a trainable LayerNorm `ln_vision`,
  in every other layer). Each layer is post-LN (BERT), over [queries; text] (QFormerLayer):
    A ← LN(X + SelfAttn(X))                     (B, K + T, H), one softmax over queries and text
    Q ← LN(A_q + CrossAttn(q = A_q, kv = LN_v(X_img)))   in layers i with i % cross_attention_every == 0
    Q ← LN(Q + FFN_q(Q)),  T ← LN(A_t + FFN_t(A_t))       each branch its own FFN
    Z = LL_O(Q)                               (B, K, E),  X starts as LN_q([queries; word + position])
  The bridge (stage 2, and every stage of the default) is the query branch alone (T = 0). Stage 1
  (config.stage="representation", BLIP-2's representation learning; text_vocab > 0) adds the text
  branch and the heads of ITC, ITM and ITG (qformer_text.py, its equations and parameter count).
  bridgejax chooses by default: k=32 (BLIP-2's), width H = D (no BERT to start from, so the queries take
  the vision width), num_layers=2 with cross-attention in every layer (cross_attention_every=1), 16
  heads (64-wide like BERT's), mlp_ratio=4, eps 1e-5, layer=-2 and every token of it, CLS included,
  through LN_v, trained in one stage. configs/qformer.py:blip2 is BLIP-2's: H=768, 12 heads, 12 layers,
  cross-attention every 2nd, eps 1e-12, both stages. Attention projections are torch-initialised
  (BLIP-2 starts from BERT's weights, unavailable here).
  Parameters of the query branch, C the cross-attention layers, W = H (width):
    K·H + 2H (LN_q) + 2D (LN_v) + num_layers·(4·(H² + H) + 2·H·M + M + H + 2·2H)
    + C·(2·(H² + H) + 2·(D·H + H) + 2H) + H·E + E (+ pool).
    ViT-L/14 + Gemma-2B, defaults: 35,729,408 (36,518,401 with the heads); blip2: 103,200,256.

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
import jax
import jax.numpy as jnp

from bridgejax.bridges import alltokens, base
from bridgejax.bridges.base import BridgeOutput, MultiHeadCrossAttention, layer_norm, ln_params
from bridgejax.bridges.projector import GeluMLP
# qformer_attention_mask: BLIP-2's stage-1 masks, with the text branch; importable from here too
from bridgejax.bridges.qformer_text import TextBranch, qformer_attention_mask  # noqa: F401
from bridgejax.errors import UserError

# MultiHeadCrossAttention shares its queries over the batch; vmapped over B with one parameter set
# it takes per-example queries, which every layer after the first needs (and self-attention).
_PerExampleAttention = nn.vmap(MultiHeadCrossAttention, in_axes=0, out_axes=0, variable_axes={"params": None},
                               split_rngs={"params": False})


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


class QFormerAttention(nn.Module):
  """BERT's multi-head attention (the Q-Former's, HF's Blip2QFormerMultiHeadAttention + SelfOutput's
  dense): x (B, L, H) attends to y (B, M, C) under mask (B, L, M) (True = may attend) -> (B, L, H).
  q_proj (H, heads, F), k_proj and v_proj (C, heads, F), out_proj (H, H), all with biases; F = H/heads.
  Its parameter names and shapes are MultiHeadCrossAttention's when C = H, so checkpoints of the
  default Q-Former load unchanged."""

  num_heads: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, y, mask=None):
    width = x.shape[-1]
    head_dim = width // self.num_heads
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    proj = lambda name: nn.DenseGeneral((self.num_heads, head_dim), kernel_init=base.torch_mha_in_kernel,
                                        bias_init=nn.initializers.zeros, name=name, **kw)
    q = proj("q_proj")(x) * head_dim**-0.5  # (B, L, heads, F)
    k, v = proj("k_proj")(y), proj("v_proj")(y)  # (B, M, heads, F)
    logits = jnp.einsum("BLHF,BMHF->BHLM", q, k).astype(jnp.float32)
    if mask is not None:
      logits = jnp.where(mask[:, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum("BHLM,BMHF->BLHF", probs, v).reshape(*x.shape[:2], width)
    return nn.Dense(width, kernel_init=base.torch_linear_kernel, bias_init=nn.initializers.zeros,
                    name="out_proj", **kw)(out)


class QFormerLayer(nn.Module):
  """One BERT-style (post-LN) Q-Former layer over [queries; text] (B, K + T, H), K = query_length:

    A = LN(X + SelfAttn(X, X, mask))                      every position, one softmax (mask: ITC, ITM, ITG)
    A_q = LN(A_q + CrossAttn(A_q, tokens))                the K query positions, if cross_attention
    out = [LN(A_q + FFN_q(A_q)); LN(A_t + FFN_t(A_t))]    queries and text each through their own FFN

  tokens (B, N, C) the normalised vision tokens. Text positions (T > 0) exist in stage 1 only, so
  FFN_t ("text_ffn", HF's intermediate/output) is created only there; query_length = 0 is a text-only
  pass (ITC's text side), as HF's Blip2QFormerLayer."""

  num_heads: int
  mlp_ratio: int
  cross_attention: bool = True
  eps: float = 1e-5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, tokens, query_length: int, mask=None):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    norm = lambda name, h: nn.LayerNorm(epsilon=self.eps, name=name, **kw)(h)
    attend = lambda name, q, kv, m=None: QFormerAttention(self.num_heads, name=name, **kw)(q, kv, m)
    ffn = lambda name, h: GeluMLP(self.mlp_ratio * h.shape[-1], h.shape[-1], name=name, **kw)(h)
    a = norm("self_attn_norm", x + attend("self_attn", x, x, mask))
    q, t = a[:, :query_length], a[:, query_length:]
    out = []
    if query_length:
      if self.cross_attention:
        q = norm("cross_attn_norm", q + attend("cross_attn", q, tokens))
      out.append(norm("ffn_norm", q + ffn("ffn", q)))
    if t.shape[1]:
      out.append(norm("text_ffn_norm", t + ffn("text_ffn", t)))
    return jnp.concatenate(out, axis=1) if len(out) > 1 else out[0]

  @staticmethod
  def num_params(width: int, mlp_ratio: int, cross_attention: bool, vision_width: int | None = None) -> int:
    """The query branch's parameters (no text FFN); cross-attention keys/values read vision_width."""
    c = width if vision_width is None else vision_width
    attention = 4 * (width * width + width)
    cross = 2 * (width * width + width) + 2 * (c * width + width) + ln_params(width) if cross_attention else 0
    return attention + GeluMLP.num_params(width, mlp_ratio * width, width) + 2 * ln_params(width) + cross


class PerceiverResampler(alltokens._AllTokens, base.Bridge):
  registry_name = "perceiver_resampler"
  grid_size: int
  k: int = 64  # latents = output tokens (Flamingo's 64)
  num_layers: int = 6
  num_heads: int = 8  # every attention's heads, and the attention pool's
  mlp_ratio: int = 4
  layer: int = -1
  post_norm: bool = True
  retrieval_feature: str = "mean"  # alltokens.RETRIEVAL_FEATURES

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


class QFormer(alltokens._AllTokens, TextBranch, base.Bridge):
  """The query branch is the bridge; TextBranch (qformer_text.py) adds stage 1's text branch and heads."""

  registry_name = "qformer"
  grid_size: int
  k: int = 32  # learned queries = output tokens (BLIP-2's 32)
  num_layers: int = 2  # BLIP-2: 12
  cross_attention_every: int = 1  # BLIP-2: 2 (layers 0, 2, 4, ...)
  num_heads: int = 16  # every attention's heads, and the attention pool's
  mlp_ratio: int = 4
  layer: int = -2  # BLIP-2: the ViT's penultimate layer
  post_norm: bool = False
  retrieval_feature: str = "mean"  # alltokens.RETRIEVAL_FEATURES
  width: int = 0  # the Q-Former's width H; 0 = the vision width D (BLIP-2: 768, BERT-base's)
  layer_norm_eps: float = 1e-5  # the Q-Former's LayerNorms (BLIP-2: BERT's 1e-12); LN_v keeps 1e-5
  text_vocab: int = 0  # > 0: the stage-1 text branch and heads (set by config.stage="representation")

  @property
  def query_width(self) -> int:
    return self.width or self.vision_width

  def _cross_attends(self, i: int) -> bool:
    return i % self.cross_attention_every == 0

  @property
  def num_params(self) -> int:
    """The query branch (the bridge of stage 2); the text branch's are `text_params`."""
    d, h, e = self.vision_width, self.query_width, self.llm_width
    layers = sum(QFormerLayer.num_params(h, self.mlp_ratio, self._cross_attends(i), d) for i in range(self.num_layers))
    return self.k * h + ln_params(h) + ln_params(d) + layers + h * e + e + self._pool_params

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = self.query_width
    self.queries = self.param("queries", nn.initializers.normal(0.02), (self.k, h), self.param_dtype)
    self.query_norm = nn.LayerNorm(epsilon=self.layer_norm_eps, **kw)  # BERT's embedding LN: queries and text
    self.vision_norm = nn.LayerNorm(epsilon=1e-5, **kw)  # BLIP-2's ln_vision
    self.layers = [QFormerLayer(self.num_heads, self.mlp_ratio, cross_attention=self._cross_attends(i),
                                eps=self.layer_norm_eps, name=f"layer_{i}", **kw) for i in range(self.num_layers)]
    self.proj = base.dense(self.llm_width, h, **kw)  # LL_O
    if self.retrieval_feature == "attention_pool":
      self.feature_pool = base.AttentionPool(self.num_heads, **kw)
    if self.text_vocab:  # stage 1 (BLIP-2's representation learning)
      self.setup_text_branch(**kw)

  # ----------------------------------------------------------------- the query branch (the bridge)

  def vision_tokens(self, features: base.VisionFeatures):
    """-> (the layer's tokens (B, N, D), LN_v of them: what cross-attention reads)."""
    x = self._tokens(features)  # (B, N, D), CLS included
    return x, self.vision_norm(x)

  def query_states(self, tokens):
    """tokens (B, N, D) after LN_v -> the queries' last states (B, K, H): query_length = K, no text."""
    h = self.query_norm(self.queries.astype(self.dtype))  # (K, H)
    h = jnp.broadcast_to(h, (tokens.shape[0], *h.shape))  # (B, K, H)
    for layer in self.layers:
      h = layer(h, tokens, self.k)
    return h

  def __call__(self, features: base.VisionFeatures) -> BridgeOutput:
    x, tokens = self.vision_tokens(features)
    h = self.query_states(tokens)
    z = self.proj(h)  # LL_O: (B, K, E)
    if self.retrieval_feature == "mean":
      return BridgeOutput(z, jnp.mean(h.astype(jnp.float32), axis=1).astype(self.dtype))
    return BridgeOutput(z, self.feature_pool(x))


# --- registry ----------------------------------------------------------------------------------------

def _check_resampler(name, dims, *, k, num_layers, num_heads, mlp_ratio, **kw):
  for key, value in dict(k=k, num_layers=num_layers, mlp_ratio=mlp_ratio).items():
    base.check_positive_int(name, key, value)
  base.check_heads(name, num_heads, dims["vision_width"])  # the layers' attention, whatever W_i reads
  alltokens._check_common(name, dims, num_heads=num_heads, **kw)


def _check_qformer(name, dims, *, cross_attention_every, width, layer_norm_eps, text_vocab, num_heads, **kw):
  base.check_positive_int(name, "cross_attention_every", cross_attention_every)
  if width:  # 0: the vision width
    base.check_positive_int(name, "width", width)
  base.check_heads(name, num_heads, width or dims["vision_width"])
  if isinstance(layer_norm_eps, bool) or not isinstance(layer_norm_eps, (int, float)) or not 0 < layer_norm_eps < 1:
    raise UserError(f"bridge {name!r}: layer_norm_eps={layer_norm_eps!r} must be a number in (0, 1), e.g. 1e-12")
  if text_vocab:
    base.check_positive_int(name, "text_vocab", text_vocab)
  for key, value in dict(k=kw["k"], num_layers=kw["num_layers"], mlp_ratio=kw["mlp_ratio"]).items():
    base.check_positive_int(name, key, value)
  alltokens._check_common(name, dims, num_heads=num_heads,
                          **{key: kw[key] for key in ("layer", "post_norm", "retrieval_feature")})


base.register("perceiver_resampler", PerceiverResampler, check=_check_resampler,
              doc="Flamingo: k latents attend to [patches; latents], num_layers pre-LN blocks, Linear(D, E)")
base.register("qformer", QFormer, check=_check_qformer, fixed=("text_vocab",),
              doc="BLIP-2 Q-Former: k queries, self-attention + cross-attention to all tokens + FFN, Linear(D, E)")
