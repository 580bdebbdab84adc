"""`load_language_model`: the decoder family of a checkpoint, then that family's loader.

    HF directory        config.json's `architectures` (else `model_type`): weights.gemma (Gemma 1/2/3),
                        weights.llama (LLaMA 2/3, Mistral, Qwen2) or weights.gptneo (GPT-Neo, Glória);
                        anything else is named in the error
    converted directory its header's kind ("gemma", "llama" or "gpt_neo")
    .gguf file          its general.architecture: weights.gemma (gemma, gemma2, gemma3) or weights.llama (llama, qwen2)

Missing or unreadable paths go to weights.gemma, whose loader reports them.
"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp

from bridgejax.weights import converted, gemma, gptneo, llama, safetensors_io
from bridgejax.weights.bound import LanguageModel
from bridgejax.weights.errors import CheckpointError

# each: KIND, ARCHITECTURES, accepts(hf_config), config_from_hf(hf_config), load_language_model(path, ...)
FAMILIES = (gemma, llama, gptneo)


def family_of(path: str):
  """The weights module (gemma, llama or gptneo) that reads `path`."""
  path = str(path)
  if gemma.is_gguf(path) and os.path.isfile(path):  # the file's general.architecture names the family
    arch = gemma.gguf_architecture(path)
    for family in FAMILIES:
      if arch in getattr(family, "GGUF_ARCHITECTURES", ()):
        return family
    raise CheckpointError(f"{path!r} holds a {arch!r} model; load_language_model reads GGUF architectures "
                          + ", ".join(a for family in FAMILIES for a in getattr(family, "GGUF_ARCHITECTURES", ())))
  if not os.path.isdir(path):
    return gemma
  if converted.is_converted(path):
    with open(os.path.join(path, converted.HEADER)) as f:
      kind = json.load(f).get("kind")
    return next((family for family in FAMILIES if family.KIND == kind), gemma)  # gemma names a wrong kind
  if not os.path.isfile(os.path.join(path, "config.json")):
    return gemma
  return family_of_config(safetensors_io.read_hf_config(path))


def family_of_config(hf: dict):
  """The weights module that reads a HF config.json dict, or a CheckpointError naming what it is."""
  for family in FAMILIES:
    if family.accepts(hf):
      return family
  arch = (hf.get("architectures") or [None])[0]
  model_types = ("gemma", "gemma2", "gemma3_text", *llama.MODEL_TYPES, *gptneo.MODEL_TYPES)
  raise CheckpointError(
      f"unknown language model architecture {arch!r} (model_type={hf.get('model_type')!r}); "
      f"load_language_model reads {', '.join(a for family in FAMILIES for a in family.ARCHITECTURES)} "
      f"(model_type {', '.join(model_types)}) or a Gemma or LLaMA .gguf file")


def config_from_hf(hf: dict):
  """The model config (GemmaConfig, LlamaConfig or GPTNeoConfig) of a HF config.json dict."""
  return family_of_config(hf).config_from_hf(hf)


def load_language_model(path: str, *, dtype=jnp.float32, param_dtype=jnp.float32, sharding=None) -> LanguageModel:
  """The frozen decoder (Gemma, LLaMA family, GPT-Neo) of a HF directory, a converted directory or a
  (Gemma or LLaMA) .gguf file, its params on device.

  dtype is the compute dtype; param_dtype the dtype the parameters are stored in (bfloat16 halves
  the memory of a frozen LLM). Norm statistics, softmax and logits stay float32 either way.
  sharding places the params (see `tree.place`): by default this process's first device; pass the
  mesh's shardings to load straight onto a mesh.
  """
  return family_of(path).load_language_model(path, dtype=dtype, param_dtype=param_dtype, sharding=sharding)
