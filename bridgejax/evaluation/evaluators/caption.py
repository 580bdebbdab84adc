"""Captioning: greedy (or beam) KV-cache decoding after [visual] + BOS [+ prompt], stopped at EOS or
[RET], FROMAGe's cut rule, pycocoevalcap scores (BLEU-1..4, METEOR, ROUGE-L, CIDEr; SPICE reported
unavailable); an empty caption is scored, not dropped (its share is `empty_fraction`).

Protocols: "standard" is COCO Karpathy test (5k images) with FROMAGe's crop, greedy, 32 tokens;
"thesis" is the thesis's fork, which captioned the 5,000 images of COCO val2017 squashed to 224x224.
"""

from __future__ import annotations

import numpy as np

from bridgejax.data.records import open_split
from bridgejax.evaluation import captioning, markup
from bridgejax.evaluation.evaluators.base import Evaluator, TaskResult

KEYS = {
    "max_new_tokens": 32,
    "num_beams": 1,  # 1 = greedy
    "caption_prompt": "",  # FROMAGe optionally prompts with "A picture of"
    "cut_rule": "fromage",  # captioning.cut_caption: "fromage" (its code) or "first" (the papers' wording)
}
STANDARD = {"split": "test", "image_resize": "clip", "max_examples": 0, "num_beams": 1, "max_new_tokens": 32,
            "cut_rule": "fromage", "caption_prompt": ""}
COCO_VAL2017_SQUASHED = {"split": "val2017", "image_resize": "squash"}  # the thesis's caption/retrieval split


def run(engine, data_dir: str, split: str, cfg, config=None) -> TaskResult:
  # lazy: jax and grain load when a task runs, not when a config is read (configs/base.py)
  from bridgejax.engine import pad_rows, round_up
  from bridgejax.evaluation.evaluators.common import num_examples, task_batches

  records = open_split(data_dir, split)
  n = num_examples(records, cfg.max_examples)
  tok = engine.tokenizer
  prompt_ids = tok.encode(cfg.caption_prompt, add_bos=True)
  ids, mask = pad_rows([prompt_ids] * engine.round_batch(cfg.batch_size), round_up(len(prompt_ids), 8), tok.pad_id)
  predictions, hyps, refs = [], {}, {}
  for batch in task_batches(engine, data_dir, split, n, cfg, "caption"):
    tokens, _ = engine.encode(batch["image"])
    new = engine.generate(tokens, ids, mask, max_new_tokens=cfg.max_new_tokens, num_beams=cfg.num_beams)
    for row in np.flatnonzero(batch["valid"]):
      index = int(batch["index"][row])
      record = records[index]
      raw = engine.decode_new(new[row])
      hyps[index], refs[index] = captioning.cut_caption(raw, cfg.cut_rule), list(record["captions"])
      predictions.append({"index": index, "id": record["id"], "caption": hyps[index], "generated": raw,
                          "references": refs[index]})
  metrics = captioning.score(hyps, refs)
  empty = sum(not h.strip() for h in hyps.values())
  metrics["empty_fraction"] = empty / len(hyps)
  return TaskResult(metrics, predictions, {"images": len(hyps), "empty_captions": empty},
                    notes=dict(captioning.UNAVAILABLE))


def section(preds: dict, images, n: int) -> str:
  rows = []
  for p in preds["predictions"][:n]:
    refs = "".join(f"<li>{markup.escape(r)}</li>" for r in p["references"])
    rows.append(f"<tr><td>{markup.img(images.uri(preds['dataset'], p['index']), p['id'])}</td>"
                f"<td>{markup.text(p['caption'])}<ul class=refs>{refs}</ul>"
                f'<div class="meta">id {markup.escape(str(p["id"]))}; raw: {markup.escape(repr(p["generated"]))}'
                "</div></td></tr>")
  return "<h2>Captioning</h2><table><tr><th>image</th><th>generated / references</th></tr>" + "".join(rows) + "</table>"


EVALUATOR = Evaluator(
    type="caption", kind="image_text", keys=KEYS, run=run, section=section, order=0,
    protocols={"standard": STANDARD, "thesis": {**STANDARD, **COCO_VAL2017_SQUASHED}},
    columns=(("BLEU-1", "B-1"), ("BLEU-2", "B-2"), ("BLEU-3", "B-3"), ("BLEU-4", "B-4"), ("METEOR", "METEOR"),
             ("ROUGE-L", "ROUGE-L"), ("CIDEr", "CIDEr"), ("SPICE", "SPICE"), ("empty_fraction", "empty%")))
