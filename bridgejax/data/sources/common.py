"""What every source shares: images that are loaded (and checked) later, in worker processes,
the loop that writes examples and counts the ones whose image is unusable, reading a source's
JSON file, and reading a text data file line by line (text_lines: a line that is not UTF-8 is one
bad row, not the end of the run; a byte-order mark is not part of the first line)."""

from __future__ import annotations

import dataclasses
import io
import json
import multiprocessing
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from bridgejax.data.image import ImageError, decode_image, read_image_file, resize_shortest_side
from bridgejax.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")


@dataclasses.dataclass(frozen=True)
class ImageSource:
  """Where an example's image comes from: a file, bytes in hand, or a known failure."""
  name: str                      # for messages and skipped.jsonl
  path: str | None = None
  data: bytes | None = None
  error: tuple[str, str] | None = None  # (reason, detail), e.g. img2dataset's failed download


def load_image(src: ImageSource, max_size: int | None = None) -> bytes:
  """The image's encoded bytes after a full decode check, or ImageError.

  With `max_size`, an image whose shorter side exceeds it is re-encoded (JPEG, quality 95) with
  the shorter side resized to max_size: CLIP's 224 transform then gives nearly the same pixels
  and a dataset of original-size downloads shrinks tenfold.
  """
  if src.error is not None:
    raise ImageError(src.error[0], src.name, src.error[1])
  data = src.data if src.data is not None else read_image_file(src.path)
  image = decode_image(data, src.name)
  if max_size is not None and min(image.size) > max_size:
    out = io.BytesIO()
    resize_shortest_side(image, max_size).save(out, "JPEG", quality=95)
    data = out.getvalue()
  return data


def _load(item: tuple[Any, ImageSource, int | None]) -> tuple[Any, bytes | ImageError]:
  key, src, max_size = item
  try:
    return key, load_image(src, max_size)
  except ImageError as e:
    return key, e


class ImageLoader:
  """Loads ImageSources in order, in `workers` processes (0: in this process)."""

  def __init__(self, workers: int = 0, max_size: int | None = None):
    self.workers, self.max_size = workers, max_size
    self._pool = None

  def map(self, items: Iterable[tuple[Any, ImageSource]]) -> Iterator[tuple[Any, bytes | ImageError]]:
    """(key, source) -> (key, bytes or the ImageError), in input order."""
    items = ((key, src, self.max_size) for key, src in items)
    if self.workers <= 0:
      return map(_load, items)
    if self._pool is None:  # spawn: safe whatever the parent has imported (jax, threads)
      self._pool = multiprocessing.get_context("spawn").Pool(self.workers)
    return self._pool.imap(_load, items, chunksize=8)

  def close(self, abort: bool = False) -> None:
    if self._pool is not None:
      self._pool.terminate() if abort else self._pool.close()  # abort: Ctrl-C, a failed write
      self._pool.join()
      self._pool = None

  def __enter__(self) -> "ImageLoader":
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    self.close(abort=exc_type is not None)


def write_examples(writer, loader: ImageLoader, examples: Iterable[dict[str, Any]],
                   on_example: Callable[[], None] = lambda: None) -> int:
  """Write examples whose "image" is an ImageSource into `writer` (a SplitWriter) with the
  bytes filled in; an unusable image is skipped and counted. Returns the number written."""
  pending = ((ex, ex.pop("image")) for ex in examples)
  written = 0
  for ex, image in _loaded(writer, loader, pending, on_example):
    writer.write({**ex, "image": image})
    written += 1
  return written


def write_image_table(table, loader: ImageLoader, images: Iterable[tuple[Any, ImageSource]],
                      on_image: Callable[[], None] = lambda: None) -> dict[Any, int]:
  """Write images {id, image} into an image-table split; returns id -> index of those that load."""
  return {key: table.write({"id": str(key), "image": image}) for key, image in _loaded(table, loader, images, on_image)}


def _loaded(split, loader: ImageLoader, items: Iterable[tuple[Any, ImageSource]], on_item: Callable[[], None]):
  """(key, image bytes) of the items whose image loads, in order; an unusable one is recorded as
  skipped in `split` (its writer) instead. on_item() is called once per item either way."""
  for key, result in loader.map(items):
    on_item()
    if isinstance(result, ImageError):
      split.skip(result.reason, result.source, result.detail)
    else:
      yield key, result


def text_lines(path: str | os.PathLike) -> Iterator[tuple[int, str | None, str]]:
  """(line number from 1, the line's text with its line ending, "") for each line of a UTF-8 text
  file, or (line number, None, why) for a line that is not UTF-8, so that the caller skips that one
  row and goes on. A UTF-8 byte-order mark at the start is dropped (utf-8-sig), as spreadsheet
  programs write one before the first column's name. Lines end at \\n, \\r\\n or a lone \\r (old Mac
  files), as text mode reads them."""
  number = 0
  with open(path, "rb") as f:
    for chunk in f:
      if number == 0 and chunk.startswith(b"\xef\xbb\xbf"):
        chunk = chunk[3:]
      for raw in _LONE_CR.split(chunk) if b"\r" in chunk else [chunk]:
        if not raw:
          continue
        number += 1
        try:
          yield number, raw.decode("utf-8"), ""
        except UnicodeDecodeError as e:
          yield number, None, (f"not UTF-8 text (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line); "
                               "save the file as UTF-8")


_LONE_CR = re.compile(rb"(?<=\r)(?!\n)")  # after a \r that no \n follows: a line ends there too


def load_json(path: str | os.PathLike, key: str, what: str) -> dict[str, Any]:
  """A source's JSON file, a dict with a top-level `key`; else one clear error naming the file."""
  with open(path, encoding="utf-8") as f:
    data = json.load(f)
  if not isinstance(data, dict) or key not in data:
    raise UserError(f"{path} is not a {what} file: no top-level {key!r} list")
  return data


def index_images(*roots: str | os.PathLike, recursive: bool = True) -> dict[int, str]:
  """Image files under `roots`, keyed by the last number in their name.

  COCO (COCO_val2014_000000391895.jpg, 000000391895.jpg) and VisDial
  (VisualDialog_val2018_000000254080.jpg) both end their file names with the image id.
  """
  index: dict[int, str] = {}
  for root in roots:
    root = Path(root)
    if not root.is_dir():
      raise FileNotFoundError(f"image folder {root} does not exist; pass the folder that holds "
                              "the images (e.g. --images .../val2014)")
    walker = os.walk(root) if recursive else [(str(root), [], os.listdir(root))]
    for dirpath, _, files in walker:
      for f in files:
        stem, ext = os.path.splitext(f)
        numbers = re.findall(r"\d+", stem)
        if ext.lower() in IMAGE_EXTENSIONS and numbers:
          index.setdefault(int(numbers[-1]), os.path.join(dirpath, f))
  return index


def image_source(index: dict[int, str], image_id: int, what: str) -> ImageSource:
  path = index.get(image_id)
  if path is None:
    return ImageSource(f"{what} image {image_id}", error=("missing", "not found in the image folders"))
  return ImageSource(path, path=path)


def json_kind(value: Any) -> str:
  """How a JSON value reads in a message: 'null', 'a number', 'a JSON object', ..."""
  if value is None:
    return "null"
  if isinstance(value, bool):
    return "true/false"
  if isinstance(value, (int, float)):
    return "a number"
  if isinstance(value, dict):
    return "a JSON object"
  if isinstance(value, list):
    return "a list"
  return f"a {type(value).__name__}"


def image_path(root: str | os.PathLike, value: Any, name: str, *, allow_outside_base: bool = False) -> ImageSource:
  """The image at `value`, a path from a data file relative to `root` (the base folder).

  A path that leaves the base folder (../../etc/x.jpg, or an absolute path elsewhere) is refused
  (an `outside_base` skip) unless allow_outside_base: a data file from elsewhere must not make
  preparation read, and copy into the dataset, any file the user can read. The check is on the
  path as written (symlinked folders inside the base are fine).
  """
  if not isinstance(value, str) or not value.strip():
    return ImageSource(name, error=("bad_row", f"the image path is {json_kind(value) if value != '' else 'empty'}, "
                                               "not a path string"))
  path = os.path.normpath(os.path.join(root, value))
  if not allow_outside_base:
    base = os.path.abspath(root)
    if os.path.commonpath([base, os.path.abspath(path)]) != base:
      return ImageSource(name, error=("outside_base", f"{value!r} is outside the base folder {root} "
                                                      "(pass --allow-outside-base to read it)"))
  return ImageSource(path, path=path)


def split_name(name: str) -> str:
  """'val2014' -> 'val', 'test-dev2015' -> 'test-dev', 'val2018' -> 'val'."""
  return re.sub(r"\d+$", "", name) or name
