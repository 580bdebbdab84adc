"""BLIP-2's stage 1 on the Q-Former (querying.QFormer with text_vocab > 0): its text branch and heads.

Axis legend: B batch, K learned queries, T text tokens, N vision tokens, D vision width, H the
Q-Former's width, M = mlp_ratio·H the feed-forward width, V_t the text vocabulary.

Stage 1 (config.stage="representation", BLIP-2's representation learning) runs the query branch's
layers (querying.QFormerLayer) over [queries; text] and adds what only it trains: word and absolute
position embeddings (BERT's, HF's Blip2TextEmbeddings), a text FFN FFN_t in every layer (created by
the layer once text passes through it), and the heads of the three losses that
model.representation_loss joins:
  ITC  Linear(H, 256) on each query and on the text's first token, unit norm, a learned temperature;
  ITM  Linear(H, 2), the mean over the queries of a joint pass (qformer_attention_mask, causal=False);
  ITG  BERT's LM head (Linear(H, H), GELU, LN) and the decoder tied to the word embeddings, over the
       text of a joint pass under BLIP-2's multimodal causal mask (causal=True).
The queries, LN_q, LN_v and the layers are the query branch's (querying.QFormer), so stage 2 starts
from what stage 1 trained.
  Parameters (QFormer.text_params), V_t = the LLM's vocabulary + 1 ([DEC]):
    V_t·H + 512·H + num_layers·(2·H·M + M + H + 2H) + 2·(256·H + 256) + 1 + (2H + 2) + (H² + H) + 2H + V_t;
    blip2 at Gemma-2B: 254,932,996 (196.6M of it the word embeddings over 256,001 ids).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from bridgejax.bridges import base
from bridgejax.bridges.projector import GeluMLP

TEXT_POSITIONS = 512  # BERT's max_position_embeddings: the text branch's absolute positions
ITC_WIDTH = 256  # BLIP-2's embed_dim of the ITC projections


class TextBranch(nn.Module):
  """QFormer's stage-1 methods, a mixin: the fields (query_width, k, text_vocab, num_layers, mlp_ratio,
  layer_norm_eps, dtypes), the queries, query_norm, layers and the query branch's `vision_tokens` and
  `query_states` are QFormer's."""

  @property
  def text_params(self) -> int:
    """Stage 1's own parameters: embeddings, a text FFN per layer, the ITC, ITM and ITG heads."""
    h, v = self.query_width, self.text_vocab
    embeddings = v * h + TEXT_POSITIONS * h
    text_ffns = self.num_layers * (GeluMLP.num_params(h, self.mlp_ratio * h, h) + base.ln_params(h))
    heads = 2 * (h * ITC_WIDTH + ITC_WIDTH) + 1 + (2 * h + 2) + (h * h + h) + base.ln_params(h) + v
    return embeddings + text_ffns + heads

  def setup_text_branch(self, **kw):
    """The embeddings and heads, from QFormer.setup after the query branch's (the order its `param`s
    draw their initial values in)."""
    h = self.query_width
    init = nn.initializers.normal(0.02)  # BERT's initializer_range
    self.word_embeddings = nn.Embed(self.text_vocab, h, embedding_init=init, **kw)
    self.position_embeddings = nn.Embed(TEXT_POSITIONS, h, embedding_init=init, **kw)
    self.itc_image_proj = base.dense(ITC_WIDTH, h, **kw)  # BLIP-2's vision_proj
    self.itc_text_proj = base.dense(ITC_WIDTH, h, **kw)  # text_proj
    self.itc_temp = self.param("itc_temp", nn.initializers.constant(0.07), ())
    self.itm_head = base.dense(2, h, **kw)
    self.itg_transform = base.dense(h, h, **kw)  # BERT's LM head: dense, GELU, LN, then the tied decoder
    self.itg_norm = nn.LayerNorm(epsilon=self.layer_norm_eps, **kw)
    self.itg_bias = self.param("itg_bias", nn.initializers.zeros, (self.text_vocab,), self.param_dtype)

  def text_states(self, ids, mask):
    """ITC's text side: ids (B, T) alone, bidirectional over real tokens -> (B, T, H)."""
    x = self.query_norm(self._embed_text(ids))
    attend = jnp.broadcast_to(mask.astype(bool)[:, None, :], (*ids.shape, ids.shape[1]))  # (B, T, T)
    for layer in self.layers:
      x = layer(x, None, 0, attend)
    return x

  def joint_states(self, tokens, ids, mask, causal: bool):
    """[queries; text] (B, K + T, H) through every layer, queries cross-attending to tokens (B, N, D):
    causal=False ITM's mask (every position sees every real one); causal=True ITG's (the queries see
    only the queries, text position t the queries and text up to t): qformer_attention_mask."""
    b = ids.shape[0]
    q = jnp.broadcast_to(self.queries.astype(self.dtype), (b, self.k, self.query_width))
    x = self.query_norm(jnp.concatenate([q, self._embed_text(ids)], axis=1))
    attend = qformer_attention_mask(self.k, mask, causal)
    for layer in self.layers:
      x = layer(x, tokens, self.k, attend)
    return x

  def _embed_text(self, ids):  # (B, T) -> (B, T, H): word + absolute position (BERT's; HF Blip2TextEmbeddings)
    return self.word_embeddings(ids) + self.position_embeddings(jnp.arange(ids.shape[1]))[None]

  def itc_embeddings(self, query_states, text_states):
    """-> (the queries' ITC embeddings (B, K, 256), the text's from its first token (B, 256)), unit norm."""
    normalize = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    return (normalize(self.itc_image_proj(query_states).astype(jnp.float32)),
            normalize(self.itc_text_proj(text_states[:, 0]).astype(jnp.float32)))

  def itc_temperature(self):
    """BLIP-2 clamps its temp to [0.001, 0.5] in place before each step, so it keeps learning at a
    bound; a plain clip would stop its gradient there: the clipped value, the identity's gradient."""
    return self.itc_temp + jax.lax.stop_gradient(jnp.clip(self.itc_temp, 0.001, 0.5) - self.itc_temp)

  def itm_logits(self, joint_states):  # (B, K + T, H) -> (B, 2): the mean over the query positions
    return jnp.mean(self.itm_head(joint_states[:, :self.k]).astype(jnp.float32), axis=1)

  def itg_logits(self, text_states):  # (B, T, H) -> (B, T, V_t): the decoder tied to word_embeddings
    h = self.itg_norm(nn.gelu(self.itg_transform(text_states), approximate=False))
    return self.word_embeddings.attend(h).astype(jnp.float32) + self.itg_bias

  def init_representation(self, features, ids, mask):
    """Touches every stage-1 parameter (init): the query branch without LL_O, the text branch, the heads."""
    _, tokens = self.vision_tokens(features)
    q, t = self.query_states(tokens), self.text_states(ids, mask)
    return (self.itc_embeddings(q, t), self.itc_temperature(), self.itm_logits(self.joint_states(tokens, ids, mask, False)),
            self.itg_logits(self.joint_states(tokens, ids, mask, True)[:, self.k:]))


def qformer_attention_mask(num_queries: int, mask, causal: bool):
  """Who sees whom in [queries; text] (B, K + T, K + T), mask (B, T) the text's real tokens.
  ITM (causal=False): every position sees the queries and the real text. ITG (causal=True, BLIP-2's
  multimodal causal mask): the queries see only the queries; text t sees the queries and real text <= t."""
  b, t = mask.shape
  real = jnp.concatenate([jnp.ones((b, num_queries), bool), mask.astype(bool)], axis=1)  # (B, K + T)
  attend = jnp.broadcast_to(real[:, None, :], (b, num_queries + t, num_queries + t))
  if not causal:
    return attend
  pos = jnp.arange(num_queries + t)
  is_text = pos >= num_queries
  allowed = jnp.where(is_text[:, None], ~is_text[None, :] | (pos[None, :] <= pos[:, None]), ~is_text[None, :])
  return attend & allowed[None]
