"""CLIP image preprocessing in numpy/PIL, equal to transformers' CLIPImageProcessor.

Shortest side resized to `size` (PIL bicubic), centre crop `size` x `size`, rescale to [0, 1],
normalise with the CLIP mean/std; returns float32 CHW, the layout the vision tower takes.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


def resize_shortest_side(image: Image.Image, size: int) -> Image.Image:
  width, height = image.size
  short, long = sorted((width, height))
  new_short, new_long = size, int(size * long / short)  # int() truncates, as transformers does
  new_size = (new_short, new_long) if width <= height else (new_long, new_short)
  return image.resize(new_size, resample=Image.Resampling.BICUBIC)


def center_crop(image: Image.Image, size: int) -> Image.Image:
  width, height = image.size
  if width < size or height < size:
    raise ValueError(f"image of {width}x{height} is smaller than the {size}x{size} crop")
  top, left = (height - size) // 2, (width - size) // 2
  return image.crop((left, top, left + size, top + size))


def to_rgb(image: Image.Image) -> Image.Image:
  """RGB, with transparency composited onto white (as transformers' convert_to_rgb does)."""
  if image.mode == "RGB":
    return image
  white = Image.new("RGBA", image.size, (255, 255, 255))
  return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")


def clip_preprocess(image: Image.Image | np.ndarray, size: int = 224) -> np.ndarray:
  """One image (PIL, or uint8 HWC array) -> (3, size, size) float32, CLIP-normalised."""
  if isinstance(image, np.ndarray):
    image = Image.fromarray(image)
  image = center_crop(resize_shortest_side(to_rgb(image), size), size)
  pixels = np.asarray(image, dtype=np.float32) / 255.0
  return ((pixels - CLIP_MEAN) / CLIP_STD).transpose(2, 0, 1)
