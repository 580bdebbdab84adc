"""Frozen backbones bound to their parameters: what `load_vision_tower` and `load_language_model`
return. The Flax modules themselves (bridgejax.models) know nothing of weights or devices.

Parameters live on device: the loaders place them (on the default device or a given sharding) and
host leaves handed to these classes are put on this process's first device, so calls and
`generate` never send the weights again.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from bridgejax import generate as generation
from bridgejax.models.clip import CLIPVisionConfig, CLIPVisionTransformer, VisionOutput
from bridgejax.models.decoder import CausalLM, DecoderConfig, LMOutput
from bridgejax.weights.tree import on_device


@dataclasses.dataclass
class VisionTower:
  """A vision tower (CLIP or SigLIP: models/clip.py, models/siglip.py) bound to its (frozen)
  parameters: `tower(pixel_values) -> VisionOutput`.

  `params` live on device (the loaders place them; host leaves given here are put on this
  process's first device), so calls never send the weights again.
  """

  module: CLIPVisionTransformer
  params: Any
  config: CLIPVisionConfig

  def __post_init__(self):
    self.params = on_device(self.params)
    self._apply = jax.jit(lambda params, pixels: self.module.apply({"params": params}, pixels))

  def __call__(self, pixel_values) -> VisionOutput:
    return self._apply(self.params, jnp.asarray(pixel_values))


@dataclasses.dataclass
class LanguageModel:
  """A Gemma, LLaMA-family or GPT-Neo decoder (models/gemma.py, llama.py, gptneo.py) bound to its (frozen) parameters.

      out = lm(input_ids=ids, attention_mask=mask)      # or inputs_embeds=...; -> LMOutput
      new = lm.generate(ids, attention_mask=mask, max_new_tokens=32)   # (B, 32) new tokens

  `params` live on device (the loaders place them; host leaves given here are put on this
  process's first device), so calls and `generate` never send the weights again.
  """

  module: CausalLM
  params: Any
  config: DecoderConfig

  def __post_init__(self):
    self.params = on_device(self.params)

    def apply(params, input_ids, attention_mask, inputs_embeds, extra_embeddings):
      return self.module.apply({"params": params}, input_ids, attention_mask, inputs_embeds, extra_embeddings)

    self._apply = jax.jit(apply)
    self._embed = jax.jit(lambda params, ids, extra: self.module.apply(
        {"params": params}, ids, extra, method="embed"))  # by name: any family

  def __call__(self, input_ids=None, attention_mask=None, inputs_embeds=None, extra_embeddings=None) -> LMOutput:
    as_array = lambda a: None if a is None else jnp.asarray(a)
    return self._apply(self.params, as_array(input_ids), as_array(attention_mask), as_array(inputs_embeds),
                       as_array(extra_embeddings))

  def embed(self, input_ids, extra_embeddings=None):
    """(B, T) ids -> (B, T, D) embeddings (times the module's `embed_scale`), the space `inputs_embeds` lives in."""
    extra = None if extra_embeddings is None else jnp.asarray(extra_embeddings)
    return self._embed(self.params, jnp.asarray(input_ids), extra)

  def generate(self, input_ids=None, **kwargs):
    """KV-cache decoding; see `bridgejax.generate.generate` for the arguments."""
    return generation.generate(self.module, self.params, input_ids, **kwargs)
