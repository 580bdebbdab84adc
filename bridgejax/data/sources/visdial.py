"""VisDial v1.0 (official JSON) as visdial records, one per dialog (= per image).

- Dialogs: visdial_1.0_{train,val,test}.json, {"split": "val2018", "data": {"questions": [str],
  "answers": [str], "dialogs": [{"image_id", "caption", "dialog": [{"question": qi, "answer": ai,
  "answer_options": [100 answer indices], "gt_index"}]}]}}. Test dialogs stop at a random round,
  whose answer and gt_index are absent. Questions are stored as in the file (no "?").
- Dense annotations (optional): visdial_1.0_val_dense_annotations.json, [{"image_id",
  "round_id" (1-based), "gt_relevance": [100 floats]}] ("relevance" in the train sample).
- Images: VisualDialog_val2018_XXXXXXXXXXXX.jpg / COCO_train2014_... found by the id in the name.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterator

from bridgejax.data.sources.common import image_source, index_images, split_name
from bridgejax.errors import UserError


def examples(dialogs: str | os.PathLike, images: list[str | os.PathLike], *,
             dense: str | os.PathLike | None = None, split: str | None = None
             ) -> tuple[str, Iterator[dict[str, Any]]]:
  with open(dialogs, encoding="utf-8") as f:
    top = json.load(f)
  data = top.get("data") if isinstance(top, dict) else None
  if not data or "dialogs" not in data:
    raise UserError(f"{dialogs} is not a VisDial v1.0 file: no data.dialogs")
  questions, answers = data["questions"], data["answers"]
  relevance = {}
  if dense is not None:
    with open(dense, encoding="utf-8") as f:
      for d in json.load(f):
        scores = d.get("gt_relevance", d.get("relevance"))
        relevance[d["image_id"]] = (int(d["round_id"]) - 1, [float(s) for s in scores])
  name = split or split_name(top.get("split", "val"))
  index = index_images(*images)

  def gen():
    for d in data["dialogs"]:
      rounds = []
      for r in d["dialog"]:
        rounds.append({
            "question": questions[r["question"]],
            "answer": answers[r["answer"]] if "answer" in r else "",
            "options": [answers[i] for i in r.get("answer_options", [])],
            "gt_index": int(r.get("gt_index", -1))})
      dense_round, scores = relevance.get(d["image_id"], (-1, []))
      yield {"id": str(d["image_id"]), "image_id": int(d["image_id"]),
             "image": image_source(index, d["image_id"], "VisDial"), "caption": d["caption"],
             "rounds": rounds, "dense_round_index": dense_round, "dense_relevance": scores}
  return name, gen()
