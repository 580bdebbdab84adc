"""Users' own image-caption data: JSONL lines or CSV/TSV rows with an image path and a caption.

    {"image": "photos/cat.jpg", "caption": "a cat on a sofa"}
    {"image": "photos/dog.png", "captions": ["a dog", "a brown dog running"], "id": "dog-1"}

CSV/TSV need a header naming the columns: image (or file, path, filepath) and caption (or text).
Relative image paths are taken from --images, else from the data file's folder (the base folder);
a path outside it is refused unless allow_outside_base (--allow-outside-base).

A bad row is skipped, counted and listed in skipped.jsonl with the reason, never stopping the
run: not JSON or not an object (`bad_row`), an image or caption of the wrong type (a number, a
JSON object, a list where a string belongs, null, a null or non-string inside a caption list:
`bad_row`), no caption (`no_caption`), an image path outside the base folder (`outside_base`).
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any, Iterator

from bridgejax.data.sources.common import ImageSource, image_path, json_kind

_IMAGE_FIELDS = ("image", "file", "path", "filepath", "file_name", "filename", "image_path")
_CAPTION_FIELDS = ("caption", "text", "captions")


def _rows(src: Path) -> Iterator[tuple[int, dict[str, Any] | str]]:
  """(line number, row dict), or (line number, error message) for an unreadable line."""
  with open(src, newline="", encoding="utf-8") as f:
    if src.suffix in (".csv", ".tsv"):
      reader = csv.DictReader(f, delimiter="\t" if src.suffix == ".tsv" else ",")
      if not reader.fieldnames:
        return
      missing = [kind for kind, names in (("image", _IMAGE_FIELDS), ("caption", _CAPTION_FIELDS))
                 if not set(n.strip().lower() for n in reader.fieldnames) & set(names)]
      if missing:
        raise ValueError(f"{src}: the header {reader.fieldnames} names no {' and no '.join(missing)} "
                         f"column; name them e.g. 'image' and 'caption'")
      for i, row in enumerate(reader, start=2):  # a short row's missing cells are None: empty
        yield i, {k.strip().lower(): v if v is not None else "" for k, v in row.items() if k is not None}
      return
    for i, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
        yield i, row if isinstance(row, dict) else f"line is a JSON {type(row).__name__}, not an object"
      except ValueError as e:
        yield i, f"not JSON ({e})"


def _first(row: dict[str, Any], names: tuple[str, ...]) -> tuple[str | None, Any]:
  """(field, value) of the first of `names` in the row with a value other than ""."""
  return next(((k, row[k]) for k in names if k in row and row[k] != ""), (None, None))


def _captions(field: str, value: Any) -> list[str] | str:
  """The row's captions, stripped and non-empty, or why they are unusable."""
  if isinstance(value, str):
    return [value.strip()] if value.strip() else []
  if not isinstance(value, list):
    return f"{field} is {json_kind(value)}, not a string or a list of strings"
  for i, c in enumerate(value):
    if not isinstance(c, str):
      return f"{field}[{i}] is {json_kind(c)}, not a string"
  return [c.strip() for c in value if c.strip()]


def examples(src: str | os.PathLike, images: str | os.PathLike | None = None, *,
             allow_outside_base: bool = False) -> Iterator[dict[str, Any]]:
  src = Path(src)
  if not src.exists():
    raise FileNotFoundError(f"{src} does not exist")
  root = Path(images) if images is not None else src.parent

  def bad(line: int, name: str, reason: str, detail: str) -> dict[str, Any]:
    return {"id": str(line), "image": ImageSource(name, error=(reason, detail)), "captions": [""], "meta": {}}

  for line, row in _rows(src):
    name = f"{src.name}:{line}"
    if isinstance(row, str):
      yield bad(line, name, "bad_row", row)
      continue
    image_field, image = _first(row, _IMAGE_FIELDS)
    caption_field, value = _first(row, _CAPTION_FIELDS)
    ident = row.get("id", line)
    if image_field is None:
      yield bad(line, name, "bad_row", f"no image field (one of {', '.join(_IMAGE_FIELDS)})")
      continue
    if ident is not None and (isinstance(ident, bool) or not isinstance(ident, (str, int))):
      yield bad(line, name, "bad_row", f"id is {json_kind(ident)}, not a string or an integer")
      continue
    captions = _captions(caption_field, value) if caption_field else []
    if isinstance(captions, str):
      yield bad(line, name, "bad_row", captions)
      continue
    if not captions:
      yield bad(line, name, "no_caption", "empty or absent caption")
      continue
    src_img = image_path(root, image, name, allow_outside_base=allow_outside_base)
    meta = {k: v for k, v in row.items() if k not in _IMAGE_FIELDS + _CAPTION_FIELDS + ("id",)
            and isinstance(v, (str, int, float, bool))}
    yield {"id": str(line if ident is None else ident), "image": src_img, "captions": captions,
           "meta": {"image": image if isinstance(image, str) else "", **meta}}
