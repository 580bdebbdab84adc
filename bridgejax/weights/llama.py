"""LLaMA-family decoders (LlamaForCausalLM: LLaMA 2/3; MistralForCausalLM; Qwen2ForCausalLM) from a
Hugging Face directory (model.safetensors or shards), a llama.cpp GGUF file (architectures llama and
qwen2) or a bridgejax converted directory.

One name map for both formats (our parameter path -> the HF or GGUF tensor name) and `tree.assemble`,
which reports missing/unexpected tensors and shape mismatches, as for Gemma. GGUF files are read as
transformers' GGUF loader (modeling_gguf_pytorch_utils.py, integrations/ggml.py) reads them:
  * "llama": LLaMA, and Mistral, which llama.cpp's convert_hf_to_gguf.py writes as "llama" and
    transformers and llama.cpp run as LLaMA (full attention). The script permutes the q/k rows for
    llama.cpp's interleaved RoPE; undone here as transformers' LlamaTensorProcessor does, for this
    architecture only. transformers' own "mistral" mapping (a "llama" file named exactly "mistral")
    fails in transformers 5.24, as gguf-py has no "mistral" architecture; bridgejax reads no "mistral".
  * "qwen2": Qwen2 with its q/k/v biases (`blk.N.attn_q.bias`...), rows as stored (NeoX RoPE is HF's
    half-split order), full attention (Qwen2Config's use_sliding_window=False).
No other biases; RoPE unscaled or linear; an untied head is `output.weight`; the head dim is
attention.key_length. A LLaMA-2 GGUF vocabulary is sentencepiece, which `load_tokenizer` rebuilds;
LLaMA 3's and Qwen2's BPE ones ("gpt2") it does not. Other architectures fail with one line naming these.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from bridgejax.models.decoder import FULL, SLIDING
from bridgejax.models.llama import Llama, LlamaConfig
from bridgejax.weights import converted, safetensors_io
from bridgejax.weights.bound import LanguageModel
from bridgejax.weights.errors import CheckpointError, config_json_errors
from bridgejax.weights.gemma import LINEARS, LazyTensor, _eos_ids, gguf_field, gguf_header, gguf_reader, is_gguf
from bridgejax.weights.tree import Source, abstract_init, assemble, check_tree, place

KIND = "llama"
ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
_FAMILY_OF_ARCHITECTURE = dict(zip(ARCHITECTURES, ("llama", "mistral", "qwen2")))
_FAMILY_OF_MODEL_TYPE = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}
MODEL_TYPES = tuple(_FAMILY_OF_MODEL_TYPE)
GGUF_ARCHITECTURES = ("llama", "qwen2")  # llama.cpp's names, = our family names
_PERMUTED_GGUF_ARCHITECTURE = "llama"  # the one whose q/k rows llama.cpp permutes


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


def special_token_ids(hf: dict, default_eos: int) -> tuple[int, tuple[int, ...], int]:
  """(bos, eos ids, pad) of a config.json; with no BOS or pad token (LLaMA, Mistral, GPT-Neo) both are
  the first EOS, as bridgejax's tokenizer pads."""
  eos = _eos_ids(hf.get("eos_token_id", default_eos))
  fallback = eos[0] if eos else 0
  bos, pad = hf.get("bos_token_id"), hf.get("pad_token_id")
  return (fallback if bos is None else bos), eos, (fallback if pad is None else pad)


def config_from_hf(hf: dict) -> LlamaConfig:
  """Our config from a HF config.json dict (transformers 4.x or 5.x layout)."""
  family = _family(hf)
  with config_json_errors():
    num_layers, num_heads = hf["num_hidden_layers"], hf["num_attention_heads"]
    layer_types, window = _layer_types(hf, family, num_layers)
    bos, eos, pad = special_token_ids(hf, default_eos=2)
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
        bos_token_id=bos, eos_token_ids=eos, pad_token_id=pad)


def accepts(hf_config: dict) -> bool:
  """Whether a HF config.json describes a checkpoint this module reads."""
  return bool(set(hf_config.get("architectures") or []) & set(ARCHITECTURES)) or (
      not hf_config.get("architectures") and hf_config.get("model_type") in _FAMILY_OF_MODEL_TYPE)


# ---------------------------------------------------------------------------------------------
# The name map

_NORMS = {"pre_attn_norm": ("input_layernorm", "attn_norm"), "pre_ffw_norm": ("post_attention_layernorm", "ffn_norm")}
_TOP_LEVEL = {  # our path -> (HF, GGUF) tensor; the LM head is (V, D) in both layouts
    ("embedding",): ("model.embed_tokens.weight", "token_embd.weight"),
    ("final_norm", "scale"): ("model.norm.weight", "output_norm.weight"),
    ("lm_head",): ("lm_head.weight", "output.weight"),
}


def name_map(config: LlamaConfig, file_format: str = "hf") -> dict[tuple[str, ...], Source]:
  """Our parameter path -> tensor name in a HF or (file_format "gguf") llama.cpp GGUF file; the
  linears are Gemma's (`LINEARS`)."""
  which = int(file_format == "gguf")
  sources = {ours: Source(names[which]) for ours, names in _TOP_LEVEL.items()
             if ours != ("lm_head",) or not config.tie_word_embeddings}
  biased = {"q_proj": config.qkv_bias, "k_proj": config.qkv_bias, "v_proj": config.qkv_bias,
            "o_proj": config.o_bias, "gate_proj": config.mlp_bias, "up_proj": config.mlp_bias,
            "down_proj": config.mlp_bias}
  for i in range(config.num_layers):
    prefix = f"blk.{i}" if which else f"model.layers.{i}"
    for module, names in LINEARS.items():
      sources[(f"layers_{i}", *module, "kernel")] = Source(f"{prefix}.{names[which]}.weight", (1, 0))
      if biased[module[1]]:
        sources[(f"layers_{i}", *module, "bias")] = Source(f"{prefix}.{names[which]}.bias")
    for ours, names in _NORMS.items():
      sources[(f"layers_{i}", ours, "scale")] = Source(f"{prefix}.{names[which]}.weight")
  return sources


def unpermute_rows(weights: np.ndarray, heads: int) -> np.ndarray:
  """(heads * F, D) q or k rows from llama.cpp's interleaved-RoPE order back to HF's half-split one
  (the inverse of convert_hf_to_gguf.py's permute; transformers' reverse_permute_weights)."""
  half = weights.shape[0] // heads // 2
  return weights.reshape(heads, half, 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def _gguf_config(reader, path: str) -> LlamaConfig:
  arch, meta, required = gguf_header(reader, path, GGUF_ARCHITECTURES, "a LLaMA-family model")
  names = {t.name: t for t in reader.tensors}
  if "token_embd.weight" not in names:
    raise CheckpointError(f"{path!r} has no token_embd.weight tensor")
  if "rope_freqs.weight" in names:  # LLaMA 3.1's scaled frequencies, stored as a tensor
    raise CheckpointError(f"{path!r}: per-frequency RoPE factors (rope_freqs, LLaMA 3.1) are not supported")
  scaling = meta("rope.scaling.type", "none")
  if scaling not in ("none", "linear"):
    raise CheckpointError(f"{path!r}: RoPE scaling {scaling!r} is not supported")
  hidden, heads = required["embedding_length"], required["attention.head_count"]
  eos = gguf_field(reader, "tokenizer.ggml.eos_token_id", 2)
  return LlamaConfig(
      family=arch, vocab_size=int(names["token_embd.weight"].shape[1]), hidden_size=hidden,
      intermediate_size=required["feed_forward_length"], num_layers=required["block_count"], num_heads=heads,
      num_kv_heads=meta("attention.head_count_kv", heads), head_dim=meta("attention.key_length", hidden // heads),
      rms_norm_eps=meta("attention.layer_norm_rms_epsilon", 1e-5), rope_theta=float(meta("rope.freq_base", 10_000.0)),
      rope_type="linear" if scaling == "linear" else "default",
      rope_factor=float(meta("rope.scaling.factor", 1.0)) if scaling == "linear" else 1.0,
      qkv_bias=arch == "qwen2",
      tie_word_embeddings="output.weight" not in names, max_position_embeddings=meta("context_length", 4096),
      bos_token_id=gguf_field(reader, "tokenizer.ggml.bos_token_id", 1), eos_token_ids=(eos,),
      pad_token_id=gguf_field(reader, "tokenizer.ggml.padding_token_id", eos))


def read_gguf(path: str) -> tuple[LlamaConfig, dict]:
  """(config, tensors by GGUF name, q/k rows in HF's order)."""
  reader = gguf_reader(path)
  try:
    config = _gguf_config(reader, path)
  except CheckpointError:
    raise
  except (ValueError, TypeError) as e:  # LlamaConfig's own checks, odd metadata types (per-layer head counts)
    raise CheckpointError(f"{path!r} describes a model bridgejax cannot build: {e}") from e
  permuted = gguf_field(reader, "general.architecture") == _PERMUTED_GGUF_ARCHITECTURE
  heads = {"attn_q.weight": config.num_heads, "attn_k.weight": config.num_kv_heads} if permuted else {}
  tensors = {}
  for t in reader.tensors:
    n = heads.get(t.name.rpartition("blk.")[2].partition(".")[2])
    tensors[t.name] = LazyTensor(t, transform=None if n is None else (lambda w, n=n: unpermute_rows(w, n)))
  return config, tensors


def _ignorer(config: LlamaConfig):
  """Tensors a checkpoint may carry that the model does not use: a tied model's saved LM head and
  RoPE buffers some exporters save."""
  return lambda name: (config.tie_word_embeddings and name == "lm_head.weight") or name.endswith("rotary_emb.inv_freq")


# ---------------------------------------------------------------------------------------------
# Loading

def read_checkpoint(path: str, param_dtype=jnp.float32) -> tuple[LlamaConfig, dict]:
  """(config, params) of a HF directory, a .gguf file or a converted directory, checked against the module."""
  path = str(path)
  if is_gguf(path):
    config, tensors = read_gguf(path)
    return config, assemble(name_map(config, "gguf"), tensors, _abstract(config), checkpoint=path,
                            param_dtype=param_dtype)
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
  """The frozen LLaMA-family decoder of a HF or converted directory or a .gguf file, its params on device; the
  arguments are `weights.load_language_model`'s (weights/language.py, which dispatches here)."""
  config, params = read_checkpoint(path, param_dtype)
  params = place(params, sharding)
  return LanguageModel(Llama(config, dtype=dtype, param_dtype=param_dtype), params, config)


def _abstract(config: LlamaConfig):
  return abstract_init(Llama(config), jnp.zeros((1, 1), jnp.int32))
