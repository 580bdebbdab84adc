"""Recall@k equals a brute-force numpy computation; chunked equals unchunked; the tie rule."""

import numpy as np
import pytest

from bridgejax.evaluation import retrieval


def _brute_force(image_emb, text_emb, text_to_image, ks, sims=None):
  """Full similarity matrix, a stable descending argsort per query, the COCO multi-caption rule."""
  if sims is None:
    sims = image_emb.astype(np.float64) @ text_emb.astype(np.float64).T  # (images, texts)
  out = {}
  i2t_order = np.argsort(-sims, axis=1, kind="stable")
  t2i_order = np.argsort(-sims.T, axis=1, kind="stable")
  for k in ks:
    i2t_hits = [np.isin(i2t_order[i, :k], np.flatnonzero(text_to_image == i)).any() for i in range(sims.shape[0])]
    t2i_hits = [text_to_image[t] in t2i_order[t, :k] for t in range(sims.shape[1])]
    out[f"i2t_R@{k}"] = float(np.mean(i2t_hits))
    out[f"t2i_R@{k}"] = float(np.mean(t2i_hits))
  return out


def _random_case(num_images, captions_per_image, dim, seed):
  rng = np.random.default_rng(seed)
  image_emb = rng.normal(size=(num_images, dim)).astype(np.float32)
  text_to_image = np.repeat(np.arange(num_images), captions_per_image)
  rng.shuffle(text_to_image)
  # Texts near their image, so the recalls are neither 0 nor 1.
  text_emb = (image_emb[text_to_image] + 1.5 * rng.normal(size=(len(text_to_image), dim))).astype(np.float32)
  image_emb /= np.linalg.norm(image_emb, axis=1, keepdims=True)
  text_emb /= np.linalg.norm(text_emb, axis=1, keepdims=True)
  return image_emb, text_emb, text_to_image


@pytest.mark.parametrize("captions_per_image", [5, 1])
def test_equals_brute_force(captions_per_image):
  image_emb, text_emb, text_to_image = _random_case(60, captions_per_image, 16, seed=captions_per_image)
  ks = (1, 5, 10)
  ours = retrieval.recall_at_k(image_emb, text_emb, text_to_image, ks)
  expected = _brute_force(image_emb, text_emb, text_to_image, ks)
  assert ours == expected
  assert 0 < ours["t2i_R@1"] < ours["t2i_R@10"] < 1 and 0 < ours["i2t_R@1"] < 1


def test_multi_caption_rule_counts_sibling_captions_as_hits():
  # Image 0 has captions 0 and 1, both more similar to it than any other text: i2t R@1 must be 1
  # (the thesis fork's bug ranked caption 1 as a miss for image 0's caption 0 and vice versa).
  image_emb = np.eye(2, dtype=np.float32)
  text_emb = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9]], np.float32)
  result = retrieval.recall_at_k(image_emb, text_emb, np.array([0, 0, 1, 1]), ks=(1,))
  assert result == {"i2t_R@1": 1.0, "t2i_R@1": 1.0}
  ranks = retrieval.ranks(image_emb, text_emb, np.array([0, 0, 1, 1]))
  np.testing.assert_array_equal(ranks["i2t"], [1, 1])


@pytest.mark.parametrize("chunk_size", [1, 7, 16, 64, 100, 299, 300, 301, 5000])
def test_chunked_equals_unchunked(chunk_size):
  image_emb, text_emb, text_to_image = _random_case(60, 5, 16, seed=3)
  full = retrieval.ranks(image_emb, text_emb, text_to_image, chunk_size=10**6)
  chunked = retrieval.ranks(image_emb, text_emb, text_to_image, chunk_size=chunk_size)
  np.testing.assert_array_equal(full["i2t"], chunked["i2t"])
  np.testing.assert_array_equal(full["t2i"], chunked["t2i"])


def test_ties_follow_a_stable_descending_sort():
  # Small-integer embeddings: every similarity is exact in float32, and many are equal.
  rng = np.random.default_rng(0)
  image_emb = rng.integers(-1, 2, size=(40, 3)).astype(np.float32)
  text_to_image = np.repeat(np.arange(40), 3)
  text_emb = rng.integers(-1, 2, size=(120, 3)).astype(np.float32)
  sims = image_emb.astype(np.float64) @ text_emb.astype(np.float64).T
  ks = (1, 2, 3, 5, 10, 50)
  for chunk_size in (1, 13, 1024):
    ours = retrieval.recall_at_k(image_emb, text_emb, text_to_image, ks, chunk_size=chunk_size)
    assert ours == _brute_force(image_emb, text_emb, text_to_image, ks, sims=sims)


def test_t2i_ranks_equal_argsort_positions():
  image_emb, text_emb, text_to_image = _random_case(30, 5, 8, seed=7)
  ranks = retrieval.ranks(image_emb, text_emb, text_to_image, chunk_size=17)
  order = np.argsort(-(text_emb.astype(np.float64) @ image_emb.astype(np.float64).T), axis=1, kind="stable")
  expected = np.array([np.flatnonzero(order[t] == text_to_image[t])[0] + 1 for t in range(len(text_emb))])
  np.testing.assert_array_equal(ranks["t2i"], expected)


def test_recall_from_ranks():
  assert retrieval.recall_from_ranks([1, 2, 6, 11], ks=(1, 5, 10)) == {1: 0.25, 5: 0.5, 10: 0.75}


def test_bad_input():
  image_emb, text_emb, text_to_image = _random_case(5, 2, 4, seed=0)
  with pytest.raises(ValueError, match=r"no text.*\[4\]"):
    retrieval.recall_at_k(image_emb, text_emb[:8], text_to_image[:8] % 4)
  with pytest.raises(ValueError, match="outside"):
    retrieval.recall_at_k(image_emb, text_emb, np.where(text_to_image == 0, 5, text_to_image))
  with pytest.raises(ValueError, match="width"):
    retrieval.recall_at_k(image_emb, text_emb[:, :3], text_to_image)
  with pytest.raises(ValueError, match="shape"):
    retrieval.recall_at_k(image_emb, text_emb, text_to_image[:-1])
  with pytest.raises(ValueError, match="NaN"):
    retrieval.recall_at_k(np.full_like(image_emb, np.nan), text_emb, text_to_image)
