"""Convert a Hugging Face checkpoint into bridgejax's converted format (an Orbax checkpoint).

    python -m bridgejax.weights.convert --hf /path/to/clip-vit-large-patch14 --out /path/to/clip-l14
    python -m bridgejax.weights.convert --hf DIR --out DIR --dtype bfloat16
    python -m bridgejax.weights.convert --hf gemma-3-270m.gguf --out DIR    # GGUF: dequantised

The family is detected from config.json (or a .gguf file); the output loads with the same
`load_*` function as the source, without transformers or safetensors, and faster.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import jax.numpy as jnp

from bridgejax.weights import clip, converted, gemma, gptneo, language, llama, safetensors_io, siglip
from bridgejax.weights.errors import CheckpointError

# Each family module provides KIND, accepts(hf_config) and read_checkpoint(path, param_dtype);
# GGUF files go to the language family weights/language.py picks by their general.architecture.
FAMILIES = [clip, siglip, gemma, llama, gptneo]


def family_of(path: str):
  if gemma.is_gguf(path):  # a single file, no config.json: its metadata names the (language) architecture
    return language.family_of(path)
  hf_config = safetensors_io.read_hf_config(path)
  for family in FAMILIES:
    if family.accepts(hf_config):
      return family
  raise CheckpointError(
      f"{path!r}: no bridgejax model reads architectures={hf_config.get('architectures')} "
      f"(model_type={hf_config.get('model_type')!r}); supported: "
      + ", ".join(a for f in FAMILIES for a in f.ARCHITECTURES))


def convert(hf_path: str, out_dir: str, dtype: str = "float32") -> str:
  """Converts and returns the kind written."""
  family = family_of(hf_path)
  config, params = family.read_checkpoint(hf_path, param_dtype=jnp.dtype(dtype))
  converted.save(out_dir, family.KIND, dataclasses.asdict(config), params)
  return family.KIND


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--hf", required=True, help="Hugging Face model directory (config.json + *.safetensors) or a .gguf file")
  parser.add_argument("--out", required=True, help="new directory for the converted checkpoint")
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                      help="dtype the frozen parameters are stored in")
  args = parser.parse_args(argv)
  start = time.time()
  try:
    kind = convert(args.hf, args.out, args.dtype)
  except (CheckpointError, FileExistsError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"converted {args.hf} ({kind}, {args.dtype}) -> {args.out} in {time.time() - start:.1f}s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
