"""GPT-Neo decoders (GPTNeoForCausalLM: EleutherAI's GPT-Neo, Glória 1.3B) from a Hugging Face
directory (model.safetensors or shards) or a bridgejax converted directory.

One name map (our parameter path -> the HF tensor name) and `tree.assemble`, which reports
missing/unexpected tensors and shape mismatches, as for the other families.
"""

from __future__ import annotations

import jax.numpy as jnp

from bridgejax.models.decoder import FULL, SLIDING
from bridgejax.models.gptneo import GPTNeo, GPTNeoConfig
from bridgejax.weights import converted, safetensors_io
from bridgejax.weights.bound import LanguageModel
from bridgejax.weights.errors import CheckpointError, config_json_errors
from bridgejax.weights.llama import special_token_ids
from bridgejax.weights.tree import Source, abstract_init, assemble, check_tree, place

KIND = "gpt_neo"
ARCHITECTURES = ("GPTNeoForCausalLM",)
MODEL_TYPES = ("gpt_neo",)
_LAYER_TYPE = {"global": FULL, "local": SLIDING}


def _attention_layers(hf: dict) -> list[str]:
  """transformers' config.attention_layers: saved as is, else expanded from attention_types
  ([[["global", "local"], 12]] = 12 repeats of the pair)."""
  if hf.get("attention_layers"):
    return list(hf["attention_layers"])
  types = hf.get("attention_types") or [[["global", "local"], 12]]
  return [kind for pattern, repeats in types for _ in range(repeats) for kind in pattern]


def config_from_hf(hf: dict) -> GPTNeoConfig:
  """Our config from a HF config.json dict."""
  with config_json_errors():
    hidden, num_layers = hf["hidden_size"], hf["num_layers"]
    layers = _attention_layers(hf)
    if set(layers) - set(_LAYER_TYPE):
      raise CheckpointError(f"attention types {sorted(set(layers) - set(_LAYER_TYPE))} are not supported "
                            "(GPT-Neo has 'global' and 'local')")
    bos, eos, pad = special_token_ids(hf, default_eos=50256)
    return GPTNeoConfig(
        vocab_size=hf["vocab_size"], hidden_size=hidden, intermediate_size=hf.get("intermediate_size") or 4 * hidden,
        num_layers=num_layers, num_heads=hf["num_heads"], layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        hidden_act=hf.get("activation_function", "gelu_new"),
        layer_types=tuple(_LAYER_TYPE[kind] for kind in layers), sliding_window=hf.get("window_size", 256),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        bos_token_id=bos, eos_token_ids=eos, pad_token_id=pad)


def accepts(hf_config: dict) -> bool:
  """Whether a HF config.json describes a checkpoint this module reads."""
  return bool(set(hf_config.get("architectures") or []) & set(ARCHITECTURES)) or (
      not hf_config.get("architectures") and hf_config.get("model_type") in MODEL_TYPES)


def name_map(config: GPTNeoConfig) -> dict[tuple[str, ...], Source]:
  """Our parameter path -> tensor name in a HF file; torch's (out, in) Linear weights become (in, out)."""
  linear = lambda name: Source(f"{name}.weight", (1, 0))
  norm = lambda ours, theirs: {(*ours, "scale"): Source(f"{theirs}.weight"), (*ours, "bias"): Source(f"{theirs}.bias")}
  sources = {("embedding",): Source("transformer.wte.weight"), ("position_embedding",): Source("transformer.wpe.weight"),
             **norm(("final_norm",), "transformer.ln_f")}
  if not config.tie_word_embeddings:
    sources[("lm_head",)] = Source("lm_head.weight")  # (V, D) in both layouts
  for i in range(config.num_layers):
    ours, theirs = f"layers_{i}", f"transformer.h.{i}"
    for proj in ("q_proj", "k_proj", "v_proj"):
      sources[(ours, "attn", proj, "kernel")] = linear(f"{theirs}.attn.attention.{proj}")
    sources[(ours, "attn", "o_proj", "kernel")] = linear(f"{theirs}.attn.attention.out_proj")
    sources[(ours, "attn", "o_proj", "bias")] = Source(f"{theirs}.attn.attention.out_proj.bias")
    for module, hf_module in (("fc_in", "mlp.c_fc"), ("fc_out", "mlp.c_proj")):
      sources[(ours, module, "kernel")] = linear(f"{theirs}.{hf_module}")
      sources[(ours, module, "bias")] = Source(f"{theirs}.{hf_module}.bias")
    sources.update(norm((ours, "pre_attn_norm"), f"{theirs}.ln_1"))
    sources.update(norm((ours, "pre_ffw_norm"), f"{theirs}.ln_2"))
  return sources


def _ignorer(config: GPTNeoConfig):
  """Tensors a checkpoint may carry that the model does not use: a tied model's saved LM head and
  the causal-mask buffers older exporters saved (attn.attention.bias / masked_bias)."""
  return lambda name: ((config.tie_word_embeddings and name == "lm_head.weight")
                       or name.endswith(("attn.attention.bias", "attn.attention.masked_bias")))


def read_checkpoint(path: str, param_dtype=jnp.float32) -> tuple[GPTNeoConfig, dict]:
  """(config, params) of a HF directory or a converted directory, checked against the module."""
  path = str(path)
  if converted.is_converted(path):
    config_dict, params = converted.load(path, KIND)
    config = GPTNeoConfig(**config_dict)
    return config, check_tree(params, _abstract(config), checkpoint=path, param_dtype=param_dtype)
  config = config_from_hf(safetensors_io.read_hf_config(path))
  params = assemble(name_map(config), safetensors_io.read_hf_tensors(path), _abstract(config), checkpoint=path,
                    param_dtype=param_dtype, ignore=_ignorer(config))
  return config, params


def load_language_model(path: str, *, dtype=jnp.float32, param_dtype=jnp.float32, sharding=None) -> LanguageModel:
  """The frozen GPT-Neo decoder of a HF or converted directory, its params on device; the
  arguments are `weights.load_language_model`'s (weights/language.py, which dispatches here)."""
  config, params = read_checkpoint(path, param_dtype)
  return LanguageModel(GPTNeo(config, dtype=dtype, param_dtype=param_dtype), place(params, sharding), config)


def _abstract(config: GPTNeoConfig):
  return abstract_init(GPTNeo(config), jnp.zeros((1, 1), jnp.int32))
