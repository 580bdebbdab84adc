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
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array

# Loss weights. FROMAGe's code: loss = cap_loss_scale·CE_caption + ret_loss_scale·CE_text
#   + ret_loss_scale·(L_i2t + L_t2i)/2 with both scales 1.0. The thesis's eq. 5.1,
#   L = 0.5·L_c + 0.5·(L_i2t + L_t2i), has no text-CE term and puts 0.5 on the *sum* of the two
#   InfoNCE terms, i.e. 1.0 on their mean (our `contrastive` part).
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


def _shifted(logits, labels, mask, shift):
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
  return logits, jnp.where(mask, labels, 0), mask


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
  logits, labels, mask = _shifted(logits, labels, mask, shift)
  nll = token_nll(logits, labels)
  return jnp.sum(jnp.where(mask, nll, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


def token_accuracy(logits: Array, labels: Array, mask: Array | None = None, *, ks=(1, 5),
                   shift: bool = True) -> dict[str, Array]:
  """Next-token top-k accuracy in % over the unmasked targets (FROMAGe logs Acc@1/Acc@5), as
  {"acc_top1": ..., "acc_top5": ...}. The rank of the target is the number of strictly larger
  logits, so no top-k sort over the vocabulary is needed."""
  logits, labels, mask = _shifted(logits, labels, mask, shift)
  if isinstance(logits, tuple):
    vocab, extra = jax.lax.stop_gradient(logits)
    v = vocab.shape[-1]
    target = jnp.where(labels < v, jnp.take_along_axis(vocab, jnp.minimum(labels, v - 1)[..., None], axis=-1)[..., 0],
                       jnp.take_along_axis(extra, jnp.clip(labels - v, 0, None)[..., None], axis=-1)[..., 0])[..., None]
    rank = jnp.sum(vocab > target, axis=-1) + jnp.sum(extra > target, axis=-1)
  else:
    logits = jax.lax.stop_gradient(logits)
    target = jnp.take_along_axis(logits, labels[..., None].astype(jnp.int32), axis=-1)
    rank = jnp.sum(logits > target, axis=-1)
  count = jnp.maximum(jnp.sum(mask), 1)
  return {f"acc_top{k}": 100.0 * jnp.sum(mask & (rank < k)) / count for k in ks}


def l2_normalize(x: Array) -> Array:
  """x / ||x|| in float32, as FROMAGe (no epsilon: a zero embedding is a bug upstream)."""
  x = x.astype(jnp.float32)
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


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


def resolve_weights(weights: str | Mapping | None = "fromage") -> dict[str, float]:
  """A preset name from WEIGHTS or a mapping {caption, text, contrastive} (missing keys from 'fromage')."""
  if weights is None:
    weights = "fromage"
  if isinstance(weights, str):
    if weights not in WEIGHTS:
      raise ValueError(f"unknown loss weighting {weights!r}; use one of {sorted(WEIGHTS)} or a mapping "
                       f"with keys {sorted(WEIGHTS['fromage'])}")
    return dict(WEIGHTS[weights])
  weights = weights.to_dict() if hasattr(weights, "to_dict") else dict(weights)
  unknown = sorted(set(weights) - set(WEIGHTS["fromage"]))
  if unknown:
    raise ValueError(f"unknown loss weight key(s) {unknown}; the keys are {sorted(WEIGHTS['fromage'])}")
  return {**WEIGHTS["fromage"], **{k: float(v) for k, v in weights.items()}}


def total_loss(parts: Mapping[str, Array], weights: str | Mapping | None = "fromage") -> Array:
  """weights['caption']·parts['caption'] + weights['text']·parts['text'] + weights['contrastive']·parts['contrastive'].

  parts['caption'] and parts['text'] are `caption_loss` of the two passes, parts['contrastive'] the
  first output of `contrastive_loss` (the mean of the two directions). Defaults: FROMAGe's 1/1/1;
  weights='thesis_eq5_1' gives the thesis's eq. 5.1 (0.5 caption, no text CE, 0.5 on the sum of the
  two InfoNCE directions). A term with weight 0 may be absent from parts.
  """
  w = resolve_weights(weights)
  total = jnp.zeros((), jnp.float32)
  for key, weight in w.items():
    if weight == 0.0:
      continue
    if key not in parts:
      raise ValueError(f"total_loss: weight {key}={weight} but parts has no {key!r} (it has {sorted(parts)})")
    total = total + weight * parts[key]
  return total


def cmli_contrastive_loss(image_tokens: Array, text_tokens: Array, logit_scale: Array, *,
                          image_mask: Array | None = None, text_mask: Array | None = None,
                          max_scale: float | None = None) -> tuple[Array, dict[str, Array]]:
  """Optional: FILIP's cross-modal late interaction (CMLI; docs/reference.md) as a symmetric InfoNCE.

  image_tokens (I, N, D), text_tokens (T, M, D) in a shared space (e.g. W_i on patch tokens, W_t on
  the caption's hidden states), masks (I, N) / (T, M) True on the tokens that take part (FILIP drops
  CLS and padding; each example needs at least one). With cosine similarities c[i, t, n, m]:
    s_i2t[i, t] = mean_n max_m c   (every image patch finds its best text token, eq. 3)
    s_t2i[i, t] = mean_m max_n c   (every text token finds its best image patch, eq. 4)
  loss_i2t ranks the texts of each image by s_i2t, loss_t2i the images of each text by s_t2i, with
  exp(logit_scale) as in `contrastive_loss`; returns ((loss_i2t + loss_t2i) / 2, parts).
  Memory is I·T·N·M similarities: for a global batch of 180, 257 patches and 24 text tokens that is
  2.0e8 floats (0.8 GB in float32) before gradients, which is why FILIP shrinks D to
  256 and why this is off by default.
  """
  v, w = l2_normalize(image_tokens), l2_normalize(text_tokens)
  image_mask = jnp.ones(v.shape[:2], bool) if image_mask is None else image_mask.astype(bool)
  text_mask = jnp.ones(w.shape[:2], bool) if text_mask is None else text_mask.astype(bool)
  sim = jnp.einsum("INd,TMd->ITNM", v, w)
  valid = image_mask[:, None, :, None] & text_mask[None, :, None, :]
  sim = jnp.where(valid, sim, -2.0)  # below any cosine: never the max
  best_text = jnp.max(sim, axis=3)  # (I, T, N)
  best_patch = jnp.max(sim, axis=2)  # (I, T, M)
  s_i2t = jnp.sum(jnp.where(image_mask[:, None, :], best_text, 0.0), axis=2) / jnp.sum(image_mask, 1)[:, None]
  s_t2i = jnp.sum(jnp.where(text_mask[None, :, :], best_patch, 0.0), axis=2) / jnp.sum(text_mask, 1)[None, :]
  scale = jnp.exp(jnp.asarray(logit_scale, jnp.float32))
  if max_scale is not None:
    scale = jnp.minimum(scale, max_scale)
  logits_i2t, logits_t2i = scale * s_i2t, scale * s_t2i.T  # rows: images / texts
  diag = jnp.arange(logits_i2t.shape[0])
  loss_i2t = jnp.mean(jax.nn.logsumexp(logits_i2t, axis=1) - logits_i2t[diag, diag])
  loss_t2i = jnp.mean(jax.nn.logsumexp(logits_t2i, axis=1) - logits_t2i[diag, diag])
  return (loss_i2t + loss_t2i) / 2, dict(loss_i2t=loss_i2t, loss_t2i=loss_t2i, scale=scale)
