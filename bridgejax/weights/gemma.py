"""Gemma 1/2/3 decoders from a Hugging Face directory (GemmaForCausalLM, Gemma2ForCausalLM,
Gemma3ForCausalLM / a gemma3_text config), a GGUF file (llama.cpp's gemma, gemma2, gemma3
architectures; quantised tensors are dequantised with the `gguf` package) or a bridgejax converted
directory.

Both file formats go through one name map (our parameter path -> the HF or the GGUF tensor name)
and `tree.assemble`, which reports missing/unexpected tensors and shape mismatches.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping

import gguf
import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from bridgejax.models.decoder import FULL, SLIDING
from bridgejax.models.gemma import Gemma, GemmaConfig
from bridgejax.weights.bound import LanguageModel
from bridgejax.weights import converted, safetensors_io
from bridgejax.weights.errors import CheckpointError, MissingCheckpointError, config_json_errors
from bridgejax.weights.gguf_file import GGUFFile
from bridgejax.weights.tree import Source, abstract_init, assemble, check_tree, export, place

KIND = "gemma"
ARCHITECTURES = ("GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM")
_FAMILY_OF_ARCHITECTURE = dict(zip(ARCHITECTURES, ("gemma", "gemma2", "gemma3")))
_FAMILY_OF_MODEL_TYPE = {"gemma": "gemma", "gemma2": "gemma2", "gemma3_text": "gemma3"}
GGUF_ARCHITECTURES = ("gemma", "gemma2", "gemma3")  # llama.cpp's names, = our family names


# ---------------------------------------------------------------------------------------------
# Hugging Face config.json

def _rope(hf: dict, family: str) -> tuple[float, float, float]:
  """(global theta, local theta, linear scaling factor of global layers), from either the
  transformers 5 layout (`rope_parameters`, per layer type for Gemma 3) or the 4.x one
  (`rope_theta`, `rope_local_base_freq`, `rope_scaling`)."""
  params = hf.get("rope_parameters") or {}
  if family == "gemma3":
    full = params.get(FULL) or {"rope_theta": hf.get("rope_theta", 1_000_000.0), **(hf.get("rope_scaling") or {})}
    local = params.get(SLIDING) or {"rope_theta": hf.get("rope_local_base_freq", 10_000.0)}
  else:
    full = local = params or {"rope_theta": hf.get("rope_theta", 10_000.0), **(hf.get("rope_scaling") or {})}
  kind = lambda rope: rope.get("rope_type", rope.get("type", "default"))
  # Linear scaling is supported where the model applies it: every layer of Gemma 1 (all global),
  # the global layers of Gemma 3.
  if kind(full) not in ("default", "linear") or (kind(local) != "default" and family != "gemma"):
    raise CheckpointError(f"RoPE {full} / {local} is not supported (bridgejax reads 'default' and "
                          "'linear' scaling of global layers)")
  factor = float(full["factor"]) if kind(full) == "linear" else 1.0
  return float(full.get("rope_theta", 10_000.0)), float(local.get("rope_theta", 10_000.0)), factor


def _layer_types(hf: dict, family: str, num_layers: int) -> tuple[str, ...]:
  if hf.get("layer_types"):
    return tuple(hf["layer_types"])
  if family == "gemma2":  # transformers' default: even layers slide, odd ones are global
    return tuple(SLIDING if (i + 1) % 2 else FULL for i in range(num_layers))
  if family == "gemma3":  # every `sliding_window_pattern`-th layer is global
    pattern = hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", 6))
    return tuple(SLIDING if (i + 1) % pattern else FULL for i in range(num_layers))
  return (FULL,) * num_layers


def _family(hf: dict) -> str:
  arch = (hf.get("architectures") or [None])[0]
  family = _FAMILY_OF_ARCHITECTURE.get(arch) or _FAMILY_OF_MODEL_TYPE.get(hf.get("model_type"))
  if family is None:
    raise CheckpointError(
        f"unknown language model architecture {arch!r} (model_type={hf.get('model_type')!r}); "
        f"load_language_model reads {', '.join(ARCHITECTURES)} (model_type gemma, gemma2, gemma3_text) "
        "or a .gguf file")
  return family


def _eos_ids(value) -> tuple[int, ...]:
  if value is None:
    return ()
  return tuple(value) if isinstance(value, (list, tuple)) else (value,)


def config_from_hf(hf: dict) -> GemmaConfig:
  """Our config from a HF config.json dict (transformers 4.x or 5.x layout)."""
  family = _family(hf)
  if hf.get("use_bidirectional_attention"):
    raise CheckpointError("use_bidirectional_attention=True (an encoder variant) is not supported")
  if hf.get("tie_word_embeddings", True) is False:
    raise CheckpointError("tie_word_embeddings=False: bridgejax's Gemma ties the LM head to the embeddings")
  if hf.get("attention_bias"):
    raise CheckpointError("attention_bias=True is not supported (no Gemma checkpoint uses it)")
  num_layers, num_heads = hf["num_hidden_layers"], hf["num_attention_heads"]
  head_dim = hf.get("head_dim") or hf["hidden_size"] // num_heads
  if family == "gemma":  # transformers reads `hidden_act` and means the tanh gelu by "gelu"
    act = hf.get("hidden_act") or "gelu_pytorch_tanh"
    act = "gelu_pytorch_tanh" if act == "gelu" else act
  else:
    act = hf.get("hidden_activation") or "gelu_pytorch_tanh"
  theta, local_theta, factor = _rope(hf, family)
  layer_types = _layer_types(hf, family, num_layers)
  softcaps = dict(attn_logit_softcapping=50.0, final_logit_softcapping=30.0) if family == "gemma2" else {}
  with config_json_errors():
    return GemmaConfig(
        family=family, vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"], num_layers=num_layers, num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads, head_dim=head_dim,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6), hidden_act=act,
        query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar", 256) if family != "gemma" else head_dim),
        rope_theta=theta, rope_local_theta=local_theta, rope_scaling_factor=factor, layer_types=layer_types,
        sliding_window=hf.get("sliding_window", 4096) if SLIDING in layer_types else None,
        attn_logit_softcapping=hf.get("attn_logit_softcapping", softcaps.get("attn_logit_softcapping")),
        final_logit_softcapping=hf.get("final_logit_softcapping", softcaps.get("final_logit_softcapping")),
        post_norms=family != "gemma", qk_norm=family == "gemma3",
        max_position_embeddings=hf.get("max_position_embeddings", 8192),
        bos_token_id=hf.get("bos_token_id", 2), eos_token_ids=_eos_ids(hf.get("eos_token_id", 1)),
        pad_token_id=hf.get("pad_token_id", 0) if hf.get("pad_token_id") is not None else 0)


def accepts(hf_config: dict) -> bool:
  """Whether a HF config.json describes a checkpoint this module reads."""
  return bool(set(hf_config.get("architectures") or []) & set(ARCHITECTURES)) or (
      hf_config.get("model_type") in _FAMILY_OF_MODEL_TYPE)


# ---------------------------------------------------------------------------------------------
# The name map, for both formats

LINEARS = {  # our module in a layer -> (HF, GGUF) tensor; torch's (out, in) becomes our (in, out); LLaMA's too
    ("attn", "q_proj"): ("self_attn.q_proj", "attn_q"),
    ("attn", "k_proj"): ("self_attn.k_proj", "attn_k"),
    ("attn", "v_proj"): ("self_attn.v_proj", "attn_v"),
    ("attn", "o_proj"): ("self_attn.o_proj", "attn_output"),
    ("mlp", "gate_proj"): ("mlp.gate_proj", "ffn_gate"),
    ("mlp", "up_proj"): ("mlp.up_proj", "ffn_up"),
    ("mlp", "down_proj"): ("mlp.down_proj", "ffn_down"),
}
# Gemma 1 has two norms per layer; HF calls the pre-MLP one "post_attention_layernorm".
_NORMS_GEMMA1 = {
    ("pre_attn_norm",): ("input_layernorm", "attn_norm"),
    ("pre_ffw_norm",): ("post_attention_layernorm", "ffn_norm"),
}
_NORMS_POST = {  # Gemma 2 and 3
    ("pre_attn_norm",): ("input_layernorm", "attn_norm"),
    ("post_attn_norm",): ("post_attention_layernorm", "post_attention_norm"),
    ("pre_ffw_norm",): ("pre_feedforward_layernorm", "ffn_norm"),
    ("post_ffw_norm",): ("post_feedforward_layernorm", "post_ffw_norm"),
}
_QK_NORMS = {("attn", "q_norm"): ("self_attn.q_norm", "attn_q_norm"),
             ("attn", "k_norm"): ("self_attn.k_norm", "attn_k_norm")}


def name_map(config: GemmaConfig, file_format: str = "hf") -> dict[tuple[str, ...], Source]:
  """Our parameter path -> tensor name in a HF (prefix `model.`) or GGUF file."""
  gguf = file_format == "gguf"
  which = int(gguf)
  tensor = (lambda i, name: f"blk.{i}.{name}.weight") if gguf else (lambda i, name: f"model.layers.{i}.{name}.weight")
  sources = {
      ("embedding",): Source("token_embd.weight" if gguf else "model.embed_tokens.weight"),
      ("final_norm", "scale"): Source("output_norm.weight" if gguf else "model.norm.weight"),
  }
  norms = {**(_NORMS_POST if config.post_norms else _NORMS_GEMMA1), **(_QK_NORMS if config.qk_norm else {})}
  for i in range(config.num_layers):
    for module, names in LINEARS.items():
      sources[(f"layers_{i}", *module, "kernel")] = Source(tensor(i, names[which]), (1, 0))
    for module, names in norms.items():
      sources[(f"layers_{i}", *module, "scale")] = Source(tensor(i, names[which]))
  return sources


def _ignored(name: str) -> bool:
  """Tensors a Gemma checkpoint may carry that the model does not use: the tied LM head (checked
  by config.json's tie_word_embeddings) and RoPE buffers some exporters save."""
  return name in ("lm_head.weight", "output.weight") or name.endswith("rotary_emb.inv_freq")


# ---------------------------------------------------------------------------------------------
# GGUF

def gguf_reader(path: str):
  """The file's metadata and tensor table (`gguf_file.GGUFFile`), one per file (version), shared by the
  model and tokenizer loaders."""
  if not os.path.isfile(path):
    raise MissingCheckpointError(f"GGUF file {path!r} does not exist")
  stat = os.stat(path)
  return _cached_reader(os.path.abspath(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=2)
def _cached_reader(path: str, mtime_ns: int, size: int):
  try:
    return GGUFFile(path)
  except Exception as e:  # ValueError, struct.error, UnicodeDecodeError, ... on a damaged file
    raise CheckpointError(f"{path!r} is not a readable GGUF file ({type(e).__name__}: {e})") from e


def gguf_field(reader, key: str, default=None):
  return reader.fields.get(key, default)


def gguf_architecture(path: str) -> str | None:
  return gguf_field(gguf_reader(path), "general.architecture")


def gguf_header(reader, path: str, architectures: tuple[str, ...], what: str):
  """(architecture, its metadata as `meta(key, default)`, the sizes every decoder needs) of a GGUF
  file of one of `architectures`, or a CheckpointError naming what is wrong."""
  arch = gguf_field(reader, "general.architecture")
  if arch not in architectures:
    raise CheckpointError(f"{path!r} holds a {arch!r} model, not {what} (GGUF architectures {', '.join(architectures)})")
  meta = lambda key, default=None: gguf_field(reader, f"{arch}.{key}", default)
  required = {key: meta(key) for key in ("embedding_length", "block_count", "feed_forward_length",
                                         "attention.head_count")}
  if None in required.values():
    raise CheckpointError(f"{path!r} lacks GGUF metadata {[k for k, v in required.items() if v is None]}")
  return arch, meta, required


class LazyTensor:
  """A GGUF tensor dequantised only when numpy asks for its values (assemble reads .shape first),
  minus `shift`, then through `transform` (a function of the (out, in)-shaped array) if given."""

  def __init__(self, tensor, shift: float = 0.0, transform=None):
    self._tensor, self._shift, self._transform = tensor, shift, transform
    self.shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists dims innermost first

  def __array__(self, dtype=None, copy=None):
    values = gguf.quants.dequantize(self._tensor.data, self._tensor.tensor_type).reshape(self.shape)
    values = values.astype(np.float32) - self._shift
    values = values if self._transform is None else self._transform(values)
    return values if dtype is None else values.astype(dtype)


def _gguf_config(reader, path: str) -> GemmaConfig:
  arch, meta, required = gguf_header(reader, path, GGUF_ARCHITECTURES, "Gemma")
  hidden, num_layers, num_heads = required["embedding_length"], required["block_count"], required["attention.head_count"]
  num_kv_heads = meta("attention.head_count_kv", num_heads)
  if not isinstance(num_kv_heads, int):
    raise CheckpointError(f"{path!r}: per-layer head_count_kv is not supported")
  head_dim = meta("attention.key_length", hidden // num_heads)
  embedding = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
  if embedding is None:
    raise CheckpointError(f"{path!r} has no token_embd.weight tensor")
  # llama.cpp scales queries by head_dim ** -0.5 except in the 27B models (hidden / heads): the files
  # do not carry query_pre_attn_scalar, so follow it (46 layers: Gemma 2 27B; 62: Gemma 3 27B).
  is_27b = (arch, num_layers) in (("gemma2", 46), ("gemma3", 62))
  if arch == "gemma":
    layer_types, window = (FULL,) * num_layers, None
  else:  # llama.cpp's defaults: Gemma 2 alternates from a sliding layer 0, Gemma 3 has every 6th
    # layer global; newer files state the pattern (a period, or one "is sliding" flag per layer).
    pattern = meta("attention.sliding_window_pattern", 2 if arch == "gemma2" else 6)
    if isinstance(pattern, list):
      layer_types = tuple(SLIDING if sliding else FULL for sliding in pattern)
    else:
      layer_types = tuple(SLIDING if (i + 1) % pattern else FULL for i in range(num_layers))
    window = meta("attention.sliding_window", 4096)
  scaling = meta("rope.scaling.type", "none")
  if scaling not in ("none", "linear"):
    raise CheckpointError(f"{path!r}: RoPE scaling {scaling!r} is not supported")
  eos = gguf_field(reader, "tokenizer.ggml.eos_token_id", 1)
  theta = meta("rope.freq_base", 1_000_000.0 if arch == "gemma3" else 10_000.0)
  return GemmaConfig(
      family=arch, vocab_size=int(embedding.shape[1]), hidden_size=hidden,
      intermediate_size=meta("feed_forward_length"), num_layers=num_layers, num_heads=num_heads,
      num_kv_heads=num_kv_heads, head_dim=head_dim,
      rms_norm_eps=meta("attention.layer_norm_rms_epsilon", 1e-6),
      query_pre_attn_scalar=float(hidden // num_heads if is_27b else head_dim),
      rope_theta=theta, rope_local_theta=meta("rope.freq_base_swa", 10_000.0 if arch == "gemma3" else theta),
      rope_scaling_factor=float(meta("rope.scaling.factor", 1.0)) if scaling == "linear" else 1.0,
      layer_types=layer_types, sliding_window=window,
      attn_logit_softcapping=meta("attn_logit_softcapping", 50.0) if arch == "gemma2" else None,
      final_logit_softcapping=meta("final_logit_softcapping", 30.0) if arch == "gemma2" else None,
      post_norms=arch != "gemma", qk_norm=arch == "gemma3",
      max_position_embeddings=meta("context_length", 8192),
      bos_token_id=gguf_field(reader, "tokenizer.ggml.bos_token_id", 2), eos_token_ids=(eos,),
      pad_token_id=gguf_field(reader, "tokenizer.ggml.padding_token_id", 0))


def read_gguf(path: str) -> tuple[GemmaConfig, Mapping[str, LazyTensor]]:
  """(config, tensors by GGUF name). llama.cpp stores Gemma norm weights as 1 + w: undone here."""
  reader = gguf_reader(path)
  try:
    config = _gguf_config(reader, path)
  except CheckpointError:
    raise
  except (ValueError, TypeError) as e:  # GemmaConfig's own checks, odd metadata types
    raise CheckpointError(f"{path!r} describes a model bridgejax cannot build: {e}") from e
  tensors = {t.name: LazyTensor(t, 1.0 if t.name.endswith("norm.weight") else 0.0) for t in reader.tensors}
  return config, tensors


# ---------------------------------------------------------------------------------------------
# Loading

def is_gguf(path: str) -> bool:
  return str(path).endswith(".gguf")


def read_checkpoint(path: str, param_dtype=jnp.float32) -> tuple[GemmaConfig, dict]:
  """(config, params) of a HF directory, a .gguf file or a converted directory, checked against the module."""
  path = str(path)
  if is_gguf(path):
    config, tensors = read_gguf(path)
    params = assemble(name_map(config, "gguf"), tensors, _abstract(config), checkpoint=path,
                      param_dtype=param_dtype, ignore=_ignored)
    return config, params
  if converted.is_converted(path):
    config_dict, params = converted.load(path, KIND)
    config = GemmaConfig(**config_dict)
    return config, check_tree(params, _abstract(config), checkpoint=path, param_dtype=param_dtype)
  config = config_from_hf(safetensors_io.read_hf_config(path))
  tensors = safetensors_io.read_hf_tensors(path)
  params = assemble(name_map(config, "hf"), tensors, _abstract(config), checkpoint=path,
                    param_dtype=param_dtype, ignore=_ignored)
  return config, params


def load_language_model(path: str, *, dtype=jnp.float32, param_dtype=jnp.float32, sharding=None) -> LanguageModel:
  """The frozen Gemma decoder of a HF directory, a .gguf file or a converted directory, its params on device.

  dtype is the compute dtype; param_dtype the dtype the parameters are stored in (bfloat16 halves
  the memory of a frozen LLM). Norm statistics, softmax and logits stay float32 either way.
  sharding places the params (see `tree.place`): by default this process's first device; pass the
  mesh's shardings to load straight onto a mesh.
  """
  config, params = read_checkpoint(path, param_dtype)
  params = place(params, sharding)
  return LanguageModel(Gemma(config, dtype=dtype, param_dtype=param_dtype), params, config)


def _abstract(config: GemmaConfig):
  return abstract_init(Gemma(config), jnp.zeros((1, 1), jnp.int32))


def save_hf(path: str, config: GemmaConfig, params) -> None:
  """Writes a Hugging Face directory (config.json + model.safetensors) that transformers'
  Gemma/Gemma2/Gemma3ForCausalLM loads: the inverse of the HF name map."""
  arch, model_type = {"gemma": ("GemmaForCausalLM", "gemma"), "gemma2": ("Gemma2ForCausalLM", "gemma2"),
                      "gemma3": ("Gemma3ForCausalLM", "gemma3_text")}[config.family]
  hf = {"architectures": [arch], "model_type": model_type, "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads, "head_dim": config.head_dim,
        "rms_norm_eps": config.rms_norm_eps, "max_position_embeddings": config.max_position_embeddings,
        "bos_token_id": config.bos_token_id, "pad_token_id": config.pad_token_id,
        "eos_token_id": list(config.eos_token_ids) if len(config.eos_token_ids) > 1 else config.eos_token_ids[0],
        "tie_word_embeddings": True, "attention_bias": False, "dtype": "float32"}
  if config.family == "gemma":
    if config.query_pre_attn_scalar != config.head_dim or config.rope_scaling_factor != 1.0:
      raise ValueError("a Gemma 1 config.json cannot express query_pre_attn_scalar != head_dim or RoPE scaling")
    hf.update(hidden_act=config.hidden_act, rope_theta=config.rope_theta)
  else:
    hf.update(hidden_activation=config.hidden_act, query_pre_attn_scalar=config.query_pre_attn_scalar,
              layer_types=list(config.layer_types), sliding_window=config.sliding_window,
              attn_logit_softcapping=config.attn_logit_softcapping,
              final_logit_softcapping=config.final_logit_softcapping, rope_theta=config.rope_theta)
    if config.family == "gemma3":
      hf.update(rope_local_base_freq=config.rope_local_theta)
  os.makedirs(path, exist_ok=True)
  tensors = export(name_map(config, "hf"), jax.tree.map(lambda x: np.asarray(x, np.float32), params))
  save_file(tensors, os.path.join(path, safetensors_io.SINGLE_FILE), metadata={"format": "pt"})
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf, f, indent=2)
