"""VQAv2 (official JSON) as vqa records pointing into an image table.

- Questions: v2_OpenEnded_mscoco_{train2014,val2014,test2015,test-dev2015}_questions.json,
  {"data_subtype": "val2014", "questions": [{"image_id", "question", "question_id"}], ...}.
- Annotations (train/val only): v2_mscoco_{train2014,val2014}_annotations.json, {"annotations":
  [{"question_id", "image_id", "question_type", "answer_type", "multiple_choice_answer",
  "answers": [{"answer", "answer_confidence", "answer_id"} x 10]}]}.
- Images: the COCO folder(s) (COCO_val2014_000000XXXXXX.jpg), found by the id in the file name.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from bridgejax.data.sources.common import ImageSource, image_source, index_images, load_json, split_name
from bridgejax.errors import UserError


def read(questions: str | os.PathLike, annotations: str | os.PathLike | None,
         images: list[str | os.PathLike], *, split: str | None = None
         ) -> tuple[str, list[tuple[int, ImageSource]], list[dict[str, Any]]]:
  """(split name, [(image_id, ImageSource)] in first-use order, [question records without image])."""
  qdata = load_json(questions, "questions", "VQAv2 questions")
  anns = {}
  if annotations is not None:
    anns = {a["question_id"]: a for a in load_json(annotations, "annotations", "VQAv2 annotations")["annotations"]}
  name = split or split_name(qdata.get("data_subtype") or Path(questions).stem.split("_")[-2])
  index = index_images(*images)

  records, image_order = [], {}
  for q in qdata["questions"]:
    a = anns.get(q["question_id"])
    if annotations is not None and a is None:
      raise UserError(f"question {q['question_id']} has no annotation in {annotations}: "
                       "questions and annotations files of different splits?")
    answers = [x["answer"] for x in a["answers"]] if a else []
    image_order.setdefault(q["image_id"], None)
    records.append({
        "id": str(q["question_id"]), "question_id": int(q["question_id"]),
        "image_id": str(q["image_id"]), "question": q["question"],
        "question_type": a.get("question_type", "") if a else "",
        "answer_type": a.get("answer_type", "") if a else "",
        "answers": answers,
        "answer_confidences": [x.get("answer_confidence", "") for x in a["answers"]] if a else [],
        "multiple_choice_answer": a.get("multiple_choice_answer", "") if a else ""})
  images_out = [(image_id, image_source(index, image_id, "COCO")) for image_id in image_order]
  return name, images_out, records
