"""Image <-> text retrieval: W_i image embeddings, W_t caption embeddings (BOS + caption + [RET]),
L2-normalised; R@1/5/10 both ways with the COCO multi-caption rule (bridgejax.evaluation.retrieval,
chunked), in percent.

Captions are cut to the run's config.data.max_caption_tokens, as training saw them. Protocols:
"standard" is COCO Karpathy test (5k images, 25k captions); "thesis" COCO val2017 squashed to 224x224.
"""

from __future__ import annotations

import numpy as np

from bridgejax.data.records import open_split
from bridgejax.evaluation import markup, retrieval
from bridgejax.evaluation.evaluators.base import Evaluator, TaskResult
from bridgejax.evaluation.evaluators.caption import COCO_VAL2017_SQUASHED

KEYS = {
    "captions_per_image": 5,  # texts per image (COCO 5k: 25k captions)
    "chunk_size": 1024,  # queries per similarity block
}
STANDARD = {"split": "test", "image_resize": "clip", "max_examples": 0, "captions_per_image": 5}
DEFAULT_CAPTION_TOKENS = 24  # without a run config (config.data.max_caption_tokens)


def run(engine, data_dir: str, split: str, cfg, config=None) -> TaskResult:
  # lazy: jax and grain load when a task runs, not when a config is read (configs/base.py)
  from bridgejax.evaluation.evaluators.common import num_examples, recall_both_ways, task_batches, top_k
  from bridgejax.losses import l2_normalize

  max_caption_tokens = int(config.data.max_caption_tokens) if config is not None else DEFAULT_CAPTION_TOKENS
  records = open_split(data_dir, split)
  n = num_examples(records, cfg.max_examples)
  per_image = cfg.captions_per_image
  image_embs, text_embs, text_to_image, indices, texts = [], [], [], [], []
  for batch in task_batches(engine, data_dir, split, n, cfg, "retrieval", tokenizer=engine.tokenizer,
                            captions_per_image=per_image, max_length=max_caption_tokens):
    _, image_emb = engine.encode(batch["image"])
    b, c, t = batch["caption_ids"].shape
    text_emb = np.asarray(engine.text_embedding(batch["caption_ids"].reshape(b * c, t),
                                                batch["caption_mask"].reshape(b * c, t))).reshape(b, c, -1)
    image_emb = np.asarray(image_emb)
    for row in np.flatnonzero(batch["valid"]):
      index = int(batch["index"][row])
      captions = records[index]["captions"][:per_image]
      for j in np.flatnonzero(batch["caption_valid"][row]):
        text_embs.append(text_emb[row, j])
        text_to_image.append(len(image_embs))
        texts.append(captions[j])
      image_embs.append(image_emb[row])
      indices.append(index)
  images, captions = l2_normalize(np.stack(image_embs)), l2_normalize(np.stack(text_embs))
  text_to_image = np.asarray(text_to_image)
  chunk = cfg.chunk_size
  ranks = retrieval.ranks(images, captions, text_to_image, chunk)
  top_texts, top_images = top_k(images, captions, 5, chunk), top_k(captions, images, 5, chunk)
  ids = [records[i]["id"] for i in indices]
  predictions, caption_rows = [], [[] for _ in indices]
  for t, i in enumerate(text_to_image):
    caption_rows[i].append(t)
  for i, index in enumerate(indices):
    queries = [{"text": texts[t], "t2i_rank": int(ranks["t2i"][t]),
                "top_images": [ids[g] for g in top_images[t]]} for t in caption_rows[i]]
    predictions.append({"index": index, "id": ids[i], "i2t_rank": int(ranks["i2t"][i]),
                        "top_texts": [texts[t] for t in top_texts[i]], "queries": queries})
  return TaskResult(recall_both_ways(ranks), predictions, {"images": len(indices), "texts": len(texts)},
                    {"max_caption_tokens": max_caption_tokens})


def section(preds: dict, images, n: int) -> str:
  index_of = {p["id"]: p["index"] for p in preds["predictions"]}
  rows = []
  for p in preds["predictions"][:n]:
    if not p["queries"]:
      continue
    q = p["queries"][0]
    found = markup.strip([(k + 1, images.uri(preds["dataset"], index_of[g]), g, g == p["id"])
                          for k, g in enumerate(q["top_images"]) if g in index_of], 80)
    texts = "".join(f"<li>{markup.escape(t)}</li>" for t in p["top_texts"][:3])
    rows.append(f"<tr><td>{markup.img(images.uri(preds['dataset'], p['index']), p['id'])}</td>"
                f"<td><b>{markup.escape(q['text'])}</b><div class=meta>rank of this image: {q['t2i_rank']}</div>"
                f'<div class="strip">{found}</div></td>'
                f"<td><div class=meta>best caption at rank {p['i2t_rank']}; top texts:</div><ol>{texts}</ol></td></tr>")
  return ("<h2>Retrieval</h2><table><tr><th>image</th><th>text → images (the true image framed)</th>"
          "<th>image → texts</th></tr>" + "".join(rows) + "</table>")


EVALUATOR = Evaluator(
    type="retrieval", kind="image_text", keys=KEYS, run=run, section=section, order=1,
    protocols={"standard": STANDARD, "thesis": {**STANDARD, **COCO_VAL2017_SQUASHED}},
    columns=(("i2t_R@1", "i2t R@1"), ("i2t_R@5", "i2t R@5"), ("i2t_R@10", "i2t R@10"),
             ("t2i_R@1", "t2i R@1"), ("t2i_R@5", "t2i R@5"), ("t2i_R@10", "t2i R@10")))
