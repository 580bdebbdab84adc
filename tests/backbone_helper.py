"""What the backbone tests share (test_gemma, test_llama, test_gptneo, test_siglip): ragged batches,
the transformers reference, error measures, damaged checkpoint copies and a short bridge training
run with frozen-weight checks."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import torch


@dataclasses.dataclass
class Tiny:
  """A tiny random checkpoint written by a test."""

  name: str
  path: str  # the save_pretrained directory
  model: object  # the transformers model (eval mode, float32)


def perturb_norms_and_biases(model, is_norm_weight, std=0.5):
  """transformers initialises norm weights at 1 and biases at 0: draw them around those, so that both matter."""
  with torch.no_grad():
    for name, param in model.named_parameters():
      if is_norm_weight(name):
        param.normal_(1.0, std)
      elif name.endswith("bias"):
        param.normal_(0.0, std)


def write_gguf(model, path, arch, tensor_names, *, value=lambda name, array: array, skip=(), metadata=None,
               tokens=None):
  """A float32 GGUF of a tiny HF decoder, with gguf's own HF -> GGUF name map (`tensor_names`, a
  gguf.MODEL_ARCH) and a sentencepiece-style vocabulary (BOS 2, EOS 1, pad 0). `value(name, array)`
  turns a HF tensor into what llama.cpp stores; `metadata(writer, config)` adds the family's keys."""
  import gguf

  c = model.config
  names = gguf.get_tensor_name_map(tensor_names, c.num_hidden_layers)
  writer = gguf.GGUFWriter(str(path), arch)
  writer.add_block_count(c.num_hidden_layers)
  writer.add_embedding_length(c.hidden_size)
  writer.add_feed_forward_length(c.intermediate_size)
  writer.add_head_count(c.num_attention_heads)
  writer.add_head_count_kv(c.num_key_value_heads)
  writer.add_key_length(c.head_dim)
  writer.add_value_length(c.head_dim)
  writer.add_layer_norm_rms_eps(c.rms_norm_eps)
  writer.add_context_length(c.max_position_embeddings)
  if metadata is not None:
    metadata(writer, c)
  tokens = tokens or [f"<t{i}>" for i in range(c.vocab_size)]
  writer.add_tokenizer_model("llama")
  writer.add_token_list(tokens)
  writer.add_token_scores([0.0] * len(tokens))
  writer.add_token_types([1] * len(tokens))
  writer.add_bos_token_id(2)
  writer.add_eos_token_id(1)
  writer.add_pad_token_id(0)
  for name, tensor in model.state_dict().items():
    if name not in skip:
      array = value(name, tensor.numpy().astype(np.float32))
      writer.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), array)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return str(path)


def with_rows_appended(model, rows):
  """A copy of a transformers decoder with `rows` (X, D) appended to its input table and to its LM
  head (tied or not): the reference for bridgejax's extra_embeddings ([RET])."""
  import copy

  grown = copy.deepcopy(model)
  vocab = grown.get_input_embeddings().weight.shape[0]
  with torch.no_grad():
    grown.resize_token_embeddings(vocab + len(rows))
    grown.get_input_embeddings().weight[vocab:] = torch.from_numpy(rows)
    grown.get_output_embeddings().weight[vocab:] = torch.from_numpy(rows)
  return grown


def batch(vocab=96, seed=0):
  """Three right-padded rows of 12, 7 and 3 real tokens (longer than the tiny sliding windows of 4)."""
  ids = np.random.default_rng(seed).integers(3, vocab, (3, 12)).astype(np.int32)
  ids[:, 0] = 2  # BOS
  mask = (np.arange(12)[None] < np.array([[12], [7], [3]])).astype(np.int32)
  return np.where(mask == 1, ids, 0), mask


def reference(model, ids=None, mask=None, embeds=None):
  """transformers' forward with every hidden state."""
  with torch.no_grad():
    return model(input_ids=None if ids is None else torch.from_numpy(ids).long(),
                 inputs_embeds=None if embeds is None else torch.from_numpy(np.asarray(embeds)),
                 attention_mask=None if mask is None else torch.from_numpy(mask).long(), output_hidden_states=True)


def max_error(ours, ref, mask):
  """Max abs difference over the real (unpadded) positions."""
  return float(np.abs(np.asarray(ours, np.float32) - ref.float().numpy())[mask.astype(bool)].max())


def assert_decoder_parity(out, ref, mask, atol):
  """Every hidden state and the logits within atol (max abs over real positions)."""
  assert len(out.hidden_states) == len(ref.hidden_states)
  errors = [max_error(a, b, mask) for a, b in zip(out.hidden_states, ref.hidden_states)]
  errors.append(max_error(out.logits, ref.logits, mask))
  print(f"max errors (hidden states..., logits): {['%.1e' % e for e in errors]}")
  assert max(errors) <= atol, errors
  np.testing.assert_array_equal(out.last_hidden_state, out.hidden_states[-1])


def right_padded(prompts, pad=0):
  ids = np.full((len(prompts), max(map(len, prompts))), pad, np.int32)
  mask = np.zeros_like(ids)
  for i, p in enumerate(prompts):
    ids[i, :len(p)], mask[i, :len(p)] = p, 1
  return ids, mask


def assert_greedy_equals_transformers(lm, model, prompts, new_tokens=16, pad=0):
  """bridgejax's batched KV-cache greedy decoding = transformers' generate, one prompt at a time."""
  ids, mask = right_padded(prompts, pad)
  ours = np.asarray(lm.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, pad_id=pad))
  with torch.no_grad():
    want = []
    for p in prompts:
      new = model.generate(torch.tensor([p]), max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)[0, len(p):]
      want.append(new.tolist() + [pad] * (new_tokens - len(new)))
  np.testing.assert_array_equal(ours, want)
  assert len({int(x) for x in ours.ravel()}) > 3  # the tiny models say more than one word


def bf16_relative_errors(lm_bf16, model, ids, mask):
  """(ours, transformers' own bf16) relative L2 errors of bf16 logits against float32 transformers."""
  import copy

  ref = reference(model, ids, mask).logits.numpy()
  ours = lm_bf16(input_ids=ids, attention_mask=mask).logits
  assert ours.dtype == jnp.float32
  with torch.no_grad():
    torch_bf16 = copy.deepcopy(model).to(torch.bfloat16)(
        input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long()).logits.float().numpy()
  real = mask.astype(bool)
  relative = lambda a: float(np.linalg.norm((np.asarray(a) - ref)[real]) / np.linalg.norm(ref[real]))
  return relative(ours), relative(torch_bf16)


def copy_with(source_dir, path, *, config=None, drop=(), reshape=None):
  """A copy of a HF directory with config.json keys changed, tensors dropped or replaced by zeros of another shape."""
  from safetensors.numpy import save_file

  from bridgejax.weights.safetensors_io import read_hf_tensors

  os.makedirs(path)
  with open(os.path.join(source_dir, "config.json")) as f:
    hf = {**json.load(f), **(config or {})}
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf, f)
  tensors = {k: np.array(v) for k, v in read_hf_tensors(source_dir).items() if k not in drop}
  for name, shape in (reshape or {}).items():
    tensors[name] = np.zeros(shape, np.float32)
  save_file(tensors, os.path.join(path, "model.safetensors"))
  return str(path)


def train_bridge_steps(vision_config, llm_config, frozen, *, steps=3, configure=None):
  """`steps` AdamW steps of the FROMAGe bridge (configs/fromage.py, concat trick on) on random images and
  captions ending in [RET]; asserts the frozen trees stay bitwise unchanged, the trainable ones move and
  the losses are finite. `configure(config)` may change the experiment config first. Returns the losses."""
  import optax

  from bridgejax.heads import frozen_row_norm
  from bridgejax.model import BridgeModel
  from bridgejax.train.optimizer import make_optimizer
  from bridgejax.train.step import TrainState, make_train_step
  from configs.fromage import get_config

  config = get_config(None)
  config.concat_prob = 0.5
  if configure is not None:
    configure(config)
  config.optim.warmup_steps = 0
  model = BridgeModel.create(config, vision_config, llm_config)
  ret, size = llm_config.vocab_size, vision_config.image_size
  rng = np.random.default_rng(0)
  data = {"image": rng.standard_normal((2, 3, size, size)).astype(np.float32),
          "text_ids": np.array([[2, 5, 7, ret, 0], [2, 9, ret, 0, 0]], np.int32),
          "text_mask": np.array([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]], np.int32)}
  before = jax.tree.map(np.array, frozen)
  trainable = model.init_trainable(jax.random.key(1), frozen)
  optimizer = make_optimizer(config.optim)
  state = TrainState.create(trainable, optimizer)
  start = jax.tree.map(np.array, trainable)
  step = jax.jit(make_train_step(model, optimizer, seed=0))
  ret_norm = frozen_row_norm(frozen)
  losses = []
  for _ in range(steps):
    state, metrics = step(state, frozen, data, ret_norm)
    losses.append(float(metrics["loss"]))
  assert all(np.isfinite(losses)) and metrics["skipped"] == 0, losses
  assert jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(a, np.asarray(b)), before, frozen))
  moved = jax.tree.map(lambda a, b: not np.array_equal(a, np.asarray(b)), start, state.params)
  assert all(jax.tree.leaves(moved["bridge"])) and moved["ret"]["ret_embedding"], moved
  assert optax.global_norm(state.params) > 0
  return losses
