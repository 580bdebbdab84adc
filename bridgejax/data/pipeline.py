"""grain input pipelines over prepared datasets: fixed-shape numpy batches, a global shuffle per
seed, one disjoint shard per process, worker processes, and iterator state for checkpoints.

Training (captioning + retrieval, FROMAGe): one image and one of its captions per example,

    ds = train_dataset("data/cc3m", "train", tokenizer, batch_size=180, seed=0, worker_count=2)
    it = iter(ds)                   # a LoaderIterator
    batch = next(it)   # image (B,3,S,S) f32 | text_ids, text_mask (B,T) i32 | index (B,) i32
    state = it.get_state()          # {"step": n, ...}: the same on every process; checkpoint it
    it = iter(ds); it.set_state(state)   # continues with the very next batch, any worker count

With cached frozen features (bridgejax.data.features: `features=FeatureCache(...)`), a batch holds
the cached hidden states instead of `image`: hidden_<i> (B, tokens, W) bfloat16, one per hidden
state the config reads; the stream (records, order, captions) is the same, so a run can resume
from images to features and back.

text is BOS + caption + [RET], right padded to T = max_length (24), a caption that is too long
is cut and still ends with [RET]; so [RET] sits at text_mask.sum(-1) - 1. Labels are text_ids
shifted, masked by text_mask: the model and losses make them, nothing else is needed.

Order of the stream (what makes resumption and multi-host exact): records are shuffled globally
with (seed, epoch), the epoch is cut to a multiple of the process count and dealt round-robin to
the processes (disjoint, equal lengths, so hosts never drift apart), examples are batched in
order (batch b of every process is step b), and the stream repeats with a fresh shuffle. Batch n
is a pure function of (records, seed, batch size, shard, n): worker processes only compute it,
and a restored iterator simply starts again at n.

Evaluation: eval_dataset reads a split once, in record order, with the last batch padded
(`valid` False) so that every batch has the same shape and every process the same batch count.
"""

from __future__ import annotations

import json
import os
from typing import Any, Protocol

import numpy as np
from absl import flags

from bridgejax.data.image import clip_preprocess, decode_image
from bridgejax.data.records import RecordError, Split
from bridgejax.errors import UserError


class Tokenizer(Protocol):
  """What the pipeline needs of bridgejax.weights.load_tokenizer's tokenizer."""
  ret_id: int

  def batch_encode(self, texts: list[str], max_length: int, *, add_bos: bool = True,
                   append_ret: bool = False) -> tuple[np.ndarray, np.ndarray]: ...


def _shard(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
  if shard_index is None or shard_count is None:
    import jax  # lazy: jax, seconds of the data CLIs' start
    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index {shard_index} is not in [0, shard_count={shard_count})")
  return shard_index, shard_count


def _image(record: dict[str, Any], image_size: int, resize: str = "clip") -> np.ndarray:
  return clip_preprocess(decode_image(record["image"], f"record {record['id']!r}"), image_size, resize)


class _TrainExample:
  """record -> one training example; picks one of the record's captions with the element's rng
  (a different one each epoch for COCO's five). A class, not a closure: it goes to the workers.
  With `features` (a FeatureCache) the record's cached hidden states replace its image."""

  def __init__(self, split: Split, tokenizer: Tokenizer, image_size: int, max_length: int, resize: str = "clip",
               features=None):
    self.split, self.tokenizer = split, tokenizer
    self.image_size, self.max_length, self.resize = image_size, max_length, resize
    self.features = features

  def __call__(self, index: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    record = self.split[index]
    captions = record["captions"]
    caption = captions[int(rng.integers(len(captions)))] if len(captions) > 1 else captions[0]
    ids, mask = self.tokenizer.batch_encode([caption], self.max_length, add_bos=True, append_ret=True)
    return {**self._vision(record, index),
            "text_ids": np.asarray(ids[0], np.int32), "text_mask": np.asarray(mask[0], np.int32),
            "index": np.int32(index)}

  def _vision(self, record: dict[str, Any], index: int) -> dict[str, np.ndarray]:
    if self.features is None:
      return {"image": _image(record, self.image_size, self.resize)}
    cached = self.features[index]
    if cached.pop("id") != record["id"]:
      raise RecordError(f"the feature cache {self.features.path} is out of step with split {self.split.name!r} "
                        f"at record {index} ({record['id']!r}): rebuild it (python -m bridgejax.features)")
    return cached


class Loader:
  """An iterable of fixed-shape batches over a random-access grain MapDataset of batches.

  iter(loader) gives a LoaderIterator whose state is just {"step": n} plus what the stream
  depends on, so a restored iterator rebuilds the stream at batch n: exact, independent of the
  worker count, and checked against the dataset, seed, batch size and shard it was saved with.
  """

  def __init__(self, batches, *, worker_count: int = 0, buffer_size: int = 2,
               fingerprint: dict[str, Any] | None = None):
    self.batches, self.worker_count, self.buffer_size = batches, worker_count, buffer_size
    self.fingerprint = fingerprint or {}

  def __len__(self) -> int:  # sys.maxsize for a repeating stream
    return len(self.batches)

  def __getitem__(self, step: int) -> dict[str, np.ndarray]:
    """Batch `step`, computed here and now (no workers): for tests and debugging."""
    return self.batches[step]

  def __iter__(self) -> "LoaderIterator":
    return LoaderIterator(self)


class LoaderIterator:
  """Iterator over a Loader with get_state()/set_state(). The state is a small JSON-able dict,
  the same on every process (the step; the shard comes from the process), so the training
  checkpoint can store process 0's copy: orbax `ocp.args.JsonSave(it.get_state())` or
  save_iterator_state. Close the iterator to stop its worker processes."""

  def __init__(self, loader: Loader, step: int = 0):
    self.loader, self.step, self._it = loader, step, None

  def _open(self):
    import grain  # lazy: grain (with jax), seconds of the data CLIs' start
    ds = self.loader.batches[self.step:]
    # Elements are whole batches (a 180 x 224^2 batch is 108 MB): small buffers.
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1 if self.loader.worker_count else 2,
                                              prefetch_buffer_size=2))
    if self.loader.worker_count > 0:
      if not flags.FLAGS.is_parsed():
        # grain reads its absl flags when it starts workers and fails if nobody parsed them (a
        # notebook, a test, a script without absl.app). Marking them parsed keeps every default,
        # and a later FLAGS(argv) still parses normally.
        flags.FLAGS.mark_as_parsed()
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.loader.worker_count,
                                                       per_worker_buffer_size=self.loader.buffer_size))
    self._it = iter(ds)

  def __iter__(self) -> "LoaderIterator":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._it is None:
      self._open()
    batch = next(self._it)
    self.step += 1
    return batch

  def get_state(self) -> dict[str, Any]:
    return {"step": self.step, **self.loader.fingerprint}

  def set_state(self, state: dict[str, Any]) -> None:
    changed = {k: (state.get(k), v) for k, v in self.loader.fingerprint.items() if state.get(k) != v}
    if changed:
      raise ValueError("the saved data iterator state belongs to another stream; (saved, now): "
                       f"{changed}. Resume with the dataset, seed, batch size and process count "
                       "it was saved with, or start the data stream afresh")
    self.close()
    self.step = int(state["step"])

  def close(self) -> None:
    if self._it is not None and hasattr(self._it, "close"):
      self._it.close()
    self._it = None


def epoch_order(num_records: int, *, seed: int, shard_index: int, shard_count: int, shuffle: bool = True):
  """The record indices this process reads, as a grain MapDataset (infinite when repeated).

  Global shuffle of all records with (seed, epoch), cut to a multiple of shard_count, dealt
  round-robin: the processes' shards are disjoint and equally long in every epoch.
  """
  import grain  # lazy: grain (with jax), seconds of the data CLIs' start
  if num_records < shard_count:
    raise RecordError(f"{num_records} records cannot feed {shard_count} processes")
  ds = grain.MapDataset.range(num_records)
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds[: num_records - num_records % shard_count]
  return ds[shard_index::shard_count]


def train_dataset(data_dir: str | os.PathLike, split: str, tokenizer: Tokenizer, *,
                  batch_size: int, seed: int = 0, image_size: int = 224, max_length: int = 24,
                  shard_index: int | None = None, shard_count: int | None = None,
                  num_epochs: int | None = None, worker_count: int = 0,
                  worker_buffer_size: int = 2, image_resize: str = "clip", features=None):
  """Batches of image_text examples for training; returns a Loader (iterable of batches).

  batch_size is per process. (The concat trick's coin is the model's: a pure function of
  (seed, step), so every process draws the same one; see BridgeModel.loss.)
  shard_index/shard_count default to jax.process_index()/process_count(). num_epochs=None
  repeats forever. worker_count processes decode and preprocess (0: in this process).
  image_resize: "clip" (resize + centre crop) or "squash" (bridgejax.data.image).
  features: a bridgejax.data.features.FeatureCache of this split, read instead of the images.
  """
  if batch_size <= 0:
    raise UserError(f"batch_size {batch_size} must be positive")
  records = Split(data_dir, split)
  if records.kind != "image_text":
    raise RecordError(f"split {split!r} of {data_dir} holds {records.kind} records; training "
                      "reads image_text splits (captions)")
  if features is not None and len(features) != len(records):
    raise RecordError(f"the feature cache {features.path} holds {len(features)} records, split {split!r} "
                      f"{len(records)}: rebuild it (python -m bridgejax.features)")
  shard_index, shard_count = _shard(shard_index, shard_count)
  ds = epoch_order(len(records), seed=seed, shard_index=shard_index, shard_count=shard_count)
  if len(ds) < batch_size:
    raise RecordError(f"split {split!r} gives this process {len(ds)} examples per epoch, fewer "
                      f"than one batch of {batch_size}")
  ds = ds.repeat(num_epochs)
  ds = ds.random_map(_TrainExample(records, tokenizer, image_size, max_length, image_resize, features), seed=seed)
  ds = ds.batch(batch_size, drop_remainder=True)
  return Loader(ds, worker_count=worker_count, buffer_size=worker_buffer_size, fingerprint=dict(
      split=split, num_records=len(records), seed=seed, batch_size=batch_size, shard_count=shard_count))


class _EvalExample:
  def __init__(self, split: Split, num_records: int, shard_index: int, shard_count: int,
               image_size: int, tokenizer: Tokenizer | None, captions_per_image: int, max_length: int,
               resize: str = "clip"):
    self.split, self.num_records, self.resize = split, num_records, resize
    self.shard_index, self.shard_count = shard_index, shard_count
    self.image_size, self.tokenizer = image_size, tokenizer
    self.captions_per_image, self.max_length = captions_per_image, max_length

  def __call__(self, position: int) -> dict[str, np.ndarray]:
    index = self.shard_index + position * self.shard_count
    valid = index < self.num_records
    record = self.split[index if valid else 0]  # padding repeats record 0, marked invalid
    out = {"image": _image(record, self.image_size, self.resize), "index": np.int32(index if valid else -1),
           "valid": np.bool_(valid), "id": np.str_(record["id"] if valid else "")}
    if self.tokenizer is not None:
      caps = list(record["captions"][: self.captions_per_image])
      present = np.zeros(self.captions_per_image, bool)
      present[: len(caps)] = valid
      caps += [""] * (self.captions_per_image - len(caps))
      ids, mask = self.tokenizer.batch_encode(caps, self.max_length, add_bos=True, append_ret=True)
      out.update(caption_ids=np.asarray(ids, np.int32), caption_mask=np.asarray(mask, np.int32),
                 caption_valid=present)
    return out


def eval_dataset(data_dir: str | os.PathLike, split: str, *, batch_size: int, image_size: int = 224,
                 shard_index: int | None = None, shard_count: int | None = None,
                 tokenizer: Tokenizer | None = None, captions_per_image: int = 5,
                 max_length: int = 24, worker_count: int = 0, image_resize: str = "clip"):
  """One ordered pass over any split, in fixed-shape batches; returns a Loader.

  Every batch: image (B,3,S,S), index (B,) i32 (the record, -1 for padding), valid (B,) bool,
  id (B,) str. The text of a record (question, dialog, captions) is Split(data_dir, split)[index].
  For image_text splits, a tokenizer adds the first `captions_per_image` captions as
  caption_ids/caption_mask (B,C,T) and caption_valid (B,C): the retrieval text side, where an
  image-to-text hit is any of the image's captions. Process p reads records p, p+P, p+2P, ...
  """
  import grain  # lazy: grain (with jax), seconds of the data CLIs' start
  records = Split(data_dir, split)
  if tokenizer is not None and records.kind != "image_text":
    raise RecordError(f"captions come from image_text splits; {split!r} holds {records.kind}")
  shard_index, shard_count = _shard(shard_index, shard_count)
  n = len(records)
  per_shard = -(-n // shard_count)
  padded = -(-per_shard // batch_size) * batch_size  # the same on every process
  ds = grain.MapDataset.range(padded).map(_EvalExample(
      records, n, shard_index, shard_count, image_size, tokenizer, captions_per_image, max_length, image_resize))
  ds = ds.batch(batch_size, drop_remainder=True)
  return Loader(ds, worker_count=worker_count, fingerprint=dict(
      split=split, num_records=n, batch_size=batch_size, shard_count=shard_count))


def save_iterator_state(iterator, path: str | os.PathLike) -> None:
  """Write a grain iterator's state as JSON (for orbax, grain.checkpoint.CheckpointSave does it)."""
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(iterator.get_state(), f)
  os.replace(tmp, path)


def restore_iterator_state(iterator, path: str | os.PathLike) -> None:
  with open(path) as f:
    iterator.set_state(json.load(f))
