"""Gemma 1/2/3 decoder: parity with transformers on tiny random checkpoints (HF and GGUF files),
[RET] rows outside the frozen table, gradients, conversion, and every error path."""

import json
import os

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import backbone_helper
from backbone_helper import batch, max_error, reference
from bridgejax.models.decoder import FULL, SLIDING, CausalLM
from bridgejax.models.families import DECODERS
from bridgejax.weights import CheckpointError, MissingCheckpointError, load_language_model
from bridgejax.weights.convert import main as convert_main
from bridgejax.weights.gemma import config_from_hf
from conftest import TINY_GEMMAS, make_tiny_gemma

NAMES = sorted(TINY_GEMMAS)
ATOL = 1e-4


def _assert_parity(out, ref, mask, atol=ATOL):
  """Within atol, relative to the tensor's scale where that exceeds 1 (float32 rounding grows with
  it: Gemma 1's residual stream reaches ~60 in these random models, logits stay ~1)."""
  assert len(out.hidden_states) == len(ref.hidden_states)
  for i, (a, b) in enumerate(zip(out.hidden_states, ref.hidden_states)):
    scale = max(1.0, float(b.abs().max()))
    assert max_error(a, b, mask) <= atol * scale, f"hidden_states[{i}]"
  np.testing.assert_array_equal(out.last_hidden_state, out.hidden_states[-1])
  assert max_error(out.logits, ref.logits, mask) <= atol * max(1.0, float(ref.logits.abs().max()))


@pytest.mark.parametrize("name", NAMES)
def test_parity_on_a_padded_batch(name, tiny_gemmas):
  tiny = tiny_gemmas[name]
  lm = load_language_model(tiny.path)
  c = tiny.model.config
  assert (lm.config.num_heads, lm.config.num_kv_heads) == (c.num_attention_heads, c.num_key_value_heads)
  assert lm.config.layer_types == tuple(getattr(c, "layer_types", None) or [FULL] * c.num_hidden_layers)
  ids, mask = batch()
  out = lm(input_ids=ids, attention_mask=mask)
  assert out.logits.shape == (3, 12, 96) and out.logits.dtype == jnp.float32
  _assert_parity(out, reference(tiny.model, ids, mask), mask)
  # padding is invisible: a row alone, unpadded, gives the same values on its real positions
  alone = lm(input_ids=ids[1:2, :7])
  np.testing.assert_allclose(alone.logits[0], out.logits[1, :7], atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_parity_through_inputs_embeds(name, tiny_gemmas):
  tiny = tiny_gemmas[name]
  lm = load_language_model(tiny.path)
  ids, mask = batch(seed=1)
  embeds = np.array(lm.embed(ids))  # scaled space, as transformers' embed_tokens
  with torch.no_grad():
    ref_embeds = tiny.model.get_input_embeddings()(torch.from_numpy(ids).long()).numpy()
  np.testing.assert_allclose(embeds, ref_embeds, atol=1e-6)
  # arbitrary embeddings (a bridge's visual tokens) enter after the scaling, as in transformers
  embeds[:, :4] = np.random.default_rng(2).standard_normal((3, 4, 32)).astype(np.float32)
  _assert_parity(lm(inputs_embeds=embeds, attention_mask=mask), reference(tiny.model, None, mask, embeds), mask)


@pytest.mark.parametrize("name", ["gemma_gqa", "gemma2", "gemma3"])
def test_extra_embeddings_act_as_rows_past_the_vocabulary(name, tiny_gemmas, tmp_path):
  """[RET]: ids >= vocab_size read extra_embeddings and the tied head gets their logit columns;
  the same as transformers with those rows appended to its embedding table."""
  tiny = tiny_gemmas[name]
  lm = load_language_model(tiny.path)
  extra = np.random.default_rng(3).standard_normal((2, 32)).astype(np.float32) * 0.2
  grown = make_tiny_gemma(name, tmp_path / "grown")
  with torch.no_grad():
    grown.model.resize_token_embeddings(98)
    grown.model.get_input_embeddings().weight[96:] = torch.from_numpy(extra)
  ids, mask = batch(seed=4)
  ids[0, 5], ids[1, 6], ids[2, 2] = 96, 97, 96
  out = lm(input_ids=ids, attention_mask=mask, extra_embeddings=extra)
  assert out.logits.shape == (3, 12, 98)
  _assert_parity(out, reference(grown.model, ids, mask), mask)
  # more positions than vocabulary rows: the head joins the table instead of the logit columns
  many = lm(input_ids=np.tile(ids, (3, 1)), attention_mask=np.tile(mask, (3, 1)), extra_embeddings=extra)
  np.testing.assert_allclose(many.logits[:3], out.logits, atol=1e-5)


def test_gradients_reach_extra_embeddings_and_inputs_embeds_only(tiny_gemmas):
  lm = load_language_model(tiny_gemmas["gemma3"].path)
  ids, mask = batch(seed=5)
  ids[:, 2] = 96  # [RET] as input, and as a logit column through the tied head
  extra = jnp.full((1, 32), 0.1)

  def loss(trainable, frozen):
    embeds = lm.module.apply({"params": frozen}, ids, trainable["extra"], method=type(lm.module).embed)
    embeds = embeds + trainable["shift"]
    out = lm.module.apply({"params": frozen}, inputs_embeds=embeds, attention_mask=mask,
                          extra_embeddings=trainable["extra"])
    return out.logits[..., -1].sum() + out.last_hidden_state[:, 2].sum()

  trainable = {"extra": extra, "shift": jnp.zeros((3, 12, 32))}
  grads = jax.jit(jax.grad(loss))(trainable, lm.params)
  assert float(jnp.abs(grads["extra"]).sum()) > 0
  assert float(jnp.abs(grads["shift"][mask.astype(bool)]).min()) > 0
  assert lm.params["embedding"].shape == (96, 32)  # the frozen table is never grown


def test_bfloat16_params_and_compute_stay_close(tiny_gemmas):
  tiny = tiny_gemmas["gemma2"]
  lm = load_language_model(tiny.path, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  assert lm.params["layers_0"]["attn"]["q_proj"]["kernel"].dtype == jnp.bfloat16
  ids, mask = batch()
  out, ref = lm(input_ids=ids, attention_mask=mask), reference(tiny.model, ids, mask)
  assert out.logits.dtype == jnp.float32  # logits, softmax and norm statistics are float32
  real = mask.astype(bool)
  error = np.linalg.norm((np.asarray(out.logits) - ref.logits.numpy())[real]) / np.linalg.norm(ref.logits.numpy()[real])
  assert error < 0.03, error


def test_transformers_4_config_layout_reads_the_same(tiny_gemmas, tmp_path):
  """Hub configs written by transformers 4.x: rope_theta / rope_local_base_freq / rope_scaling and
  sliding_window_pattern instead of rope_parameters and layer_types."""
  with open(os.path.join(tiny_gemmas["gemma3"].path, "config.json")) as f:
    new = json.load(f)
  old = {k: v for k, v in new.items() if k not in ("rope_parameters", "layer_types", "_sliding_window_pattern")}
  old.update(rope_theta=1_000_000.0, rope_local_base_freq=10_000.0, sliding_window_pattern=2,
             rope_scaling={"rope_type": "linear", "factor": 2.0})
  assert config_from_hf(old) == config_from_hf(new)
  assert config_from_hf(new).layer_types == (SLIDING, FULL, SLIDING, FULL)
  assert config_from_hf(new).rope_scaling_factor == 2.0
  gemma1 = {**json.load(open(os.path.join(tiny_gemmas["gemma_mqa"].path, "config.json"))), "hidden_act": "gelu"}
  assert config_from_hf(gemma1).hidden_act == "gelu_pytorch_tanh"  # what transformers runs for "gelu"


# ------------------------------------------------------------------------------------------------
# GGUF files written here from the tiny checkpoints, with gguf's own HF -> GGUF name map

def write_gguf(tiny, path, arch="gemma2", tokens=None):
  """A float32 GGUF of a tiny HF Gemma, as llama.cpp writes one (norm weights stored as 1 + w)."""
  def metadata(writer, c):
    if arch == "gemma2":
      writer.add_sliding_window(c.sliding_window)
      writer.add_attn_logit_softcapping(c.attn_logit_softcapping)
      writer.add_final_logit_softcapping(c.final_logit_softcapping)

  tensor_names = {"gemma": gguf.MODEL_ARCH.GEMMA, "gemma2": gguf.MODEL_ARCH.GEMMA2,
                  "gemma3": gguf.MODEL_ARCH.GEMMA3}.get(arch, gguf.MODEL_ARCH.LLAMA)
  return backbone_helper.write_gguf(tiny.model, path, arch, tensor_names, skip=("lm_head.weight",),
                                    value=lambda name, array: array + 1 if "norm" in name else array,
                                    metadata=metadata, tokens=tokens)


@pytest.mark.parametrize("name,arch,overrides", [
    ("gemma_gqa", "gemma", {}),
    # llama.cpp has no query_pre_attn_scalar: it scales by head_dim, so the reference does too
    ("gemma2", "gemma2", {"query_pre_attn_scalar": 8}),
])
def test_gguf_parity(name, arch, overrides, tmp_path):
  tiny = make_tiny_gemma(name, tmp_path / "hf", **overrides)
  lm = load_language_model(write_gguf(tiny, tmp_path / "model.gguf", arch))
  assert lm.config.family == arch
  ids, mask = batch(seed=6)
  _assert_parity(lm(input_ids=ids, attention_mask=mask), reference(tiny.model, ids, mask), mask)


# ------------------------------------------------------------------------------------------------
# Conversion

def test_convert_cli_round_trip_from_hf_and_gguf(tmp_path, tiny_gemmas, capsys):
  tiny = tiny_gemmas["gemma3"]
  ids, mask = batch()
  want = load_language_model(tiny.path)(input_ids=ids, attention_mask=mask).logits
  assert convert_main(["--hf", tiny.path, "--out", str(tmp_path / "conv"), "--dtype", "bfloat16"]) == 0
  assert "gemma" in capsys.readouterr().out
  lm = load_language_model(str(tmp_path / "conv"), param_dtype=jnp.bfloat16)
  assert lm.params["embedding"].dtype == jnp.bfloat16
  assert lm.config == load_language_model(tiny.path).config
  real = mask.astype(bool)  # weights rounded to bf16, compute float32
  got = load_language_model(str(tmp_path / "conv"))(input_ids=ids, attention_mask=mask).logits
  np.testing.assert_allclose(got[real], want[real], atol=0.1)

  gguf_file = write_gguf(tiny_gemmas["gemma_mqa"], tmp_path / "m.gguf", "gemma")
  assert convert_main(["--hf", gguf_file, "--out", str(tmp_path / "conv_gguf")]) == 0
  np.testing.assert_array_equal(load_language_model(str(tmp_path / "conv_gguf")).params["embedding"],
                                load_language_model(gguf_file).params["embedding"])


# ------------------------------------------------------------------------------------------------
# Errors

def _copy_with(tiny, path, *, config=None, drop=(), add=None, reshape=None):
  """A broken copy of a tiny checkpoint: edited config, dropped/added/reshaped tensors."""
  from safetensors.numpy import save_file

  from bridgejax.weights.safetensors_io import read_hf_tensors

  os.makedirs(path)
  with open(os.path.join(tiny.path, "config.json")) as f:
    hf = {**json.load(f), **(config or {})}
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf, f)
  tensors = {k: np.array(v) for k, v in read_hf_tensors(tiny.path).items() if k not in drop}
  tensors.update(add or {})
  for name, shape in (reshape or {}).items():
    tensors[name] = np.zeros(shape, np.float32)
  save_file(tensors, os.path.join(path, "model.safetensors"))
  return str(path)


def test_missing_directory_and_files(tmp_path, tiny_gemmas):
  with pytest.raises(MissingCheckpointError, match="does not exist"):
    load_language_model(str(tmp_path / "nowhere"))
  os.makedirs(tmp_path / "empty")
  with pytest.raises(MissingCheckpointError, match="no config.json"):
    load_language_model(str(tmp_path / "empty"))
  path = _copy_with(tiny_gemmas["gemma_mqa"], tmp_path / "no_weights")
  os.remove(os.path.join(path, "model.safetensors"))
  with pytest.raises(MissingCheckpointError, match="model.safetensors"):
    load_language_model(path)
  with pytest.raises(MissingCheckpointError, match="does not exist"):
    load_language_model(str(tmp_path / "nowhere.gguf"))


def test_unknown_or_unsupported_architecture(tmp_path, tiny_gemmas):
  path = _copy_with(tiny_gemmas["gemma_mqa"], tmp_path / "phi",
                    config={"architectures": ["PhiForCausalLM"], "model_type": "phi"})
  with pytest.raises(CheckpointError, match="unknown language model architecture 'PhiForCausalLM'"):
    load_language_model(path)
  assert convert_main(["--hf", path, "--out", str(tmp_path / "out")]) == 1
  path = _copy_with(tiny_gemmas["gemma_mqa"], tmp_path / "untied", config={"tie_word_embeddings": False})
  with pytest.raises(CheckpointError, match="tie_word_embeddings"):
    load_language_model(path)


def test_missing_unexpected_and_misshapen_tensors(tmp_path, tiny_gemmas):
  tiny = tiny_gemmas["gemma2"]
  path = _copy_with(tiny, tmp_path / "a", drop=["model.layers.1.self_attn.k_proj.weight"],
                    add={"model.layers.1.self_attn.extra.weight": np.zeros(3, np.float32)})
  with pytest.raises(CheckpointError) as error:
    load_language_model(path)
  assert "missing tensors (1): model.layers.1.self_attn.k_proj.weight" in str(error.value)
  assert "unexpected tensors (1): model.layers.1.self_attn.extra.weight" in str(error.value)
  path = _copy_with(tiny, tmp_path / "b", reshape={"model.layers.0.mlp.up_proj.weight": (40, 32)})
  with pytest.raises(CheckpointError, match=r"model.layers.0.mlp.up_proj.weight: expected \(48, 32\), got \(40, 32\)"):
    load_language_model(path)
  # config.json of a different model than the weights
  path = _copy_with(tiny, tmp_path / "c", config={"num_key_value_heads": 4})
  with pytest.raises(CheckpointError, match="shape mismatches"):
    load_language_model(path)


def test_gguf_that_is_not_gemma_or_not_gguf(tmp_path, tiny_gemmas):
  path = write_gguf(tiny_gemmas["gemma_mqa"], tmp_path / "phi2.gguf", "phi2")
  with pytest.raises(CheckpointError, match="holds a 'phi2' model; load_language_model reads GGUF architectures "
                                            "gemma, gemma2, gemma3, llama"):
    load_language_model(path)
  assert convert_main(["--hf", path, "--out", str(tmp_path / "out")]) == 1
  (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
  with pytest.raises(CheckpointError, match="not a readable GGUF file"):
    load_language_model(str(tmp_path / "junk.gguf"))


def test_every_decoder_family_is_a_causal_lm():
  """model.py, generate.py and weights.LanguageModel type the LLM by models/decoder.CausalLM."""
  for config_class, module_class in DECODERS.items():
    module = module_class(config_class())  # the default (full-size) config: nothing is initialised
    assert isinstance(module, CausalLM), module_class.__name__
