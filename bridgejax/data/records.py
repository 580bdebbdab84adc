"""The on-disk dataset: array_record shards of msgpack records, described by dataset_info.json.

A prepared dataset is one directory:

    dataset_info.json              # format, source, splits {name: kind, files, num_examples,
                                   #   fingerprint}, skips
    skipped.jsonl                  # one line per skipped image: split, source, reason, detail
    train-00000-of-00004.array_record ...

Images are stored encoded, as they came (JPEG/PNG/WebP bytes, checked to decode at preparation),
and preprocessed at read time: the dataset stays the size of the images and the image size is
a read-time choice. A record either holds its image (`image`: bytes) or points into an image
table split (`image_index`: int), so that the 5 questions of a VQAv2 image, or the captions,
questions and dialogs of one toy image, share one copy.

Record kinds (every string is str, every id of the original format is kept as in the format):

  images      id, image
  image_text  id, image | image_index, captions [str, ...] (COCO: 5-7, CC3M: 1), meta {}
  vqa         id, question_id:int, image_id:str, image | image_index, question, question_type,
              answer_type ("yes/no" | "number" | "other"), answers [10 str], answer_confidences
              [10 str], multiple_choice_answer  (test splits: answers [] and empty strings)
  visdial     id, image_id:int, image | image_index, caption, rounds [{question, answer,
              options [100 str], gt_index}] (test: the last round has answer "" and gt_index -1),
              dense_round_index:int (0-based; -1 if none), dense_relevance [100 float] ([] if none)
  compose     id, image_index (the reference image), target_index:int (the target, in the same
              image table, which is the gallery), modification (the text), attribute (what changes)
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

import msgpack
from array_record.python.array_record_module import ArrayRecordWriter

from bridgejax.errors import UserError

FORMAT, VERSION = "bridgejax-records", 1
INFO_FILE, SKIPPED_FILE = "dataset_info.json", "skipped.jsonl"
_WRITER_OPTIONS = "group_size:1,zstd:3"  # group_size 1: cheap random access, which grain needs

# Required fields per kind (besides the image). Writers check them, so a reader can rely on them.
SCHEMAS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "images": {"id": str},
    "image_text": {"id": str, "captions": list, "meta": dict},
    "vqa": {"id": str, "question_id": int, "image_id": str, "question": str, "question_type": str,
            "answer_type": str, "answers": list, "answer_confidences": list,
            "multiple_choice_answer": str},
    "visdial": {"id": str, "image_id": int, "caption": str, "rounds": list,
                "dense_round_index": int, "dense_relevance": list},
    "compose": {"id": str, "target_index": int, "modification": str, "attribute": str},
}
ANSWER_TYPES = ("yes/no", "number", "other")


class RecordError(UserError):
  """A dataset directory or record is not what bridgejax.data expects."""


def encode(example: dict[str, Any]) -> bytes:
  return msgpack.packb(example, use_bin_type=True)


def decode(data: bytes) -> dict[str, Any]:
  return msgpack.unpackb(data, raw=False)


def check(example: dict[str, Any], kind: str, *, has_table: bool) -> None:
  """Raise RecordError if `example` does not follow the schema of `kind`."""
  if kind not in SCHEMAS:
    raise RecordError(f"unknown record kind {kind!r}; one of {sorted(SCHEMAS)}")
  for key, types in SCHEMAS[kind].items():
    if not isinstance(example.get(key), types):
      raise RecordError(f"{kind} record {example.get('id')!r}: field {key!r} must be {types}, "
                        f"got {type(example.get(key)).__name__}")
  if has_table and kind != "images":
    if not isinstance(example.get("image_index"), int):
      raise RecordError(f"{kind} record {example['id']!r} needs an int `image_index` into the image table")
  elif not isinstance(example.get("image"), bytes):
    raise RecordError(f"{kind} record {example['id']!r} needs encoded `image` bytes")
  if kind == "image_text" and not (example["captions"] and all(isinstance(c, str) for c in example["captions"])):
    raise RecordError(f"image_text record {example['id']!r} needs at least one caption string")
  if kind == "vqa" and example["answers"] and example["answer_type"] not in ANSWER_TYPES:
    raise RecordError(f"vqa record {example['id']!r}: answer_type {example['answer_type']!r} "
                      f"is not one of {ANSWER_TYPES}")


# --- Writing -------------------------------------------------------------------------------------

class SplitWriter:
  """Appends records of one kind to `{split}-NNNNN-of-MMMMM.array_record`, a new shard per
  `shard_bytes`. `write` returns the record's index in the split (what `image_index` points at)."""

  def __init__(self, out_dir: Path, name: str, kind: str, *, image_table: str | None = None,
               shard_bytes: int = 1 << 30, dataset: "DatasetWriter | None" = None):
    self._writer_cls = ArrayRecordWriter
    self.out_dir, self.name, self.kind, self.image_table = out_dir, name, kind, image_table
    self.shard_bytes, self.num_examples, self.dataset = shard_bytes, 0, dataset
    self._tmp_paths: list[Path] = []
    self._writer, self._bytes = None, 0
    self._digest = hashlib.blake2b(digest_size=16)  # of every record written, in order: the split's identity

  def write(self, example: dict[str, Any]) -> int:
    check(example, self.kind, has_table=self.image_table is not None)
    data = encode(example)
    if self._writer is None or self._bytes + len(data) > self.shard_bytes and self._bytes:
      self._roll()
    self._writer.write(data)
    self._digest.update(len(data).to_bytes(8, "little"))
    self._digest.update(data)
    self._bytes += len(data)
    self.num_examples += 1
    return self.num_examples - 1

  def skip(self, reason: str, source: str, detail: str = "") -> None:
    """Count an example left out of this split (and log it to skipped.jsonl)."""
    if self.dataset is not None:
      self.dataset.skip(self.name, reason, source, detail)

  def _roll(self) -> None:
    if self._writer is not None:
      self._writer.close()
    path = self.out_dir / f".{self.name}-{len(self._tmp_paths):05d}.array_record.tmp"
    self._tmp_paths.append(path)
    self._writer, self._bytes = self._writer_cls(str(path), _WRITER_OPTIONS), 0

  def close(self) -> dict[str, Any]:
    """Finish the shards (renamed into place only now) and return the split's manifest entry."""
    if self._writer is None:
      self._roll()  # an empty split still gets one (empty) shard, so readers need no special case
    self._writer.close()
    n, files = len(self._tmp_paths), []
    for i, tmp in enumerate(self._tmp_paths):
      final = f"{self.name}-{i:05d}-of-{n:05d}.array_record"
      os.replace(tmp, self.out_dir / final)
      files.append(final)
    return {"kind": self.kind, "files": files, "num_examples": self.num_examples,
            "image_table": self.image_table, "fingerprint": self._digest.hexdigest()}


class DatasetWriter:
  """Writes (or adds splits to) one dataset directory. Use as a context manager;
  dataset_info.json is written last, so shards of an interrupted preparation are never read.

      with DatasetWriter(out, source="coco") as w:
        train = w.split("train", "image_text")
        train.write({...})
        w.skip("train", "missing", "train2014/x.jpg")
  """

  def __init__(self, out_dir: str | os.PathLike, source: str, *, overwrite: bool = False,
               shard_bytes: int = 1 << 30, args: dict[str, Any] | None = None):
    self.out_dir, self.source, self.shard_bytes = Path(out_dir), source, shard_bytes
    self.overwrite, self.args = overwrite, args or {}
    # Splits can be added to a prepared dataset (CC3M train and val come from separate inputs).
    self._existing = load_info(self.out_dir) if (self.out_dir / INFO_FILE).exists() else None
    self.out_dir.mkdir(parents=True, exist_ok=True)
    self.splits: dict[str, SplitWriter] = {}
    self.skipped: dict[str, dict[str, int]] = {}
    self.notes: dict[str, Any] = {}
    self._skip_log = open(self.out_dir / SKIPPED_FILE, "a")
    self._first_skips: list[dict[str, str]] = []
    self._replaced: list[str] = []
    self.info: dict[str, Any] | None = None

  def split(self, name: str, kind: str, *, image_table: str | None = None) -> SplitWriter:
    if name in self.splits:
      raise RecordError(f"split {name!r} is written twice")
    if self._existing and name in self._existing["splits"]:
      if not self.overwrite:
        raise RecordError(f"{self.out_dir} already has a split {name!r}; pass overwrite=True "
                          "(--overwrite) to replace it, or choose another --split or --out")
      # The old shards go only once the new ones are in place (close): an interrupted run
      # leaves the old split readable.
      self._replaced += self._existing["splits"].pop(name)["files"]
      self._existing["skipped"].pop(name, None)
    known = set(self.splits) | set(self._existing["splits"] if self._existing else ())
    if image_table is not None and image_table not in known:
      raise RecordError(f"split {name!r} points at image table {image_table!r}, which is not written")
    self.splits[name] = SplitWriter(self.out_dir, name, kind, image_table=image_table,
                                    shard_bytes=self.shard_bytes, dataset=self)
    return self.splits[name]

  def skip(self, split: str, reason: str, source: str, detail: str = "") -> None:
    counts = self.skipped.setdefault(split, {})
    counts[reason] = counts.get(reason, 0) + 1
    entry = {"split": split, "source": source, "reason": reason, "detail": detail}
    self._skip_log.write(json.dumps(entry) + "\n")
    if len(self._first_skips) < 5:
      self._first_skips.append(entry)

  def close(self) -> dict[str, Any]:
    self._skip_log.close()
    old = self._existing or {"splits": {}, "skipped": {}, "notes": {}}
    info = {"format": FORMAT, "version": VERSION, "source": self.source,
            "splits": {**old["splits"], **{name: w.close() for name, w in self.splits.items()}},
            "skipped": {**old["skipped"], **self.skipped}, "notes": {**old["notes"], **self.notes},
            "args": self.args}
    tmp = self.out_dir / (INFO_FILE + ".tmp")
    tmp.write_text(json.dumps(info, indent=1, default=str))
    os.replace(tmp, self.out_dir / INFO_FILE)
    current = {f for split in info["splits"].values() for f in split["files"]}
    for f in self._replaced:
      if f not in current:
        (self.out_dir / f).unlink(missing_ok=True)
    self.info = info
    return info

  def summary(self) -> dict[str, Any]:
    """What this run wrote and skipped (after close): the CLI's closing report."""
    if self.info is None:
      raise RecordError("summary() is available once the writer is closed")
    return {"out": str(self.out_dir), "source": self.source,
            "splits": {n: self.info["splits"][n] for n in self.splits},
            "skipped": {n: self.skipped.get(n, {}) for n in self.splits},
            "examples_skipped": list(self._first_skips)}

  def __enter__(self) -> "DatasetWriter":
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is None:
      self.close()
    else:  # leave no half-written shards behind and no dataset_info.json
      self._skip_log.close()
      for w in self.splits.values():
        if w._writer is not None:
          w._writer.close()
        for p in w._tmp_paths:
          p.unlink(missing_ok=True)


# --- Reading -------------------------------------------------------------------------------------

def load_info(data_dir: str | os.PathLike) -> dict[str, Any]:
  path = Path(data_dir) / INFO_FILE
  if not path.exists():
    hint = (" (an interrupted preparation: run it again)" if any(Path(data_dir).glob("*.array_record*"))
            else " (prepare one with `python -m bridgejax.prepare ...`)")
    raise RecordError(f"{data_dir} is not a prepared bridgejax dataset: no {INFO_FILE}{hint}")
  info = json.loads(path.read_text())
  if info.get("format") != FORMAT or info.get("version", 0) > VERSION:
    raise RecordError(f"{path}: format {info.get('format')!r} v{info.get('version')} is not "
                      f"{FORMAT} v<={VERSION}; prepare the dataset again with this bridgejax")
  return info


def split_fingerprint(data_dir: str | os.PathLike, name: str) -> str:
  """The identity of split `name`'s records and of its image table's: a hash of every record, kept
  in dataset_info.json when the split was written (for a split written before it was kept, a hash
  of its shard files). Re-preparing a split with other images gives another fingerprint, whatever
  its count; caches built from a split (bridgejax.data.features) record it."""
  info = load_info(data_dir)["splits"]
  digest = hashlib.blake2b(digest_size=16)
  while name:
    split = info[name]
    if split.get("fingerprint"):
      digest.update(split["fingerprint"].encode())
    else:
      for file in split["files"]:
        with open(Path(data_dir) / file, "rb") as f:
          for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    name = split.get("image_table")
  return digest.hexdigest()


class Split:
  """Random access to the records of one split: len(split), split[i] -> dict.

  Records pointing into an image table get their `image` bytes filled in. Picklable (grain's
  worker processes get a copy and reopen the files), and opened lazily.
  """

  def __init__(self, data_dir: str | os.PathLike, name: str):
    self.data_dir = Path(data_dir)
    info = load_info(data_dir)
    if name not in info["splits"]:
      raise RecordError(f"{data_dir} has no split {name!r}; it has {sorted(info['splits'])}")
    self.name, self.info = name, info["splits"][name]
    self.kind = self.info["kind"]
    self.images = Split(data_dir, self.info["image_table"]) if self.info["image_table"] else None
    self._source = None

  def __len__(self) -> int:
    return self.info["num_examples"]

  def _records(self):
    if self._source is None:
      import grain  # lazy: grain (with jax), seconds of the data CLIs' start
      paths = [str(self.data_dir / f) for f in self.info["files"]]
      self._source = grain.sources.ArrayRecordDataSource(paths)
    return self._source

  def __getitem__(self, index: int) -> dict[str, Any]:
    if not -len(self) <= index < len(self):
      raise IndexError(f"record {index} of split {self.name!r} with {len(self)} records")
    record = decode(self._records()[int(index) % len(self)])
    if self.images is not None and "image" not in record:
      record["image"] = self.images[record["image_index"]]["image"]
    return record

  def __iter__(self) -> Iterator[dict[str, Any]]:
    return (self[i] for i in range(len(self)))

  def __getstate__(self):
    return {**self.__dict__, "_source": None}

  def __repr__(self) -> str:
    return f"Split({str(self.data_dir)!r}, {self.name!r}: {self.kind}, {len(self)} records)"


def open_split(data_dir: str | os.PathLike, name: str) -> Split:
  return Split(data_dir, name)
