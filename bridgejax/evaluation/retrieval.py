"""Image <-> text retrieval Recall@k with the COCO multi-caption rule, computed chunk by chunk.

Similarity is the dot product `image_emb @ text_emb.T` (pass L2-normalised embeddings for cosine
similarity, as FROMAGe does; the learned logit scale does not change a ranking). It is computed in
float32 with `Precision.HIGHEST`, so TPUs do not round it to bfloat16 passes.

  * text -> image: a text's query is a hit at k when its own image is among the k most similar images.
  * image -> text: an image's query is a hit at k when ANY of its captions is among the k most similar
    texts (the COCO 5-caption rule; FROMAGe's thesis fork counted the sibling captions as misses,
    which is wrong and not reproduced). Its rank is the rank of its best-ranked caption.

Ties are broken as a stable descending sort (`np.argsort(-sims, kind="stable")`) would: among
equal similarities the lower gallery index ranks first. Ranks are 1-based.

Memory: only a (chunk_size, gallery) block of similarities exists at a time; the block is computed by
one jitted function (similarity.py) per (chunk shape, gallery shape), and the last chunk is padded rather than
recompiled. COCO 5k test: 25,000 x 5,000 in chunks of 1,024 queries.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _chunked_ranks(queries: np.ndarray, gallery: np.ndarray, query_keys: np.ndarray,
                   gallery_keys: np.ndarray, chunk_size: int, left_out: np.ndarray | None = None) -> np.ndarray:
  from bridgejax.evaluation import similarity  # lazy: jax, ~1-3 s; configs read the evaluators that import this
  n = queries.shape[0]
  left_out = np.full(n, -1) if left_out is None else np.asarray(left_out)
  chunk = min(chunk_size, n)
  gallery, gallery_keys = similarity.on_device(gallery), similarity.on_device(gallery_keys.astype(np.int32))
  out = np.empty(n, np.int64)
  for start in range(0, n, chunk):
    stop = min(start + chunk, n)
    pad = chunk - (stop - start)  # pad the last chunk to the compiled shape; padded rows are dropped
    q = np.pad(queries[start:stop], ((0, pad), (0, 0)))
    keys = np.pad(query_keys[start:stop].astype(np.int32), (0, pad), constant_values=-1)
    skip = np.pad(left_out[start:stop].astype(np.int32), (0, pad), constant_values=-1)
    out[start:stop] = np.asarray(similarity.best_positive_ranks(q, gallery, keys, gallery_keys, skip))[:stop - start]
  return out


def _as_embeddings(x, name: str) -> np.ndarray:
  x = np.asarray(x, dtype=np.float32)
  if x.ndim != 2:
    raise ValueError(f"{name} must be 2-D (count, dim), got shape {x.shape}")
  if not np.isfinite(x).all():
    raise ValueError(f"{name} contains NaN or infinite values")
  return x


def ranks(image_emb, text_emb, text_to_image, chunk_size: int = 1024) -> dict[str, np.ndarray]:
  """1-based ranks: {"i2t": (num_images,) rank of each image's best-ranked caption among all texts,
  "t2i": (num_texts,) rank of each text's image among all images}.

  image_emb (num_images, D), text_emb (num_texts, D), text_to_image (num_texts,) int: the index in
  image_emb of each text's image. Every image must have at least one text.
  """
  image_emb = _as_embeddings(image_emb, "image_emb")
  text_emb = _as_embeddings(text_emb, "text_emb")
  if image_emb.shape[1] != text_emb.shape[1]:
    raise ValueError(f"image_emb has width {image_emb.shape[1]} but text_emb has width {text_emb.shape[1]}")
  num_images, num_texts = image_emb.shape[0], text_emb.shape[0]
  text_to_image = np.asarray(text_to_image)
  if text_to_image.shape != (num_texts,) or not np.issubdtype(text_to_image.dtype, np.integer):
    raise ValueError(f"text_to_image must be an integer array of shape ({num_texts},), "
                     f"got {text_to_image.dtype} {text_to_image.shape}")
  if num_images == 0 or num_texts == 0:
    raise ValueError(f"need at least one image and one text, got {num_images} and {num_texts}")
  out_of_range = np.flatnonzero((text_to_image < 0) | (text_to_image >= num_images))
  if out_of_range.size:
    raise ValueError(f"text_to_image points outside the {num_images} images at texts {out_of_range[:10].tolist()}")
  captionless = np.setdiff1d(np.arange(num_images), text_to_image)
  if captionless.size:
    raise ValueError(f"{captionless.size} images have no text, so image->text recall is undefined for them: "
                     f"{captionless[:10].tolist()}")
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be positive, got {chunk_size}")

  t2i = _chunked_ranks(text_emb, image_emb, text_to_image, np.arange(num_images), chunk_size)
  i2t = _chunked_ranks(image_emb, text_emb, np.arange(num_images), text_to_image, chunk_size)
  return {"i2t": i2t, "t2i": t2i}


def composed_ranks(query_emb, gallery_emb, targets, references, chunk_size: int = 1024) -> np.ndarray:
  """Composed image retrieval: the 1-based rank of each query's target (targets (Q,) gallery indices)
  among the gallery (G, D), the query's own reference image (references (Q,), -1: none) left out,
  as CIR benchmarks do (Pic2Word's CIRR evaluation). Same similarity and tie rule as `ranks`."""
  query_emb, gallery_emb = _as_embeddings(query_emb, "query_emb"), _as_embeddings(gallery_emb, "gallery_emb")
  targets, references = np.asarray(targets), np.asarray(references)
  g = gallery_emb.shape[0]
  if targets.shape != (query_emb.shape[0],) or references.shape != targets.shape:
    raise ValueError(f"targets and references must have shape ({query_emb.shape[0]},), got {targets.shape} "
                     f"and {references.shape}")
  if np.any((targets < 0) | (targets >= g)) or np.any(targets == references):
    raise ValueError(f"every target must be a gallery index in [0, {g}) other than its query's reference")
  return _chunked_ranks(query_emb, gallery_emb, targets, np.arange(g), chunk_size, references)


def recall_from_ranks(ranks_1based, ks: Sequence[int] = (1, 5, 10)) -> dict[int, float]:
  """{k: fraction of queries whose 1-based rank is <= k}."""
  r = np.asarray(ranks_1based)
  if r.size == 0:
    raise ValueError("no ranks")
  return {int(k): float(np.mean(r <= k)) for k in ks}


def recall_at_k(image_emb, text_emb, text_to_image, ks: Sequence[int] = (1, 5, 10),
                chunk_size: int = 1024) -> dict[str, float]:
  """{"i2t_R@1", "i2t_R@5", ..., "t2i_R@1", ...}: fractions in [0, 1]; see the module docstring.

  For the 1:1 case (one text per image, e.g. VisDial T2I dialogs) pass
  text_to_image = np.arange(num_texts).
  """
  r = ranks(image_emb, text_emb, text_to_image, chunk_size)
  out = {}
  for direction in ("i2t", "t2i"):
    for k, value in recall_from_ranks(r[direction], ks).items():
      out[f"{direction}_R@{k}"] = value
  return out
