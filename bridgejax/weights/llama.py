"""LLaMA-family decoders (LlamaForCausalLM: LLaMA 2/3; MistralForCausalLM; Qwen2ForCausalLM) from a
Hugging Face directory (model.safetensors or shards) or a bridgejax converted directory.

One name map (our parameter path -> the HF tensor name) and `tree.assemble`, which reports
missing/unexpected tensors and shape mismatches, as for Gemma. GGUF files are not read: llama.cpp
permutes the q/k rows of LLaMA checkpoints for its interleaved RoPE and these families ship BPE
(tokenizer.ggml.model = "gpt2") vocabularies that bridgejax's GGUF tokenizer does not rebuild.
"""

from __future__ import annotations

import jax.numpy as jnp

from bridgejax.models.gemma import FULL, SLIDING
from bridgejax.models.llama import Llama, LlamaConfig
from bridgejax.weights import converted, safetensors_io
from bridgejax.weights.bound import LanguageModel
from bridgejax.weights.errors import CheckpointError
from bridgejax.weights.gemma import _eos_ids
from bridgejax.weights.tree import Source, abstract_init, assemble, check_tree, place

KIND = "llama"
ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
_FAMILY_OF_ARCHITECTURE = dict(zip(ARCHITECTURES, ("llama", "mistral", "qwen2")))
_FAMILY_OF_MODEL_TYPE = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}
MODEL_TYPES = tuple(_FAMILY_OF_MODEL_TYPE)


# ---------------------------------------------------------------------------------------------
# Hugging Face config.json

def _family(hf: dict) -> str:
  arch = (hf.get("architectures") or [None])[0]
  family = _FAMILY_OF_ARCHITECTURE.get(arch) or _FAMILY_OF_MODEL_TYPE.get(hf.get("model_type"))
  if family is None:
    raise CheckpointError(f"unknown language model architecture {arch!r} (model_type={hf.get('model_type')!r}); "
                          f"bridgejax.weights.llama reads {', '.join(ARCHITECTURES)}")
  return family


def _rope(hf: dict) -> dict:
  """Our RoPE fields from the transformers 5 layout (`rope_parameters`) or the 4.x one
  (`rope_theta` + `rope_scaling`)."""
  params = hf.get("rope_parameters") or {"rope_theta": hf.get("rope_theta", 10_000.0), **(hf.get("rope_scaling") or {})}
  kind = params.get("rope_type", params.get("type", "default"))
  if kind not in ("default", "linear", "llama3"):
    raise CheckpointError(f"RoPE {params} is not supported (bridgejax reads 'default', 'linear' and 'llama3')")
  if params.get("partial_rotary_factor", 1.0) != 1.0:
    raise CheckpointError(f"partial_rotary_factor={params['partial_rotary_factor']} is not supported")
  fields = dict(rope_theta=float(params.get("rope_theta", 10_000.0)), rope_type=kind)
  if kind != "default":
    fields["rope_factor"] = float(params["factor"])
  if kind == "llama3":
    fields.update(rope_low_freq_factor=float(params["low_freq_factor"]),
                  rope_high_freq_factor=float(params["high_freq_factor"]),
                  rope_original_max_positions=int(params.get("original_max_position_embeddings")
                                                  or hf["max_position_embeddings"]))
  return fields


def _layer_types(hf: dict, family: str, num_layers: int) -> tuple[tuple[str, ...], int | None]:
  """(layer types, sliding window), as transformers lays them out per family."""
  window = hf.get("sliding_window")
  if hf.get("layer_types"):
    types = tuple(hf["layer_types"])
    return types, (window if SLIDING in types else None)
  if family == "mistral" and window is not None:  # every layer slides
    return (SLIDING,) * num_layers, window
  if family == "qwen2" and hf.get("use_sliding_window") and window is not None:  # layers from max_window_layers on
    start = hf.get("max_window_layers", 28)
    return tuple(SLIDING if i >= start else FULL for i in range(num_layers)), window
  return (FULL,) * num_layers, None


def config_from_hf(hf: dict) -> LlamaConfig:
  """Our config from a HF config.json dict (transformers 4.x or 5.x layout)."""
  family = _family(hf)
  try:
    num_layers, num_heads = hf["num_hidden_layers"], hf["num_attention_heads"]
    layer_types, window = _layer_types(hf, family, num_layers)
    eos = _eos_ids(hf.get("eos_token_id", 2))
    pad = hf.get("pad_token_id")
    attention_bias = bool(hf.get("attention_bias", False))
    return LlamaConfig(
        family=family, vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"], num_layers=num_layers, num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6), hidden_act=hf.get("hidden_act", "silu"), **_rope(hf),
        layer_types=layer_types, sliding_window=window,
        qkv_bias=family == "qwen2" or attention_bias, o_bias=family == "llama" and attention_bias,
        mlp_bias=family == "llama" and bool(hf.get("mlp_bias", False)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        bos_token_id=hf["bos_token_id"] if hf.get("bos_token_id") is not None else (eos[0] if eos else 0),
        eos_token_ids=eos,
        # no pad token (LLaMA, Mistral): pad with EOS, as bridgejax's tokenizer does
        pad_token_id=pad if pad is not None else (eos[0] if eos else 0))
  except KeyError as e:
    raise CheckpointError(f"config.json lacks {e}") from e
  except ValueError as e:
    raise CheckpointError(f"config.json describes a model bridgejax cannot build: {e}") from e


def accepts(hf_config: dict) -> bool:
  """Whether a HF config.json describes a checkpoint this module reads."""
  return bool(set(hf_config.get("architectures") or []) & set(ARCHITECTURES)) or (
      not hf_config.get("architectures") and hf_config.get("model_type") in _FAMILY_OF_MODEL_TYPE)


# ---------------------------------------------------------------------------------------------
# The name map

_LINEARS = {  # our module in a layer -> HF module; torch's (out, in) becomes our (in, out)
    ("attn", "q_proj"): "self_attn.q_proj", ("attn", "k_proj"): "self_attn.k_proj",
    ("attn", "v_proj"): "self_attn.v_proj", ("attn", "o_proj"): "self_attn.o_proj",
    ("mlp", "gate_proj"): "mlp.gate_proj", ("mlp", "up_proj"): "mlp.up_proj", ("mlp", "down_proj"): "mlp.down_proj",
}
_NORMS = {"pre_attn_norm": "input_layernorm", "pre_ffw_norm": "post_attention_layernorm"}


def name_map(config: LlamaConfig) -> dict[tuple[str, ...], Source]:
  """Our parameter path -> tensor name in a HF file."""
  sources = {("embedding",): Source("model.embed_tokens.weight"), ("final_norm", "scale"): Source("model.norm.weight")}
  if not config.tie_word_embeddings:
    sources[("lm_head",)] = Source("lm_head.weight")  # (V, D) in both layouts
  biased = {"q_proj": config.qkv_bias, "k_proj": config.qkv_bias, "v_proj": config.qkv_bias,
            "o_proj": config.o_bias, "gate_proj": config.mlp_bias, "up_proj": config.mlp_bias,
            "down_proj": config.mlp_bias}
  for i in range(config.num_layers):
    prefix = f"model.layers.{i}"
    for module, name in _LINEARS.items():
      sources[(f"layers_{i}", *module, "kernel")] = Source(f"{prefix}.{name}.weight", (1, 0))
      if biased[module[1]]:
        sources[(f"layers_{i}", *module, "bias")] = Source(f"{prefix}.{name}.bias")
    for ours, theirs in _NORMS.items():
      sources[(f"layers_{i}", ours, "scale")] = Source(f"{prefix}.{theirs}.weight")
  return sources


def _ignorer(config: LlamaConfig):
  """Tensors a checkpoint may carry that the model does not use: a tied model's saved LM head and
  RoPE buffers some exporters save."""
  return lambda name: (config.tie_word_embeddings and name == "lm_head.weight") or name.endswith("rotary_emb.inv_freq")


# ---------------------------------------------------------------------------------------------
# Loading

def read_checkpoint(path: str, param_dtype=jnp.float32) -> tuple[LlamaConfig, dict]:
  """(config, params) of a HF directory or a converted directory, checked against the module."""
  path = str(path)
  if converted.is_converted(path):
    config_dict, params = converted.load(path, KIND)
    config = LlamaConfig(**config_dict)
    return config, check_tree(params, _abstract(config), checkpoint=path, param_dtype=param_dtype)
  config = config_from_hf(safetensors_io.read_hf_config(path))
  tensors = safetensors_io.read_hf_tensors(path)
  params = assemble(name_map(config), tensors, _abstract(config), checkpoint=path, param_dtype=param_dtype,
                    ignore=_ignorer(config))
  return config, params


def load_language_model(path: str, *, dtype=jnp.float32, param_dtype=jnp.float32, sharding=None) -> LanguageModel:
  """The frozen LLaMA-family decoder of a HF or converted directory, its params on device; the
  arguments are `weights.load_language_model`'s (weights/language.py, which dispatches here)."""
  config, params = read_checkpoint(path, param_dtype)
  params = place(params, sharding)
  return LanguageModel(Llama(config, dtype=dtype, param_dtype=param_dtype), params, config)


def _abstract(config: LlamaConfig):
  return abstract_init(Llama(config), jnp.zeros((1, 1), jnp.int32))
