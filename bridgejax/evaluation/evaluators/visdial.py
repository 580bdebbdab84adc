"""VisDial: the image-and-dialog-to-answer (IT2T) and dialog-to-image (T2I) tasks.

IT2T: [visual] + BOS + "Q: q1?\\nA: a1\\n...\\nQ: qr?\\nA:" and each of the round's candidates
" {answer}" scored by summed next-token CE (FROMAGe's layout; its caption-free history is the
default, with_caption=True puts the caption first), or with scoring="fromage" as FROMAGe's
eval_visdial_generation.py scores (SCORINGS); R@k, MRR, mean rank, NDCG on the densely annotated
round (bridgejax.evaluation.visdial). T2I: BOS + "Q: q1? A: a1. ..." + [RET] (FROMAGe's
eval_visdial_retrieval.py text), ranking the split's images per dialog.

Protocols: "standard" is VisDial v1.0 val; "thesis" follows FROMAGe's protocol (thesis §5.5.3):
eval_visdial_generation.py's scoring on images squashed to 224x224.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from bridgejax.errors import UserError
from bridgejax.data.records import RecordError, open_split
from bridgejax.evaluation import markup, retrieval, visdial as visdial_metrics
from bridgejax.evaluation.evaluators.base import Evaluator, TaskResult

KEYS = {
    "with_caption": False,  # FROMAGe's code leaves the caption out of both IT2T and T2I texts
    # "next_token": each candidate's summed next-token CE after "...A:"; "fromage": FROMAGe's
    # eval_visdial_generation.py (BOS before every answer, logits[t] scored against label[t]).
    "scoring": "next_token",
    "rounds_per_step": 2,  # IT2T rounds scored per step (x 100 candidates each)
    "max_dialog_tokens": 512,  # T2I dialog text cap (longer dialogs lose their last rounds; counted)
    "chunk_size": 1024,
}
STANDARD = {"split": "val", "image_resize": "clip", "max_examples": 0, "with_caption": False, "scoring": "next_token"}


def _question(q: str) -> str:
  return q if q.rstrip().endswith("?") else q + "?"


def it2t_context(record: dict, round_index: int, *, with_caption: bool) -> str:
  """FROMAGe's IT2T text before a round's candidates (its notebook): history lines, then "A:"."""
  lines = [record["caption"]] if with_caption else []
  for r in record["rounds"][:round_index]:
    lines += [f"Q: {_question(r['question'])}", f"A: {r['answer']}"]
  lines.append(f"Q: {_question(record['rounds'][round_index]['question'])}")
  return "\n".join(lines) + "\nA:"


def t2i_text(record: dict, *, with_caption: bool) -> str:
  """FROMAGe's eval_visdial_retrieval.py dialog text ("Q: q? A: a." joined by spaces); [RET] is
  appended by the tokenizer."""
  parts = [record["caption"]] if with_caption else []
  for r in record["rounds"]:
    if r["answer"]:  # a test dialog's last round has no answer
      parts += [f"Q: {_question(r['question'])}", f"A: {r['answer']}."]
  return " ".join(parts)


@dataclasses.dataclass(frozen=True)
class Scoring:
  """How IT2T turns a candidate answer into a score (its negated summed CE)."""
  answer_cue: str  # appended to the context, which ends in "A:"
  candidate_prefix: str  # before each answer's text
  candidate_bos: bool  # a BOS before each answer
  unshifted: bool  # CE of logits[t] against token t itself, not against the next token
  description: str


SCORINGS = {
    "next_token": Scoring("", " ", False, False,
                                 "summed next-token CE of ' {answer}' after the context's 'A:' (log-likelihood)"),
    # FROMAGe's evals/eval_visdial_generation.py: caption = '\n'.join(contexts) + '\nA: '; each answer
    # tokenized with add_special_tokens=True (a BOS first); CrossEntropyLoss(logits, labels) with no
    # shift, summed over the answer's positions, its BOS included.
    "fromage": Scoring(" ", "", True, True,
                              "FROMAGe's script: context '...A: ', BOS + answer, logits[t] scored against "
                              "label[t] (unshifted CE) summed over the answer's positions"),
}


def scoring_of(name: str, cfg) -> Scoring:
  """The task's IT2T scoring; an unknown name is one line naming the choices (checked before weights load)."""
  if cfg.scoring not in SCORINGS:
    raise UserError(f"--config.evals.{name}.scoring={cfg.scoring!r} is unknown; choose from {sorted(SCORINGS)}")
  return SCORINGS[cfg.scoring]


def run(engine, data_dir: str, split: str, cfg, config=None) -> TaskResult:
  # lazy: jax and grain load when a task runs, not when a config is read (configs/base.py)
  from bridgejax.engine import cached_encoder, pad_rows, round_up
  from bridgejax.evaluation.evaluators.common import num_examples, percent_recalls, task_batches, top_k
  from bridgejax.losses import l2_normalize

  scoring = scoring_of("visdial", cfg)
  records = open_split(data_dir, split)
  n = num_examples(records, cfg.max_examples)
  tok = engine.tokenizer
  with_caption = cfg.with_caption
  per_step = engine.round_batch(cfg.rounds_per_step)  # rows every device gets
  batch_size = engine.round_batch(cfg.batch_size)
  encode_ctx, encode_cand = cached_encoder(tok, add_bos=True), cached_encoder(tok, add_bos=scoring.candidate_bos)
  context = lambda dialog, r: it2t_context(dialog, r, with_caption=with_caption) + scoring.answer_cue

  # A pass over the text first: one compiled shape for the whole split.
  dialogs = [{k: v for k, v in records[i].items() if k != "image"} for i in range(n)]  # text only in memory
  num_options = {len(r["options"]) for d in dialogs for r in d["rounds"] if r["options"]}
  if len(num_options) != 1:
    raise RecordError(f"VisDial rounds of {data_dir}:{split} have {sorted(num_options)} candidate answers; "
                      "IT2T needs the same number in every round (100 in VisDial v1.0)")
  num_options = num_options.pop()
  ctx_len = max(len(encode_ctx(context(d, r))) for d in dialogs for r in range(len(d["rounds"])))
  cand_len = max(len(encode_cand(scoring.candidate_prefix + o))
                  for d in dialogs for r in d["rounds"] for o in r["options"])
  ctx_len, cand_len = round_up(ctx_len, 16), round_up(cand_len, 4)
  dialog_len = round_up(max(len(tok.encode(t2i_text(d, with_caption=with_caption))) for d in dialogs) + 1, 16)
  dialog_len = min(dialog_len, cfg.max_dialog_tokens)

  def negative_nll(rounds: list) -> list[np.ndarray]:
    """-CE of every candidate of each (dialog, round, visual tokens) in `rounds`, per_step rows a call."""
    out = []
    for start in range(0, len(rounds), per_step):
      chunk = rounds[start:start + per_step]
      rows = chunk + [chunk[0]] * (per_step - len(chunk))  # pad to the compiled shape
      ctx_ids, ctx_mask = pad_rows([encode_ctx(context(dialogs[d], r)) for d, r, _ in rows], ctx_len, tok.pad_id)
      cand = [pad_rows([encode_cand(scoring.candidate_prefix + o) for o in dialogs[d]["rounds"][r]["options"]],
                       cand_len, tok.pad_id) for d, r, _ in rows]
      nll = engine.candidate_nll(np.stack([v for _, _, v in rows]), ctx_ids, ctx_mask,
                                 np.stack([c[0] for c in cand]), np.stack([c[1] for c in cand]),
                                 unshifted=scoring.unshifted)
      out += list(-nll[:len(chunk)])
    return out

  scores = [None] * n  # per dialog: (rounds, options) of -CE
  image_embs, dialog_embs = [None] * n, [None] * n
  pending: list[tuple[int, int, np.ndarray]] = []  # (dialog, round, visual tokens) not scored yet
  for batch in task_batches(engine, data_dir, split, n, cfg, "visdial"):
    tokens, image_emb = engine.encode(batch["image"])
    valid = np.flatnonzero(batch["valid"])
    texts = [t2i_text(dialogs[int(batch["index"][row])], with_caption=with_caption) for row in valid]
    texts += [""] * (batch_size - len(texts))
    ids, mask = tok.batch_encode(texts, dialog_len, add_bos=True, append_ret=True)
    dialog_emb = np.asarray(engine.text_embedding(ids, mask))
    for j, row in enumerate(valid):
      d = int(batch["index"][row])
      image_embs[d], dialog_embs[d] = image_emb[row], dialog_emb[j]
      scores[d] = [None] * len(dialogs[d]["rounds"])
      pending += [(d, r, tokens[row]) for r, rnd in enumerate(dialogs[d]["rounds"]) if rnd["options"]]
    ready = len(pending) - len(pending) % per_step  # whole steps now, the rest with the next batch
    for (d, r, _), row in zip(pending[:ready], negative_nll(pending[:ready])):
      scores[d][r] = row
    pending = pending[ready:]
  for (d, r, _), row in zip(pending, negative_nll(pending)):
    scores[d][r] = row

  metrics, predictions, truncated = _visdial_metrics(dialogs, scores), [], 0
  images, texts = l2_normalize(np.stack(image_embs)), l2_normalize(np.stack(dialog_embs))
  metrics = percent_recalls({**metrics, **visdial_metrics.t2i_recall(images, texts, chunk_size=cfg.chunk_size)})
  t2i_ranks = retrieval.ranks(images, texts, np.arange(n))["t2i"]
  top_images = top_k(texts, images, 5)
  for d, dialog in enumerate(dialogs):
    truncated += len(tok.encode(t2i_text(dialog, with_caption=with_caption))) + 1 > dialog_len
    rounds = []
    for r, rnd in enumerate(dialog["rounds"]):
      if scores[d][r] is None:
        continue
      s = scores[d][r]
      rank = int(visdial_metrics.scores_to_ranks(s)[rnd["gt_index"]]) if rnd["gt_index"] >= 0 else None
      rounds.append({"question": rnd["question"], "answer": rnd["answer"], "gt_rank": rank,
                     "predicted": rnd["options"][int(np.argmax(s))]})
    predictions.append({"index": d, "id": dialog["id"], "image_id": dialog["image_id"], "caption": dialog["caption"],
                        "rounds": rounds, "t2i_rank": int(t2i_ranks[d]),
                        "top_images": [dialogs[g]["id"] for g in top_images[d]]})
  counts = {"dialogs": n, "rounds": sum(s is not None for d in scores for s in d),
            "dense_dialogs": sum(d["dense_round_index"] >= 0 and bool(d["dense_relevance"]) for d in dialogs),
            "options_per_round": num_options, "dialogs_truncated_for_t2i": int(truncated)}
  return TaskResult(metrics, predictions, counts,
                    {"context_tokens": ctx_len, "candidate_tokens": cand_len, "dialog_tokens": dialog_len},
                    {"scoring": scoring.description})


def _visdial_metrics(dialogs: list[dict], scores: list[list]) -> dict[str, float]:
  """visdial.score on the (dialogs, rounds, options) array when every round is annotated (val);
  otherwise R@k/MRR over the annotated rounds and NDCG over the dense ones."""
  rounds = {len(d["rounds"]) for d in dialogs}
  full = len(rounds) == 1 and all(r["gt_index"] >= 0 for d in dialogs for r in d["rounds"])
  dense = [d["dense_round_index"] >= 0 and bool(d["dense_relevance"]) for d in dialogs]
  if full:
    s = np.stack([np.stack(x) for x in scores])
    gt = np.asarray([[r["gt_index"] for r in d["rounds"]] for d in dialogs])
    if all(dense):  # the dense round_id of the official file is 1-based; records store it 0-based
      return visdial_metrics.score(gt, scores=s, relevance=np.asarray([d["dense_relevance"] for d in dialogs]),
                                   round_id=np.asarray([d["dense_round_index"] + 1 for d in dialogs]))
    out = visdial_metrics.score(gt, scores=s)
  else:
    flat = [(x[r], d["rounds"][r]["gt_index"]) for d, x in zip(dialogs, scores)
            for r in range(len(x)) if x[r] is not None and d["rounds"][r]["gt_index"] >= 0]
    if not flat:
      raise RecordError("no VisDial round has a ground-truth answer (a test split?); use the val split")
    out = visdial_metrics.sparse_metrics(np.asarray([g for _, g in flat]), scores=np.stack([s for s, _ in flat]))
  kept = [i for i, ok in enumerate(dense) if ok and scores[i][dialogs[i]["dense_round_index"]] is not None]
  if kept:
    out["NDCG"] = visdial_metrics.ndcg(np.asarray([dialogs[i]["dense_relevance"] for i in kept]),
                                       scores=np.stack([scores[i][dialogs[i]["dense_round_index"]] for i in kept]))
  return out



def section(preds: dict, images, n: int) -> str:
  index_of = {p["id"]: p["index"] for p in preds["predictions"]}
  rows = []
  for p in preds["predictions"][:n]:
    rounds = "".join(
        f"<li>{markup.escape(r['question'])}? <span class={'ok' if r['gt_rank'] == 1 else 'bad'}>"
        f"{markup.escape(r['predicted'])}</span> <span class=meta>(truth: {markup.escape(r['answer'])}, "
        f"rank {r['gt_rank']})</span></li>" for r in p["rounds"][:4])
    found = markup.strip([(k + 1, images.uri(preds["dataset"], index_of[g]), g, g == p["id"])
                          for k, g in enumerate(p["top_images"]) if g in index_of], 64)
    rows.append(f"<tr><td>{markup.img(images.uri(preds['dataset'], p['index']), p['id'])}</td>"
                f"<td><div class=meta>{markup.escape(p['caption'])}</div><ol>{rounds}</ol></td>"
                f'<td><div class=meta>images for the dialog (true rank {p["t2i_rank"]})</div>'
                f'<div class="strip">{found}</div></td></tr>')
  return ("<h2>VisDial</h2><table><tr><th>image</th><th>rounds: predicted (truth, rank)</th><th>T2I</th></tr>"
          + "".join(rows) + "</table>")


EVALUATOR = Evaluator(
    type="visdial", kind="visdial", keys=KEYS, run=run, section=section, order=3,
    check=scoring_of,
    protocols={"standard": STANDARD,
               "thesis": {**STANDARD, "scoring": "fromage", "image_resize": "squash"}},
    columns=(("R@1", "VD R@1"), ("R@5", "VD R@5"), ("R@10", "VD R@10"), ("MRR", "MRR"), ("NDCG", "NDCG"),
             ("mean_rank", "VD rank"), ("t2i_R@1", "VD t2i R@1"), ("t2i_R@5", "VD t2i R@5"),
             ("t2i_R@10", "VD t2i R@10"), ("i2t_R@1", "VD i2t R@1"), ("i2t_R@5", "VD i2t R@5"),
             ("i2t_R@10", "VD i2t R@10")))
