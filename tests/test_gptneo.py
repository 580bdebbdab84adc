"""GPT-Neo (Glória 1.3B's architecture): parity with transformers on tiny random checkpoints written
here (hidden states, logits, greedy decoding, bf16), local attention windows, [RET] rows, the
converted format, error paths, and a bridge training on it."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from backbone_helper import (assert_decoder_parity, assert_greedy_equals_transformers, batch, bf16_relative_errors,
                             Tiny, copy_with, perturb_norms_and_biases, reference, with_rows_appended, train_bridge_steps)
from bridgejax.models.decoder import FULL, SLIDING
from bridgejax.models.gptneo import GPTNeo, GPTNeoConfig
from bridgejax.weights import CheckpointError, load_language_model
from bridgejax.weights.convert import main as convert_main
from bridgejax.weights.gptneo import config_from_hf

VOCAB, WIDTH = 96, 32
# initializer_range 0.15 and norms/biases drawn with std 0.3 (make_tiny): residual streams small enough
# that float32 rounding stays well under the 1e-5 bound, weights large enough that greedy decoding varies
_COMMON = dict(vocab_size=VOCAB, hidden_size=WIDTH, num_heads=4, window_size=4, max_position_embeddings=64,
               initializer_range=0.15, bos_token_id=2, eos_token_id=1)
TINY = {  # name: GPTNeoConfig kwargs
    # global, local, global (window 4 < the test sequences), MLP width 4 * D (intermediate_size null)
    "gptneo": dict(num_layers=3, attention_types=[[["global", "local"], 1], [["global"], 1]]),
    # local first, an explicit MLP width, an untied head, the exact gelu
    "gptneo_untied": dict(num_layers=2, attention_types=[[["local", "global"], 1]], intermediate_size=40,
                          tie_word_embeddings=False, activation_function="gelu"),
}
ATOL = 1e-5  # float32, max abs


def make_tiny(name, path, seed=0):
  import transformers

  torch.manual_seed(seed)
  model = transformers.GPTNeoForCausalLM(transformers.GPTNeoConfig(**_COMMON, **TINY[name])).eval()
  perturb_norms_and_biases(model, lambda name: ".ln_" in name and name.endswith("weight"), std=0.3)
  model.save_pretrained(str(path))
  return Tiny(name, str(path), model)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  root = tmp_path_factory.mktemp("tiny_gptneos")
  return {name: make_tiny(name, root / name) for name in TINY}


@pytest.fixture(scope="module")
def lms(tiny):
  return {name: load_language_model(t.path) for name, t in tiny.items()}


@pytest.mark.parametrize("name", sorted(TINY))
def test_parity_and_greedy_decoding(name, tiny, lms):
  """Hidden states and logits on a ragged batch, through ids and through inputs_embeds (a visual
  prefix), and 16 greedy tokens: all as transformers."""
  t, lm = tiny[name], lms[name]
  assert isinstance(lm.module, GPTNeo) and lm.module.embed_scale == 1.0  # visual tokens: no sqrt(D)
  assert lm.config.layer_types == tuple({"global": FULL, "local": SLIDING}[k] for k in t.model.config.attention_layers)
  assert lm.config.sliding_window == 4 and ("lm_head" in lm.params) != t.model.config.tie_word_embeddings
  ids, mask = batch(VOCAB)
  out = lm(input_ids=ids, attention_mask=mask)
  assert out.logits.shape == (3, 12, VOCAB) and out.logits.dtype == jnp.float32
  assert_decoder_parity(out, reference(t.model, ids, mask), mask, ATOL)

  embeds = np.array(lm.embed(ids))  # the token table's space: positions are added inside, as transformers
  with torch.no_grad():
    np.testing.assert_array_equal(embeds, t.model.get_input_embeddings()(torch.from_numpy(ids).long()).numpy())
  embeds[:, :4] = np.random.default_rng(2).standard_normal((3, 4, WIDTH)).astype(np.float32)
  assert_decoder_parity(lm(inputs_embeds=embeds, attention_mask=mask), reference(t.model, None, mask, embeds), mask,
                        ATOL)
  assert_greedy_equals_transformers(lm, t.model, [[2, 17, 33, 5, 60, 71, 9], [2, 44, 12], [2, 80, 3, 91, 27]])


def test_local_window_changes_the_result(tiny, lms):
  """The window matters on these sequences: the same weights with every layer global differ from
  transformers' local layers (so the parity above checks the window, not a no-op)."""
  lm = lms["gptneo"]
  ids, mask = batch(VOCAB)
  everything_global = dataclasses.replace(lm.config, layer_types=(FULL,) * lm.config.num_layers)
  logits = GPTNeo(everything_global).apply({"params": lm.params}, ids, mask).logits
  assert float(jnp.abs(logits - lm(input_ids=ids, attention_mask=mask).logits)[0, 8:].max()) > 1e-3


@pytest.mark.parametrize("name", sorted(TINY))
def test_extra_embeddings_act_as_rows_past_the_vocabulary(name, tiny, lms):
  """[RET]: ids >= vocab_size read extra_embeddings, which are also the extra logit columns:
  transformers with the rows appended to its input table and its (tied or untied) head."""
  extra = np.random.default_rng(3).standard_normal((2, WIDTH)).astype(np.float32) * 0.2
  grown = with_rows_appended(tiny[name].model, extra)
  ids, mask = batch(VOCAB, seed=4)
  ids[0, 5], ids[1, 6], ids[2, 2] = VOCAB, VOCAB + 1, VOCAB
  out = lms[name](input_ids=ids, attention_mask=mask, extra_embeddings=extra)
  assert out.logits.shape == (3, 12, VOCAB + 2)
  assert_decoder_parity(out, reference(grown, ids, mask), mask, ATOL)


def test_bfloat16_params_and_compute_stay_close(tiny):
  """bf16 params and compute: logits within 3e-2 relative L2 of float32 transformers and within
  1.5x of transformers' own bf16 run (measured: 1.04e-2 vs 8.2e-3)."""
  t = tiny["gptneo"]
  lm = load_language_model(t.path, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  assert lm.params["position_embedding"].dtype == jnp.bfloat16
  ours, theirs = bf16_relative_errors(lm, t.model, *batch(VOCAB))
  print(f"bf16 logits: relative L2 error {ours:.2e} (transformers bf16: {theirs:.2e})")
  assert ours < 0.03 and ours <= theirs * 1.5


def test_converted_checkpoint_loads_the_same(tiny, lms, tmp_path, capsys):
  t = tiny["gptneo_untied"]
  ids, mask = batch(VOCAB)
  assert convert_main(["--hf", t.path, "--out", str(tmp_path / "conv")]) == 0
  assert "gpt_neo" in capsys.readouterr().out
  lm = load_language_model(str(tmp_path / "conv"))
  assert isinstance(lm.module, GPTNeo) and lm.config == lms["gptneo_untied"].config
  np.testing.assert_array_equal(lm(input_ids=ids, attention_mask=mask).logits,
                                lms["gptneo_untied"](input_ids=ids, attention_mask=mask).logits)


def test_config_reads_transformers_layouts(tiny):
  with open(os.path.join(tiny["gptneo"].path, "config.json")) as f:
    saved = json.load(f)
  compact = {k: v for k, v in saved.items() if k != "attention_layers"}  # only attention_types
  assert config_from_hf(compact) == config_from_hf(saved)
  assert config_from_hf(saved).layer_types == (FULL, SLIDING, FULL)
  assert config_from_hf(saved).intermediate_size == 4 * WIDTH and config_from_hf(saved).pad_token_id == 1  # EOS
  # GPT-Neo 1.3B's hub config.json: 24 layers of [global, local] x 12, window 256
  neo = {"architectures": ["GPTNeoForCausalLM"], "vocab_size": 50257, "hidden_size": 2048, "num_layers": 24,
         "num_heads": 16, "attention_types": [[["global", "local"], 12]], "window_size": 256,
         "intermediate_size": None, "max_position_embeddings": 2048, "bos_token_id": 50256, "eos_token_id": 50256}
  assert config_from_hf(neo) == GPTNeoConfig()  # our defaults are its shapes (param_count's gloria-1.3b)


def test_bad_checkpoints_fail_clearly(tmp_path, tiny):
  t = tiny["gptneo"]
  path = copy_with(t.path, tmp_path / "a", drop=["transformer.h.1.attn.attention.out_proj.bias"])
  with pytest.raises(CheckpointError, match=r"missing tensors \(1\): transformer.h.1.attn.attention.out_proj.bias"):
    load_language_model(path)
  path = copy_with(t.path, tmp_path / "b", reshape={"transformer.h.0.mlp.c_fc.weight": (40, 32)})
  with pytest.raises(CheckpointError, match=r"transformer.h.0.mlp.c_fc.weight: expected \(128, 32\), got \(40, 32\)"):
    load_language_model(path)
  path = copy_with(t.path, tmp_path / "c", config={"tie_word_embeddings": False})  # no lm_head in the file
  with pytest.raises(CheckpointError, match=r"missing tensors \(1\): lm_head.weight"):
    load_language_model(path)
  path = copy_with(t.path, tmp_path / "d", config={"architectures": ["GPTJForCausalLM"], "model_type": "gptj"})
  with pytest.raises(CheckpointError, match="unknown language model architecture 'GPTJForCausalLM'.*GPTNeoForCausalLM"):
    load_language_model(path)
  assert convert_main(["--hf", path, "--out", str(tmp_path / "out")]) == 1
  path = copy_with(t.path, tmp_path / "e", config={"attention_layers": ["global", "sparse", "global"]})
  with pytest.raises(CheckpointError, match=r"attention types \['sparse'\] are not supported"):
    load_language_model(path)


def test_a_bridge_trains_on_gptneo_with_the_llm_frozen(lms):
  """3 AdamW steps of the FROMAGe bridge on the tiny GPT-Neo (untied head: [RET]'s column is
  still extra_embeddings): losses finite, bridge and [RET] move, every frozen weight bitwise the same."""
  from bridgejax.models.clip import CLIPVisionConfig, CLIPVisionTransformer

  vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2, image_size=28,
                            patch_size=7)
  lm = lms["gptneo_untied"]
  frozen = {"vision": jax.jit(CLIPVisionTransformer(vision).init)(jax.random.key(0), jnp.zeros((1, 3, 28, 28)))["params"],
            "llm": lm.params}
  losses = train_bridge_steps(vision, lm.config, frozen)
  print(f"losses: {losses}")


def test_gpt2_style_tokenizer_json_adds_no_bos_and_appends_ret(tmp_path):
  """A GPT-Neo tokenizer.json (byte-level BPE, ByteLevel post-processor, <|endoftext|> as BOS/EOS/UNK):
  ids as transformers' tokenizer gives them (no BOS), [RET] at vocab_size, pads with EOS."""
  import tokenizers
  import transformers

  from bridgejax.weights import load_tokenizer

  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  tok.post_processor = tokenizers.processors.ByteLevel(trim_offsets=False)
  trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                           initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(["um cão vermelho corre no parque", "uma imagem de um gato"] * 20, trainer)
  os.makedirs(tmp_path / "tok")
  tok.save(str(tmp_path / "tok" / "tokenizer.json"))
  with open(tmp_path / "tok" / "tokenizer_config.json", "w") as f:  # as GPT-Neo's hub file: no add_bos_token
    json.dump({"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "tokenizer_class": "GPT2Tokenizer"}, f)
  with open(tmp_path / "tok" / "config.json", "w") as f:
    json.dump({"architectures": ["GPTNeoForCausalLM"], "vocab_size": 320, "bos_token_id": 0, "eos_token_id": 0}, f)
  ours = load_tokenizer(str(tmp_path / "tok"))
  theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
  text = "um gato vermelho no parque"
  assert not ours.uses_bos and ours.encode(text) == theirs(text)["input_ids"]
  assert ours.ret_id == 320 and ours.encode(text + "[RET]")[-1] == 320
  ids, mask = ours.batch_encode([text, "um cão"], 12, append_ret=True)
  assert ids[1, mask[1].sum() - 1] == 320 and ids[1, -1] == ours.pad_id == ours.eos_id == 0
  assert ours.decode(ids[0]) == text
