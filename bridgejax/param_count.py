"""Count a config's trainable parameters from abstract shapes, at its real sizes, with no weights.

    python -m bridgejax.param_count --config configs/crossatt_k12.py [--json]

Backbone sizes come from config.json at config.vision.path / config.llm.path when it exists (any
family load_vision_tower / load_language_model reads), else from the architecture named by
config.vision.arch / config.llm.arch (VISION_ARCHS, LLM_ARCHS: CLIP ViT-L/14 and Gemma-2B in the
thesis configs), so nothing needs downloading.
"""

from __future__ import annotations

import functools
import json
import os

import jax
import numpy as np
from absl import flags
from ml_collections import config_flags

from bridgejax import cli
from bridgejax.errors import UserError
from bridgejax.model import BridgeModel
from bridgejax.models.clip import CLIPVisionConfig
from bridgejax.models.families import decoder_class, vision_class
from bridgejax.models.gemma import GemmaConfig
from bridgejax.models.gptneo import GPTNeoConfig
from bridgejax.models.llama import LlamaConfig
from bridgejax.models.siglip import SiglipVisionConfig

# Architectures by name, for configs whose checkpoints are not on this machine.
VISION_ARCHS = {
    "clip-vit-large-patch14": CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_layers=24,
                                               num_heads=16, image_size=224, patch_size=14, projection_dim=768),
    "clip-vit-large-patch14-336": CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_layers=24,
                                                   num_heads=16, image_size=336, patch_size=14, projection_dim=768),
    "clip-vit-base-patch16": CLIPVisionConfig(patch_size=16, projection_dim=512),
    "clip-vit-base-patch32": CLIPVisionConfig(projection_dim=512),
    # the hub's config.json: 27 layers, width 1152, MLP 4304, 16 heads, 27 x 27 patches, no CLS
    "siglip-so400m-patch14-384": SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_layers=27,
                                                    num_heads=16, image_size=384, patch_size=14),
    "siglip-base-patch16-224": SiglipVisionConfig(),  # SiglipVisionConfig's defaults
}
LLM_ARCHS = {
    "gemma-2b": GemmaConfig(),  # GemmaConfig's defaults are Gemma-2B
    "llama-2-7b": LlamaConfig(),  # LlamaConfig's defaults are LLaMA-2-7B
    "gervasio-7b": LlamaConfig(),  # Gervásio 7B PT-PT: LLaMA-2-7B fine-tuned, the same shapes and vocabulary
    # Glória 1.3B: GPT-Neo 1.3B's shapes (GPTNeoConfig's defaults; its config.json wins when present)
    "gloria-1.3b": GPTNeoConfig(),
}


def backbone_configs(config):
  """(vision config, LLM config) of an experiment config, of whichever families its backbones are."""
  from bridgejax.weights import language, safetensors_io  # lazy: orbax and the loaders, ~0.3 s of CLI start
  from bridgejax.weights import vision as vision_weights  # lazy: orbax and the loaders, ~0.3 s of CLI start

  def one(tower, archs, from_hf):  # config.json at the path if there is one, else the named architecture
    path, arch = config[tower].path, config[tower].arch
    hf_json = os.path.join(path, "config.json")
    if os.path.isfile(hf_json):
      return from_hf(safetensors_io.read_hf_config(path))
    if arch in archs:
      return archs[arch]
    raise UserError(f"no {hf_json} and config.{tower}.arch={arch!r} is not one of {sorted(archs)}")

  return (one("vision", VISION_ARCHS, vision_weights.config_from_hf),
          one("llm", LLM_ARCHS, language.config_from_hf))


@functools.lru_cache(maxsize=8)
def abstract_frozen(vision, llm) -> dict:
  """Shapes of the frozen trees (tracing Gemma-2B's init takes seconds: cached)."""
  c = vision
  return {
      "vision": jax.eval_shape(lambda: vision_class(c)(c).init(
          jax.random.key(0), np.zeros((1, c.num_channels, c.image_size, c.image_size)))["params"]),
      "llm": jax.eval_shape(lambda: decoder_class(llm)(llm).init(jax.random.key(0), np.zeros((1, 1), np.int32))["params"]),
  }


def count(config) -> dict:
  """{"trainable_params", "by_module", "frozen_params", "vision", "llm", "bridge"}: shapes only."""
  vision, llm = backbone_configs(config)
  model = BridgeModel.create(config, vision, llm)
  frozen = abstract_frozen(vision, llm)
  trainable = jax.eval_shape(lambda f: model.init_trainable(jax.random.key(0), f), frozen)
  size = lambda tree: int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
  by_module = {f"{top}/{name}": size(sub) for top in ("bridge", "ret") for name, sub in trainable[top].items()}
  return {"config": config.name, "trainable_params": size(trainable), "by_module": by_module,
          "frozen_params": {k: size(v) for k, v in frozen.items()}, "bridge": config.bridge.to_dict(),
          "vision": f"{vision.num_layers} layers, width {vision.hidden_size}, {vision.num_tokens} tokens",
          "llm": f"{llm.family}, {llm.num_layers} layers, width {llm.hidden_size}, vocab {llm.vocab_size}"}


def format_table(result: dict) -> str:
  lines = [f"{result['config']}: bridge {result['bridge']}", f"  vision {result['vision']}; llm {result['llm']}",
           f"  {'trainable module':32s} {'params':>14s}"]
  lines += [f"  {name:32s} {n:>14,d}" for name, n in result["by_module"].items()]
  lines.append(f"  {'total trainable':32s} {result['trainable_params']:>14,d}")
  for name, n in result["frozen_params"].items():
    lines.append(f"  {'frozen ' + name:32s} {n:>14,d}")
  return "\n".join(lines)


def main(argv):
  del argv
  result = count(flags.FLAGS.config)
  print(json.dumps(result) if flags.FLAGS.json else format_table(result))


if __name__ == "__main__":  # flags only here: importing this module defines none
  config_flags.DEFINE_config_file("config", None, "experiment config (configs/*.py[:args])")
  flags.DEFINE_bool("json", False, "print one JSON object instead of a table")
  flags.mark_flags_as_required(["config"])
  cli.run_absl(main)  # a bad flag, key or config: one line, as train.py
