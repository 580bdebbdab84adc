"""Composed image retrieval (Pic2Word's task): each query (reference image, modification text) goes
through Engine.composed_query and is ranked against W_i of the split's image table (the gallery;
with max_examples, the rows the first queries use), its reference left out; R@1/5/10 of the target,
overall and per changed attribute, in percent.

Beside it, Pic2Word's baselines (its Table 1): the reference image's own embedding (image_only), the
modification's W_t embedding alone (text_only) and their normalised sum (image_plus_text). A
composed query is worth its cost where it beats them. Protocol "standard": the toy world's
compose_test benchmark.
"""

from __future__ import annotations

import numpy as np

from bridgejax.data.records import open_split
from bridgejax.evaluation import markup, retrieval
from bridgejax.evaluation.evaluators.base import Evaluator, TaskResult

KEYS = {"chunk_size": 1024}  # queries per similarity block
STANDARD = {"split": "compose_test", "image_resize": "clip", "max_examples": 0}
BASELINES = ("image_only", "text_only", "image_plus_text")


def run(engine, data_dir: str, split: str, cfg, config=None) -> TaskResult:
  # lazy: jax and grain load when a task runs, not when a config is read (configs/base.py)
  from bridgejax import pic2word
  from bridgejax.engine import pad_rows, round_up
  from bridgejax.evaluation.evaluators.common import (num_examples, percent_recalls, task_batches, text_embeddings,
                                                      top_k)
  from bridgejax.losses import l2_normalize

  records = open_split(data_dir, split)
  n = num_examples(records, cfg.max_examples)
  queries = [{k: v for k, v in records[i].items() if k != "image"} for i in range(n)]
  table = records.info["image_table"]
  used = 1 + max(max(q["image_index"], q["target_index"]) for q in queries)
  gallery_size = used if cfg.max_examples else len(open_split(data_dir, table))
  gallery = np.zeros((gallery_size, 0), np.float32)
  for batch in task_batches(engine, data_dir, table, gallery_size, cfg, "compose gallery"):
    _, emb = engine.encode(batch["image"])
    if not gallery.shape[1]:
      gallery = np.zeros((gallery_size, emb.shape[1]), np.float32)
    valid = np.flatnonzero(batch["valid"])
    gallery[batch["index"][valid]] = emb[valid]
  rows = [engine.composed_ids(q["modification"]) for q in queries]
  length = round_up(max(len(ids) for ids, _ in rows), 16)  # one compiled shape
  embs = np.zeros((n, gallery.shape[1]), np.float32)
  for batch in task_batches(engine, data_dir, split, n, cfg, "compose queries"):
    picked = [rows[i] if ok else rows[0] for i, ok in zip(batch["index"], batch["valid"])]
    ids, mask = pad_rows([r for r, _ in picked], length, engine.tokenizer.pad_id)
    emb = engine.composed_query(batch["image"], ids, mask, [w for _, w in picked])
    valid = np.flatnonzero(batch["valid"])
    embs[batch["index"][valid]] = emb[valid]
  embs, gallery = l2_normalize(embs), l2_normalize(gallery)
  targets = np.asarray([q["target_index"] for q in queries])
  references = np.asarray([q["image_index"] for q in queries])
  ranks = retrieval.composed_ranks(embs, gallery, targets, references, cfg.chunk_size)
  metrics = {f"R@{k}": v for k, v in retrieval.recall_from_ranks(ranks).items()}
  for attribute in sorted({q["attribute"] for q in queries}):
    mine = [i for i, q in enumerate(queries) if q["attribute"] == attribute]
    metrics[f"{attribute}_R@1"] = retrieval.recall_from_ranks(ranks[mine], (1,))[1]
  image_only = gallery[references]
  text_only = l2_normalize(text_embeddings(engine, [q["modification"] for q in queries], cfg.batch_size))
  for name, baseline in zip(BASELINES, (image_only, text_only, l2_normalize(image_only + text_only))):
    baseline_ranks = retrieval.composed_ranks(baseline, gallery, targets, references, cfg.chunk_size)
    metrics.update({f"{name}_R@{k}": v for k, v in retrieval.recall_from_ranks(baseline_ranks).items()})
  top = top_k(embs, gallery, 6, cfg.chunk_size)  # 5 after the reference is left out
  predictions = [{"index": i, "id": q["id"], "modification": q["modification"], "attribute": q["attribute"],
                  "reference_index": int(references[i]), "target_index": int(targets[i]), "rank": int(ranks[i]),
                  "top_gallery": [int(g) for g in top[i] if g != references[i]][:5]} for i, q in enumerate(queries)]
  template = pic2word.QUERY_TEMPLATE if engine.model.has_term("pic2word") else "[visual tokens] {}"
  return TaskResult(percent_recalls(metrics), predictions, {"queries": n, "gallery": gallery_size},
                    {"gallery_split": table, "query_template": template + " [RET]"})


def section(preds: dict, images, n: int) -> str:
  """Each query's reference, its modification, and the gallery's top 5 (the target framed)."""
  gallery = {**preds["dataset"], "split": preds["settings"]["gallery_split"]}
  rows = []
  for p in preds["predictions"][:n]:
    found = markup.strip([(k + 1, images.uri(gallery, g), str(g), g == p["target_index"])
                          for k, g in enumerate(p["top_gallery"])], 64)
    rows.append(f"<tr><td>{markup.img(images.uri(gallery, p['reference_index']), p['id'], 80)}</td>"
                f"<td>{markup.escape(p['modification'])}<div class=meta>{markup.escape(p['attribute'])}; "
                f"target at rank {p['rank']}</div></td><td><div class=\"strip\">{found}</div></td></tr>")
  return ("<h2>Composed retrieval</h2><table><tr><th>reference</th><th>modification</th>"
          "<th>top 5 (the target framed)</th></tr>" + "".join(rows) + "</table>")


EVALUATOR = Evaluator(
    type="compose", kind="compose", keys=KEYS, run=run, section=section, order=4,
    protocols={"standard": STANDARD, "thesis": STANDARD},
    columns=(("R@1", "CIR R@1"), ("R@5", "CIR R@5"), ("R@10", "CIR R@10"), ("image_only_R@1", "img-only R@1"),
             ("text_only_R@1", "text-only R@1")))
