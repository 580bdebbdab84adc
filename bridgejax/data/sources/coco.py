"""COCO captions as image_text examples: one record per image with all its captions (5, some 6-7),
so captioning references and the multi-caption retrieval rule read straight from the record.

- Karpathy split, `dataset_coco.json` (also dataset_flickr30k.json / dataset_flickr8k.json):
  {"images": [{"filepath": "val2014", "filename": "COCO_val2014_000000391895.jpg", "cocoid": 391895,
  "imgid", "split": "train"|"val"|"test"|"restval", "sentences": [{"raw", "tokens", ...}]}]};
  images at IMAGES/filepath/filename. "restval" joins "train" (the usual 113,287-image train
  split) unless asked not to.
- The official captions file, `captions_val2017.json`: {"images": [{"id", "file_name"}],
  "annotations": [{"image_id", "caption"}]}; images at IMAGES/file_name.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

from bridgejax.data.sources.common import ImageSource, image_path, load_json, split_name
from bridgejax.errors import UserError


def load(src: str | os.PathLike) -> dict[str, Any]:
  return load_json(src, "images", "COCO captions")


def is_karpathy(data: dict[str, Any]) -> bool:
  return bool(data["images"]) and "sentences" in data["images"][0]


def karpathy_examples(data: dict[str, Any], images: str | os.PathLike, *, restval_into_train: bool = True,
                      allow_outside_base: bool = False) -> dict[str, Iterator[dict[str, Any]]]:
  """{split: examples} for the Karpathy splits present (train, val, test; restval if kept apart)."""
  images = Path(images)
  by_split: dict[str, list[dict]] = {}
  for img in data["images"]:
    split = img.get("split", "train")
    if split == "restval" and restval_into_train:
      split = "train"
    by_split.setdefault(split, []).append(img)

  def gen(entries):
    for img in entries:
      image_id = img.get("cocoid", img.get("imgid"))
      path = os.path.join(img.get("filepath", ""), img["filename"])
      meta = {"image_id": image_id, "filename": img["filename"], "karpathy_split": img.get("split")}
      yield {"id": str(image_id if image_id is not None else img["filename"]),
             "image": image_path(images, path, path, allow_outside_base=allow_outside_base),
             "captions": [s["raw"].strip() for s in img["sentences"]], "meta": meta}
  return {split: gen(entries) for split, entries in by_split.items()}


def captions_examples(data: dict[str, Any], images: str | os.PathLike, *,
                      allow_outside_base: bool = False) -> Iterator[dict[str, Any]]:
  """Examples from the official captions_*.json, in the file's image order."""
  images = Path(images)
  captions: dict[int, list[str]] = {}
  for ann in data.get("annotations", []):
    captions.setdefault(ann["image_id"], []).append(ann["caption"].strip())
  for img in data["images"]:
    caps = captions.get(img["id"], [])
    src = (image_path(images, img["file_name"], img["file_name"], allow_outside_base=allow_outside_base) if caps else
           ImageSource(str(images / img["file_name"]), error=("no_caption", "image without caption annotations")))
    yield {"id": str(img["id"]), "image": src, "captions": caps or [""],
           "meta": {"image_id": img["id"], "filename": img["file_name"]}}


def examples(src: str | os.PathLike, images: str | os.PathLike | None = None, *,
             split: str | None = None, restval_into_train: bool = True,
             allow_outside_base: bool = False) -> dict[str, Iterator[dict[str, Any]]]:
  """{split: examples} from either format. `images` defaults to the JSON file's folder; image
  paths must stay inside it unless allow_outside_base."""
  data = load(src)
  images = images if images is not None else Path(src).parent
  if is_karpathy(data):
    splits = karpathy_examples(data, images, restval_into_train=restval_into_train,
                               allow_outside_base=allow_outside_base)
    if split and split not in splits:
      raise UserError(f"{src} has no Karpathy split {split!r}; it has {sorted(splits)}")
    return {split: splits[split]} if split else splits
  # captions_val2017.json -> "val"; the name can be overridden with --split.
  name = split or split_name(Path(src).stem.removeprefix("captions_"))
  return {name: captions_examples(data, images, allow_outside_base=allow_outside_base)}
