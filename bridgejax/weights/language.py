"""`load_language_model`: the decoder family of a checkpoint, then that family's loader.

    HF directory        config.json's `architectures` (else `model_type`): weights.gemma (Gemma 1/2/3)
                        or weights.llama (LLaMA 2/3, Mistral, Qwen2); anything else is named in the error
    converted directory its header's kind ("gemma" or "llama")
    .gguf file          weights.gemma (the only family read from GGUF)

Missing or unreadable paths go to weights.gemma, whose loader reports them.
"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp

from bridgejax.weights import converted, gemma, llama, safetensors_io
from bridgejax.weights.bound import LanguageModel
from bridgejax.weights.errors import CheckpointError

FAMILIES = (gemma, llama)  # each: KIND, ARCHITECTURES, accepts(hf_config), load_language_model(path, ...)


def family_of(path: str):
  """The weights module (gemma or llama) that reads `path`."""
  path = str(path)
  if gemma.is_gguf(path) or not os.path.isdir(path):
    return gemma
  if converted.is_converted(path):
    with open(os.path.join(path, converted.HEADER)) as f:
      kind = json.load(f).get("kind")
    return next((family for family in FAMILIES if family.KIND == kind), gemma)  # gemma names a wrong kind
  if not os.path.isfile(os.path.join(path, "config.json")):
    return gemma
  hf = safetensors_io.read_hf_config(path)
  for family in FAMILIES:
    if family.accepts(hf):
      return family
  arch = (hf.get("architectures") or [None])[0]
  raise CheckpointError(
      f"unknown language model architecture {arch!r} (model_type={hf.get('model_type')!r}); "
      f"load_language_model reads {', '.join(a for family in FAMILIES for a in family.ARCHITECTURES)} "
      f"(model_type gemma, gemma2, gemma3_text, {', '.join(llama.MODEL_TYPES)}) or a Gemma .gguf file")


def load_language_model(path: str, *, dtype=jnp.float32, param_dtype=jnp.float32, sharding=None) -> LanguageModel:
  """The frozen decoder of a HF directory, a converted directory or a (Gemma) .gguf file, its params on device.

  dtype is the compute dtype; param_dtype the dtype the parameters are stored in (bfloat16 halves
  the memory of a frozen LLM). Norm statistics, softmax and logits stay float32 either way.
  sharding places the params (see `tree.place`): by default this process's first device; pass the
  mesh's shardings to load straight onto a mesh.
  """
  return family_of(path).load_language_model(path, dtype=dtype, param_dtype=param_dtype, sharding=sharding)
