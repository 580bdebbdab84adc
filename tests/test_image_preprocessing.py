"""CLIP preprocessing equals transformers' CLIPImageProcessor (the PIL backend)."""

import numpy as np
import pytest
from PIL import Image
from transformers import CLIPImageProcessor

from bridgejax.data.image import clip_preprocess

# Measured: exactly equal (max abs difference 0.0) on every case below.
BOUND = 1e-6


@pytest.mark.parametrize("size", [224, 48])
@pytest.mark.parametrize("height,width,mode", [(300, 451, "RGB"), (451, 300, "RGB"), (224, 224, "RGB"),
                                                 (231, 1000, "RGB"), (257, 263, "RGBA"), (300, 260, "L")])
def test_equals_clip_image_processor(size, height, width, mode):
  rng = np.random.default_rng(height * width)
  channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
  pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
  image = Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode)
  processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
  reference = processor(images=image, return_tensors="np")["pixel_values"][0]
  ours = clip_preprocess(image, size)
  assert ours.shape == reference.shape == (3, size, size)
  assert ours.dtype == np.float32
  assert np.abs(ours - reference).max() <= BOUND


def test_uint8_array_input_matches_pil_input():
  pixels = np.random.default_rng(0).integers(0, 256, (100, 80, 3), dtype=np.uint8)
  np.testing.assert_array_equal(clip_preprocess(pixels, 64), clip_preprocess(Image.fromarray(pixels), 64))


@pytest.mark.parametrize("height,width,mode", [(300, 451, "RGB"), (451, 300, "RGBA"), (231, 1000, "L")])
def test_squash_equals_clip_image_processor_without_crop(height, width, mode):
  """data.image_resize="squash" (the thesis fork's COCO eval): the whole image to size x size,
  as CLIPImageProcessor does with a height/width size and the centre crop turned off."""
  rng = np.random.default_rng(height + width)
  channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
  pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
  image = Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode)
  processor = CLIPImageProcessor(size={"height": 64, "width": 64}, do_center_crop=False)
  reference = processor(images=image, return_tensors="np")["pixel_values"][0]
  ours = clip_preprocess(image, 64, resize="squash")
  assert ours.shape == reference.shape == (3, 64, 64)
  assert np.abs(ours - reference).max() <= BOUND


def test_unknown_resize_is_a_clear_error():
  with pytest.raises(ValueError, match="use one of clip, squash"):
    clip_preprocess(np.zeros((8, 8, 3), np.uint8), 4, resize="crop")
