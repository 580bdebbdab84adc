"""Visual Dialog metrics, equal to the official VisDial evaluation code
(batra-mlp-lab/visdial-challenge-starter-pytorch, visdialch/metrics.py: `scores_to_ranks`,
`SparseGTMetrics`, `NDCG`; and evaluate.py's choice of the densely annotated round).

IT2T (answer ranking): each round has candidate answers (100 in VisDial v1.0) with scores, higher
is better (the eval loop passes the negative summed token cross-entropy).
  * ranks: 1-based; ties go to the lower candidate index (a stable descending sort; torch.sort,
    which the official code calls, promises no order for ties).
  * R@k = fraction of rounds whose ground-truth answer has rank <= k; MRR = mean of 1 / rank;
    mean_rank = mean rank. Over every round given (the official code: all 10 rounds of val).
  * NDCG (dense annotations, one round per dialog): k = the number of candidates with nonzero
    relevance; DCG = sum over the top-k predicted candidates of relevance / log2(position + 1);
    divided by the DCG of the top-k candidates sorted by relevance; mean over dialogs.
  * The dense annotation file's `round_id` is 1-based (the official code takes `round_id - 1`).
    FROMAGe's evals/eval_visdial_generation.py indexes `i * 10 + round_id`, the round after the
    annotated one (and the next dialog's first round when round_id == 10); `dense_round` does not
    copy that.

T2I (image retrieval from a dialog): one dialog per image, rank all images; see `t2i_recall`.
Scale: fractions in [0, 1], unrounded; ranks 1-based.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from bridgejax.evaluation import retrieval


def _as_scores(scores) -> np.ndarray:
  scores = np.asarray(scores)
  if scores.ndim < 1 or scores.shape[-1] == 0:
    raise ValueError(f"scores must have a last axis of candidates, got shape {scores.shape}")
  scores = scores.astype(np.float64)
  if np.isnan(scores).any():
    raise ValueError("scores contain NaN")
  return scores


def scores_to_ranks(scores) -> np.ndarray:
  """(..., num_candidates) scores, higher better -> same-shape int array of 1-based ranks (the
  official `scores_to_ranks`; ties: lower candidate index first)."""
  scores = _as_scores(scores)
  order = np.argsort(-scores, axis=-1, kind="stable")
  ranks = np.empty(scores.shape, np.int64)
  np.put_along_axis(ranks, order, np.arange(1, scores.shape[-1] + 1), axis=-1)
  return ranks


def _ranks(scores, ranks) -> np.ndarray:
  if (scores is None) == (ranks is None):
    raise ValueError("pass exactly one of scores= or ranks=")
  if scores is not None:
    return scores_to_ranks(scores)
  ranks = np.asarray(ranks)
  if ranks.ndim < 1 or not np.issubdtype(ranks.dtype, np.integer):
    raise ValueError(f"ranks must be an integer array (..., num_candidates), got {ranks.dtype} {ranks.shape}")
  expected = np.arange(1, ranks.shape[-1] + 1)
  if not (np.sort(ranks, axis=-1) == expected).all():
    raise ValueError("each row of ranks must be a permutation of 1..num_candidates")
  return ranks


def gt_ranks(gt_index, *, scores=None, ranks=None) -> np.ndarray:
  """1-based rank of the ground-truth candidate: gt_index (...) int (0-based candidate index, the
  `gt_index` of visdial_1.0_val.json), with scores or ranks of shape (..., num_candidates)."""
  ranks = _ranks(scores, ranks)
  gt_index = np.asarray(gt_index)
  if gt_index.shape != ranks.shape[:-1] or not np.issubdtype(gt_index.dtype, np.integer):
    raise ValueError(f"gt_index must be an integer array of shape {ranks.shape[:-1]}, "
                     f"got {gt_index.dtype} {gt_index.shape}")
  bad = np.argwhere((gt_index < 0) | (gt_index >= ranks.shape[-1]))
  if bad.size:
    raise ValueError(f"gt_index outside 0..{ranks.shape[-1] - 1} at {bad[:10].tolist()}")
  return np.take_along_axis(ranks, gt_index[..., None], axis=-1)[..., 0]


def rank_metrics(ranks_1based, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
  """{"R@1", "R@5", "R@10", "MRR", "mean_rank"} from 1-based ground-truth ranks (the official
  `SparseGTMetrics.retrieve`)."""
  r = np.asarray(ranks_1based, np.float64).ravel()
  if r.size == 0:
    raise ValueError("no ranks")
  out = {f"R@{k}": float(np.mean(r <= k)) for k in ks}
  out["MRR"] = float(np.mean(1.0 / r))
  out["mean_rank"] = float(np.mean(r))
  return out


def sparse_metrics(gt_index, *, scores=None, ranks=None, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
  """R@k, MRR and mean rank of the ground-truth answers; scores or ranks (..., num_candidates),
  gt_index (...). Every round given counts once."""
  return rank_metrics(gt_ranks(gt_index, scores=scores, ranks=ranks), ks)


def ndcg_per_round(relevance, *, scores=None, ranks=None) -> np.ndarray:
  """The official NDCG of each row: relevance, scores or ranks of shape (rows, num_candidates)."""
  ranks = _ranks(scores, ranks)
  relevance = np.asarray(relevance, np.float64)
  if relevance.shape != ranks.shape or ranks.ndim != 2:
    raise ValueError(f"relevance {relevance.shape} and scores/ranks {ranks.shape} must both be (rows, num_candidates)")
  k = np.sum(relevance != 0, axis=-1)
  empty = np.flatnonzero(k == 0)
  if empty.size:
    raise ValueError(f"rows {empty[:10].tolist()} have no relevant candidate; "
                     "their NDCG is 0/0 (NaN in the official code)")
  predicted = np.argsort(ranks, axis=-1, kind="stable")  # candidates in predicted order
  ideal = -np.sort(-relevance, axis=-1)  # relevance values in ideal order
  discounts = np.log2(np.arange(ranks.shape[-1]) + 2.0)
  top = np.arange(ranks.shape[-1])[None, :] < k[:, None]
  dcg = np.sum(np.where(top, np.take_along_axis(relevance, predicted, axis=-1) / discounts, 0.0), axis=-1)
  best = np.sum(np.where(top, ideal / discounts, 0.0), axis=-1)
  return dcg / best


def ndcg(relevance, *, scores=None, ranks=None) -> float:
  """Mean official NDCG over rows; see `ndcg_per_round`."""
  return float(np.mean(ndcg_per_round(relevance, scores=scores, ranks=ranks)))


def dense_round(per_round, round_id) -> np.ndarray:
  """Picks each dialog's densely annotated round: per_round (dialogs, rounds, ...), round_id
  (dialogs,) 1-based as in visdial_1.0_val_dense_annotations.json -> (dialogs, ...)."""
  per_round = np.asarray(per_round)
  round_id = np.asarray(round_id)
  if per_round.ndim < 2 or round_id.shape != per_round.shape[:1] or not np.issubdtype(round_id.dtype, np.integer):
    raise ValueError(f"need per_round (dialogs, rounds, ...) and integer round_id (dialogs,), got "
                     f"{per_round.shape} and {round_id.dtype} {round_id.shape}")
  bad = np.flatnonzero((round_id < 1) | (round_id > per_round.shape[1]))
  if bad.size:
    raise ValueError(f"round_id must be 1-based in 1..{per_round.shape[1]}; dialogs {bad[:10].tolist()} are not")
  return per_round[np.arange(per_round.shape[0]), round_id - 1]


def score(gt_index, *, scores=None, ranks=None, relevance=None, round_id=None,
          ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
  """The official VisDial IT2T evaluation of a split.

  scores or ranks: (dialogs, rounds, num_candidates); gt_index: (dialogs, rounds) 0-based.
  relevance: (dialogs, num_candidates) dense `gt_relevance`, with round_id (dialogs,) 1-based.
  Returns {"R@1", "R@5", "R@10", "MRR", "mean_rank"} over all rounds, plus "NDCG" over the
  annotated rounds when relevance is given.
  """
  full_ranks = _ranks(scores, ranks)
  if full_ranks.ndim != 3:
    raise ValueError(f"scores/ranks must be (dialogs, rounds, num_candidates), got {full_ranks.shape}")
  out = sparse_metrics(gt_index, ranks=full_ranks, ks=ks)
  if (relevance is None) != (round_id is None):
    raise ValueError("pass relevance= and round_id= together")
  if relevance is not None:
    out["NDCG"] = ndcg(relevance, ranks=dense_round(full_ranks, round_id))
  return out


def t2i_recall(image_emb, dialog_emb, ks: Sequence[int] = (1, 5, 10), chunk_size: int = 1024) -> dict[str, float]:
  """VisDial T2I: dialog i belongs to image i; rank all images for each dialog's embedding.

  Returns {"t2i_R@k": each dialog ranks the images (the protocol), "i2t_R@k": each image ranks
  the dialogs}. FROMAGe's evals/eval_visdial_retrieval.py takes `topk` over the last axis of
  `image_embs @ text_embs.T`, i.e. it ranks dialogs per image: its reported "T2I" numbers are
  the "i2t" ones here.
  """
  image_emb, dialog_emb = np.asarray(image_emb), np.asarray(dialog_emb)
  if image_emb.shape[0] != dialog_emb.shape[0]:
    raise ValueError(f"one dialog per image: got {image_emb.shape[0]} images and {dialog_emb.shape[0]} dialogs")
  return retrieval.recall_at_k(image_emb, dialog_emb, np.arange(dialog_emb.shape[0]), ks, chunk_size)
