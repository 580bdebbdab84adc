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
apart, so each half is then exactly its own sequence. (One program rather than a `lax.cond`
between the two layouts, which would keep both branches' buffers alive.)

`config.remat` trades memory for compute in the backward pass: "llm" recomputes each frozen LLM
layer (keeping only its input), "all" also recomputes the LM head with its cross-entropy and the
bridge. In every mode the float32 logits are held a block of positions at a time over a long
vocabulary (`lm_loss`; losses.LOSS_BLOCK_ROW_BYTES a row), never as a whole (B, S, V) array.

Bridges that act inside the frozen LLM (eP-ALM, Flamingo: bridges/inllm.py) append context rows to
their tokens; `split_visual` takes them off the sequence and `llm_hook` hands them, with the bridge's
parameters, to the decoder's per-layer hook (models/decoder.DecoderHook). Every other bridge: no hook.

Options, all off by default (the parameter tree and the program are then exactly FROMAGe's):
token-type embeddings added to every LLM input through a LayerScale (`config.token_type_embeddings`,
RetrievalHeads), and the optional loss terms of bridgejax/terms/ (CMLI, Target-CMLI, Pic2Word; on
when config.loss.<name> > 0): each declares its heads, built into the `ret` subtree, and `loss`
hands it the step's states (terms.States) and adds its weighted value to the total.

Axis legend: B batch, T text length, K visual tokens (k), S = K + T, D LLM width, E retrieval
width, W vision width, V vocabulary, N patches, d the per-token (CMLI) heads' width.
"""

from __future__ import annotations

import dataclasses
import functools
import flax.linen as nn
import jax
import jax.numpy as jnp

from bridgejax import losses, terms as terms_lib
from bridgejax.config_schema import REMAT, STAGES, VISUAL_TOKEN_SCALES  # declared with their keys
from bridgejax.concat import pair_layout, pair_up, unpair
from bridgejax.heads import RetrievalHeads, frozen_row_norm, rescale_ret_row
from bridgejax.bridges import BridgeOutput, VisionFeatures, build_bridge
from bridgejax.bridges.base import CLS_EQUIVALENTS
from bridgejax.errors import UserError
from bridgejax.models.clip import CLIPVisionConfig, CLIPVisionTransformer
from bridgejax.models.families import decoder_class, vision_class
from bridgejax.models.decoder import CausalLM, DecoderConfig
from bridgejax.models.precision import matmul_precision

TRAINABLE = ("bridge", "ret")
# config.stage (STAGES): "generative" trains the bridge through the LLM (every config); "representation"
# is BLIP-2's stage 1, the Q-Former's text branch with ITC, ITM and ITG (BridgeModel.representation_loss).
# config.visual_token_scale (VISUAL_TOKEN_SCALES): how visual tokens enter the LLM relative to text
# embeddings (which Gemma scales by sqrt(D)).
#   "sqrt_d": multiplied by the LLM's embedding normaliser (`embed_scale`: sqrt(D) for Gemma, 1 for
#     the LLaMA family, which has none) too, as in the thesis's stack: its fork
#     passed [visual tokens, text embeddings] as `inputs_embeds` to transformers 4.x, whose
#     GemmaModel.forward multiplied *all* inputs_embeds by sqrt(hidden_size) (sqrt(2048) = 45.25 in
#     bf16). transformers 5.x moved the scale into the embedding layer.
#   "none": added after the text scaling, as transformers 5.x and FROMAGe (OPT has no such scale) do;
#     visual tokens then start 45x smaller relative to text for Gemma-2B, and under Adam each
#     bridge must grow 45x to get where the thesis's started.


def _with_precision(method):
  """Trace the method under the model's matmul precision (float32 means float32)."""

  @functools.wraps(method)
  def wrapper(self, *args, **kwargs):
    with matmul_precision(self.llm.dtype, self.matmul_precision):
      return method(self, *args, **kwargs)

  return wrapper


@dataclasses.dataclass(frozen=True)
class BridgeModel:
  """Pure functions over the parameter dict; build with `BridgeModel.create`."""

  vision: CLIPVisionTransformer
  llm: CausalLM  # Gemma, Llama or GPTNeo (models/families.py)
  bridge: nn.Module
  heads: RetrievalHeads
  ret_id: int
  loss_weights: dict
  concat_prob: float
  remat: str = "none"  # REMAT
  matmul_precision: str = ""  # "" = automatic (models/precision.py), else a jax precision name
  visual_token_scale: str = "sqrt_d"  # VISUAL_TOKEN_SCALES
  cls_equivalent: str | None = None  # None: the tower has a CLS token; else bridges.base.CLS_EQUIVALENTS
  terms: tuple = ()  # the optional loss terms config.loss switches on (terms.Active, bridgejax/terms/)
  stage: str = "generative"  # STAGES

  @classmethod
  def create(cls, config, vision_config: CLIPVisionConfig, llm_config: DecoderConfig, *,
             compute_dtype=jnp.float32, frozen_param_dtype=jnp.float32, tokenizer=None) -> "BridgeModel":
    """`tokenizer` is needed by a term's prompt only (Pic2Word's; parameter shapes need none)."""
    kw = dict(dtype=compute_dtype, param_dtype=frozen_param_dtype)
    remat = config.remat
    if remat not in REMAT:
      raise UserError(f"config.remat={remat!r}: use one of {', '.join(REMAT)} (--config.remat=llm)")
    scale = config.visual_token_scale
    if scale not in VISUAL_TOKEN_SCALES:
      raise UserError(f"config.visual_token_scale={scale!r}: use one of {', '.join(VISUAL_TOKEN_SCALES)}")
    bridge = build_bridge(config.bridge, vision_width=vision_config.hidden_size,
                          vision_layers=vision_config.num_layers, grid_size=vision_config.grid_size,
                          llm_width=llm_config.hidden_size, llm_layers=llm_config.num_layers)
    stage = config.stage
    if stage not in STAGES:
      raise UserError(f"config.stage={stage!r}: use one of {', '.join(STAGES)}")
    if stage == "representation":  # the text branch reads the LLM's tokenizer; [DEC] is the id after it
      if config.bridge.name != "qformer":
        raise UserError(f"config.stage='representation' is BLIP-2's stage 1 and needs the qformer bridge, not "
                        f"{config.bridge.name!r}: use configs/qformer.py:blip2")
      bridge = bridge.clone(text_vocab=llm_config.vocab_size + 1)
    weights = losses.resolve_weights(config.loss, optional=terms_lib.names())
    dims = terms_lib.Dims(llm_config.hidden_size, vision_config.hidden_size, config.ret.logit_scale_init)
    active = terms_lib.resolve(config, dims, weights)
    if tokenizer is not None:  # what needs the tokenizer (Pic2Word's prompt ids)
      active = tuple(dataclasses.replace(a, options=a.term.prepare(a.options, tokenizer, llm_config.vocab_size))
                     if a.term.prepare else a for a in active)
    heads = RetrievalHeads(llm_config.hidden_size, config.ret.embed_dim, config.ret.logit_scale_init,
                           token_types=config.token_type_embeddings,
                           extra=terms_lib.heads(active, dims))
    llm_class = decoder_class(llm_config)
    # a tower without a CLS token (SigLIP): what bridges read in its place (bridges.base.CLS_EQUIVALENTS)
    cls_equivalent = None if getattr(vision_config, "has_cls_token", True) else config.vision.cls_equivalent
    if cls_equivalent not in (None, *CLS_EQUIVALENTS):
      raise UserError(f"config.vision.cls_equivalent={cls_equivalent!r}: use one of {', '.join(CLS_EQUIVALENTS)}")
    return cls(vision_class(vision_config)(vision_config, **kw), llm_class(llm_config, remat=remat != "none", **kw), bridge,
               heads, ret_id=llm_config.vocab_size, loss_weights=weights, concat_prob=config.concat_prob,
               remat=remat, matmul_precision=config.matmul_precision, visual_token_scale=scale,
               cls_equivalent=cls_equivalent, terms=active, stage=stage)

  # ------------------------------------------------------------------ parameters

  def init_trainable(self, rng, frozen) -> dict:
    """Fresh {bridge, ret}; the [RET] row starts at the mean norm of the frozen rows (as FROMAGe keeps it)."""
    features = self._abstract_vision_features()
    bridge_rng, ret_rng = jax.random.split(rng)
    if self.stage == "representation":  # the Q-Former's query and text branches and heads, no LL_O
      ids = jnp.zeros((1, 2), jnp.int32)
      bridge = self.bridge.init(bridge_rng, features, ids, jnp.ones_like(ids), method="init_representation")["params"]
      feature = jax.eval_shape(lambda: self.bridge.init_with_output(bridge_rng, features)[0]).image_feature
    else:
      bridge = self.bridge.init(bridge_rng, features)["params"]
      feature = jax.eval_shape(lambda: self.bridge.apply({"params": bridge}, features)).image_feature
    patches = jnp.zeros((1, 1, features.hidden_states[-1].shape[-1]))  # what the CMLI image head reads
    ret = self.heads.init(ret_rng, jnp.zeros((1, self.heads.llm_width)), jnp.zeros(feature.shape, feature.dtype),
                          patches)
    trainable = {"bridge": bridge, "ret": ret["params"]}
    row_norm = frozen_row_norm(frozen)
    trainable = rescale_ret_row(trainable, row_norm)
    if self.heads.token_types:  # the type embeddings start where the [RET] row does (RetrievalHeads)
      trainable["ret"].update({name: row_norm * losses.l2_normalize(trainable["ret"][name])
                               for name in ("token_type_image", "token_type_text")})
    return trainable

  def _abstract_vision_features(self) -> VisionFeatures:
    """Features of the tower's shapes (zeros, γ = 1, β = 0): the bridge's init needs shapes only."""
    c = self.vision.config
    out = jax.eval_shape(lambda: self.vision.init_with_output(
        jax.random.key(0), jnp.zeros((1, c.num_channels, c.image_size, c.image_size)))[0])
    zeros = tuple(jnp.zeros(h.shape, jnp.float32) for h in out.hidden_states)
    width = zeros[-1].shape[-1]
    return VisionFeatures.from_tower(zeros, {"scale": jnp.ones((width,)), "bias": jnp.zeros((width,))}, c.layer_norm_eps,
                                     cls_equivalent=self.cls_equivalent, pooled=zeros[-1][:, 0])

  # ------------------------------------------------------------------ the pieces

  @_with_precision
  def encode_images(self, params, images) -> BridgeOutput:
    """(B, C, H, W) pixels -> the bridge's visual tokens (B, K, D), in the LLM's input space (scaled
    per `visual_token_scale`, plus the image type embedding with token_types), and retrieval feature."""
    return self.bridge_output(params, self.vision_features(params, images))

  @_with_precision
  def vision_features(self, params, images) -> VisionFeatures:
    """(B, C, H, W) pixels -> the frozen tower's hidden states, as every bridge reads them."""
    out = self.vision.apply({"params": params["vision"]}, images)
    return VisionFeatures.from_tower(out.hidden_states, params["vision"]["post_norm"],
                                     self.vision.config.layer_norm_eps, cls_equivalent=self.cls_equivalent,
                                     pooled=out.pooler_output)

  @_with_precision
  def bridge_output(self, params, features: VisionFeatures) -> BridgeOutput:
    """The tower's features -> visual tokens (B, K, D) in the LLM's input space, retrieval feature."""
    bridge = lambda p, features: self.bridge.apply({"params": p}, features)
    if self.remat == "all":
      bridge = jax.checkpoint(bridge)
    out = bridge(params["bridge"], features)
    tokens, context = self.split_visual(out.tokens)  # the context rows of an in-LLM bridge stay as they are
    if self.visual_token_scale == "sqrt_d":  # see VISUAL_TOKEN_SCALES; the LLM's own normaliser in its dtype, as its embed
      tokens = tokens * jnp.asarray(self.llm.embed_scale, self.llm.dtype)
    if self.heads.token_types:  # eq. 5: after the image "encoder" (the bridge), before the shared LLM
      image_type = self.type_offsets(params)[0]
      tokens = tokens + image_type.astype(tokens.dtype)
    if context is not None:
      tokens = jnp.concatenate([tokens, context.astype(tokens.dtype)], axis=1)
    return out._replace(tokens=tokens)

  def type_offsets(self, params):
    """What the TTE adds to each LLM input, λ ⊙ t_image and λ ⊙ t_text in the LLM's input space (times
    its embedding normaliser, as the table's rows), each (D,) float32 (RetrievalHeads, eq. 4-5)."""
    offsets = self.heads.apply({"params": params["ret"]}, method=RetrievalHeads.type_offsets)
    return tuple(offset * self.llm.embed_scale for offset in offsets)

  @_with_precision
  def image_embedding(self, params, bridge_out: BridgeOutput):  # (B, E), not normalised
    return self.heads.apply({"params": params["ret"]}, bridge_out.image_feature, method=RetrievalHeads.image_embedding)

  def embed_text(self, params, ids):  # (B, T) -> (B, T, D), [RET] from the trainable row
    ret_row = params["ret"]["ret_embedding"]
    embeds = self.llm.apply({"params": params["llm"]}, ids, ret_row, method="embed")
    offset = self.text_type_offset(params)
    return embeds if offset is None else embeds + offset.astype(embeds.dtype)

  def text_type_offset(self, params):
    """What every text token's embedding gets added, BOS and [RET] included (eq. 4): (D,), or None
    without token types. Generation adds it to each token it embeds (generate's embed_offset)."""
    return self.type_offsets(params)[1] if self.heads.token_types else None

  @_with_precision
  def llm_hidden(self, params, inputs_embeds, mask, positions=None, segment_ids=None, hook=None):
    """(B, S, D) embeddings, (B, S) mask -> final-norm hidden states (B, S, D).

    `positions` default to the running count of real tokens, so masked holes inside a sequence
    (the concat trick) are invisible: the result equals the compacted sequence. `segment_ids`
    (B, S) keep packed sequences apart (see `pair_layout`). `hook`: an in-LLM bridge's (`llm_hook`).
    """
    if positions is None:
      positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    hidden, _, _ = self.llm.apply({"params": params["llm"]}, inputs_embeds, positions, mask, None, segment_ids,
                                  hook, method="decode")
    return hidden

  @_with_precision
  def run_llm(self, params, inputs_embeds, mask, positions=None, segment_ids=None, hook=None):
    """(B, S, D) embeddings, (B, S) mask -> logits (B, S, V + 1) float32, final-norm hidden (B, S, D)."""
    hidden = self.llm_hidden(params, inputs_embeds, mask, positions, segment_ids, hook)
    logits = self.llm.apply({"params": params["llm"]}, hidden, params["ret"]["ret_embedding"], method="logits")
    return logits, hidden

  @_with_precision
  def lm_loss(self, params, hidden, labels, target_mask):
    """Token-mean next-token CE of the LM head: hidden (B, S, D) at position t predicts labels[t + 1]
    where target_mask[t + 1]; the [RET] column is its own product (the decoder's split_logits).
    Over a long vocabulary the head runs a few positions at a time (losses.chunked_caption_loss): the
    float32 (B, S, V) logits are never held whole, in the forward pass or the backward."""
    def ce(llm, ret_row, hidden):
      head = lambda h: self.llm.apply({"params": llm}, h, ret_row, method="split_logits")
      return losses.chunked_caption_loss(head, hidden[:, :-1], labels[:, 1:], target_mask[:, 1:])

    if self.remat == "all":  # recompute the logits in the backward pass instead of keeping them
      ce = jax.checkpoint(ce)
    return ce(params["llm"], params["ret"]["ret_embedding"], hidden)

  @_with_precision
  def ret_embeddings(self, params, hidden, positions):
    """W_t of the final-norm hidden states at the [RET] positions: hidden (B, S, D), positions (B, P)
    -> (B, P, E), not normalised. The one place a [RET] state becomes a text embedding: the text
    pass's last token here, a query's or a generated [RET] in inference."""
    ret_hidden = jnp.take_along_axis(hidden, positions[..., None], axis=1)  # (B, P, D)
    return self.heads.apply({"params": params["ret"]}, ret_hidden, method=RetrievalHeads.text_embedding)

  def _text_pass(self, params, ids, mask, embeds=None):
    """(B, T) ids ending in [RET] (or their embeddings (B, T, D)) -> final-norm hidden (B, T, D), text
    embedding (B, E)."""
    hidden = self.llm_hidden(params, self.embed_text(params, ids) if embeds is None else embeds, mask)
    last = jnp.sum(mask, axis=1) - 1  # the [RET] position: the last real token
    return hidden, self.ret_embeddings(params, hidden, last[:, None])[:, 0]

  @_with_precision
  def text_embedding(self, params, ids, mask):
    """Text pass: (B, T) ids ending in [RET] -> (logits (B, T, V + 1), text embedding (B, E))."""
    hidden, emb = self._text_pass(params, ids, mask)
    logits = self.llm.apply({"params": params["llm"]}, hidden, params["ret"]["ret_embedding"], method="logits")
    return logits, emb

  @_with_precision
  def word_query_embedding(self, params, words, ids, mask, word_positions):
    """W_t embedding (B, E) of the text pass over ids (B, T) ending in [RET], the embedding at
    word_positions (B,) replaced by the pseudo words (B, D) (plus the text type, as a word's)."""
    embeds = self.embed_text(params, ids)
    offset = self.text_type_offset(params)
    words = words if offset is None else words + offset
    at_word = (jnp.arange(ids.shape[1])[None, :] == word_positions[:, None])[..., None]  # (B, T, 1)
    embeds = jnp.where(at_word, words[:, None, :].astype(embeds.dtype), embeds)
    return self._text_pass(params, ids, mask, embeds)[1]

  @_with_precision
  def head(self, params, name: str, x=None):
    """A loss term's head ret/<name> (terms.Head) applied to x in float32, or its scalar when x is None."""
    return self.heads.apply({"params": params["ret"]}, name, x, method=RetrievalHeads.apply_head)

  def has_term(self, name: str) -> bool:
    """Whether the optional loss term `name` (bridgejax/terms/) is on."""
    return any(active.name == name for active in self.terms)

  def caption_inputs(self, params, visual_tokens, ids, mask, *, ret_is_input: bool = False):
    """[visual tokens] + BOS + caption: embeddings (B, S, D), mask (B, S), labels (B, S), target mask (B, S).

    As in FROMAGe's captioning pass, [RET] is neither a target nor (so that the concat trick joins
    [img_a, cap_a, img_b, cap_b]) an input; BOS is a target, predicted from the last visual token.
    `ret_is_input=True` keeps every [RET] as a real input token, as inference needs: a composed query
    or a generated [RET] is read at its own position, attending to itself (FROMAGe feeds generated
    [RET] tokens back in).
    """
    visual_tokens = self.split_visual(visual_tokens)[0]
    k = visual_tokens.shape[1]
    text = self.embed_text(params, ids)
    if not ret_is_input:
      mask = mask * (ids != self.ret_id).astype(mask.dtype)
    ones = jnp.ones(ids.shape[:1] + (k,), mask.dtype)
    embeds = jnp.concatenate([visual_tokens.astype(text.dtype), text], axis=1)
    full_mask = jnp.concatenate([ones, mask], axis=1)
    target_mask = jnp.concatenate([jnp.zeros_like(ones), mask], axis=1)  # visual positions are no targets
    labels = jnp.concatenate([jnp.zeros_like(ones, dtype=ids.dtype), ids], axis=1)
    return embeds, full_mask, labels, target_mask

  def split_visual(self, visual_tokens):
    """(B, K, D) bridge tokens -> (the prefix that enters the LLM's sequence, the context rows an
    in-LLM bridge reads inside the LLM (B, C, D), or None for a prefix bridge) (bridges/inllm.py)."""
    rows = getattr(self.bridge, "num_context_tokens", 0)
    return (visual_tokens, None) if not rows else (visual_tokens[:, :-rows], visual_tokens[:, -rows:])

  def llm_hook(self, params, visual_tokens, length: int):
    """The decoder hook (models/decoder.DecoderHook) of an in-LLM bridge for rows that caption_inputs
    laid out from visual_tokens (B, K, D), `length` columns each; None for a prefix bridge."""
    context = self.split_visual(visual_tokens)[1]
    if context is None:
      return None
    markers = jnp.zeros((visual_tokens.shape[0], length), bool).at[:, 0].set(True)  # each row's image: column 0
    return self.bridge.decoder_hook(params["bridge"], context, markers)

  # ------------------------------------------------------------------ the loss

  @_with_precision
  def loss(self, trainable, frozen, batch, rng):
    """Total loss and its parts for one batch {image (B,C,H,W), text_ids (B,T), text_mask (B,T)}; the
    tower's VisionFeatures in `vision_features` instead of `image` skip it (bridgejax.data.features)."""
    if self.stage == "representation":
      return self.representation_loss(trainable, frozen, batch, rng)
    params = {**frozen, **trainable}
    ids, mask = batch["text_ids"], batch["text_mask"]
    if self.concat_prob > 0 and ids.shape[0] % 2:
      raise UserError(f"the concat trick pairs examples: batch_size must be even, got {ids.shape[0]} "
                       "(or set concat_prob=0)")
    features = batch["vision_features"] if "vision_features" in batch else self.vision_features(params, batch["image"])
    bridge_out = self.bridge_output(params, features)

    embeds, full_mask, labels, target_mask = self.caption_inputs(params, bridge_out.tokens, ids, mask)
    hook = self.llm_hook(params, bridge_out.tokens, embeds.shape[1])
    positions = segment_ids = None
    use_concat = jnp.asarray(False)
    if self.concat_prob > 0:  # one LLM call for both sides of the coin (module docstring)
      use_concat = jax.random.bernoulli(rng, self.concat_prob)
      embeds, full_mask, labels, target_mask = (pair_up(x) for x in (embeds, full_mask, labels, target_mask))
      positions, segment_ids = pair_layout(full_mask, use_concat)
      hook = None if hook is None else hook.map_rows(pair_up)  # a row's two images, in order
    hidden = self.llm_hidden(params, embeds, full_mask, positions, segment_ids, hook)
    caption = self.lm_loss(params, hidden, labels, target_mask)

    text_hidden, text_emb = self._text_pass(params, ids, mask)
    text = self.lm_loss(params, text_hidden, ids, mask)
    image_emb = self.image_embedding(params, bridge_out)
    logit_scale = params["ret"]["logit_scale"]
    contrastive, parts = losses.contrastive_loss(image_emb, text_emb, logit_scale)
    terms = {"caption": caption, "text": text, "contrastive": contrastive}
    metrics = {"caption_loss": caption, "text_loss": text, "contrastive_loss": contrastive,
               "concat": use_concat.astype(jnp.float32), **parts}
    if self.terms:
      unpaired = unpair(hidden) if self.concat_prob > 0 else hidden  # (B, S, D): a row per example again
      prefix = unpaired.shape[1] - ids.shape[1]  # the visual positions come first (caption_inputs)
      states = terms_lib.States(
          features=features, visual_tokens=bridge_out.tokens, visual_hidden=unpaired[:, :prefix],
          caption_hidden=unpaired[:, prefix:], text_hidden=text_hidden, image_emb=image_emb,
          caption_tokens=mask.astype(bool) & (ids != self.ret_id) & (jnp.arange(ids.shape[1]) > 0)[None, :],
          patches=features.tokens(-1, post_norm=True)[:, 1:])
      for active in self.terms:  # each term's value and parts; the value counts toward the total
        values = active.term.loss(self, params, states, active.options)
        terms[active.name] = values[active.name]
        metrics.update({f"{name}_loss": value for name, value in values.items()})
    total = losses.total_loss(terms, self.loss_weights, optional=terms_lib.names())
    metrics = {"loss": total, **metrics}
    return total, metrics

  @_with_precision
  def representation_loss(self, trainable, frozen, batch, rng):
    """BLIP-2's stage 1 (LAVIS's blip2_qformer.py): ITC + ITM + ITG of the Q-Former on the batch's images
    and texts, the LLM unused. The text branch reads the ids without [RET] (BOS first, BLIP-2's [CLS]);
    ITG replaces the first token by [DEC] (the id after the LLM's vocabulary, whose [RET] never
    reaches the text branch) and predicts the rest under the multimodal causal mask. ITM's
    negatives are sampled from the global batch by ITC's similarities (losses.hard_negatives)."""
    params = {**frozen, **trainable}
    ids = jnp.asarray(batch["text_ids"])
    mask = jnp.asarray(batch["text_mask"]) * (ids != self.ret_id)  # (B, T)
    features = batch["vision_features"] if "vision_features" in batch else self.vision_features(params, batch["image"])
    qformer = lambda method, *args: self.bridge.apply({"params": params["bridge"]}, *args, method=method)
    _, tokens = qformer("vision_tokens", features)  # (B, N, D), after LN_v
    query_emb, text_emb = qformer("itc_embeddings", qformer("query_states", tokens), qformer("text_states", ids, mask))
    itc, sim_i2t, sim_t2i = losses.qformer_itc_loss(query_emb, text_emb, qformer("itc_temperature"))
    neg_image, neg_text = losses.hard_negatives(rng, sim_i2t, sim_t2i)
    joint = qformer("joint_states", jnp.concatenate([tokens, tokens[neg_image], tokens]),
                    jnp.concatenate([ids, ids, ids[neg_text]]), jnp.concatenate([mask, mask, mask[neg_text]]), False)
    itm = losses.itm_loss(qformer("itm_logits", joint))
    decoder_ids = ids.at[:, 0].set(self.ret_id)  # [DEC]
    k = self.bridge.num_tokens
    itg = losses.itg_loss(qformer("itg_logits", qformer("joint_states", tokens, decoder_ids, mask, True)[:, k:]),
                          ids, mask)
    total = itc + itm + itg  # LAVIS sums the three
    return total, {"loss": total, "itc_loss": itc, "itm_loss": itm, "itg_loss": itg,
                   "itc_temperature": qformer("itc_temperature")}
