"""LLaMA-family decoders (LLaMA 2/3, Mistral, Qwen2): parity with transformers on tiny random
checkpoints written here (hidden states, logits, greedy decoding, bf16), [RET] rows with tied and
untied heads, sharded and converted checkpoints, and the error paths Gemma's loader has."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from backbone_helper import (assert_decoder_parity, assert_greedy_equals_transformers, batch, bf16_relative_errors,
                             Tiny, copy_with, perturb_norms_and_biases, reference, with_rows_appended, write_gguf)
from bridgejax.models.llama import Llama, LlamaConfig, inv_frequencies
from bridgejax.weights import CheckpointError, load_language_model
from bridgejax.weights.convert import main as convert_main
from bridgejax.weights.llama import config_from_hf, read_checkpoint

VOCAB, WIDTH = 96, 32
_COMMON = dict(vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=48, num_attention_heads=4, head_dim=8,
               num_hidden_layers=2, initializer_range=0.2, pad_token_id=0, eos_token_id=1, bos_token_id=2,
               max_position_embeddings=128)
# llama3 RoPE with a pre-training context of 64: with head_dim 8 (wavelengths 6, 63, 628, 6283) the
# four frequencies fall in the kept, smoothed and divided bands.
_LLAMA3 = {"rope_type": "llama3", "rope_theta": 10_000.0, "factor": 8.0, "low_freq_factor": 1.0,
           "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
TINY = {  # name: (transformers model class, config class, config kwargs)
    "llama_gqa_tied": ("LlamaForCausalLM", "LlamaConfig", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    # untied head, MQA, llama3 RoPE scaling, attention and MLP biases (LLaMA's attention_bias / mlp_bias)
    "llama3_untied": ("LlamaForCausalLM", "LlamaConfig", dict(
        num_key_value_heads=1, tie_word_embeddings=False, rope_parameters=_LLAMA3, attention_bias=True,
        mlp_bias=True)),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", dict(
        num_key_value_heads=2, tie_word_embeddings=True, rope_parameters={"rope_type": "default",
                                                                          "rope_theta": 1_000_000.0})),
    # every layer slides, with a window shorter than the test sequences
    "mistral": ("MistralForCausalLM", "MistralConfig", dict(
        num_key_value_heads=2, tie_word_embeddings=False, sliding_window=4)),
}
NAMES = sorted(TINY)
ATOL = 1e-5  # float32, max abs


def make_tiny(name, path, seed=0, max_shard_size=None, **overrides):
  import transformers

  model_class, config_class, kwargs = TINY[name]
  torch.manual_seed(seed)
  hf_config = getattr(transformers, config_class)(**{**_COMMON, **kwargs, **overrides})
  model = getattr(transformers, model_class)(hf_config).eval()
  perturb_norms_and_biases(model, lambda name: "norm" in name)
  kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
  model.save_pretrained(str(path), **kw)
  return Tiny(name, str(path), model)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  root = tmp_path_factory.mktemp("tiny_llamas")
  return {name: make_tiny(name, root / name) for name in NAMES}


def _batch(seed=0):
  return batch(VOCAB, seed)


def _assert_parity(out, ref, mask, atol=ATOL):
  assert_decoder_parity(out, ref, mask, atol)


# ------------------------------------------------------------------------------------------------
# Parity

@pytest.mark.parametrize("name", NAMES)
def test_parity_and_greedy_decoding(name, tiny):
  """Hidden states and logits on a ragged batch, through ids and through inputs_embeds (a visual
  prefix), and 16 greedy tokens: all as transformers."""
  t = tiny[name]
  lm = load_language_model(t.path)
  assert isinstance(lm.module, Llama) and lm.config.family == name.split("_")[0].rstrip("3")
  assert lm.module.embed_scale == 1.0  # no normaliser: visual_token_scale "sqrt_d" multiplies by 1
  c = t.model.config
  assert (lm.config.num_heads, lm.config.num_kv_heads) == (c.num_attention_heads, c.num_key_value_heads)
  assert ("lm_head" in lm.params) != c.tie_word_embeddings
  ids, mask = _batch()
  out = lm(input_ids=ids, attention_mask=mask)
  assert out.logits.shape == (3, 12, VOCAB) and out.logits.dtype == jnp.float32
  _assert_parity(out, reference(t.model, ids, mask), mask)

  embeds = np.array(lm.embed(ids))
  with torch.no_grad():
    np.testing.assert_array_equal(embeds, t.model.get_input_embeddings()(torch.from_numpy(ids).long()).numpy())
  embeds[:, :4] = np.random.default_rng(2).standard_normal((3, 4, WIDTH)).astype(np.float32)
  _assert_parity(lm(inputs_embeds=embeds, attention_mask=mask), reference(t.model, None, mask, embeds), mask)

  assert_greedy_equals_transformers(lm, t.model, [[2, 17, 33, 5, 60, 71, 9], [2, 44, 12], [2, 80, 3, 91, 27]])


@pytest.mark.parametrize("name", ["llama_gqa_tied", "llama3_untied"])
def test_extra_embeddings_act_as_rows_past_the_vocabulary(name, tiny):
  """[RET]: ids >= vocab_size read extra_embeddings, which are also the extra logit columns, with a
  tied or an untied head (FROMAGe ties the [RET] row): transformers with the rows appended to both."""
  t = tiny[name]
  lm = load_language_model(t.path)
  extra = np.random.default_rng(3).standard_normal((2, WIDTH)).astype(np.float32) * 0.2
  grown = with_rows_appended(tiny[name].model, extra)
  ids, mask = _batch(seed=4)
  ids[0, 5], ids[1, 6], ids[2, 2] = VOCAB, VOCAB + 1, VOCAB
  out = lm(input_ids=ids, attention_mask=mask, extra_embeddings=extra)
  assert out.logits.shape == (3, 12, VOCAB + 2)
  _assert_parity(out, reference(grown, ids, mask), mask)


def test_bfloat16_params_and_compute_stay_close(tiny):
  """bf16 params and compute: logits within 3e-2 relative L2 of float32 transformers, and within
  1.5x of transformers' own bf16 run (measured: 1.26e-2 vs 1.15e-2 for this Qwen2; 1.1e-2 to 1.4e-2
  vs 1.1e-2 to 1.6e-2 for the other tiny models)."""
  t = tiny["qwen2"]
  lm = load_language_model(t.path, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  assert lm.params["layers_0"]["attn"]["q_proj"]["bias"].dtype == jnp.bfloat16
  ours, theirs = bf16_relative_errors(lm, t.model, *_batch())
  print(f"bf16 logits: relative L2 error {ours:.2e} (transformers bf16: {theirs:.2e})")
  assert ours < 0.03
  assert ours <= theirs * 1.5


def test_llama3_rope_frequencies_equal_transformers():
  from transformers import LlamaConfig as HFConfig
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

  hf = HFConfig(**{**_COMMON, "head_dim": 32, "rope_parameters": {**_LLAMA3, "original_max_position_embeddings": 512}, "max_position_embeddings": 4096})
  want, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
  ours = inv_frequencies(config_from_hf(hf.to_dict()))
  np.testing.assert_allclose(ours, want.numpy(), rtol=1e-6)


def test_transformers_4_config_layout_reads_the_same(tiny):
  """Hub configs written by transformers 4.x: rope_theta + rope_scaling, Qwen2's use_sliding_window."""
  with open(os.path.join(tiny["llama3_untied"].path, "config.json")) as f:
    new = json.load(f)
  old = {k: v for k, v in new.items() if k != "rope_parameters"}
  old.update(rope_theta=10_000.0, rope_scaling={k: v for k, v in _LLAMA3.items() if k != "rope_theta"})
  assert config_from_hf(old) == config_from_hf(new)
  assert config_from_hf(new).rope_type == "llama3" and config_from_hf(new).o_bias
  qwen = {"architectures": ["Qwen2ForCausalLM"], **_COMMON, "num_hidden_layers": 4, "use_sliding_window": True,
          "sliding_window": 8, "max_window_layers": 2, "rope_theta": 1e6}
  assert config_from_hf(qwen).layer_types == ("full_attention",) * 2 + ("sliding_attention",) * 2
  assert config_from_hf(qwen).qkv_bias and not config_from_hf(qwen).o_bias
  assert config_from_hf({**qwen, "use_sliding_window": False}).sliding_window is None
  mistral = {**qwen, "architectures": ["MistralForCausalLM"], "sliding_window": None}
  assert config_from_hf(mistral).layer_types == ("full_attention",) * 4  # Mistral v0.2+: no window


# ------------------------------------------------------------------------------------------------
# Sharded and converted checkpoints

def test_sharded_and_converted_checkpoints_load_the_same(tiny, tmp_path, capsys):
  t = tiny["llama3_untied"]
  ids, mask = _batch()
  want = np.asarray(load_language_model(t.path)(input_ids=ids, attention_mask=mask).logits)
  sharded = make_tiny("llama3_untied", tmp_path / "sharded", max_shard_size="20KB")
  assert os.path.isfile(os.path.join(sharded.path, "model.safetensors.index.json"))
  np.testing.assert_array_equal(load_language_model(sharded.path)(input_ids=ids, attention_mask=mask).logits, want)

  assert convert_main(["--hf", t.path, "--out", str(tmp_path / "conv")]) == 0
  assert "llama" in capsys.readouterr().out
  lm = load_language_model(str(tmp_path / "conv"))
  assert isinstance(lm.module, Llama) and lm.config == load_language_model(t.path).config
  np.testing.assert_array_equal(lm(input_ids=ids, attention_mask=mask).logits, want)


# ------------------------------------------------------------------------------------------------
# GGUF, written here as llama.cpp's convert_hf_to_gguf.py writes LLaMA and Mistral (architecture
# "llama", q/k rows permuted) and Qwen2 (architecture "qwen2", rows as HF's, q/k/v biases), against
# transformers loading the same file

def _llama_cpp_permute(weights, heads):
  """convert_hf_to_gguf.py's LlamaModel.permute: HF's half-split RoPE rows -> llama.cpp's interleaved order."""
  return weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(
      weights.shape)


def write_llama_gguf(tiny, path, arch="llama", name=None):
  """`tiny` as a GGUF of llama.cpp's `arch` ("llama": q/k rows permuted) and general.name `name`."""
  import gguf

  c = tiny.model.config

  def value(tensor, array):
    if arch == "llama" and tensor.endswith(("q_proj.weight", "k_proj.weight")):
      return _llama_cpp_permute(array, c.num_attention_heads if "q_proj" in tensor else c.num_key_value_heads)
    return array

  def metadata(writer, c):
    writer.add_rope_dimension_count(c.head_dim)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    if name is not None:
      writer.add_name(name)

  tensor_names = gguf.MODEL_ARCH.QWEN2 if arch == "qwen2" else gguf.MODEL_ARCH.LLAMA
  return write_gguf(tiny.model, path, arch, tensor_names, value=value, metadata=metadata,
                    skip=("lm_head.weight",) if c.tie_word_embeddings else ())


def _transformers_from_gguf(path):
  """transformers' own GGUF loading of the file: the reference."""
  import transformers

  return transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                            dtype=torch.float32).eval()


GGUF_CASES = {  # id: (TINY name, make_tiny overrides, GGUF architecture, general.name, transformers class)
    "llama_tied": ("llama_gqa_tied", {}, "llama", None, "LlamaForCausalLM"),
    "llama_untied": ("llama_gqa_tied", {"tie_word_embeddings": False}, "llama", None, "LlamaForCausalLM"),
    # Mistral v0.2+ (no window; llama.cpp and transformers run a GGUF Mistral as LLaMA)
    "mistral": ("mistral", {"sliding_window": None}, "llama", "Mistral-7B-Instruct-v0.2", "LlamaForCausalLM"),
    "qwen2": ("qwen2", {}, "qwen2", None, "Qwen2ForCausalLM"),
}


@pytest.mark.parametrize("case", sorted(GGUF_CASES))
def test_gguf_parity(case, tmp_path, capsys):
  """LLaMA (GQA, tied or untied head in `output.weight`), Mistral and Qwen2 GGUF files load to the
  hidden states and logits of transformers loading the same file, which equal the source model's
  (so the file is written right); an untied one converts."""
  tiny_name, overrides, arch, name, hf_class = GGUF_CASES[case]
  t = make_tiny(tiny_name, tmp_path / "hf", **overrides)
  path = write_llama_gguf(t, tmp_path / "model.gguf", arch, name)
  theirs = _transformers_from_gguf(path)
  assert type(theirs).__name__ == hf_class
  lm = load_language_model(path)
  assert isinstance(lm.module, Llama) and lm.config.family == arch and lm.config.qkv_bias == (arch == "qwen2")
  c = theirs.config
  assert (lm.config.tie_word_embeddings, lm.config.num_kv_heads) == (c.tie_word_embeddings, c.num_key_value_heads)
  ids, mask = _batch(seed=6)
  ref = reference(theirs, ids, mask)
  _assert_parity(lm(input_ids=ids, attention_mask=mask), ref, mask)
  np.testing.assert_allclose(ref.logits.numpy(), reference(t.model, ids, mask).logits.numpy(), atol=ATOL)
  if case == "llama_untied":
    assert convert_main(["--hf", path, "--out", str(tmp_path / "conv")]) == 0
    assert "llama" in capsys.readouterr().out
    np.testing.assert_array_equal(load_language_model(str(tmp_path / "conv")).params["lm_head"], lm.params["lm_head"])


def test_gguf_of_another_architecture_fails_in_one_line(tiny, tmp_path):
  """A Qwen3 GGUF (q/k norms bridgejax lacks) names the architectures that load."""
  import gguf

  path = write_gguf(tiny["qwen2"].model, tmp_path / "qwen3.gguf", "qwen3", gguf.MODEL_ARCH.QWEN2)
  with pytest.raises(CheckpointError, match="holds a 'qwen3' model; load_language_model reads GGUF architectures "
                                            "gemma, gemma2, gemma3, llama, qwen2$"):
    load_language_model(path)
  with pytest.raises(CheckpointError, match="holds a 'qwen3' model, not a LLaMA-family model \\(GGUF "
                                            "architectures llama, qwen2\\)$"):
    read_checkpoint(path)


# ------------------------------------------------------------------------------------------------
# Errors

def _copy_with(t, path, **changes):
  return copy_with(t.path, path, **changes)


def test_bad_checkpoints_fail_clearly(tmp_path, tiny):
  t = tiny["qwen2"]
  path = _copy_with(t, tmp_path / "a", drop=["model.layers.1.self_attn.k_proj.bias"])
  with pytest.raises(CheckpointError, match=r"missing tensors \(1\): model.layers.1.self_attn.k_proj.bias"):
    load_language_model(path)
  path = _copy_with(t, tmp_path / "b", reshape={"model.layers.0.mlp.up_proj.weight": (40, 32)})
  with pytest.raises(CheckpointError, match=r"model.layers.0.mlp.up_proj.weight: expected \(48, 32\), got \(40, 32\)"):
    load_language_model(path)
  # untied in config.json, but the file has no lm_head (a tied checkpoint)
  path = _copy_with(t, tmp_path / "c", config={"tie_word_embeddings": False})
  with pytest.raises(CheckpointError, match=r"missing tensors \(1\): lm_head.weight"):
    load_language_model(path)
  path = _copy_with(t, tmp_path / "d", config={"architectures": ["PhiForCausalLM"], "model_type": "phi"})
  with pytest.raises(CheckpointError, match="unknown language model architecture 'PhiForCausalLM'.*Qwen2ForCausalLM"):
    load_language_model(path)
  assert convert_main(["--hf", path, "--out", str(tmp_path / "out")]) == 1
  path = _copy_with(t, tmp_path / "e", config={"rope_parameters": {"rope_type": "yarn", "factor": 4.0}})
  with pytest.raises(CheckpointError, match="RoPE .* not supported"):
    load_language_model(path)


def test_config_checks():
  with pytest.raises(ValueError, match="multiple of num_kv_heads"):
    LlamaConfig(num_heads=4, num_kv_heads=3)
  with pytest.raises(ValueError, match="rope_type"):
    LlamaConfig(rope_type="yarn")


def test_bridge_model_runs_on_a_llama():
  """BridgeModel builds a Llama from a LlamaConfig and trains through it (remat, segment ids, [RET]
  gradients with an untied head); "sqrt_d" visual tokens use its own normaliser, 1."""
  import jax

  from bridgejax.model import BridgeModel
  from bridgejax.models.clip import CLIPVisionConfig, CLIPVisionTransformer
  from configs.fromage import get_config

  vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2, image_size=28,
                            patch_size=7)
  llm = LlamaConfig(vocab_size=30, hidden_size=24, intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                    head_dim=8, tie_word_embeddings=False)
  config = get_config(None)
  config.concat_prob, config.remat, config.visual_token_scale = 0.5, "llm", "sqrt_d"
  model = BridgeModel.create(config, vision, llm)
  assert isinstance(model.llm, Llama) and model.llm.remat and model.llm.embed_scale == 1.0 and model.ret_id == 30
  init = lambda module, x: jax.jit(module.init)(jax.random.key(0), x)["params"]  # jitted: fewer compiles
  frozen = {"vision": init(CLIPVisionTransformer(vision), jnp.zeros((1, 3, 28, 28))),
            "llm": init(Llama(llm), jnp.zeros((1, 1), jnp.int32))}
  trainable = model.init_trainable(jax.random.key(1), frozen)
  batch = {"image": np.random.default_rng(0).standard_normal((2, 3, 28, 28)).astype(np.float32),
           "text_ids": np.array([[2, 5, 7, 30, 0], [2, 9, 30, 0, 0]], np.int32),
           "text_mask": np.array([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]], np.int32)}
  (loss, metrics), grads = jax.jit(jax.value_and_grad(model.loss, has_aux=True))(trainable, frozen, batch,
                                                                                 jax.random.key(2))
  assert np.isfinite(float(loss)) and float(metrics["text_loss"]) > 0
  assert float(jnp.abs(grads["ret"]["ret_embedding"]).sum()) > 0  # [RET]: input row and logit column


def test_tokenizer_without_bos_adds_none(tmp_path):
  """Qwen2's tokenizer_config.json says "bos_token": null: no BOS, though config.json names one."""
  import tokenizers

  from bridgejax.weights import load_tokenizer

  vocab = {"<|endoftext|>": 0, "a": 1, "b": 2, "<unk>": 3}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  os.makedirs(tmp_path / "tok")
  tok.save(str(tmp_path / "tok" / "tokenizer.json"))
  with open(tmp_path / "tok" / "tokenizer_config.json", "w") as f:
    json.dump({"bos_token": None, "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}, f)
  with open(tmp_path / "tok" / "config.json", "w") as f:
    json.dump({"architectures": ["Qwen2ForCausalLM"], "vocab_size": 8, "bos_token_id": 0}, f)
  t = load_tokenizer(str(tmp_path / "tok"))
  assert t.encode("a b[RET]") == [1, 2, 8] and not t.uses_bos
