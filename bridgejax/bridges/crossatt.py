"""Cross-attention bridge (thesis eq. 7.15-7.17): k learned queries attend to every token of a layer.

Axis legend (einsum letters): B batch, N tokens (1 + grid², CLS included), D vision width,
E LLM width, K learned queries (k), H heads, F head dim.

  Z = LL_O(MHA(Q, Y_l, Y_l)),  Q (k, D) learned,  Y_l = hidden_states[layer] (B, N, D),
  LL_O(Y) = Y W_O + b, W_O (D, E).

The equations write head_i = softmax(Q K_i^T) V_i with K_i = Y W_i^K, V_i = Y W_i^V (D x D/H each)
and LL_O applied to the concatenated heads; they leave out the query projection that the shapes need
(Q is k x D, K_i is N x D/H), the 1/sqrt(F) scale and whether an output projection precedes LL_O.
We read them as the thesis's PyTorch most likely ran them: a standard nn.MultiheadAttention(D, H)
(q/k/v/out projections D x D with biases, softmax(q k^T / sqrt(F))) followed by nn.Linear(D, E).
`mha_out_proj=False` drops the attention's own out-projection, so LL_O acts on head_0 ⊕ ... ⊕ head_H-1
exactly as eq. 7.15 writes it. The queries start at N(0, 0.02²) as BLIP-2's Q-Former queries (the
thesis's inspiration; it does not give an init).

Config keys and defaults are the module fields below (`bridgejax.bridges.describe()` lists them).
The thesis's best model is k=12, layer=-2 (L-1) (configs/crossatt_k12.py). post_norm (default
False: raw hidden states as in the fork) sends every token through the tower's post-LayerNorm first.

image_feature (for W_i): a separate 1-query cross-attention (AttentionPool, same heads) over the same
tokens, as for the other all-token bridges (thesis 7.3: "uses only one vector as the query").

Parameters: k·D + 4·(D² + D) + D·E + E (+ pool D + 4·(D² + D)); without the out-projection
subtract D² + D. D=1024, E=2048, H=4: k=4 6,301,696; k=12 6,309,888 (+ 4,199,424 for the pool).
With W_i, W_t, [RET] and the logit scale, crossatt k=12 trains 11,298,305 parameters against
9,185,793 for cls_linear k=4: the thesis's "just slightly more parameters than the CLS model with
4 tokens" (7.4) holds only with the separate retrieval attention counted, which supports it.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from bridgejax.bridges import base
from bridgejax.bridges.base import AttentionPool, BridgeOutput, MultiHeadCrossAttention


class CrossAttention(nn.Module):
  vision_width: int
  llm_width: int
  grid_size: int
  k: int = 4
  layer: int = -1
  num_heads: int = 4
  post_norm: bool = False
  mha_out_proj: bool = True  # False: LL_O on the concatenated heads, as eq. 7.15 writes it
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @property
  def num_tokens(self) -> int:
    return self.k

  @property
  def num_params(self) -> int:
    d, e = self.vision_width, self.llm_width
    return (self.k * d + MultiHeadCrossAttention.num_params(d, self.mha_out_proj) + d * e + e
            + AttentionPool.num_params(d))

  @nn.compact
  def __call__(self, features: base.VisionFeatures) -> BridgeOutput:
    base.check_tokens("crossatt", features, self.grid_size, self.vision_width)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = features.tokens(self.layer, self.post_norm).astype(self.dtype)  # (B, N, D)
    queries = self.param("queries", nn.initializers.normal(0.02), (self.k, self.vision_width),
                         self.param_dtype)
    heads = MultiHeadCrossAttention(self.num_heads, out_proj=self.mha_out_proj, name="attn", **kw)(queries, x)
    z = base.dense(self.llm_width, self.vision_width, name="proj", **kw)(heads)  # LL_O: (B, K, E)
    feature = AttentionPool(self.num_heads, name="feature_pool", **kw)(x)
    return BridgeOutput(z, feature)


def _check(name, dims, *, k, layer, num_heads, post_norm, mha_out_proj):
  base.check_positive_int(name, "k", k)
  base.check_layer(name, "layer", layer, dims["vision_layers"])
  base.check_heads(name, num_heads, dims["vision_width"])
  base.check_bool(name, "post_norm", post_norm)
  base.check_bool(name, "mha_out_proj", mha_out_proj)


base.register("crossatt", CrossAttention, check=_check,
              doc="k learned queries, multi-head cross-attention over all tokens, Linear(D, E) (eq. 7.15-7.17)")
