"""LLaMA-family decoders (LLaMA 2/3, Mistral, Qwen2): parity with transformers on tiny random
checkpoints written here (hidden states, logits, greedy decoding, bf16), [RET] rows with tied and
untied heads, sharded and converted checkpoints, and the error paths Gemma's loader has."""

import copy
import dataclasses
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from bridgejax.models.llama import Llama, LlamaConfig, inv_frequencies
from bridgejax.weights import CheckpointError, load_language_model
from bridgejax.weights.convert import main as convert_main
from bridgejax.weights.llama import config_from_hf

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


@dataclasses.dataclass
class Tiny:
  name: str
  path: str
  model: object


def make_tiny(name, path, seed=0, max_shard_size=None):
  import transformers

  model_class, config_class, kwargs = TINY[name]
  torch.manual_seed(seed)
  model = getattr(transformers, model_class)(getattr(transformers, config_class)(**{**_COMMON, **kwargs})).eval()
  with torch.no_grad():  # transformers initialises norms at 1 and biases at 0: make both matter
    for param_name, param in model.named_parameters():
      if "norm" in param_name:
        param.normal_(1.0, 0.5)
      elif param_name.endswith("bias"):
        param.normal_(0.0, 0.5)
  kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
  model.save_pretrained(str(path), **kw)
  return Tiny(name, str(path), model)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  root = tmp_path_factory.mktemp("tiny_llamas")
  return {name: make_tiny(name, root / name) for name in NAMES}


def _batch(seed=0):
  """Three right-padded rows of 12, 7 and 3 real tokens (longer than Mistral's window of 4)."""
  ids = np.random.default_rng(seed).integers(3, VOCAB, (3, 12)).astype(np.int32)
  ids[:, 0] = 2  # BOS
  mask = (np.arange(12)[None] < np.array([[12], [7], [3]])).astype(np.int32)
  return np.where(mask == 1, ids, 0), mask


def _reference(model, ids=None, mask=None, embeds=None):
  with torch.no_grad():
    return model(input_ids=None if ids is None else torch.from_numpy(ids).long(),
                 inputs_embeds=None if embeds is None else torch.from_numpy(np.asarray(embeds)),
                 attention_mask=None if mask is None else torch.from_numpy(mask).long(), output_hidden_states=True)


def _max_error(ours, ref, mask):
  """Max abs difference over the real (unpadded) positions."""
  return float(np.abs(np.asarray(ours, np.float32) - ref.float().numpy())[mask.astype(bool)].max())


def _assert_parity(out, ref, mask, atol=ATOL):
  assert len(out.hidden_states) == len(ref.hidden_states)
  errors = [_max_error(a, b, mask) for a, b in zip(out.hidden_states, ref.hidden_states)]
  errors.append(_max_error(out.logits, ref.logits, mask))
  print(f"max errors (hidden states..., logits): {['%.1e' % e for e in errors]}")
  assert max(errors) <= atol, errors
  np.testing.assert_array_equal(out.last_hidden_state, out.hidden_states[-1])


def _right_padded(prompts, pad=0):
  ids = np.full((len(prompts), max(map(len, prompts))), pad, np.int32)
  mask = np.zeros_like(ids)
  for i, p in enumerate(prompts):
    ids[i, :len(p)], mask[i, :len(p)] = p, 1
  return ids, mask


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
  _assert_parity(out, _reference(t.model, ids, mask), mask)

  embeds = np.array(lm.embed(ids))
  with torch.no_grad():
    np.testing.assert_array_equal(embeds, t.model.get_input_embeddings()(torch.from_numpy(ids).long()).numpy())
  embeds[:, :4] = np.random.default_rng(2).standard_normal((3, 4, WIDTH)).astype(np.float32)
  _assert_parity(lm(inputs_embeds=embeds, attention_mask=mask), _reference(t.model, None, mask, embeds), mask)

  prompts = [[2, 17, 33, 5, 60, 71, 9], [2, 44, 12], [2, 80, 3, 91, 27]]
  ids, mask = _right_padded(prompts)
  ours = np.asarray(lm.generate(ids, attention_mask=mask, max_new_tokens=16, pad_id=0))
  with torch.no_grad():
    want = []
    for p in prompts:
      new = t.model.generate(torch.tensor([p]), max_new_tokens=16, do_sample=False, pad_token_id=0)[0, len(p):]
      want.append(new.tolist() + [0] * (16 - len(new)))
  np.testing.assert_array_equal(ours, want)
  assert len({int(x) for x in ours.ravel()}) > 3  # the tiny models say more than one word


@pytest.mark.parametrize("name", ["llama_gqa_tied", "llama3_untied"])
def test_extra_embeddings_act_as_rows_past_the_vocabulary(name, tiny, tmp_path):
  """[RET]: ids >= vocab_size read extra_embeddings, which are also the extra logit columns, with a
  tied or an untied head (FROMAGe ties the [RET] row): transformers with the rows appended to both."""
  t = tiny[name]
  lm = load_language_model(t.path)
  extra = np.random.default_rng(3).standard_normal((2, WIDTH)).astype(np.float32) * 0.2
  grown = make_tiny(name, tmp_path / "grown")
  with torch.no_grad():
    grown.model.resize_token_embeddings(VOCAB + 2)
    grown.model.get_input_embeddings().weight[VOCAB:] = torch.from_numpy(extra)
    grown.model.get_output_embeddings().weight[VOCAB:] = torch.from_numpy(extra)
  ids, mask = _batch(seed=4)
  ids[0, 5], ids[1, 6], ids[2, 2] = VOCAB, VOCAB + 1, VOCAB
  out = lm(input_ids=ids, attention_mask=mask, extra_embeddings=extra)
  assert out.logits.shape == (3, 12, VOCAB + 2)
  _assert_parity(out, _reference(grown.model, ids, mask), mask)


def test_bfloat16_params_and_compute_stay_close(tiny):
  """bf16 params and compute: logits within 3e-2 relative L2 of float32 transformers, and within
  1.5x of transformers' own bf16 run (measured: 1.26e-2 vs 1.15e-2 for this Qwen2; 1.1e-2 to 1.4e-2
  vs 1.1e-2 to 1.6e-2 for the other tiny models)."""
  t = tiny["qwen2"]
  lm = load_language_model(t.path, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  assert lm.params["layers_0"]["attn"]["q_proj"]["bias"].dtype == jnp.bfloat16
  ids, mask = _batch()
  out, ref = lm(input_ids=ids, attention_mask=mask), _reference(t.model, ids, mask).logits.numpy()
  assert out.logits.dtype == jnp.float32
  with torch.no_grad():
    torch_bf16 = copy.deepcopy(t.model).to(torch.bfloat16)(
        input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long()).logits.float().numpy()
  real = mask.astype(bool)
  relative = lambda a: np.linalg.norm((np.asarray(a) - ref)[real]) / np.linalg.norm(ref[real])
  print(f"bf16 logits: relative L2 error {relative(out.logits):.2e} (transformers bf16: {relative(torch_bf16):.2e})")
  assert relative(out.logits) < 0.03
  assert relative(out.logits) <= relative(torch_bf16) * 1.5


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
# Errors

def _copy_with(t, path, *, config=None, drop=(), reshape=None):
  from safetensors.numpy import save_file

  from bridgejax.weights.safetensors_io import read_hf_tensors

  os.makedirs(path)
  with open(os.path.join(t.path, "config.json")) as f:
    hf = {**json.load(f), **(config or {})}
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf, f)
  tensors = {k: np.array(v) for k, v in read_hf_tensors(t.path).items() if k not in drop}
  for name, shape in (reshape or {}).items():
    tensors[name] = np.zeros(shape, np.float32)
  save_file(tensors, os.path.join(path, "model.safetensors"))
  return str(path)


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
