"""The runtime the evaluators share: a split's records in fixed-shape batches on the mesh, recall
in percent, top-k lists and W_t text embeddings. Imported by each evaluator's `run` (it loads jax).

Every process reads every record (cheap next to the model); the engine splits each batch over the
mesh's 'data' axis and hands every process the whole result, so batch_size is rounded up to a
multiple of the 'data' size. Every rate is on the 0-1 scale except R@k, which is in percent, as
training logs its in-batch top-1.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from bridgejax.data.pipeline import eval_dataset
from bridgejax.engine import Engine, round_up
from bridgejax.evaluation import retrieval, similarity


def num_examples(records, max_examples: int) -> int:
  n = len(records)
  return min(n, max_examples) if max_examples and max_examples > 0 else n


def eval_batches(data_dir, split, n: int, batch_size: int, image_size: int, *, tokenizer=None,
                 captions_per_image: int = 5, max_length: int = 24, workers: int = 0,
                 desc: str | None = None, image_resize: str = "clip") -> Iterator[dict[str, np.ndarray]]:
  """The first n records of a split in fixed-shape batches (the last one padded, `valid` False)."""
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


def top_k(queries: np.ndarray, gallery: np.ndarray, k: int, chunk: int = 1024) -> np.ndarray:
  """(num_queries, k) indices of the most similar gallery items, chunked like retrieval.ranks."""
  k = min(k, gallery.shape[0])
  out, chunk = [], min(chunk, queries.shape[0])
  gallery = similarity.on_device(gallery)
  for start in range(0, queries.shape[0], chunk):
    q = queries[start:start + chunk]
    out.append(np.asarray(similarity.top_k_block(np.pad(q, ((0, chunk - q.shape[0]), (0, 0))), gallery, k))[:q.shape[0]])
  return np.concatenate(out)


def percent_recalls(metrics: dict[str, Any]) -> dict[str, Any]:
  """R@k x100: recalls are percentages in every log and JSON, like training's in-batch top-1."""
  return {k: 100.0 * v if "R@" in k and v is not None else v for k, v in metrics.items()}


def recall_both_ways(ranks: dict[str, np.ndarray], ks=(1, 5, 10)) -> dict[str, float]:
  """{i2t_R@k, t2i_R@k} in percent from retrieval.ranks' output."""
  return percent_recalls({f"{d}_R@{k}": v for d in ("i2t", "t2i")
                          for k, v in retrieval.recall_from_ranks(ranks[d], ks).items()})


def text_embeddings(engine: Engine, texts: list[str], batch_size: int) -> np.ndarray:
  """W_t embeddings (N, E) of BOS + text + [RET], as retrieval embeds captions; not normalised."""
  tok, out = engine.tokenizer, []
  length = round_up(max(len(tok.encode(t, add_bos=True)) + 1 for t in texts), 16)  # one compiled shape
  padded = texts + texts[-1:] * (-len(texts) % batch_size)  # and one batch size
  for start in range(0, len(padded), batch_size):
    ids, mask = tok.batch_encode(padded[start:start + batch_size], length, add_bos=True, append_ret=True)
    out.append(engine.text_embedding(ids, mask))
  return np.concatenate(out)[:len(texts)]
