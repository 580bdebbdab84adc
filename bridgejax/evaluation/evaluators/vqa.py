"""VQA: [visual] + BOS + "Q: {question}\\nA:", generate, keep as many words as the longest human
answer (FROMAGe's truncation), official VQA accuracy (overall / yes-no / number / other;
bridgejax.evaluation.vqa). Protocol "standard" (the thesis states nothing else): VQAv2 val.
"""

from __future__ import annotations

from collections import Counter

from bridgejax.data.records import RecordError, open_split
from bridgejax.evaluation import markup, vqa as vqa_metrics
from bridgejax.evaluation.evaluators.base import Evaluator, TaskResult

KEYS = {
    "max_new_tokens": 10,  # answers are cut to the longest human answer's word count anyway
    "processing": "official",  # or "legacy" (the VQA script before its 2021 fix; LAVIS)
}
STANDARD = {"split": "val", "image_resize": "clip", "max_examples": 0, "max_new_tokens": 10, "processing": "official"}


def prompt(question: str) -> str:
  """The text after the visual tokens (inference asks questions the same way)."""
  return f"Q: {question}\nA:"


def run(engine, data_dir: str, split: str, cfg, config=None) -> TaskResult:
  # lazy: jax and grain load when a task runs, not when a config is read (configs/base.py)
  from bridgejax.engine import pad_rows, round_up
  from bridgejax.evaluation.evaluators.common import num_examples, task_batches

  records = open_split(data_dir, split)
  n = num_examples(records, cfg.max_examples)
  tok = engine.tokenizer
  predictions, answers, questions = [], {}, {}
  for batch in task_batches(engine, data_dir, split, n, cfg, "vqa"):
    rows = [records[int(i)] if v else None for i, v in zip(batch["index"], batch["valid"])]
    prompts = [tok.encode(prompt(r["question"]), add_bos=True) if r else [tok.bos_id] for r in rows]
    ids, mask = pad_rows(prompts, round_up(max(map(len, prompts)), 16), tok.pad_id)  # few shapes
    tokens, _ = engine.encode(batch["image"])
    new = engine.generate(tokens, ids, mask, max_new_tokens=cfg.max_new_tokens)
    for row, record in enumerate(rows):
      if record is None:
        continue
      if not record["answers"]:
        raise RecordError(f"VQA record {record['id']!r} of {data_dir}:{split} has no human answers "
                          "(a test split?); evaluate on a split with annotations")
      qid = record["question_id"]
      raw = engine.decode_new(new[row])
      answers[qid] = vqa_metrics.truncate_to_reference_length(raw, record["answers"])
      questions[qid] = {"answers": record["answers"], "answer_type": record["answer_type"]}
      predictions.append({"index": int(batch["index"][row]), "question_id": qid, "image_id": record["image_id"],
                          "question": record["question"], "answer": answers[qid], "generated": raw,
                          "answers": record["answers"], "answer_type": record["answer_type"]})
  metrics = vqa_metrics.score(answers, questions, processing=cfg.processing)
  counts = {"questions": len(answers)}
  counts.update({f"questions_{t}": sum(q["answer_type"] == t for q in questions.values())
                 for t in vqa_metrics.ANSWER_TYPES})
  return TaskResult(metrics, predictions, counts, {"prompt": prompt("{question}")})


def section(preds: dict, images, n: int) -> str:
  rows = []
  for p in preds["predictions"][:n]:
    common = ", ".join(f"{a} ×{c}" for a, c in Counter(p["answers"]).most_common(3))
    rows.append(f"<tr><td>{markup.img(images.uri(preds['dataset'], p['index']), str(p['image_id']), 80)}</td>"
                f"<td>{markup.escape(p['question'])}<div class=meta>{markup.escape(p['answer_type'])}</div></td>"
                f"<td>{markup.text(p['answer'])}</td><td>{markup.escape(common)}</td></tr>")
  return ("<h2>VQA</h2><table><tr><th>image</th><th>question</th><th>answer</th><th>humans</th></tr>"
          + "".join(rows) + "</table>")


EVALUATOR = Evaluator(
    type="vqa", kind="vqa", keys=KEYS, run=run, section=section, order=2,
    protocols={"standard": STANDARD, "thesis": STANDARD},
    columns=(("overall", "VQA"), ("yes/no", "yes/no"), ("number", "number"), ("other", "other")))
