"""Users' own image-caption data: JSONL lines or CSV/TSV rows with an image path and a caption.

    {"image": "photos/cat.jpg", "caption": "a cat on a sofa"}
    {"image": "photos/dog.png", "captions": ["a dog", "a brown dog running"], "id": "dog-1"}

CSV/TSV need a header naming the columns: image (or file, path, filepath) and caption (or text).
Relative image paths are taken from --images, else from the data file's folder.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any, Iterator

from bridgejax.data.sources.common import ImageSource

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
      for i, row in enumerate(reader, start=2):
        yield i, {k.strip().lower(): v for k, v in row.items() if k is not None}
      return
    for i, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
        yield i, row if isinstance(row, dict) else f"line is a JSON {type(row).__name__}, not an object"
      except ValueError as e:
        yield i, f"not JSON ({e})"


def examples(src: str | os.PathLike, images: str | os.PathLike | None = None) -> Iterator[dict[str, Any]]:
  src = Path(src)
  if not src.exists():
    raise FileNotFoundError(f"{src} does not exist")
  root = Path(images) if images is not None else src.parent
  for line, row in _rows(src):
    name = f"{src.name}:{line}"
    if isinstance(row, str):
      yield {"id": str(line), "image": ImageSource(name, error=("bad_row", row)), "captions": [""], "meta": {}}
      continue
    image = next((row[k] for k in _IMAGE_FIELDS if row.get(k)), None)
    captions = next((row[k] for k in _CAPTION_FIELDS if row.get(k)), None)
    captions = [captions] if isinstance(captions, str) else [str(c) for c in captions or []]
    captions = [c.strip() for c in captions if str(c).strip()]
    if image is None:
      src_img = ImageSource(name, error=("bad_row", "no image field"))
    elif not captions:
      src_img = ImageSource(name, error=("no_caption", "empty or absent caption"))
    else:
      path = root / image
      src_img = ImageSource(str(path), path=str(path))
    meta = {k: v for k, v in row.items() if k not in _IMAGE_FIELDS + _CAPTION_FIELDS + ("id",)
            and isinstance(v, (str, int, float, bool))}
    yield {"id": str(row.get("id", line)), "image": src_img, "captions": captions or [""],
           "meta": {"image": image, **meta}}
