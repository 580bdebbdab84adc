"""Cross-attention bridge (thesis eq. 7.15-7.17): k learned queries attend to every token of a layer.

Axis legend (einsum letters): B batch, N tokens (1 + grid², CLS included), D vision width,
E LLM width, K learned queries (k), H heads, F = D/H head dim.

  Z = LL_O(head_0 ⊕ ... ⊕ head_{H-1})  (B, K, E),   LL_O(Y) = Y W_O + b, W_O (D, E)   (7.15)
  head_i = ω(Q_i K_i^T) V_i            (B, K, F),   ω(·) = softmax(· / sqrt(F))       (7.16)
  K_i = Y_l W_i^K, V_i = Y_l W_i^V     (B, N, F),   W_i^K, W_i^V (D, F)                (7.17)
  Q (k, D) learned; Y_l = hidden_states[layer] (B, N, D).

`attention` picks how the attention is read:
  "equation": 7.15-7.17 as written. No query projection: Q_i is Q's i-th block of F columns (the
    only reading in which Q (k x 1024) K_i^T (256 x 257) has matching shapes), no biases on W^K,
    W^V, no output projection before LL_O. ω is the thesis's own (eq. 2.2: softmax(·/sqrt(d_q)));
    7.16 calls it "the softmax", and as Q is learned the scale only sets its initial temperature.
    Parameters: k·D + 2·D² + D·E + E.
  "mha" (the module default): torch.nn.MultiheadAttention(D, H) then LL_O, i.e. q/k/v/out
    projections (D, D) with biases. Parameters: k·D + 4·(D² + D) + D·E + E.
  "mha_no_out": the same without the out-projection. Parameters: k·D + 3·(D² + D) + D·E + E.
The queries start at N(0, 0.02²) as BLIP-2's Q-Former queries (the thesis's inspiration; it gives no init).

image_feature (for W_i): a separate 1-query multi-head attention (AttentionPool: a learned query and
a torch-style MHA, same heads) over the same tokens, as 7.3 describes ("a cross-attention module to
transform embeddings to compare with the embedding of the [RET] token, this uses only one vector as
the query"). Parameters: D + 4·(D² + D) = 4,199,424 for D=1024.

Which `attention` the thesis ran, from its one statement about the size (7.4: the best model, k=12,
has "just slightly more parameters than the CLS model with 4 tokens"). ViT-L/14 + Gemma-2B, H=4, with
the pool and W_i, W_t, [RET] and the logit scale (788,993):
  cls_linear k=4                    8,396,800 + 788,993             =  9,185,793
  crossatt k=12, "equation"         4,208,640 + 4,199,424 + 788,993 =  9,197,057  (+11,264, +0.1%)
  crossatt k=12, "mha_no_out"       5,260,288 + 4,199,424 + 788,993 = 10,248,705  (+12%)
  crossatt k=12, "mha"              6,309,888 + 4,199,424 + 788,993 = 11,298,305  (+23%)
  ("equation" with an equation-form pool too, D + 2·D²: 7,095,809, fewer than cls k=4.)
The equations as written, with a standard attention for the retrieval query, fit the sentence; the
thesis configs (configs/crossatt.py, crossatt_k12.py) therefore set attention="equation". The module
default stays "mha", the form the demo and earlier checkpoints were trained with.
At k=4: "equation" 4,200,448, "mha" 6,301,696 (each + 4,199,424 for the pool).

Config keys and defaults are the module fields below (`bridgejax.bridges.describe()` lists them).
The thesis's best model is k=12, layer=-2 (L-1). post_norm (default False: raw hidden states as in
the fork) sends every token through the tower's post-LayerNorm first.
"""

from __future__ import annotations

import flax.linen as nn

from bridgejax.bridges import base
from bridgejax.bridges.base import AttentionPool, BridgeOutput, MultiHeadCrossAttention

# attention -> MultiHeadCrossAttention's (query_proj, out_proj, kv_bias)
ATTENTION = {"equation": (False, False, False), "mha": (True, True, True), "mha_no_out": (True, False, True)}


class CrossAttention(base.Bridge):
  grid_size: int
  k: int = 4
  layer: int = -1
  num_heads: int = 4
  post_norm: bool = False
  attention: str = "mha"  # ATTENTION; the thesis configs set "equation" (module docstring)

  @property
  def num_params(self) -> int:
    d, e = self.vision_width, self.llm_width
    query_proj, out_proj, kv_bias = ATTENTION[self.attention]
    return (self.k * d + MultiHeadCrossAttention.num_params(d, out_proj, query_proj, kv_bias) + d * e + e
            + AttentionPool.num_params(d))

  @nn.compact
  def __call__(self, features: base.VisionFeatures) -> BridgeOutput:
    base.check_tokens("crossatt", features, self.grid_size, self.vision_width)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = features.tokens(self.layer, self.post_norm).astype(self.dtype)  # (B, N, D)
    queries = self.param("queries", nn.initializers.normal(0.02), (self.k, self.vision_width),
                         self.param_dtype)
    query_proj, out_proj, kv_bias = ATTENTION[self.attention]
    heads = MultiHeadCrossAttention(self.num_heads, out_proj=out_proj, query_proj=query_proj, kv_bias=kv_bias,
                                    name="attn", **kw)(queries, x)  # (B, K, D)
    z = base.dense(self.llm_width, self.vision_width, name="proj", **kw)(heads)  # LL_O: (B, K, E)
    feature = AttentionPool(self.num_heads, name="feature_pool", **kw)(x)
    return BridgeOutput(z, feature)


def _check(name, dims, *, k, layer, num_heads, post_norm, attention):
  base.check_positive_int(name, "k", k)
  base.check_layer(name, "layer", layer, dims["vision_layers"])
  base.check_heads(name, num_heads, dims["vision_width"])
  base.check_bool(name, "post_norm", post_norm)
  base.check_choice(name, "attention", attention, tuple(ATTENTION))


base.register("crossatt", CrossAttention, check=_check,
              doc="k learned queries, multi-head cross-attention over all tokens, Linear(D, E) (eq. 7.15-7.17)")
