"""The trainable `ret` subtree: the [RET] row, W_t, W_i, the logit scale, the token-type embeddings
and the heads the optional loss terms declare (bridgejax/terms/), and how the [RET] row is kept at
the frozen rows' norm (FROMAGe).

Axis legend: B batch, D LLM width, E retrieval width, W vision width.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from bridgejax import losses

TOKEN_TYPE_SCALE_INIT = 1e-5  # the TTE report's LayerScale init: the type embeddings start almost silent


class RetrievalHeads(nn.Module):
  """The `ret` subtree: the [RET] row, W_t, W_i and the logit scale, the token-type embeddings when
  on, and the heads the active loss terms declare (`extra`; bridgejax/terms/). Off: exactly those four.

  token_types (the TTE report, eq. 4-5; VLMo's token-type embeddings, BEiT-3/CaiT's LayerScale):
    token_type_image, token_type_text (D,) and one shared token_type_scale λ (D,), init 1e-5:
    LLM input x' = x + λ ⊙ t_type · embed_scale for every visual token and every text token (BOS and
    [RET] too), t_type living in the embedding table's space like the [RET] row. Both types start
    at the frozen rows' mean norm (BridgeModel.init_trainable, as the [RET] row), so λ is the type
    embedding's size relative to a token: the LLM's inputs move by about 1e-5 at initialisation.
    One λ for both modalities, as the report: no bias towards either. Parameters: 3·D.
  extra: terms.Head declarations, each built under its own name (a dense layer, a scalar or a
    module); each term's file has its equations and parameter formula.
  """

  llm_width: int
  embed_dim: int = 256
  logit_scale_init: float = math.log(1 / 0.07)
  token_types: bool = False
  extra: tuple = ()  # (terms.Head, ...)

  def setup(self):
    self.ret_embedding = self.param("ret_embedding", nn.initializers.normal(1.0), (1, self.llm_width))
    self.text_proj = nn.Dense(self.embed_dim, name="text_proj")  # W_t
    self.image_proj = nn.Dense(self.embed_dim, name="image_proj")  # W_i
    self.logit_scale = self.param("logit_scale", nn.initializers.constant(self.logit_scale_init), ())
    if self.token_types:
      width = (self.llm_width,)
      self.token_type_image = self.param("token_type_image", nn.initializers.normal(1.0), width)
      self.token_type_text = self.param("token_type_text", nn.initializers.normal(1.0), width)
      self.token_type_scale = self.param("token_type_scale", nn.initializers.constant(TOKEN_TYPE_SCALE_INIT), width)
    for head in self.extra:  # each under its own name: ret/<name>, as a checkpoint keeps it
      if head.kind == "dense":
        setattr(self, head.name, nn.Dense(head.width))
      elif head.kind == "scalar":
        setattr(self, head.name, self.param(head.name, nn.initializers.constant(head.init), ()))
      elif head.kind == "module":
        setattr(self, head.name, head.factory())
      else:
        raise ValueError(f"head ret/{head.name}: unknown kind {head.kind!r}")

  def __call__(self, ret_hidden, image_feature, patches):  # for init: touches every parameter
    out = [self.text_embedding(ret_hidden), self.image_embedding(image_feature), self.logit_scale]
    if self.token_types:
      out.append(self.type_offsets())
    for head in self.extra:
      x = None if head.kind == "scalar" else ret_hidden if head.reads == "llm" else patches[:, 0]
      out.append(self.apply_head(head.name, x))
    return out

  def text_embedding(self, ret_hidden):  # (B, D) -> (B, E)
    return self.text_proj(ret_hidden.astype(jnp.float32))

  def image_embedding(self, image_feature):  # (B, W) -> (B, E)
    return self.image_proj(image_feature.astype(jnp.float32))

  def type_offsets(self):  # what the TTE adds: (image (D,), text (D,)), eq. 4-5
    return self.token_type_scale * self.token_type_image, self.token_type_scale * self.token_type_text

  def apply_head(self, name, x=None):  # a term's head on x (float32), or its scalar
    head = getattr(self, name)
    return head if x is None else head(x.astype(jnp.float32))


def frozen_row_norm(frozen) -> jax.Array:
  """Mean L2 norm of the frozen embedding rows, the norm FROMAGe keeps the [RET] row at."""
  table = frozen["llm"]["embedding"]
  return jnp.mean(jnp.linalg.norm(jnp.asarray(table, jnp.float32), axis=-1))


def rescale_ret_row(trainable, target_norm):
  """FROMAGe rescales the trainable row to the frozen rows' mean norm after every step."""
  row = target_norm * losses.l2_normalize(trainable["ret"]["ret_embedding"])
  return {**trainable, "ret": {**trainable["ret"], "ret_embedding": row}}
