"""Evaluation metrics: pure functions the eval loop calls on collected outputs.

  captioning  BLEU-1..4, METEOR, ROUGE-L, CIDEr as the COCO caption evaluation (pycocoevalcap)
              computes them; SPICE reported as unavailable; FROMAGe's caption cut rule.
  vqa         the official VQA accuracy (GT-Vision-Lab/VQA vqaEval.py), FROMAGe's answer truncation.
  retrieval   image<->text Recall@k with the COCO multi-caption rule, chunked.
  visdial     VisDial R@k, MRR, mean rank and NDCG (visdial-challenge-starter-pytorch's metrics).

Scale: every rate (BLEU, METEOR, ROUGE-L, CIDEr, VQA accuracy, R@k, MRR, NDCG) is a fraction on the
0-1 scale, unrounded; ranks are 1-based. A report writer multiplies by 100 for display. The task
runners (tasks.py) store R@k x100 in the eval JSONs and logs, so recalls read in percent everywhere.

Submodules are imported on first use (`bridgejax.evaluation.vqa` does not pull in jax or Java).
"""

from __future__ import annotations

import importlib
from collections.abc import Collection, Hashable

_SUBMODULES = ("captioning", "retrieval", "visdial", "vqa")


def check_same_ids(predictions: Collection[Hashable], references: Collection[Hashable],
                   what: tuple[str, str] = ("predictions", "references"), show: int = 10) -> None:
  """Raises ValueError naming the ids that are in one collection of ids but not the other."""
  preds, refs = set(predictions), set(references)
  if preds == refs:
    return
  lines = []
  for name, missing in ((what[0], refs - preds), (what[1], preds - refs)):
    if missing:
      shown = sorted(missing, key=repr)[:show]
      more = f" and {len(missing) - show} more" if len(missing) > show else ""
      lines.append(f"{len(missing)} ids missing from {name}: {shown}{more}")
  raise ValueError(f"{what[0]} and {what[1]} have different ids; " + "; ".join(lines))


def __getattr__(name):
  if name in _SUBMODULES:
    return importlib.import_module(f"{__name__}.{name}")
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["check_same_ids", *_SUBMODULES]
