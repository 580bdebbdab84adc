"""Pic2Word's mapping network: an image becomes one pseudo word in the frozen LLM's input space, so a
composed query "a photo of * , but blue" can be read by the LLM like any sentence.

Pic2Word (Saito et al., CVPR 2023, "Pic2Word: Mapping Pictures to Words for Zero-shot Composed Image
Retrieval") trains only a light mapping network f_M on unlabeled images, with CLIP frozen: the text
encoder's embedding of "a photo of *", where * is f_M of the image's frozen CLIP embedding, is
contrasted with that image embedding. At inference the pseudo word fills a prompt with the
modification text, and the text embedding ranks the gallery. Here the LLM + [RET] + W_t is the text
encoder and the model's W_i the image side (the term: bridgejax/terms/pic2word.py):

    v  = post-LayerNorm CLS of the tower's layer L (CLIP's pooler_output), frozen     (B, W)
    h1 = ReLU(A_1 v + a_1),  h_l = ReLU(A_l h_{l-1} + a_l) for l = 2..n               (B, M)
    s  = A_o h_n + a_o, the pseudo word in the embedding table's space                (B, D)
    t  = W_t(h_[RET](BOS "a photo of" s·embed_scale [RET]))                           (B, E)
    L_pic2word = (InfoNCE_i2t + InfoNCE_t2i)(W_i(image), t) / 2, the model's logit scale

Choices where this model differs from CLIP's setting:
  - v is the post-LayerNorm CLS (width W), not CLIP's projected 768-d embedding: a CLIPVisionModel
    checkpoint has no projection, and FROMAGe's own bridge reads the same vector.
  - s is scaled by the LLM's embedding normaliser (sqrt(D) for Gemma) as a table row is, so that it
    enters where a word's embedding would (with token types, it gets the text type, as a word).
  - Only f_M learns from L_pic2word: W_i, W_t, the [RET] row, the logit scale and the bridge are
    stop-gradient in that term, as Pic2Word's stage 2 leaves CLIP untouched; they keep learning from
    the other terms.
  - Pic2Word's f_M is n = 2 blocks of Linear, Dropout(0.1), ReLU, then Linear, with M = 512 (its
    code's IM2TEXT); no dropout here, as no bridge here uses one.

Parameters: (W·M + M) + (n - 1)·(M·M + M) + (M·D + D); CLIP ViT-L/14 + Gemma-2B (W = 1024,
D = 2048, M = 512, n = 2): 1,838,080.

Prompts (Pic2Word's code): training "a photo of *" (TRAIN_PROMPT), composed queries
"a photo of * , {modification}" (QUERY_TEMPLATE). Each side of the "*" is tokenised on its own, so
the pseudo word is exactly one position whatever the tokenizer would merge.

Axis legend: B batch, W vision width, M hidden width, D LLM width, E retrieval width.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from bridgejax.errors import UserError

WORD = "*"
TRAIN_PROMPT = "a photo of *"
QUERY_TEMPLATE = "a photo of * , {}"


class MappingNetwork(nn.Module):
  """f_M: (B, W) image feature -> (B, D) pseudo word in the embedding table's space."""

  hidden: int
  layers: int
  out: int

  @nn.compact
  def __call__(self, feature):
    x = feature.astype(jnp.float32)
    for i in range(self.layers):
      x = nn.relu(nn.Dense(self.hidden, name=f"hidden_{i}")(x))
    return nn.Dense(self.out, name="out")(x)


def num_params(vision_width: int, llm_width: int, hidden: int, layers: int) -> int:
  """The module docstring's formula (config.pic2word's hidden and layers: bridgejax/terms/pic2word.py)."""
  return (vision_width * hidden + hidden) + (layers - 1) * (hidden * hidden + hidden) + (hidden * llm_width + llm_width)


def prompt_ids(tokenizer, prompt: str, ret_id: int) -> tuple[list[int], int]:
  """BOS + prompt + [RET] as ids, with a placeholder (the pad id, replaced by the pseudo word) where
  the prompt's "*" is: (ids, the placeholder's position)."""
  before, star, after = prompt.partition(WORD)
  if not star:
    raise UserError(f"a Pic2Word prompt needs a {WORD!r} where the image's pseudo word goes, got {prompt!r}")
  head = tokenizer.encode(before.rstrip(), add_bos=True)
  tail = tokenizer.encode(after, add_bos=False) if after.strip() else []
  return head + [tokenizer.pad_id] + tail + [ret_id], len(head)


def query_text(modification: str) -> str:
  """The composed query's prompt for a modification text ("but blue")."""
  return QUERY_TEMPLATE.format(modification)
