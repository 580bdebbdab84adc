"""Eval task runners: the protocols of docs/reference.md over prepared splits, returning metrics and
per-example predictions. `bridgejax.evaluation.run.evaluate` (eval.py) calls them and writes JSON.

    result = caption(engine, data_dir, split, cfg)    # -> TaskResult(metrics, predictions, counts, settings)

  caption    greedy (or beam) KV-cache decoding after [visual] + BOS [+ prompt], stopped at EOS or
             [RET], FROMAGe's cut rule, pycocoevalcap scores; empty captions are scored, not dropped.
  retrieval  W_i image embeddings, W_t caption embeddings (BOS + caption + [RET]), L2-normalised;
             R@1/5/10 both ways with the COCO multi-caption rule (chunked).
  vqa        [visual] + BOS + "Q: {question}\\nA:", generate, keep as many words as the longest
             human answer, official VQA accuracy (overall / yes-no / number / other).
  visdial    IT2T: [visual] + BOS + "Q: q1?\\nA: a1\\n...\\nQ: qr?\\nA:" and each of the candidates
             " {answer}" scored by summed next-token CE (FROMAGe's layout; its caption-free history
             is the default, with_caption=True puts the caption first), or with scoring="fromage" as
             FROMAGe's eval_visdial_generation.py scores (VISDIAL_SCORINGS); R@k, MRR, mean rank,
             NDCG on the densely annotated round. T2I: BOS + "Q: q1? A: a1. ..." + [RET]
             (FROMAGe's eval_visdial_retrieval.py text), rank the split's images per dialog.
  compose    composed image retrieval (Pic2Word): each query (reference image, modification text)
             through Engine.composed_query, ranked against W_i of the split's image table (the
             gallery; with max_examples, the rows the first queries use), its reference left out;
             R@1/5/10 of the target, overall and per changed attribute.

`quick_validation(setup, params)` is the training loop's periodic check.

`cfg` is the task's entry of config.evals (keys: bridgejax.data.splits); every rate is on the 0-1
scale, except R@k (retrieval, VisDial, quick validation), which is in percent, as training logs its
in-batch top-1. Every process reads every record; the model work of each batch is split over the
mesh's 'data' axis (see engine.py), so batch_size is rounded up to a multiple of the 'data' size.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from bridgejax import losses, mesh as mesh_lib, pic2word
from bridgejax.data.image import RESIZES
from bridgejax.data.pipeline import eval_dataset
from bridgejax.data.records import RecordError, open_split
from bridgejax.errors import UserError
from bridgejax.evaluation import captioning, retrieval, visdial as visdial_metrics, vqa as vqa_metrics
from bridgejax.evaluation.engine import Engine, cached_encoder, pad_rows, place_on_mesh, round_up, shard_rows
from bridgejax.losses import l2_normalize


@dataclasses.dataclass
class TaskResult:
  metrics: dict[str, Any]
  predictions: list[dict[str, Any]]
  counts: dict[str, int]
  settings: dict[str, Any] = dataclasses.field(default_factory=dict)
  notes: dict[str, str] = dataclasses.field(default_factory=dict)


# --------------------------------------------------------------------------- data


def num_examples(records, max_examples: int) -> int:
  n = len(records)
  return min(n, max_examples) if max_examples and max_examples > 0 else n


def eval_batches(data_dir, split, n: int, batch_size: int, image_size: int, *, tokenizer=None,
                 captions_per_image: int = 5, max_length: int = 24, workers: int = 0,
                 desc: str | None = None, image_resize: str = "clip") -> Iterator[dict[str, np.ndarray]]:
  """The first n records of a split in fixed-shape batches (the last one padded, `valid` False).
  Every process reads every record (cheap next to the model); the engine splits each batch over
  the mesh's devices and hands every process the whole result."""
  loader = eval_dataset(data_dir, split, batch_size=batch_size, image_size=image_size, shard_index=0,
                        shard_count=1, tokenizer=tokenizer, captions_per_image=captions_per_image,
                        max_length=max_length, worker_count=workers, image_resize=image_resize)
  count = -(-n // batch_size)
  it = iter(loader)
  try:
    for _ in tqdm(range(count), desc=desc, unit="batch", disable=desc is None or jax.process_index() != 0,
                  dynamic_ncols=True):
      batch = next(it)
      batch["valid"] = batch["valid"] & (batch["index"] >= 0) & (batch["index"] < n)
      yield batch
  finally:
    it.close()


def task_batches(engine: Engine, data_dir, split, n: int, cfg, desc: str, **kwargs) -> Iterator[dict[str, np.ndarray]]:
  """eval_batches with the task's batch size (rounded for the mesh), workers, geometry and bar."""
  return eval_batches(data_dir, split, n, engine.round_batch(cfg.batch_size), engine.model.vision.config.image_size,
                      workers=cfg.num_workers, image_resize=cfg.image_resize, desc=desc if cfg.progress else None,
                      **kwargs)


# --------------------------------------------------------------------------- captioning


def caption(engine: Engine, data_dir: str, split: str, cfg) -> TaskResult:
  records = open_split(data_dir, split)
  n = num_examples(records, cfg.max_examples)
  tok = engine.tokenizer
  prompt_ids = tok.encode(cfg.caption_prompt, add_bos=True)
  ids, mask = pad_rows([prompt_ids] * engine.round_batch(cfg.batch_size), round_up(len(prompt_ids), 8), tok.pad_id)
  rule = cfg.cut_rule
  predictions, hyps, refs = [], {}, {}
  for batch in task_batches(engine, data_dir, split, n, cfg, "caption"):
    tokens, _ = engine.encode(batch["image"])
    new = engine.generate(tokens, ids, mask, max_new_tokens=cfg.max_new_tokens, num_beams=cfg.num_beams)
    for row in np.flatnonzero(batch["valid"]):
      index = int(batch["index"][row])
      record = records[index]
      raw = engine.decode_new(new[row])
      hyps[index], refs[index] = captioning.cut_caption(raw, rule), list(record["captions"])
      predictions.append({"index": index, "id": record["id"], "caption": hyps[index], "generated": raw,
                          "references": refs[index]})
  metrics = captioning.score(hyps, refs)
  empty = sum(not h.strip() for h in hyps.values())
  metrics["empty_fraction"] = empty / len(hyps)
  return TaskResult(metrics, predictions, {"images": len(hyps), "empty_captions": empty},
                    notes=dict(captioning.UNAVAILABLE))


# --------------------------------------------------------------------------- retrieval


@functools.partial(jax.jit, static_argnames="k")
def _topk_block(queries, gallery, k: int):
  sims = jnp.einsum("cd,gd->cg", queries, gallery, precision=jax.lax.Precision.HIGHEST)
  return jax.lax.top_k(sims, k)[1]


def top_k(queries: np.ndarray, gallery: np.ndarray, k: int, chunk: int = 1024) -> np.ndarray:
  """(num_queries, k) indices of the most similar gallery items, chunked like retrieval.ranks."""
  k = min(k, gallery.shape[0])
  out, chunk = [], min(chunk, queries.shape[0])
  gallery = jnp.asarray(gallery)
  for start in range(0, queries.shape[0], chunk):
    q = queries[start:start + chunk]
    out.append(np.asarray(_topk_block(np.pad(q, ((0, chunk - q.shape[0]), (0, 0))), gallery, k))[:q.shape[0]])
  return np.concatenate(out)


def percent_recalls(metrics: dict[str, Any]) -> dict[str, Any]:
  """R@k x100: recalls are percentages in every log and JSON, like training's in-batch top-1."""
  return {k: 100.0 * v if "R@" in k and v is not None else v for k, v in metrics.items()}


def _recall(ranks: dict[str, np.ndarray], ks=(1, 5, 10)) -> dict[str, float]:
  return percent_recalls({f"{d}_R@{k}": v for d in ("i2t", "t2i")
                          for k, v in retrieval.recall_from_ranks(ranks[d], ks).items()})


def retrieval_task(engine: Engine, data_dir: str, split: str, cfg, *, max_caption_tokens: int = 24) -> TaskResult:
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
  metrics = _recall(ranks)
  top_texts, top_images = top_k(images, captions, 5, chunk), top_k(captions, images, 5, chunk)
  ids = [records[i]["id"] for i in indices]
  predictions, caption_rows = [], _rows_by_image(text_to_image, len(indices))
  for i, index in enumerate(indices):
    queries = [{"text": texts[t], "t2i_rank": int(ranks["t2i"][t]),
                "top_images": [ids[g] for g in top_images[t]]} for t in caption_rows[i]]
    predictions.append({"index": index, "id": ids[i], "i2t_rank": int(ranks["i2t"][i]),
                        "top_texts": [texts[t] for t in top_texts[i]], "queries": queries})
  return TaskResult(metrics, predictions, {"images": len(indices), "texts": len(texts)},
                    {"max_caption_tokens": max_caption_tokens})


def _rows_by_image(text_to_image: np.ndarray, num_images: int) -> list[list[int]]:
  rows = [[] for _ in range(num_images)]
  for t, i in enumerate(text_to_image):
    rows[i].append(t)
  return rows


# --------------------------------------------------------------------------- VQA


def vqa_prompt(question: str) -> str:
  return f"Q: {question}\nA:"


def vqa(engine: Engine, data_dir: str, split: str, cfg) -> TaskResult:
  records = open_split(data_dir, split)
  n = num_examples(records, cfg.max_examples)
  tok = engine.tokenizer
  predictions, answers, questions = [], {}, {}
  for batch in task_batches(engine, data_dir, split, n, cfg, "vqa"):
    rows = [records[int(i)] if v else None for i, v in zip(batch["index"], batch["valid"])]
    prompts = [tok.encode(vqa_prompt(r["question"]), add_bos=True) if r else [tok.bos_id] for r in rows]
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
  return TaskResult(metrics, predictions, counts, {"prompt": vqa_prompt("{question}")})


# --------------------------------------------------------------------------- VisDial


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
class VisdialScoring:
  """How IT2T turns a candidate answer into a score (its negated summed CE)."""
  answer_cue: str  # appended to the context, which ends in "A:"
  candidate_prefix: str  # before each answer's text
  candidate_bos: bool  # a BOS before each answer
  unshifted: bool  # CE of logits[t] against token t itself, not against the next token
  description: str


VISDIAL_SCORINGS = {
    "next_token": VisdialScoring("", " ", False, False,
                                 "summed next-token CE of ' {answer}' after the context's 'A:' (log-likelihood)"),
    # FROMAGe's evals/eval_visdial_generation.py: caption = '\n'.join(contexts) + '\nA: '; each answer
    # tokenized with add_special_tokens=True (a BOS first); CrossEntropyLoss(logits, labels) with no
    # shift, summed over the answer's positions, its BOS included.
    "fromage": VisdialScoring(" ", "", True, True,
                              "FROMAGe's script: context '...A: ', BOS + answer, logits[t] scored against "
                              "label[t] (unshifted CE) summed over the answer's positions"),
}


def visdial_scoring(cfg, name: str = "visdial") -> VisdialScoring:
  if cfg.scoring not in VISDIAL_SCORINGS:
    raise UserError(f"--config.evals.{name}.scoring={cfg.scoring!r} is unknown; choose from {sorted(VISDIAL_SCORINGS)}")
  return VISDIAL_SCORINGS[cfg.scoring]


def visdial(engine: Engine, data_dir: str, split: str, cfg) -> TaskResult:
  scoring = visdial_scoring(cfg)
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

  scores = [None] * n  # per dialog: (rounds, options) of -CE
  image_embs, dialog_embs = [None] * n, [None] * n
  pending: list[tuple[int, int, np.ndarray]] = []  # (dialog, round, visual tokens)

  def flush(final: bool):
    while len(pending) >= per_step or (final and pending):
      chunk, pending[:] = pending[:per_step], pending[per_step:]
      rows = chunk + [chunk[0]] * (per_step - len(chunk))  # pad to the compiled shape
      ctx = [encode_ctx(context(dialogs[d], r)) for d, r, _ in rows]
      cands = [[encode_cand(scoring.candidate_prefix + o) for o in dialogs[d]["rounds"][r]["options"]] for d, r, _ in rows]
      ctx_ids, ctx_mask = pad_rows(ctx, ctx_len, tok.pad_id)
      cand = [pad_rows(c, cand_len, tok.pad_id) for c in cands]
      nll = engine.candidate_nll(np.stack([v for _, _, v in rows]), ctx_ids, ctx_mask,
                                 np.stack([c[0] for c in cand]), np.stack([c[1] for c in cand]),
                                 unshifted=scoring.unshifted)
      for (d, r, _), row in zip(chunk, nll):
        scores[d][r] = -row

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
      for r, rnd in enumerate(dialogs[d]["rounds"]):
        if rnd["options"]:
          pending.append((d, r, tokens[row]))
    flush(final=False)
  flush(final=True)

  metrics, predictions, truncated = _visdial_metrics(dialogs, scores), [], 0
  t2i = visdial_metrics.t2i_recall(l2_normalize(np.stack(image_embs)), l2_normalize(np.stack(dialog_embs)),
                                   chunk_size=cfg.chunk_size)
  metrics = percent_recalls({**metrics, **t2i})
  t2i_ranks = retrieval.ranks(l2_normalize(np.stack(image_embs)), l2_normalize(np.stack(dialog_embs)),
                              np.arange(n))["t2i"]
  top_images = top_k(l2_normalize(np.stack(dialog_embs)), l2_normalize(np.stack(image_embs)), 5)
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


# --------------------------------------------------------------------------- composed retrieval


def compose(engine: Engine, data_dir: str, split: str, cfg) -> TaskResult:
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
  # Pic2Word's baselines (its Table 1): the reference image's own embedding, the modification's
  # text embedding alone, and their normalised sum. A composed query is worth its cost where it
  # beats them.
  image_only = gallery[references]
  text_only = l2_normalize(_text_embeddings(engine, [q["modification"] for q in queries], cfg.batch_size))
  for name, baseline in (("image_only", image_only), ("text_only", text_only),
                         ("image_plus_text", l2_normalize(image_only + text_only))):
    baseline_ranks = retrieval.composed_ranks(baseline, gallery, targets, references, cfg.chunk_size)
    metrics.update({f"{name}_R@{k}": v for k, v in retrieval.recall_from_ranks(baseline_ranks).items()})
  top = top_k(embs, gallery, 6, cfg.chunk_size)  # 5 after the reference is left out
  predictions = [{"index": i, "id": q["id"], "modification": q["modification"], "attribute": q["attribute"],
                  "reference_index": int(references[i]), "target_index": int(targets[i]), "rank": int(ranks[i]),
                  "top_gallery": [int(g) for g in top[i] if g != references[i]][:5]} for i, q in enumerate(queries)]
  template = pic2word.QUERY_TEMPLATE if engine.model.heads.pic2word_hidden else "[visual tokens] {}"
  return TaskResult(percent_recalls(metrics), predictions, {"queries": n, "gallery": gallery_size},
                    {"gallery_split": table, "query_template": template + " [RET]"})


def _text_embeddings(engine: Engine, texts: list[str], batch_size: int) -> np.ndarray:
  """W_t embeddings (N, E) of BOS + text + [RET], as retrieval embeds captions; not normalised."""
  tok, out = engine.tokenizer, []
  length = round_up(max(len(tok.encode(t, add_bos=True)) + 1 for t in texts), 16)  # one compiled shape
  padded = texts + texts[-1:] * (-len(texts) % batch_size)  # and one batch size
  for start in range(0, len(padded), batch_size):
    ids, mask = tok.batch_encode(padded[start:start + batch_size], length, add_bos=True, append_ret=True)
    out.append(engine.text_embedding(ids, mask))
  return np.concatenate(out)[:len(texts)]


# the types of bridgejax.data.splits.TASK_TYPES, which says what data each reads
TASKS = {"caption": caption, "retrieval": retrieval_task, "vqa": vqa, "visdial": visdial, "compose": compose}


def check_task(name: str, cfg) -> None:
  """What a runner would reject only when its turn comes, checked before any weights load."""
  if cfg.image_resize not in RESIZES:
    raise UserError(f"--config.evals.{name}.image_resize={cfg.image_resize!r} is unknown; choose from {list(RESIZES)}")
  if cfg.type == "visdial":
    visdial_scoring(cfg, name)



# --------------------------------------------------------------------------- quick validation

_VALIDATORS: dict[tuple[int, Any], tuple[Any, Any]] = {}
VALIDATION_CAPTIONS_PER_IMAGE = 5  # the COCO rule's captions per image


def _validation_fn(model, mesh):
  """One jitted function per model and mesh: caption/text CE sums and counts, and the embeddings,
  replicated so that every process reads them whole."""

  def fn(params, image, ids, mask, row_valid, caption_ids, caption_mask):
    out = model.encode_images(params, image)
    image_emb = model.image_embedding(params, out)
    embeds, full_mask, labels, target = model.caption_inputs(params, out.tokens, ids, mask)
    logits, _ = model.run_llm(params, embeds, full_mask, hook=model.llm_hook(params, out.tokens, embeds.shape[1]))
    cap = _ce_sum(logits, labels, target * row_valid[:, None], losses)  # padded rows count nothing
    text_logits, _ = model.text_embedding(params, ids, mask)
    text = _ce_sum(text_logits, ids, mask * row_valid[:, None], losses)
    b, c, t = caption_ids.shape
    _, text_emb = model.text_embedding(params, caption_ids.reshape(b * c, t), caption_mask.reshape(b * c, t))
    return cap, text, image_emb, text_emb.reshape(b, c, -1)

  return jax.jit(fn, out_shardings=mesh_lib.replicated(mesh))


def _ce_sum(logits, labels, mask, losses):
  logits, labels, mask = logits[:, :-1], labels[:, 1:], mask[:, 1:] > 0
  nll = losses.token_nll(logits, jnp.where(mask, labels, 0))
  return jnp.stack([jnp.sum(jnp.where(mask, nll, 0.0)), jnp.sum(mask).astype(jnp.float32)])


def quick_validation(setup, params, *, max_examples: int | None = None,
                     batch_size: int | None = None) -> dict[str, float]:
  """Validation loss parts and R@1 both ways on the first config.data.val_examples records of
  config.data.val_split: a flat dict of floats for the training loop's metric writer.

  caption_loss / text_loss: token-mean CE of the first caption (the training passes, no concat
  trick); contrastive_loss: InfoNCE in consecutive groups of the training batch size (as training
  sees it; the last group smaller); i2t_R@1 / t2i_R@1 / .._R@5: recall over all N images with up
  to 5 captions each (the COCO rule). One compiled shape; the last batch is padded. Batches are
  split over the mesh's 'data' axis (the batch size rounded up to a multiple of it).
  """
  config, model = setup.config, setup.model
  data_dir, split = config.data.dir, config.data.val_split
  mesh = setup.mesh
  batch_size = round_up(batch_size or int(config.data.val_batch_size), mesh.shape["data"])
  key = (id(model), mesh)
  if key not in _VALIDATORS:
    _VALIDATORS[key] = (model, _validation_fn(model, mesh))
  fn = _VALIDATORS[key][1]
  records = open_split(data_dir, split)
  n = min(len(records), max_examples or int(config.data.val_examples) or len(records))
  full = place_on_mesh({**setup.frozen, **params}, mesh)  # a no-op for the training state
  cap, text = np.zeros(2), np.zeros(2)
  image_embs, caption_embs, caption_image = [], [], []
  for batch in eval_batches(data_dir, split, n, batch_size, model.vision.config.image_size,
                            tokenizer=setup.tokenizer, captions_per_image=VALIDATION_CAPTIONS_PER_IMAGE,
                            max_length=config.data.max_caption_tokens, workers=0,
                            image_resize=config.data.get("image_resize", "clip")):
    valid = batch["valid"]
    inputs = (batch["image"], batch["caption_ids"][:, 0], batch["caption_mask"][:, 0], valid.astype(np.int32),
              batch["caption_ids"], batch["caption_mask"])
    out = fn(full, *(shard_rows(x, mesh) for x in inputs))
    c, t, image_emb, text_emb = jax.device_get(out)
    cap, text = cap + c, text + t
    for row in np.flatnonzero(valid):
      image_embs.append(image_emb[row])
      for j in np.flatnonzero(batch["caption_valid"][row]):
        caption_embs.append(text_emb[row, j])
        caption_image.append(len(image_embs) - 1)
  images, captions = np.stack(image_embs), np.stack(caption_embs)
  first = np.asarray([caption_image.index(i) for i in range(len(image_embs))])
  scale = params["ret"]["logit_scale"]
  group = int(config.batch_size)
  contrastive = []
  for start in range(0, len(images), group):
    part = slice(start, start + group)
    value, _ = losses.contrastive_loss(jnp.asarray(images[part]), jnp.asarray(captions[first[part]]), scale)
    contrastive.append((float(value), len(images[part])))
  ranks = retrieval.ranks(l2_normalize(images), l2_normalize(captions), np.asarray(caption_image))
  out = {"caption_loss": float(cap[0] / max(cap[1], 1)), "text_loss": float(text[0] / max(text[1], 1)),
         "contrastive_loss": sum(v * w for v, w in contrastive) / sum(w for _, w in contrastive),
         "examples": float(len(images))}
  out.update({k: v for k, v in _recall(ranks, (1, 5)).items()})
  return out
