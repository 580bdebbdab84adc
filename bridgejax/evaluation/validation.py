"""The training loop's periodic check: validation loss parts and R@1/R@5 both ways on the first
config.data.val_examples records of config.data.val_split (bridgejax.main hands it to the training loop
as its callback: train/ does not import evaluation).

One jitted function per live model and mesh (see _VALIDATORS),
one compiled shape (the last batch padded); batches are split over the mesh's 'data' axis.
"""

from __future__ import annotations

import weakref

import jax
import jax.numpy as jnp
import numpy as np

from bridgejax import losses, mesh as mesh_lib
from bridgejax.data.records import open_split
from bridgejax.engine import place_on_mesh, round_up, shard_rows
from bridgejax.evaluation import retrieval
from bridgejax.evaluation.evaluators.common import eval_batches, recall_both_ways
from bridgejax.losses import l2_normalize

VALIDATION_CAPTIONS_PER_IMAGE = 5  # the COCO rule's captions per image
# (id(model), mesh) -> its jitted function. An entry leaves when its model is collected: the function
# holds the model only weakly (it traces while the caller holds it), so the cache neither grows past
# the live models nor hands a new model, born at a dead one's id, the dead one's function.
_VALIDATORS: dict[tuple[int, object], object] = {}


def _validator(model, mesh):
  key = (id(model), mesh)
  if key not in _VALIDATORS:
    _VALIDATORS[key] = _validation_fn(weakref.ref(model), mesh)
    weakref.finalize(model, _VALIDATORS.pop, key, None)
  return _VALIDATORS[key]


def _validation_fn(model_ref, mesh):
  """Caption/text CE sums and counts, and the embeddings, replicated so that every process reads them whole."""

  def fn(params, image, ids, mask, row_valid, caption_ids, caption_mask):
    model = model_ref()
    out = model.encode_images(params, image)
    image_emb = model.image_embedding(params, out)
    embeds, full_mask, labels, target = model.caption_inputs(params, out.tokens, ids, mask)
    logits, _ = model.run_llm(params, embeds, full_mask, hook=model.llm_hook(params, out.tokens, embeds.shape[1]))
    cap = _ce_sum(logits, labels, target * row_valid[:, None])  # padded rows count nothing
    text_logits, _ = model.text_embedding(params, ids, mask)
    text = _ce_sum(text_logits, ids, mask * row_valid[:, None])
    b, c, t = caption_ids.shape
    _, text_emb = model.text_embedding(params, caption_ids.reshape(b * c, t), caption_mask.reshape(b * c, t))
    return cap, text, image_emb, text_emb.reshape(b, c, -1)

  return jax.jit(fn, out_shardings=mesh_lib.replicated(mesh))


def _ce_sum(logits, labels, mask):
  logits, labels, mask = logits[:, :-1], labels[:, 1:], mask[:, 1:] > 0
  nll = losses.token_nll(logits, jnp.where(mask, labels, 0))
  return jnp.stack([jnp.sum(jnp.where(mask, nll, 0.0)), jnp.sum(mask).astype(jnp.float32)])


def quick_validation(setup, params, *, max_examples: int | None = None,
                     batch_size: int | None = None) -> dict[str, float]:
  """Validation loss parts and R@1 both ways on the first config.data.val_examples records of
  config.data.val_split: a flat dict of floats for the training loop's metric writer.

  caption_loss / text_loss: token-mean CE of the first caption (the training passes, no concat
  trick); contrastive_loss: InfoNCE in consecutive groups of the training batch size (as training
  sees it; the last group smaller); i2t_R@1 / t2i_R@1 / .._R@5: recall over all N images with up
  to 5 captions each (the COCO rule). One compiled shape; the last batch is padded. Batches are
  split over the mesh's 'data' axis (the batch size rounded up to a multiple of it).
  """
  config, model = setup.config, setup.model
  data_dir, split = config.data.dir, config.data.val_split
  mesh = setup.mesh
  batch_size = round_up(batch_size or int(config.data.val_batch_size), mesh.shape["data"])
  fn = _validator(model, mesh)
  records = open_split(data_dir, split)
  n = min(len(records), max_examples or int(config.data.val_examples) or len(records))
  full = place_on_mesh({**setup.frozen, **params}, mesh)  # a no-op for the training state
  cap, text = np.zeros(2), np.zeros(2)
  image_embs, caption_embs, caption_image = [], [], []
  for batch in eval_batches(data_dir, split, n, batch_size, model.vision.config.image_size,
                            tokenizer=setup.tokenizer, captions_per_image=VALIDATION_CAPTIONS_PER_IMAGE,
                            max_length=config.data.max_caption_tokens, workers=0,
                            image_resize=config.data.image_resize):
    valid = batch["valid"]
    inputs = (batch["image"], batch["caption_ids"][:, 0], batch["caption_mask"][:, 0], valid.astype(np.int32),
              batch["caption_ids"], batch["caption_mask"])
    out = fn(full, *(shard_rows(x, mesh) for x in inputs))
    c, t, image_emb, text_emb = jax.device_get(out)
    cap, text = cap + c, text + t
    for row in np.flatnonzero(valid):
      image_embs.append(image_emb[row])
      for j in np.flatnonzero(batch["caption_valid"][row]):
        caption_embs.append(text_emb[row, j])
        caption_image.append(len(image_embs) - 1)
  images, captions = np.stack(image_embs), np.stack(caption_embs)
  first = np.asarray([caption_image.index(i) for i in range(len(image_embs))])
  scale = params["ret"]["logit_scale"]
  group = int(config.batch_size)
  contrastive = []
  for start in range(0, len(images), group):
    part = slice(start, start + group)
    value, _ = losses.contrastive_loss(jnp.asarray(images[part]), jnp.asarray(captions[first[part]]), scale)
    contrastive.append((float(value), len(images[part])))
  ranks = retrieval.ranks(l2_normalize(images), l2_normalize(captions), np.asarray(caption_image))
  out = {"caption_loss": float(cap[0] / max(cap[1], 1)), "text_loss": float(text[0] / max(text[1], 1)),
         "contrastive_loss": sum(v * w for v, w in contrastive) / sum(w for _, w in contrastive),
         "examples": float(len(images))}
  out.update(recall_both_ways(ranks, (1, 5)))
  return out
