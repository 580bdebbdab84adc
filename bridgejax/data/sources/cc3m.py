"""Conceptual Captions (CC3M) as users have it, as image_text examples (one caption each).

- img2dataset webdataset output: `{shard}.tar` holding `{key}.jpg`, `{key}.txt` (the caption)
  and `{key}.json` ({"caption", "url", "key", "status", ...}); the `{shard}.parquet` that
  img2dataset writes next to each tar lists every row, including failed downloads, which are
  counted as `download_failed`.
- img2dataset "files" output: `{shard}.parquet` plus a `{shard}/` folder of `{key}.jpg/.txt/.json`;
  or "parquet" output, whose parquet has the image bytes in a `jpg` column.
- The original TSV (caption <TAB> url, no header) and a folder of downloaded images whose file
  names carry the TSV row number (0-based, img2dataset's key with default settings: 000001234.jpg);
  or a TSV with a header naming `caption` and `image` columns (FROMAGe's cc3m_train.tsv), image
  paths relative to the image folder.
"""

from __future__ import annotations

import csv
import json
import os
import tarfile
from pathlib import Path
from typing import Any, Iterator

import pyarrow.parquet as pq

from bridgejax.data.sources.common import (IMAGE_EXTENSIONS, ImageSource, image_path, index_images, json_kind,
                                           text_lines)
from bridgejax.errors import UserError

_IMAGE_KEYS = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)
_PATH_COLUMNS = ("image", "filepath", "file", "filename", "path", "image_path")


def examples(src: str | os.PathLike, images: str | os.PathLike | None = None, *,
             allow_outside_base: bool = False) -> Iterator[dict[str, Any]]:
  """Examples from any of the layouts above; `src` is a folder of shards, one shard, or a TSV.
  A TSV's image paths must stay inside `images` unless allow_outside_base."""
  src = Path(src)
  if src.is_file() and src.suffix in (".tsv", ".csv", ".txt"):
    yield from tsv_examples(src, images, allow_outside_base=allow_outside_base)
  elif src.is_file() and src.suffix == ".tar":
    yield from webdataset_examples([src])
  elif src.is_file() and src.suffix == ".parquet":
    yield from parquet_examples([src])
  elif src.is_dir():
    tars, parquets = sorted(src.rglob("*.tar")), sorted(src.rglob("*.parquet"))
    if tars:
      yield from webdataset_examples(tars)
    elif parquets:
      yield from parquet_examples(parquets)
    else:
      raise FileNotFoundError(f"{src} holds neither img2dataset .tar shards nor .parquet files; "
                              "pass the img2dataset output folder, or the CC3M .tsv with --images")
  else:
    raise FileNotFoundError(f"CC3M source {src} is not an img2dataset folder, .tar, .parquet or .tsv")


def _example(key: str, image: ImageSource, caption: str | None, meta: dict) -> dict[str, Any]:
  if caption is not None and not isinstance(caption, str):  # e.g. a number in a parquet column
    image = ImageSource(image.name, error=("bad_row", f"the caption is {json_kind(caption)}, not a string"))
    return {"id": key, "image": image, "captions": [""], "meta": meta}
  caption = (caption or "").strip()
  if not caption:
    image = ImageSource(image.name, error=("no_caption", "empty or absent caption"))
  return {"id": key, "image": image, "captions": [caption], "meta": meta}


# --- webdataset ----------------------------------------------------------------------------------

def _tar_samples(path: Path) -> Iterator[tuple[str, dict[str, bytes]] | Exception]:
  """(key, {extension: bytes}) per sample, grouping consecutive members by key (webdataset's rule:
  the key is the member path up to the first dot of its basename). A damaged tar ends the shard
  with the exception as the last item instead of raising."""
  current, files = None, {}
  try:
    with tarfile.open(path, "r|*") as tar:  # streaming: shards are read once, front to back
      for member in tar:
        if not member.isfile():
          continue
        folder, base = os.path.split(member.name)
        stem, _, ext = base.partition(".")
        key = os.path.join(folder, stem)
        if key != current and current is not None:
          yield current, files
          files = {}
        current = key
        files[ext.lower()] = tar.extractfile(member).read()
  except (tarfile.TarError, EOFError, OSError, ValueError) as e:
    if current is not None:
      yield current, files
    yield e
    return
  if current is not None:
    yield current, files


def _failed_downloads(parquet: Path) -> Iterator[dict[str, Any]]:
  """Rows img2dataset could not download (they are in its parquet, never in the tar)."""
  table = pq.read_table(parquet)
  names = set(table.column_names)
  if "status" not in names:
    return
  for row in table.select([c for c in ("key", "url", "status", "error_message") if c in names]).to_pylist():
    if row["status"] != "success":
      key = str(row.get("key", ""))
      yield _example(key, ImageSource(f"{parquet.name}:{key} {row.get('url', '')}",
                                      error=("download_failed", str(row.get("error_message") or row["status"]))),
                     "failed", {"url": row.get("url")})


def webdataset_examples(tars: list[Path]) -> Iterator[dict[str, Any]]:
  for tar in tars:
    for item in _tar_samples(tar):
      if isinstance(item, Exception):
        yield _example(f"{tar.name}:end", ImageSource(str(tar), error=(
            "corrupt", f"tar shard ends early ({type(item).__name__}: {item}); its remaining "
            "samples are lost")), "lost", {})
        continue
      key, files = item
      meta = {}
      if "json" in files:
        try:
          meta = json.loads(files["json"])
        except ValueError:
          meta = {}
      caption = files.get("txt", b"").decode("utf-8", "replace").strip() or meta.get("caption")
      name = f"{tar.name}:{key}"
      image_ext = next((e for e in _IMAGE_KEYS if e in files), None)
      if meta.get("status", "success") != "success":
        image = ImageSource(name, error=("download_failed", str(meta.get("error_message") or meta["status"])))
      elif image_ext is None:
        image = ImageSource(name, error=("missing", "no image file in the shard for this key"))
      else:
        image = ImageSource(name, data=files[image_ext])
      yield _example(str(meta.get("key") or os.path.basename(key)), image, caption,
                     {"url": meta.get("url"), "shard": tar.name})
    parquet = tar.with_suffix(".parquet")
    if parquet.exists():
      yield from _failed_downloads(parquet)


# --- parquet (+ folders) -------------------------------------------------------------------------

def parquet_examples(parquets: list[Path]) -> Iterator[dict[str, Any]]:
  for parquet in parquets:
    folder = parquet.with_suffix("")  # img2dataset "files": 00000.parquet next to 00000/
    listing = {f: None for f in os.listdir(folder)} if folder.is_dir() else {}
    for batch in pq.ParquetFile(parquet).iter_batches(batch_size=1024):
      for row in batch.to_pylist():
        key = str(row.get("key", ""))
        name = f"{parquet.name}:{key}"
        if row.get("status", "success") != "success":
          image = ImageSource(name, error=("download_failed", str(row.get("error_message") or row["status"])))
        elif row.get("jpg") is not None:
          image = ImageSource(name, data=row["jpg"])
        else:
          found = next((f"{key}{e}" for e in IMAGE_EXTENSIONS if f"{key}{e}" in listing), None)
          image = (ImageSource(str(folder / found), path=str(folder / found)) if found else
                   ImageSource(str(folder / f"{key}.jpg"), error=("missing", "no such file")))
        caption = row.get("caption")
        if caption is None and f"{key}.txt" in listing:
          caption = (folder / f"{key}.txt").read_text("utf-8", "replace")
        yield _example(key, image, caption, {"url": row.get("url")})


# --- TSV -----------------------------------------------------------------------------------------

def tsv_examples(tsv: Path, images: str | os.PathLike | None, *,
                 allow_outside_base: bool = False) -> Iterator[dict[str, Any]]:
  if images is None:
    raise UserError(f"{tsv}: a CC3M TSV needs the folder of downloaded images (--images DIR)")
  images = Path(images)
  lines = text_lines(tsv)  # a line that is not UTF-8 is one bad row; a byte-order mark is dropped
  rows = ((n, why if text is None else _cells(text)) for n, text, why in lines)
  first = next(rows, None)
  if first is None:
    return
  header = [c.strip().lower() for c in first[1]] if isinstance(first[1], list) else []
  path_col = next((header.index(c) for c in _PATH_COLUMNS if c in header), None)
  if "caption" in header and path_col is not None:  # FROMAGe's format: caption <TAB> image
    cap_col = header.index("caption")
    for line, row in rows:
      if isinstance(row, str):
        yield _bad_line(tsv, line, row)
        continue
      if len(row) <= max(cap_col, path_col):
        continue
      image = image_path(images, row[path_col], f"{tsv.name}:{line}", allow_outside_base=allow_outside_base)
      yield _example(row[path_col], image, row[cap_col], {})
    return
  # The original Google TSV: caption <TAB> url, no header; images named by row number.
  index = index_images(images)
  data_rows = rows if "caption" in header else _chain([first], rows)
  for i, (line, row) in enumerate(data_rows):
    if isinstance(row, str):
      yield _bad_line(tsv, line, row, key=str(i))
      continue
    caption, url = (row + ["", ""])[:2]
    path = index.get(i)
    image = (ImageSource(path, path=path) if path else
             ImageSource(f"row {i} ({url})", error=("missing", f"no image numbered {i} in {images}")))
    yield _example(str(i), image, caption, {"url": url})


def _cells(line: str) -> list[str] | str:
  try:
    return next(csv.reader([line], delimiter="\t", quoting=csv.QUOTE_NONE), [])
  except csv.Error as e:  # a NUL byte
    return f"not a TSV row ({e})"


def _bad_line(tsv: Path, line: int, why: str, key: str | None = None) -> dict[str, Any]:
  name = f"{tsv.name}:{line}"
  return {"id": key or name, "image": ImageSource(name, error=("bad_row", why)), "captions": [""], "meta": {}}


def _chain(*iterables):
  for it in iterables:
    yield from it
