"""FROMAGe's training losses as pure functions: caption CE, [RET]-text CE, InfoNCE, their weighting.

Axis legend (einsum letters): B batch (global), b per-device batch, T sequence, V vocabulary,
D embedding width, N image tokens, M text tokens.

Everything is computed in float32 whatever the logits' dtype. Nothing here holds state: the
caller (model.py / the train step) produces logits and embeddings, these functions reduce them.

Caption and text CE (`caption_loss`) follow Hugging Face's causal-LM loss, which FROMAGe uses
through `model_output.loss`: logits at position t predict the label at t+1, and the loss is the
mean over every unmasked target token of the batch (sum of token NLLs / number of target tokens,
not a mean of per-example means). Under jit with a batch sharded over devices the mean is over the
*global* batch; FROMAGe's DDP averages per-GPU means instead, which differs only when GPUs hold
different token counts.
Over a long vocabulary (Gemma's 256,000 columns) the LM head and this CE run a few sequence positions
at a time (`chunked_caption_loss`): a float32 (B, T, V) logits array is never held, only a
(B, c, V) block, c positions of at most LOSS_BLOCK_ROW_BYTES a row, recomputed in the backward pass
(logits of at most LOSS_WHOLE_BYTES in all are kept whole).
Which labels FROMAGe counts (main.py/models.py), for building `mask`:
  captioning pass [k visual] + BOS + caption + [RET] + pad: the visual positions are masked and so is
    everything from the first pad *or [RET]* on, so [RET] is not a target there, while BOS is (the
    last visual position predicts it);
  text pass BOS + caption + [RET] + pad: only the padding is masked, so [RET] is a target (this is
    what teaches the LLM to emit it) and BOS, at position 0, is never predicted.

InfoNCE (`contrastive_loss`) follows FROMAGe's main.py: both embeddings L2-normalised,
logits_per_image = exp(logit_scale) · img @ txt^T, CE against the diagonal both ways, and the mean
of the two directions. FROMAGe and the thesis do not clamp the scale (CLIP clamps it at 100:
`max_scale=100.0` does that). Negatives are the whole global batch: called on arrays sharded over
the batch under jit, GSPMD gathers what the B x B logits need and value and gradients are those of
the single-device computation. (FROMAGe's all-gather keeps gradients only for the local rows and
DDP then averages, which scales the contrastive gradient by 1/#GPUs; we compute the true gradient.)
Inside `jax.shard_map` pass `axis_name`: the embeddings are all-gathered and each device computes
the loss rows of its own examples.

Optional token-wise terms (weights `cmli`, `target_cmli`, 0 by default), from the CMLI report
(FILIP's cross-modal late interaction, eq. 1-10): `cmli_contrastive_loss`, InfoNCE over
late-interaction similarities of per-token features, and `target_cmli_loss`, a student's patch and
text-token regression of a teacher's patch features, each text token paired with its best patch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bridgejax.errors import UserError

Array = jax.Array

# Loss weights. FROMAGe's code: loss = cap_loss_scale·CE_caption + ret_loss_scale·CE_text
#   + ret_loss_scale·(L_i2t + L_t2i)/2 with both scales 1.0. The thesis's eq. 5.1,
#   L = 0.5·L_c + 0.5·(L_i2t + L_t2i), has no text-CE term and puts 0.5 on the *sum* of the two
#   InfoNCE terms, i.e. 1.0 on their mean (our `contrastive` part).
# The optional terms (bridgejax/terms/: cmli, target_cmli, pic2word) add their own weight keys, off
# (0) in both presets.
WEIGHTS = {
    "fromage": dict(caption=1.0, text=1.0, contrastive=1.0),
    "thesis_eq5_1": dict(caption=0.5, text=0.0, contrastive=1.0),
}


def token_nll(logits, targets: Array) -> Array:
  """-log softmax(logits)[target] per position: (..., V), (...) int -> (...) float32.

  logits may also be split as (vocab (..., V), extra (..., X)), the LM head's frozen and trainable
  columns (Gemma.split_logits): the softmax runs over all V + X columns without joining them.
  logsumexp minus the gathered target logit: no (..., V) one-hot or log-softmax is materialised.
  Targets must be valid indices (mask ignored positions before calling).
  """
  targets = targets.astype(jnp.int32)
  if not isinstance(logits, tuple):
    logits = logits.astype(jnp.float32)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - target_logit
  vocab, extra = (x.astype(jnp.float32) for x in logits)
  v = vocab.shape[-1]
  in_vocab = jnp.take_along_axis(vocab, jnp.minimum(targets, v - 1)[..., None], axis=-1)[..., 0]
  in_extra = jnp.take_along_axis(extra, jnp.clip(targets - v, 0, extra.shape[-1] - 1)[..., None], axis=-1)[..., 0]
  target_logit = jnp.where(targets < v, in_vocab, in_extra)
  return jnp.logaddexp(jax.nn.logsumexp(vocab, axis=-1), jax.nn.logsumexp(extra, axis=-1)) - target_logit


def caption_loss(logits: Array, labels: Array, mask: Array | None = None, *, shift: bool = True) -> Array:
  """Mean next-token cross-entropy over the unmasked target tokens of the whole batch.

  logits (B, T, V) (or split, see `token_nll`), labels (B, T) int, mask (B, T) bool/0-1: True where labels[t] is a target (the
  caption and its end; False on visual positions, padding, and whatever else the pass masks). With
  mask=None, labels < 0 (Hugging Face's -100) are the ignored ones. shift=True (default) takes the
  unshifted sequence, like HF's `labels=`: logits[:, t] is scored against labels[:, t+1], so mask[:, 0]
  never counts. shift=False takes already aligned logits/labels.

  Returns sum(NLL · mask) / max(sum(mask), 1): 0.0 (not NaN, as HF would give) for a batch with no
  target tokens.
  """
  if mask is None:
    mask = labels >= 0  # Hugging Face's ignore_index=-100 convention
  mask = mask.astype(bool)
  lead = (logits[0] if isinstance(logits, tuple) else logits).shape[:-1]
  if lead != labels.shape or labels.shape != mask.shape:
    raise ValueError(f"logits {lead} + (V,) must be labels.shape + (V,) and mask like labels; got labels "
                     f"{labels.shape}, mask {mask.shape}")
  if shift:  # position t predicts token t+1
    logits = tuple(x[:, :-1] for x in logits) if isinstance(logits, tuple) else logits[:, :-1]
    labels, mask = labels[:, 1:], mask[:, 1:]
  total, count = masked_nll_sum(logits, labels, mask)
  return total / jnp.maximum(count, 1)


def masked_nll_sum(logits, labels: Array, mask: Array) -> tuple[Array, Array]:
  """(sum of the NLL over the positions where mask, their number): aligned logits (..., V) (or split,
  see `token_nll`), labels and bool mask (...). `caption_loss` is the one divided by the other."""
  nll = token_nll(logits, jnp.where(mask, labels, 0))
  return jnp.sum(jnp.where(mask, nll, 0.0)), jnp.sum(mask)


# How many positions `chunked_caption_loss` scores at once: as many as fit LOSS_BLOCK_ROW_BYTES of
# float32 logits per sequence, so a block is (B, c, V + X) with c·(V + X)·4 bytes at most this a row,
# and a device holds its share of the rows, like every other activation. Gemma's 256,000 + 1 columns
# take 1.0 MB a position: c = 4, a block of 0.74 GB at batch 180 (0.37 GB for the concat trick's 90
# rows of 49 positions), and the vocabulary GEMM keeps hundreds of rows. fromage at real size, XLA's
# CPU temp (docs/performance.md): 43.9 GiB with the whole logits; 37.3, 37.7, 38.4 and 39.7 GiB with
# c = 1, 2, 4 and 8.
LOSS_BLOCK_ROW_BYTES = 4 << 20
# Logits of at most this many bytes in all are kept whole: cutting them would only add the
# recomputation and read the head's weights once per block (each block streams all V x D of them).
# On the 2-core CPU, configs/demo_gemma3.py (batch 8 x 40 positions x 262,145 columns, 0.34 GB):
# 21.9 s a step in blocks of 4 positions, 11.9 s whole. At the real sizes above (4.3 GB) it changes
# nothing.
LOSS_WHOLE_BYTES = 512 << 20


def chunked_caption_loss(head, hidden: Array, labels: Array, mask: Array, *, row_bytes: int | None = None,
                         whole_bytes: int | None = None) -> Array:
  """caption_loss(head(hidden), labels, mask, shift=False) without ever holding head(hidden) whole.

  head: hidden (B, c, D) -> logits (B, c, V) or split (vocab, extra) as `token_nll` takes them (the LM
  head: Gemma.split_logits); hidden (B, T, D) already aligned with labels and mask (B, T), as
  shift=False takes them. When a row's float32 logits over all T positions exceed row_bytes (default
  LOSS_BLOCK_ROW_BYTES) the positions are cut into n equal chunks of c (the last padded with masked
  positions, fewer than n), and a `jax.lax.map` over them computes each chunk's logits and its
  `masked_nll_sum` under `jax.checkpoint`: the backward pass recomputes a chunk's logits instead of
  keeping them (one more forward GEMM of the head), so neither pass holds more than one (B, c, V)
  block. Same loss and gradient up to float32 summation order (tests/test_losses.py measures it).
  When everything fits one block, or all the logits fit whole_bytes (default LOSS_WHOLE_BYTES), this
  is `caption_loss` itself (the logits kept for the backward, no recomputation).
  """
  row_bytes = LOSS_BLOCK_ROW_BYTES if row_bytes is None else row_bytes
  whole_bytes = LOSS_WHOLE_BYTES if whole_bytes is None else whole_bytes
  mask = mask.astype(bool)
  batch, length = labels.shape
  if hidden.shape[:2] != labels.shape or labels.shape != mask.shape:
    raise ValueError(f"hidden {hidden.shape} must be labels.shape + (D,) and mask like labels; got labels "
                     f"{labels.shape}, mask {mask.shape}")
  shapes = jax.eval_shape(head, jax.ShapeDtypeStruct((1, 1, *hidden.shape[2:]), hidden.dtype))
  position_bytes = sum(x.size * 4 for x in jax.tree.leaves(shapes))  # scored in float32 (token_nll)
  if length * position_bytes <= row_bytes or batch * length * position_bytes <= whole_bytes or length <= 1:
    return caption_loss(head(hidden), labels, mask, shift=False)
  count = -(-length // max(1, row_bytes // position_bytes))
  chunk = -(-length // count)  # equal chunks, the padding below `count` positions
  pad = count * chunk - length

  def split(x):  # (B, T, ...) -> (count, B, chunk, ...), padded with masked positions
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape(batch, count, chunk, *x.shape[2:]), 1, 0)

  block = jax.checkpoint(lambda args: masked_nll_sum(head(args[0]), args[1], args[2]))
  totals, counts = jax.lax.map(block, (split(hidden), split(labels), split(mask)))
  return jnp.sum(totals) / jnp.maximum(jnp.sum(counts), 1)


def l2_normalize(x):
  """x / ||x|| over the last axis in float32, as FROMAGe normalises both embeddings (the 1e-12 floor,
  torch's F.normalize's, changes nothing but a zero row, which then stays finite).

  One function for both sides: jax arrays (and tracers) in the losses, numpy arrays on the host for
  evaluation's ranking, each computed by its own library, so numpy in means numpy out.
  """
  xp = jnp if isinstance(x, jax.Array) else np
  x = xp.asarray(x, xp.float32)
  return x / xp.maximum(xp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def contrastive_loss(image_emb: Array, text_emb: Array, logit_scale: Array, *, max_scale: float | None = None,
                     axis_name: Any = None) -> tuple[Array, dict[str, Array]]:
  """Symmetric InfoNCE over the global batch: ((InfoNCE_i2t + InfoNCE_t2i) / 2, parts).

  image_emb (B, D) = W_i(image_feature), text_emb (B, D) = W_t(hidden state at [RET]), pair i is
  (image i, text i). logit_scale is the learned *log* scale (init log(1/0.07)); the logits are
  exp(logit_scale) · cos, with exp(logit_scale) capped at max_scale if given (CLIP uses 100;
  FROMAGe and the thesis do not cap).

  parts: loss_i2t (each image picks its text among all texts), loss_t2i, scale (= exp, capped) and
  the in-batch retrieval accuracies of `retrieval_accuracy` (no gradient).

  axis_name: only inside jax.shard_map over the batch axis; image_emb/text_emb are then the local
  (b, D) shards, which are all-gathered; the returned values are the global ones on every device.
  """
  img, txt = l2_normalize(image_emb), l2_normalize(text_emb)
  scale = jnp.exp(jnp.asarray(logit_scale, jnp.float32))
  if max_scale is not None:
    scale = jnp.minimum(scale, max_scale)
  if axis_name is None:
    logits_i2t = scale * jnp.einsum("ID,TD->IT", img, txt)  # (B, B), rows images (FROMAGe's logits_per_image)
    diag = jnp.arange(logits_i2t.shape[0])
    loss_i2t = jnp.mean(jax.nn.logsumexp(logits_i2t, axis=1) - logits_i2t[diag, diag])
    loss_t2i = jnp.mean(jax.nn.logsumexp(logits_i2t, axis=0) - logits_i2t[diag, diag])
    acc = retrieval_accuracy(img, txt)
  else:
    all_img = jax.lax.all_gather(img, axis_name, axis=0, tiled=True)  # (B, D)
    all_txt = jax.lax.all_gather(txt, axis_name, axis=0, tiled=True)
    b, n = img.shape[0], all_img.shape[0]
    local = jnp.arange(b)
    mine = jax.lax.axis_index(axis_name) * b + local  # global indices of the local pairs
    l_i2t = scale * jnp.einsum("bD,TD->bT", img, all_txt)  # local images vs every text
    l_t2i = scale * jnp.einsum("bD,ID->bI", txt, all_img)  # local texts vs every image
    loss_i2t = jax.lax.psum(jnp.sum(jax.nn.logsumexp(l_i2t, axis=1) - l_i2t[local, mine]), axis_name) / n
    loss_t2i = jax.lax.psum(jnp.sum(jax.nn.logsumexp(l_t2i, axis=1) - l_t2i[local, mine]), axis_name) / n
    acc = retrieval_accuracy(all_img, all_txt)
  loss = (loss_i2t + loss_t2i) / 2
  return loss, dict(loss_i2t=loss_i2t, loss_t2i=loss_t2i, scale=scale, **acc)


def retrieval_accuracy(image_emb: Array, text_emb: Array, ks=(1, 5)) -> dict[str, Array]:
  """In-batch retrieval accuracy in %, both ways, pair i = (image i, text i), for logging.

  {"i2t_top1", "i2t_top5", "t2i_top1", "t2i_top5"}: image i ranks text i within its top k, and vice
  versa. The rank is the number of strictly more similar candidates (ties count for the pair, as
  torch.topk would break them arbitrarily). Cosine similarity; no gradient.
  """
  sim = jax.lax.stop_gradient(jnp.einsum("ID,TD->IT", l2_normalize(image_emb), l2_normalize(text_emb)))
  diag = jnp.diagonal(sim)
  rank_i2t = jnp.sum(sim > diag[:, None], axis=1)
  rank_t2i = jnp.sum(sim > diag[None, :], axis=0)
  out = {}
  for k in ks:
    out[f"i2t_top{k}"] = 100.0 * jnp.mean(rank_i2t < k)
    out[f"t2i_top{k}"] = 100.0 * jnp.mean(rank_t2i < k)
  return out


def resolve_weights(weights: str | Mapping | None = "fromage", optional: Sequence[str] = ()) -> dict[str, float]:
  """A preset name from WEIGHTS or a mapping {caption, text, contrastive, *optional} (missing keys
  from 'fromage'; an optional term's weight defaults to 0, off)."""
  if weights is None:
    weights = "fromage"
  known = {**WEIGHTS["fromage"], **{name: 0.0 for name in optional}}
  if isinstance(weights, str):
    if weights not in WEIGHTS:
      raise UserError(f"unknown loss weighting {weights!r}; use one of {sorted(WEIGHTS)} or a mapping "
                       f"with keys {sorted(known)}")
    return {**known, **WEIGHTS[weights]}
  weights = weights.to_dict() if hasattr(weights, "to_dict") else dict(weights)
  unknown = sorted(set(weights) - set(known))
  if unknown:
    raise UserError(f"unknown loss weight key(s) {unknown}; the keys are {sorted(known)}")
  return {**known, **{k: float(v) for k, v in weights.items()}}


def total_loss(parts: Mapping[str, Array], weights: str | Mapping | None = "fromage",
               optional: Sequence[str] = ()) -> Array:
  """weights['caption']·parts['caption'] + weights['text']·parts['text'] + weights['contrastive']·parts['contrastive'].

  parts['caption'] and parts['text'] are `caption_loss` of the two passes, parts['contrastive'] the
  first output of `contrastive_loss` (the mean of the two directions). Defaults: FROMAGe's 1/1/1;
  weights='thesis_eq5_1' gives the thesis's eq. 5.1 (0.5 caption, no text CE, 0.5 on the sum of the
  two InfoNCE directions). A term with weight 0 may be absent from parts; `optional` names the
  optional terms' weight keys (resolve_weights).
  """
  w = resolve_weights(weights, optional)
  total = jnp.zeros((), jnp.float32)
  for key, weight in w.items():
    if weight == 0.0:
      continue
    if key not in parts:
      raise ValueError(f"total_loss: weight {key}={weight} but parts has no {key!r} (it has {sorted(parts)})")
    total = total + weight * parts[key]
  return total


def cmli_scores(image_tokens: Array, text_tokens: Array, image_mask: Array, text_mask: Array, *,
                chunk: int = 0) -> tuple[Array, Array]:
  """FILIP's late-interaction similarities of every image with every text, the CMLI report's eq. 1-4.

  image_tokens (I, N, d), text_tokens (T, M, d) unit vectors, masks (I, N) / (T, M) True on the tokens
  that take part. With c[i, t, n, m] the cosine of patch n of image i and token m of text t:
    s_i2t[i, t] = mean_n max_m c   (every patch finds its best token, eq. 1 and 3)
    s_t2i[i, t] = mean_m max_n c   (every token finds its best patch, eq. 2 and 4)
  Returns (s_i2t, s_t2i), each (I, T). An example with no valid token scores 0.

  chunk > 0 computes `chunk` images at a time against all T texts (the largest divisor of I not
  above it), each block recomputed in the backward pass, so I·T·N·M similarities are never held at
  once: chunk·T·N·M are (`cmli_contrastive_loss` has the arithmetic).
  """
  def block(v, vm):  # (c, N, d) images against every text -> (c, T) twice
    sim = jnp.einsum("cNd,TMd->cTNM", v, text_tokens)
    sim = jnp.where(vm[:, None, :, None] & text_mask[None, :, None, :], sim, -2.0)  # -2: below any cosine
    return (_masked_mean(jnp.max(sim, axis=3), vm[:, None, :]),
            _masked_mean(jnp.max(sim, axis=2), text_mask[None, :, :]))

  images = image_tokens.shape[0]
  if chunk <= 0 or chunk >= images:
    return block(image_tokens, image_mask)
  chunk = max(c for c in range(1, chunk + 1) if images % c == 0)
  split = lambda x: x.reshape(images // chunk, chunk, *x.shape[1:])
  s_i2t, s_t2i = jax.lax.map(jax.checkpoint(lambda args: block(*args)), (split(image_tokens), split(image_mask)))
  return s_i2t.reshape(images, -1), s_t2i.reshape(images, -1)


def _masked_mean(x: Array, mask: Array) -> Array:
  """Mean of x over its last axis where mask (broadcast to x); 0 where nothing is valid."""
  mask = jnp.broadcast_to(mask, x.shape)
  return jnp.sum(jnp.where(mask, x, 0.0), axis=-1) / jnp.maximum(jnp.sum(mask, axis=-1), 1)


def cmli_contrastive_loss(image_tokens: Array, text_tokens: Array, logit_scale: Array, *,
                          image_mask: Array | None = None, text_mask: Array | None = None,
                          max_scale: float | None = None, chunk: int = 0,
                          axis_name: Any = None) -> tuple[Array, dict[str, Array]]:
  """FILIP's cross-modal late interaction (CMLI) as a symmetric InfoNCE, the CMLI report's eq. 1-4.

  image_tokens (I, N, d), text_tokens (T, M, d) in a shared space (model.py: the per-token heads,
  d = 256 as in FILIP), masks (I, N) / (T, M) True on the tokens that take part (FILIP and the report
  leave CLS and padding out). loss_i2t ranks the texts of each image by s_i2t, loss_t2i the images
  of each text by s_t2i (`cmli_scores`), with exp(logit_scale) as in `contrastive_loss`; returns
  ((loss_i2t + loss_t2i) / 2, parts). axis_name: inside jax.shard_map over the batch, as
  `contrastive_loss`: the tokens are all-gathered and each device scores its own rows.

  Memory: all pairs are I·T·N·M similarities. The report counts for a global batch of 512, N = 196
  patches and M = 64 tokens 512·12,544 = 6,422,528 dot products of d = 256 float32 products each,
  6.58 GB: that is one image against the global batch (a chunk of 1), the all-pairs set being 512
  times more. Here (CLIP ViT-L/14: N = 256, M = 24 text positions, padding masked, global batch
  180) all pairs are 180·180·256·24 = 2.0e8 similarities, 796 MB in float32, and the working set
  with `chunk` c is c/180 of that (c = 20: 88 MB); the d-wide products are contracted by the
  einsum, never stored. Compiled value and gradient on CPU: 4.0 GB of temporaries at once,
  0.46 GB with c = 20, 0.12 GB with c = 1.
  """
  v, w = l2_normalize(image_tokens), l2_normalize(text_tokens)
  image_mask = jnp.ones(v.shape[:2], bool) if image_mask is None else image_mask.astype(bool)
  text_mask = jnp.ones(w.shape[:2], bool) if text_mask is None else text_mask.astype(bool)
  scale = jnp.exp(jnp.asarray(logit_scale, jnp.float32))
  if max_scale is not None:
    scale = jnp.minimum(scale, max_scale)
  ce = lambda logits, target: jax.nn.logsumexp(logits, axis=1) - jnp.take_along_axis(logits, target[:, None], 1)[:, 0]
  if axis_name is None:
    s_i2t, s_t2i = cmli_scores(v, w, image_mask, text_mask, chunk=chunk)
    diag = jnp.arange(s_i2t.shape[0])
    loss_i2t = jnp.mean(ce(scale * s_i2t, diag))  # rows: images
    loss_t2i = jnp.mean(ce(scale * s_t2i.T, diag))  # rows: texts
  else:
    gather = lambda x: jax.lax.all_gather(x, axis_name, axis=0, tiled=True)
    b, n = v.shape[0], v.shape[0] * jax.lax.psum(1, axis_name)
    mine = jax.lax.axis_index(axis_name) * b + jnp.arange(b)  # global indices of the local pairs
    s_i2t = cmli_scores(v, gather(w), image_mask, gather(text_mask), chunk=chunk)[0]  # (b, T): local images
    s_t2i = cmli_scores(gather(v), w, gather(image_mask), text_mask, chunk=chunk)[1].T  # (b, I): local texts
    loss_i2t = jax.lax.psum(jnp.sum(ce(scale * s_i2t, mine)), axis_name) / n
    loss_t2i = jax.lax.psum(jnp.sum(ce(scale * s_t2i, mine)), axis_name) / n
  return (loss_i2t + loss_t2i) / 2, dict(loss_i2t=loss_i2t, loss_t2i=loss_t2i, scale=scale)


def matched_patches(query_match: Array, patch_match: Array, patches: Array) -> Array:
  """Target-CMLI's assignment (the CMLI report's eq. 2 on a positive pair only): for each query token,
  the patch of its own example with the highest cosine in the matching space.

  query_match (B, M, d), patch_match (B, N, d) -> patches (B, N, W) gathered at the argmax: (B, M, W).
  The argmax carries no gradient: the matching space is learned (if at all) by another term.
  Memory: B·M·N similarities, the positives only (the report: 256·12,544 of d = 256 float16
  products, 1.64 GB; here 180·24·256 = 1.1e6 similarities).
  """
  sim = jnp.einsum("BMd,BNd->BMN", l2_normalize(query_match), l2_normalize(patch_match))
  best = jax.lax.stop_gradient(jnp.argmax(sim, axis=-1))  # (B, M)
  return jnp.take_along_axis(patches, best[..., None], axis=1)


def target_cmli_loss(student_image: Array, teacher_patches: Array, student_text: Array, text_mask: Array,
                     text_match: Array, patch_match: Array, image_match: Array | None = None
                     ) -> tuple[Array, dict[str, Array]]:
  """Target-CMLI, the CMLI report's eq. 5-10: the student regresses the teacher's patch features.

  teacher_patches (B, N, W) (no CLS), student_image (B, K, W) and student_text (B, M, W) already
  mapped into the teacher's width, text_mask (B, M) True on the text tokens that take part,
  text_match (B, M, d) / patch_match (B, N, d) the matching space of `matched_patches`.
    L_i2t = MSE(student image token k, teacher patch k)               (eq. 7; needs K = N)
      with image_match (B, K, d) given, token k regresses its matched patch instead (K != N)
    L_t2i = MSE(student text token j, teacher patch m_j^t2i)          (eq. 9, m from eq. 2)
    L = (L_i2t + L_t2i) / 2                                           (eq. 10)
  MSE is torch's: the mean over tokens *and* feature dimensions (eq. 7 writes the squared norm
  summed over W, which only scales the term by W). The teacher is a constant (stop_gradient).
  """
  teacher = jax.lax.stop_gradient(teacher_patches.astype(jnp.float32))
  if image_match is None and student_image.shape[1] != teacher.shape[1]:
    raise UserError(f"target_cmli_loss: {student_image.shape[1]} student image tokens against {teacher.shape[1]} "
                     "teacher patches: pass image_match to match them")
  image_targets = teacher if image_match is None else matched_patches(image_match, patch_match, teacher)
  square = lambda student, target: jnp.mean(jnp.square(student.astype(jnp.float32) - target), axis=-1)  # (B, tokens)
  loss_i2t = jnp.mean(square(student_image, image_targets))
  loss_t2i = jnp.mean(_masked_mean(square(student_text, matched_patches(text_match, patch_match, teacher)),
                                   text_mask.astype(bool)))
  return (loss_i2t + loss_t2i) / 2, dict(loss_i2t=loss_i2t, loss_t2i=loss_t2i)


# --- BLIP-2's stage 1 (representation learning), as LAVIS's blip2_qformer.py computes it -------------
# B images and their texts; K queries; E the ITC width (256). Label smoothing 0.1 on ITC and ITG, none
# on ITM, as LAVIS (blip2_qformer.py forward; Qformer.py BertLMHeadModel's CrossEntropyLoss).
QFORMER_LABEL_SMOOTHING = 0.1


def smoothed_ce(logits: Array, labels: Array, smoothing: float, mask: Array | None = None) -> Array:
  """torch's cross_entropy(label_smoothing=smoothing): logits (..., C), int labels (...), the mean
  over `mask` (default: all)."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
  per_item = (1 - smoothing) * nll - smoothing * jnp.mean(logp, axis=-1)
  mask = jnp.ones(labels.shape, bool) if mask is None else mask.astype(bool)
  return jnp.sum(jnp.where(mask, per_item, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


def qformer_itc_loss(query_emb: Array, text_emb: Array, temperature: Array) -> tuple[Array, Array, Array]:
  """ITC: query_emb (B, K, E), text_emb (B, E), both unit norm; an image-text similarity is the best of
  its K queries', over the temperature. -> (loss, sim_i2t (B, B), sim_t2i (B, B))."""
  sim = jnp.einsum("IKE,TE->ITK", query_emb, text_emb)  # (B images, B texts, K)
  sim_i2t = jnp.max(sim, axis=-1) / temperature
  sim_t2i = sim_i2t.T  # LAVIS's sim_t2q is the same products, the text's row first
  targets = jnp.arange(sim.shape[0])
  loss = (smoothed_ce(sim_i2t, targets, QFORMER_LABEL_SMOOTHING)
          + smoothed_ce(sim_t2i, targets, QFORMER_LABEL_SMOOTHING)) / 2
  return loss, sim_i2t, sim_t2i


def hard_negatives(rng, sim_i2t: Array, sim_t2i: Array) -> tuple[Array, Array]:
  """ITM's negatives, sampled as LAVIS samples them (no gradient): for each text an image drawn with
  probability softmax(sim_t2i) over the other images, for each image a text likewise. -> (negative
  image index per text (B,), negative text index per image (B,))."""
  sim_i2t, sim_t2i = jax.lax.stop_gradient(sim_i2t), jax.lax.stop_gradient(sim_t2i)
  off_diagonal = ~jnp.eye(sim_i2t.shape[0], dtype=bool)
  image_rng, text_rng = jax.random.split(rng)
  # LAVIS fills the diagonal with -10000 before its softmax; -inf draws the same (never the positive)
  neg_image = jax.random.categorical(image_rng, jnp.where(off_diagonal, sim_t2i, -jnp.inf), axis=-1)
  neg_text = jax.random.categorical(text_rng, jnp.where(off_diagonal, sim_i2t, -jnp.inf), axis=-1)
  return neg_image, neg_text


def itm_loss(logits: Array) -> Array:
  """ITM: logits (3B, 2) of (image, its text), (negative image, text), (image, negative text):
  CE against labels 1, 0, 0 (LAVIS's order)."""
  b = logits.shape[0] // 3
  labels = jnp.concatenate([jnp.ones((b,), jnp.int32), jnp.zeros((2 * b,), jnp.int32)])
  return smoothed_ce(logits, labels, 0.0)


def itg_loss(logits: Array, ids: Array, mask: Array) -> Array:
  """ITG: logits (B, T, V) of the text positions under the multimodal causal mask; position t predicts
  ids[t + 1] where mask[t + 1] (the first token, [DEC], is never a target)."""
  return smoothed_ce(logits[:, :-1], ids[:, 1:], QFORMER_LABEL_SMOOTHING, mask[:, 1:])
