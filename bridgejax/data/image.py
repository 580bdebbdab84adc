"""CLIP image preprocessing in numpy/PIL, equal to transformers' CLIPImageProcessor.

Shortest side resized to `size` (PIL bicubic), centre crop `size` x `size`, rescale to [0, 1],
normalise with the CLIP mean/std; returns float32 CHW, the layout the vision tower takes.

`resize` chooses the geometry (`config.data.image_resize`):
  "clip"   shortest side to `size`, centre crop (CLIPImageProcessor; FROMAGe's training transform);
  "squash" the whole image to `size` x `size`, aspect ratio not kept, nothing cropped: how the
           thesis's fork fed COCO val2017 images at evaluation.
  "siglip" "squash", normalised with mean = std = 0.5 (SiglipImageProcessor) instead of CLIP's.
"""

from __future__ import annotations

import io
import os
import struct

import numpy as np
from PIL import Image

from bridgejax.config_schema import RESIZES  # declared with data.image_resize
from bridgejax.errors import UserError

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




def clip_preprocess(image: Image.Image | np.ndarray, size: int = 224, resize: str = "clip") -> np.ndarray:
  """One image (PIL, or uint8 HWC array) -> (3, size, size) float32, CLIP-normalised."""
  if isinstance(image, np.ndarray):
    image = Image.fromarray(image)
  if resize == "clip":
    image = center_crop(resize_shortest_side(to_rgb(image), size), size)
  elif resize in ("squash", "siglip"):
    image = to_rgb(image).resize((size, size), resample=Image.Resampling.BICUBIC)
  else:
    raise UserError(f"image resize {resize!r}: use one of {', '.join(RESIZES)} (config.data.image_resize)")
  pixels = np.asarray(image, dtype=np.float32) / 255.0
  if resize == "siglip":
    return ((pixels - 0.5) / 0.5).transpose(2, 0, 1)
  return ((pixels - CLIP_MEAN) / CLIP_STD).transpose(2, 0, 1)


# --- Safe decoding -------------------------------------------------------------------------------
# Web-scraped data (CC3M: about 18% of the links are dead or broken) must never crash a run, so
# every way an image can fail is turned into one catchable error that says which image and why.

class ImageError(UserError):
  """An image cannot be used. `reason` is a short tag for the skip summary, `source` names it."""

  REASONS = ("missing", "empty", "truncated", "corrupt", "too_large", "download_failed")

  def __init__(self, reason: str, source: str, detail: str = ""):
    self.reason, self.source, self.detail = reason, source, detail
    super().__init__(f"{reason} image {source}" + (f": {detail}" if detail else ""))

  def __reduce__(self):  # crosses process boundaries (preparation workers) intact
    return type(self), (self.reason, self.source, self.detail)


def decode_image(data: bytes, source: str = "<bytes>") -> Image.Image:
  """Encoded image bytes -> fully decoded RGB PIL image, or ImageError.

  Decodes every pixel (PIL opens lazily and only notices a truncated file at load time) and
  converts to RGB, so whatever passes here also passes clip_preprocess.
  """
  if not data:
    raise ImageError("empty", source, "0 bytes")
  try:
    image = Image.open(io.BytesIO(data))
    image.load()
    if image.width < 1 or image.height < 1:
      raise ImageError("corrupt", source, f"size {image.width}x{image.height}")
    return to_rgb(image)
  except ImageError:
    raise
  except Image.DecompressionBombError as e:  # > 2x PIL's MAX_IMAGE_PIXELS: a bomb or a broken header
    raise ImageError("too_large", source, str(e)) from e
  except Image.UnidentifiedImageError as e:
    raise ImageError("corrupt", source, "not an image PIL can read") from e
  except (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, TypeError) as e:
    # PIL reports a cut-off file as OSError("image file is truncated ...") or "Truncated File Read".
    reason = "truncated" if "truncated" in str(e).lower() else "corrupt"
    raise ImageError(reason, source, f"{type(e).__name__}: {e}") from e


def read_image_file(path: str | os.PathLike) -> bytes:
  """The bytes of an image file, or ImageError('missing') if it is not there."""
  try:
    with open(path, "rb") as f:
      return f.read()
  except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
    raise ImageError("missing", str(path), "no such file") from e
  except PermissionError as e:
    raise ImageError("missing", str(path), "permission denied") from e
