"""The assembled model: frozen vision tower -> trainable bridge -> frozen LLM, plus the [RET] heads.

Parameters live in one dict: `vision` and `llm` (frozen), `bridge` and `ret` (trainable). Training
differentiates `loss(trainable, frozen, batch, rng)` with respect to `trainable` only.

The two passes of FROMAGe (docs/reference.md, "Training"):
  captioning: [k visual tokens] + BOS + caption + [RET]; the visual positions are not targets.
  text:       BOS + caption + [RET], no image; CE over the whole text, and the final-norm hidden
              state at [RET] is the text embedding for retrieval.

The concat trick (FROMAGe: with probability concat_prob, pairs of examples are joined into one
caption sequence [img_a, cap_a, img_b, cap_b]) runs the LLM once whatever the coin says: with
concat_prob > 0 the captioning pass always lays pairs out as (B/2, 2S) rows, and a segment mask
decides whether the second half sees the first. Positions restart when the halves are kept
apart, so each half is then exactly its own sequence. (A `lax.cond` between two layouts kept
both branches' buffers: 73.7 GiB instead of 35.0 GiB for crossatt_k12 at batch 180 on an H200.)

`config.remat` trades memory for compute in the backward pass: "llm" recomputes each frozen LLM
layer (keeping only its input), "all" also recomputes the LM head with its cross-entropy (the
(B, S, V) logits are never kept) and the bridge.

Axis legend: B batch, T text length, K visual tokens (k), S = K + T, D LLM width, E retrieval
width, W vision width, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from bridgejax import losses
from bridgejax.bridges import BridgeOutput, VisionFeatures, build_bridge
from bridgejax.models.clip import CLIPVisionConfig, CLIPVisionTransformer
from bridgejax.models.gemma import Gemma, GemmaConfig
from bridgejax.models.llama import Llama, LlamaConfig
from bridgejax.models.precision import matmul_precision

TRAINABLE = ("bridge", "ret")
REMAT = ("none", "llm", "all")
# How visual tokens enter the LLM relative to text embeddings (which Gemma scales by sqrt(D)).
#   "sqrt_d": multiplied by the LLM's embedding normaliser (`embed_scale`: sqrt(D) for Gemma, 1 for
#     the LLaMA family, which has none) too, as in the thesis's stack: its fork
#     passed [visual tokens, text embeddings] as `inputs_embeds` to transformers 4.x, whose
#     GemmaModel.forward multiplied *all* inputs_embeds by sqrt(hidden_size) (sqrt(2048) = 45.25 in
#     bf16). transformers 5.x moved the scale into the embedding layer.
#   "none": added after the text scaling, as transformers 5.x and FROMAGe (OPT has no such scale) do;
#     visual tokens then start 45x smaller relative to text for Gemma-2B, and under Adam each
#     bridge must grow 45x to get where the thesis's started.
VISUAL_TOKEN_SCALES = ("sqrt_d", "none")


def _with_precision(method):
  """Trace the method under the model's matmul precision (float32 means float32)."""

  @functools.wraps(method)
  def wrapper(self, *args, **kwargs):
    with matmul_precision(self.llm.dtype, self.matmul_precision):
      return method(self, *args, **kwargs)

  return wrapper


class RetrievalHeads(nn.Module):
  """The `ret` subtree: the [RET] row, W_t, W_i and the logit scale."""

  llm_width: int
  embed_dim: int = 256
  logit_scale_init: float = math.log(1 / 0.07)

  def setup(self):
    self.ret_embedding = self.param("ret_embedding", nn.initializers.normal(1.0), (1, self.llm_width))
    self.text_proj = nn.Dense(self.embed_dim, name="text_proj")  # W_t
    self.image_proj = nn.Dense(self.embed_dim, name="image_proj")  # W_i
    self.logit_scale = self.param("logit_scale", nn.initializers.constant(self.logit_scale_init), ())

  def __call__(self, ret_hidden, image_feature):  # for init: touches every parameter
    return self.text_embedding(ret_hidden), self.image_embedding(image_feature), self.logit_scale

  def text_embedding(self, ret_hidden):  # (B, D) -> (B, E)
    return self.text_proj(ret_hidden.astype(jnp.float32))

  def image_embedding(self, image_feature):  # (B, W) -> (B, E)
    return self.image_proj(image_feature.astype(jnp.float32))


@dataclasses.dataclass(frozen=True)
class BridgeModel:
  """Pure functions over the parameter dict; build with `BridgeModel.create`."""

  vision: CLIPVisionTransformer
  llm: Gemma
  bridge: nn.Module
  heads: RetrievalHeads
  ret_id: int
  loss_weights: dict
  concat_prob: float
  remat: str = "none"  # REMAT
  matmul_precision: str = ""  # "" = automatic (models/precision.py), else a jax precision name
  visual_token_scale: str = "sqrt_d"  # VISUAL_TOKEN_SCALES

  @classmethod
  def create(cls, config, vision_config: CLIPVisionConfig, llm_config: GemmaConfig, *,
             compute_dtype=jnp.float32, frozen_param_dtype=jnp.float32) -> "BridgeModel":
    kw = dict(dtype=compute_dtype, param_dtype=frozen_param_dtype)
    remat = config.get("remat", "none")
    if remat not in REMAT:
      raise ValueError(f"config.remat={remat!r}: use one of {', '.join(REMAT)} (--config.remat=llm)")
    scale = config.get("visual_token_scale", "sqrt_d")
    if scale not in VISUAL_TOKEN_SCALES:
      raise ValueError(f"config.visual_token_scale={scale!r}: use one of {', '.join(VISUAL_TOKEN_SCALES)}")
    bridge = build_bridge(config.bridge, vision_width=vision_config.hidden_size,
                          vision_layers=vision_config.num_layers, grid_size=vision_config.grid_size,
                          llm_width=llm_config.hidden_size)
    heads = RetrievalHeads(llm_config.hidden_size, config.ret.embed_dim, config.ret.logit_scale_init)
    weights = losses.resolve_weights(config.loss)
    llm_class = Llama if isinstance(llm_config, LlamaConfig) else Gemma
    return cls(CLIPVisionTransformer(vision_config, **kw), llm_class(llm_config, remat=remat != "none", **kw), bridge,
               heads, ret_id=llm_config.vocab_size, loss_weights=weights, concat_prob=config.concat_prob,
               remat=remat, matmul_precision=config.get("matmul_precision", ""), visual_token_scale=scale)

  # ------------------------------------------------------------------ parameters

  def init_trainable(self, rng, frozen) -> dict:
    """Fresh {bridge, ret}; the [RET] row starts at the mean norm of the frozen rows (as FROMAGe keeps it)."""
    features = self._abstract_vision_features()
    bridge_rng, ret_rng = jax.random.split(rng)
    bridge = self.bridge.init(bridge_rng, features)["params"]
    feature = jax.eval_shape(lambda: self.bridge.apply({"params": bridge}, features)).image_feature
    ret = self.heads.init(ret_rng, jnp.zeros((1, self.heads.llm_width)), jnp.zeros(feature.shape, feature.dtype))
    trainable = {"bridge": bridge, "ret": ret["params"]}
    return rescale_ret_row(trainable, frozen_row_norm(frozen))

  def _abstract_vision_features(self) -> VisionFeatures:
    """Features of the tower's shapes (zeros, γ = 1, β = 0): the bridge's init needs shapes only."""
    c = self.vision.config
    out = jax.eval_shape(lambda: self.vision.init_with_output(
        jax.random.key(0), jnp.zeros((1, c.num_channels, c.image_size, c.image_size)))[0])
    zeros = tuple(jnp.zeros(h.shape, jnp.float32) for h in out.hidden_states)
    width = zeros[-1].shape[-1]
    return VisionFeatures(zeros, jnp.ones((width,)), jnp.zeros((width,)), c.layer_norm_eps)

  # ------------------------------------------------------------------ the pieces

  @_with_precision
  def encode_images(self, params, images) -> BridgeOutput:
    """(B, C, H, W) pixels -> the bridge's visual tokens (B, K, D), in the LLM's input space (scaled
    per `visual_token_scale`), and retrieval feature."""
    out = self.vision.apply({"params": params["vision"]}, images)
    features = VisionFeatures.from_tower(out.hidden_states, params["vision"]["post_norm"],
                                         self.vision.config.layer_norm_eps)
    bridge = lambda p, features: self.bridge.apply({"params": p}, features)
    if self.remat == "all":
      bridge = jax.checkpoint(bridge)
    out = bridge(params["bridge"], features)
    if self.visual_token_scale == "sqrt_d":  # see VISUAL_TOKEN_SCALES; the LLM's own normaliser in its dtype, as its embed
      out = out._replace(tokens=out.tokens * jnp.asarray(self.llm.embed_scale, self.llm.dtype))
    return out

  @_with_precision
  def image_embedding(self, params, bridge_out: BridgeOutput):  # (B, E), not normalised
    return self.heads.apply({"params": params["ret"]}, bridge_out.image_feature, method=RetrievalHeads.image_embedding)

  def embed_text(self, params, ids):  # (B, T) -> (B, T, D), [RET] from the trainable row
    ret_row = params["ret"]["ret_embedding"]
    return self.llm.apply({"params": params["llm"]}, ids, ret_row, method="embed")

  @_with_precision
  def llm_hidden(self, params, inputs_embeds, mask, positions=None, segment_ids=None):
    """(B, S, D) embeddings, (B, S) mask -> final-norm hidden states (B, S, D).

    `positions` default to the running count of real tokens, so masked holes inside a sequence
    (the concat trick) are invisible: the result equals the compacted sequence. `segment_ids`
    (B, S) keep packed sequences apart (see `pair_layout`).
    """
    if positions is None:
      positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    hidden, _, _ = self.llm.apply({"params": params["llm"]}, inputs_embeds, positions, mask, None, segment_ids,
                                  method="decode")
    return hidden

  @_with_precision
  def run_llm(self, params, inputs_embeds, mask, positions=None, segment_ids=None):
    """(B, S, D) embeddings, (B, S) mask -> logits (B, S, V + 1) float32, final-norm hidden (B, S, D)."""
    hidden = self.llm_hidden(params, inputs_embeds, mask, positions, segment_ids)
    logits = self.llm.apply({"params": params["llm"]}, hidden, params["ret"]["ret_embedding"], method="logits")
    return logits, hidden

  @_with_precision
  def lm_loss(self, params, hidden, labels, target_mask):
    """Token-mean next-token CE of the LM head: hidden (B, S, D) at position t predicts labels[t + 1]
    where target_mask[t + 1]; the [RET] column is its own product (Gemma.split_logits)."""
    def ce(llm, ret_row, hidden):
      logits = self.llm.apply({"params": llm}, hidden[:, :-1], ret_row, method="split_logits")
      return losses.caption_loss(logits, labels[:, 1:], target_mask[:, 1:], shift=False)

    if self.remat == "all":  # recompute the (B, S, V) logits in the backward pass instead of keeping them
      ce = jax.checkpoint(ce)
    return ce(params["llm"], params["ret"]["ret_embedding"], hidden)

  def _text_pass(self, params, ids, mask):
    """(B, T) ids ending in [RET] -> final-norm hidden (B, T, D), text embedding (B, E)."""
    hidden = self.llm_hidden(params, self.embed_text(params, ids), mask)
    last = jnp.sum(mask, axis=1) - 1  # the [RET] position: the last real token
    ret_hidden = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
    emb = self.heads.apply({"params": params["ret"]}, ret_hidden, method=RetrievalHeads.text_embedding)
    return hidden, emb

  @_with_precision
  def text_embedding(self, params, ids, mask):
    """Text pass: (B, T) ids ending in [RET] -> (logits (B, T, V + 1), text embedding (B, E))."""
    hidden, emb = self._text_pass(params, ids, mask)
    logits = self.llm.apply({"params": params["llm"]}, hidden, params["ret"]["ret_embedding"], method="logits")
    return logits, emb

  def caption_inputs(self, params, visual_tokens, ids, mask):
    """[visual tokens] + BOS + caption: embeddings (B, S, D), mask (B, S), labels (B, S), target mask (B, S).

    As in FROMAGe's captioning pass, [RET] is neither a target nor (so that the concat trick joins
    [img_a, cap_a, img_b, cap_b]) an input; BOS is a target, predicted from the last visual token.
    """
    k = visual_tokens.shape[1]
    text = self.embed_text(params, ids)
    mask = mask * (ids != self.ret_id).astype(mask.dtype)
    ones = jnp.ones(ids.shape[:1] + (k,), mask.dtype)
    embeds = jnp.concatenate([visual_tokens.astype(text.dtype), text], axis=1)
    full_mask = jnp.concatenate([ones, mask], axis=1)
    target_mask = jnp.concatenate([jnp.zeros_like(ones), mask], axis=1)  # visual positions are no targets
    labels = jnp.concatenate([jnp.zeros_like(ones, dtype=ids.dtype), ids], axis=1)
    return embeds, full_mask, labels, target_mask

  # ------------------------------------------------------------------ the loss

  @_with_precision
  def loss(self, trainable, frozen, batch, rng):
    """Total loss and its parts for one batch {image (B,C,H,W), text_ids (B,T), text_mask (B,T)}."""
    params = {**frozen, **trainable}
    ids, mask = batch["text_ids"], batch["text_mask"]
    if self.concat_prob > 0 and ids.shape[0] % 2:
      raise ValueError(f"the concat trick pairs examples: batch_size must be even, got {ids.shape[0]} "
                       "(or set concat_prob=0)")
    bridge_out = self.encode_images(params, batch["image"])

    embeds, full_mask, labels, target_mask = self.caption_inputs(params, bridge_out.tokens, ids, mask)
    positions = segment_ids = None
    use_concat = jnp.asarray(False)
    if self.concat_prob > 0:  # one LLM call for both sides of the coin (module docstring)
      use_concat = jax.random.bernoulli(rng, self.concat_prob)
      embeds, full_mask, labels, target_mask = (pair_up(x) for x in (embeds, full_mask, labels, target_mask))
      positions, segment_ids = pair_layout(full_mask, use_concat)
    hidden = self.llm_hidden(params, embeds, full_mask, positions, segment_ids)
    caption = self.lm_loss(params, hidden, labels, target_mask)

    text_hidden, text_emb = self._text_pass(params, ids, mask)
    text = self.lm_loss(params, text_hidden, ids, mask)
    image_emb = self.image_embedding(params, bridge_out)
    logit_scale = params["ret"]["logit_scale"]
    contrastive, parts = losses.contrastive_loss(image_emb, text_emb, logit_scale)
    total = losses.total_loss({"caption": caption, "text": text, "contrastive": contrastive}, self.loss_weights)
    metrics = {"loss": total, "caption_loss": caption, "text_loss": text, "contrastive_loss": contrastive,
               "concat": use_concat.astype(jnp.float32), **parts}
    return total, metrics


def pair_up(x):
  """Concat trick: rows (2i, 2i+1) become one row [x_2i, x_2i+1] (B, S, ...) -> (B/2, 2S, ...)."""
  b, s = x.shape[:2]
  return x.reshape(b // 2, 2, s, *x.shape[2:]).reshape(b // 2, 2 * s, *x.shape[2:])


def pair_layout(mask, joined):
  """Positions and segment ids of paired rows: mask (B/2, 2S), joined a bool scalar -> (B/2, 2S) each.

  joined: one segment, positions count real tokens across both halves, so padding inside the row is
  invisible and the LLM sees exactly FROMAGe's compacted [img_a, cap_a, img_b, cap_b] sequence.
  Not joined: the halves are segments 0 and 1 and positions restart at the second half, so each
  half is exactly its own sequence.
  """
  half = mask.shape[1] // 2
  second = jnp.arange(mask.shape[1]) >= half  # (2S,)
  count = jnp.cumsum(mask, axis=1)
  offset = jnp.where(second & ~joined, count[:, half - 1:half], 0)  # real tokens of the first half
  positions = jnp.maximum(count - offset - 1, 0)
  segment_ids = jnp.broadcast_to(jnp.where(joined, 0, second.astype(jnp.int32)), mask.shape)
  return positions, segment_ids


def frozen_row_norm(frozen) -> jax.Array:
  """Mean L2 norm of the frozen embedding rows, the norm FROMAGe keeps the [RET] row at."""
  table = frozen["llm"]["embedding"]
  return jnp.mean(jnp.linalg.norm(jnp.asarray(table, jnp.float32), axis=-1))


def rescale_ret_row(trainable, target_norm):
  """FROMAGe rescales the trainable row to the frozen rows' mean norm after every step."""
  row = trainable["ret"]["ret_embedding"]
  row = row * (target_norm / jnp.linalg.norm(row, axis=-1, keepdims=True))
  return {**trainable, "ret": {**trainable["ret"], "ret_embedding": row}}
