"""VisDial metrics equal brute force and a direct transcription of the official NDCG."""

import math

import numpy as np
import pytest

from bridgejax.evaluation import visdial


def _official_ndcg(scores, relevance):
  """visdialch/metrics.py NDCG.observe + _dcg, transcribed loop by loop (numpy for torch)."""
  batch = []
  for row_scores, row_relevance in zip(scores, relevance):
    ranked_idx = np.argsort(-row_scores, kind="stable")  # scores.sort(descending=True)
    ranks = np.zeros(len(row_scores), int)
    for j in range(len(row_scores)):
      ranks[ranked_idx[j]] = j
    ranks += 1
    k = int(np.sum(row_relevance != 0))
    rankings = np.argsort(ranks, kind="stable")
    best_rankings = np.argsort(-row_relevance, kind="stable")

    def dcg(idx):
      return sum(row_relevance[i] / math.log2(position + 2) for position, i in enumerate(idx))

    batch.append(dcg(rankings[:k]) / dcg(best_rankings[:k]))
  return sum(batch) / len(batch)


def test_scores_to_ranks():
  scores = np.array([[0.1, 0.5, -2.0, 0.5, 3.0]])
  np.testing.assert_array_equal(visdial.scores_to_ranks(scores), [[4, 2, 5, 3, 1]])  # tie: lower index first


def test_sparse_metrics_equal_brute_force():
  rng = np.random.default_rng(0)
  scores = rng.normal(size=(30, 10, 100))
  gt_index = rng.integers(0, 100, size=(30, 10))
  scores[np.arange(30)[:, None], np.arange(10)[None, :], gt_index] += 2.0  # make R@k non-trivial
  brute = []
  for d in range(30):
    for r in range(10):
      brute.append(1 + sum(s > scores[d, r, gt_index[d, r]] for s in scores[d, r]))  # no ties here
  brute = np.array(brute)
  ours = visdial.sparse_metrics(gt_index, scores=scores)
  expected = {"R@1": np.mean(brute <= 1), "R@5": np.mean(brute <= 5), "R@10": np.mean(brute <= 10),
              "MRR": np.mean(1 / brute), "mean_rank": np.mean(brute)}
  assert ours == pytest.approx(expected, rel=1e-12)
  assert 0 < ours["R@1"] < ours["R@10"] < 1
  # Ranks in, same result.
  assert visdial.sparse_metrics(gt_index, ranks=visdial.scores_to_ranks(scores)) == ours


@pytest.mark.parametrize("relevance,scores", [
    ([0, 1, 0.5, 0, 0.25], [5.0, 4.0, 3.0, 2.0, 1.0]),
    ([0, 1, 0.5, 0, 0.25], [1.0, 5.0, 4.0, 0.0, 3.0]),  # ideal order: NDCG 1
    ([1, 0, 0, 0, 0], [0.0, 1.0, 2.0, 3.0, 4.0]),  # the relevant one ranked last, k = 1: NDCG 0
    ([0.5, 0.5, 1, 0, 0.75], [2.0, 2.0, 0.0, 1.0, 2.0]),  # tied scores
    ([1, 1, 1, 1, 1], [3.0, 1.0, 2.0, 5.0, 4.0]),  # everything relevant: NDCG 1 whatever the order
])
def test_ndcg_equals_official_formula(relevance, scores):
  relevance, scores = np.array([relevance], float), np.array([scores])
  assert visdial.ndcg(relevance, scores=scores) == pytest.approx(_official_ndcg(scores, relevance), rel=1e-12)


def test_ndcg_known_values():
  assert visdial.ndcg([[0, 1, 0.5, 0, 0.25]], scores=[[1.0, 5.0, 4.0, 0.0, 3.0]]) == pytest.approx(1.0)
  assert visdial.ndcg([[1, 0, 0, 0, 0]], scores=[[0.0, 1.0, 2.0, 3.0, 4.0]]) == 0.0
  # By hand: k=2; predicted top two = candidate 2 (rel 0.5), then 0 (rel 1); ideal = 1, then 0.5.
  value = visdial.ndcg([[1, 0, 0.5]], scores=[[2.0, 1.0, 3.0]])
  assert value == pytest.approx((0.5 / math.log2(2) + 1 / math.log2(3)) / (1 / math.log2(2) + 0.5 / math.log2(3)))


def test_ndcg_random_batch_equals_official():
  rng = np.random.default_rng(1)
  relevance = rng.choice([0, 0, 0, 0.25, 0.5, 0.75, 1.0], size=(50, 100))
  relevance[:, 0] = 1.0  # at least one relevant candidate per row
  scores = rng.normal(size=(50, 100))
  assert visdial.ndcg(relevance, scores=scores) == pytest.approx(_official_ndcg(scores, relevance), rel=1e-12)


def test_full_evaluation_picks_the_1_based_dense_round():
  rng = np.random.default_rng(2)
  scores = rng.normal(size=(4, 10, 100))
  gt_index = rng.integers(0, 100, size=(4, 10))
  relevance = rng.choice([0, 0.5, 1.0], size=(4, 100))
  relevance[:, 3] = 1.0
  round_id = np.array([1, 10, 5, 7])
  result = visdial.score(gt_index, scores=scores, relevance=relevance, round_id=round_id)
  annotated = scores[np.arange(4), round_id - 1]
  assert result["NDCG"] == pytest.approx(_official_ndcg(annotated, relevance), rel=1e-12)
  assert set(result) == {"R@1", "R@5", "R@10", "MRR", "mean_rank", "NDCG"}
  with pytest.raises(ValueError, match="1-based"):
    visdial.dense_round(scores, np.array([0, 1, 2, 3]))


def test_bad_input():
  with pytest.raises(ValueError, match="exactly one"):
    visdial.sparse_metrics([0], scores=[[1.0, 2.0]], ranks=[[2, 1]])
  with pytest.raises(ValueError, match="permutation"):
    visdial.sparse_metrics([0], ranks=[[1, 1]])
  with pytest.raises(ValueError, match="gt_index outside"):
    visdial.sparse_metrics([2], scores=[[1.0, 2.0]])
  with pytest.raises(ValueError, match="no relevant"):
    visdial.ndcg([[0.0, 0.0]], scores=[[1.0, 2.0]])
  with pytest.raises(ValueError, match="NaN"):
    visdial.scores_to_ranks([[np.nan, 1.0]])


def test_t2i_recall_one_dialog_per_image():
  rng = np.random.default_rng(3)
  images = rng.normal(size=(40, 8)).astype(np.float32)
  dialogs = (images + rng.normal(size=(40, 8))).astype(np.float32)
  result = visdial.t2i_recall(images, dialogs, ks=(1, 5))
  sims = images.astype(np.float64) @ dialogs.astype(np.float64).T
  t2i_rank = 1 + np.sum(sims.T > np.diag(sims)[:, None], axis=1)
  i2t_rank = 1 + np.sum(sims > np.diag(sims)[:, None], axis=1)
  assert result == {"i2t_R@1": np.mean(i2t_rank <= 1), "i2t_R@5": np.mean(i2t_rank <= 5),
                    "t2i_R@1": np.mean(t2i_rank <= 1), "t2i_R@5": np.mean(t2i_rank <= 5)}
