"""Users' own image-caption data: JSONL lines or CSV/TSV rows with an image path and a caption.

    {"image": "photos/cat.jpg", "caption": "a cat on a sofa"}
    {"image": "photos/dog.png", "captions": ["a dog", "a brown dog running"], "id": "dog-1"}

CSV/TSV need a header naming the columns: image (or file, path, filepath) and caption (or text).
Relative image paths are taken from --images, else from the data file's folder (the base folder);
a path outside it is refused unless allow_outside_base (--allow-outside-base).

A bad row is skipped, counted and listed in skipped.jsonl (as FILE:LINE) with the reason, never
stopping the run: a line that is not UTF-8, not JSON or not an object (`bad_row`), a CSV/TSV line
with a quote left open (`bad_row`: a row is one line, so it never swallows the rows after it), an
image or caption of the wrong type (a number, a JSON object, a list where a string belongs, null,
a null or non-string inside a caption list: `bad_row`), no caption (`no_caption`), an image path
outside the base folder (`outside_base`). A UTF-8 byte-order mark before the first line is ignored.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any, Iterator

from bridgejax.data.sources.common import ImageSource, image_path, json_kind, text_lines
from bridgejax.errors import UserError

_IMAGE_FIELDS = ("image", "file", "path", "filepath", "file_name", "filename", "image_path")
_CAPTION_FIELDS = ("caption", "text", "captions")


def _rows(src: Path) -> Iterator[tuple[int, dict[str, Any] | str]]:
  """(line number, row dict), or (line number, why) for a line that is not a usable row."""
  lines = text_lines(src)
  if src.suffix in (".csv", ".tsv"):
    yield from _table_rows(src, lines, "\t" if src.suffix == ".tsv" else ",")
    return
  for i, line, why in lines:
    if line is None:
      yield i, why
    elif line.strip():
      try:
        row = json.loads(line)
        yield i, row if isinstance(row, dict) else f"line is a JSON {type(row).__name__}, not an object"
      except ValueError as e:
        yield i, f"not JSON ({e})"


def _table_rows(src: Path, lines, delimiter: str) -> Iterator[tuple[int, dict[str, Any] | str]]:
  """A CSV/TSV's rows as dicts keyed by the header's names (stripped, lower case): a short row's
  missing cells are "", cells past the header are dropped, blank lines are skipped."""
  header = None
  for i, line, why in lines:
    cells = why if line is None else _cells(line, delimiter)
    if header is None:
      if isinstance(cells, str):
        raise UserError(f"{src}:{i}: cannot read the header line: {cells}")
      if not cells:
        continue
      header = [c.strip().lower() for c in cells]
      missing = [kind for kind, names in (("image", _IMAGE_FIELDS), ("caption", _CAPTION_FIELDS))
                 if not set(header) & set(names)]
      if missing:
        raise UserError(f"{src}: the header {cells} names no {' and no '.join(missing)} "
                         f"column; name them e.g. 'image' and 'caption'")
    elif isinstance(cells, str):
      yield i, cells
    elif cells:
      yield i, {**dict.fromkeys(header, ""), **dict(zip(header, cells))}


def _cells(line: str, delimiter: str) -> list[str] | str:
  """One line's cells, or why csv cannot read them. A row is one line: a quote still open at the
  line's end is this row's error (csv's reader would read on into the next rows and merge them)."""
  try:
    return next(csv.reader([line], delimiter=delimiter, strict=True), [])
  except csv.Error as e:
    if "unexpected end of data" in str(e):
      return "a quoted field is not closed on this line (a row is one line): close it, and write a quote inside one as \"\""
    return f"not a {'TSV' if delimiter == chr(9) else 'CSV'} row ({e})"


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
