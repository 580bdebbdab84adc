"""Convert a CLIP checkpoint and extract image features, end to end.

    python examples/clip_features.py [--hf DIR]

Without --hf it makes a tiny random CLIPVisionModel with transformers (nothing is downloaded), so
the whole path (HF directory -> convert CLI -> load -> features) runs on any machine.
"""

import argparse
import os
import tempfile

import numpy as np
from PIL import Image

from bridgejax import weights
from bridgejax.data.image import clip_preprocess
from bridgejax.weights.convert import convert


def tiny_random_clip(path: str) -> str:
  import transformers  # the test extra: only used to make a checkpoint to convert
  config = transformers.CLIPVisionConfig(image_size=56, patch_size=7, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4)
  transformers.CLIPVisionModel(config).save_pretrained(path)
  return path


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--hf", help="a Hugging Face CLIP directory (default: a tiny random one)")
  args = parser.parse_args()
  work = tempfile.mkdtemp(prefix="bridgejax_clip_")
  hf = args.hf or tiny_random_clip(os.path.join(work, "hf"))
  out = os.path.join(work, "converted")
  convert(hf, out)
  vision = weights.load_vision_tower(out)
  c = vision.config
  print(f"converted {hf} -> {out}: {c.num_layers} layers, width {c.hidden_size}, {c.num_tokens} tokens per image")

  rng = np.random.default_rng(0)
  image = Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8))
  pixels = clip_preprocess(image, c.image_size)[None]
  result = vision(pixels)
  print(f"hidden_states: {len(result.hidden_states)} x {tuple(result.hidden_states[0].shape)}")
  print(f"pooler_output: {tuple(result.pooler_output.shape)}, first values "
        f"{np.round(np.asarray(result.pooler_output[0, :4]), 4).tolist()}")


if __name__ == "__main__":
  main()
