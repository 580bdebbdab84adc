"""Which Flax module runs a backbone config: one lookup for the multimodal model, `param_count`, the
benchmarks and the loaders, so a new family is added here once."""

from __future__ import annotations

from bridgejax.models.clip import CLIPVisionConfig, CLIPVisionTransformer
from bridgejax.models.gemma import Gemma, GemmaConfig
from bridgejax.models.gptneo import GPTNeo, GPTNeoConfig
from bridgejax.models.llama import Llama, LlamaConfig
from bridgejax.models.siglip import SiglipVisionConfig, SiglipVisionTransformer

DECODERS = {GemmaConfig: Gemma, LlamaConfig: Llama, GPTNeoConfig: GPTNeo}
VISION_TOWERS = {CLIPVisionConfig: CLIPVisionTransformer, SiglipVisionConfig: SiglipVisionTransformer}


def decoder_class(config):
  """The decoder module of a GemmaConfig, LlamaConfig or GPTNeoConfig."""
  try:
    return DECODERS[type(config)]
  except KeyError:
    raise TypeError(f"no decoder for {type(config).__name__}; bridgejax has {[c.__name__ for c in DECODERS]}") from None


def vision_class(config):
  """The vision tower module of a CLIPVisionConfig or SiglipVisionConfig."""
  try:
    return VISION_TOWERS[type(config)]
  except KeyError:
    raise TypeError(f"no vision tower for {type(config).__name__}; bridgejax has "
                    f"{[c.__name__ for c in VISION_TOWERS]}") from None
