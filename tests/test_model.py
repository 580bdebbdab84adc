"""The assembled model's loss equals FROMAGe's computation, done independently in torch with
transformers' Gemma on the same weights: both passes, every mask, the concat trick."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from bridgejax.concat import pair_up
from bridgejax.model import BridgeModel, TRAINABLE
from model_helper import K, VOCAB, caption_batch


def _torch_lm_with_ret(gemma, ret_row):
  """transformers' Gemma with the [RET] row appended to its (tied) embedding table."""
  lm = copy.deepcopy(gemma)  # resizing mutates the model and its config
  lm.resize_token_embeddings(VOCAB + 1)
  with torch.no_grad():
    lm.get_input_embeddings().weight[VOCAB] = torch.from_numpy(np.asarray(ret_row[0]))
  return lm


def _fromage_reference(model, params, gemma, batch, concat):
  """FROMAGe's loss from its definition, in torch: compacted sequences, -100 labels, HF's loss."""
  out = model.encode_images(params, jnp.asarray(batch["image"]))
  visual = torch.from_numpy(np.array(out.tokens))
  lm = _torch_lm_with_ret(gemma, params["ret"]["ret_embedding"])
  embed = lm.get_input_embeddings()  # scales by sqrt(D) itself, like ours
  ids, mask = torch.from_numpy(batch["text_ids"]).long(), batch["text_mask"]
  caption_len = mask.sum(1) - 1  # caption tokens without [RET]: FROMAGe's captioning pass drops it
  seqs, labels = [], []
  pieces = [[i] for i in range(4)] if not concat else [[0, 1], [2, 3]]
  for group in pieces:
    seq, lab = [], []
    for i in group:
      n = int(caption_len[i])
      seq += [visual[i], embed(ids[i, :n][None])[0]]
      lab += [torch.full((K,), -100), ids[i, :n]]
    seqs.append(torch.cat(seq))
    labels.append(torch.cat(lab))
  width = max(len(s) for s in seqs)
  x = torch.stack([torch.cat([s, torch.zeros(width - len(s), s.shape[1])]) for s in seqs])
  y = torch.stack([torch.cat([l, torch.full((width - len(l),), -100)]) for l in labels])
  attention = (y != -100) | torch.stack([torch.arange(width) < len(s) for s in seqs])
  with torch.no_grad():
    caption = lm(inputs_embeds=x, attention_mask=attention.long(), labels=y).loss.item()
    text_labels = ids.masked_fill(torch.from_numpy(mask) == 0, -100)
    text_out = lm(input_ids=ids, attention_mask=torch.from_numpy(mask).long(), labels=text_labels,
                  output_hidden_states=True)
  last = torch.from_numpy(mask.sum(1) - 1)
  ret_hidden = text_out.hidden_states[-1][torch.arange(4), last].numpy()
  ret = jax.tree.map(np.asarray, params["ret"])
  text_emb = ret_hidden @ ret["text_proj"]["kernel"] + ret["text_proj"]["bias"]
  image_emb = np.asarray(out.image_feature) @ ret["image_proj"]["kernel"] + ret["image_proj"]["bias"]
  normalise = lambda e: e / np.linalg.norm(e, axis=1, keepdims=True)
  logits = np.exp(ret["logit_scale"]) * normalise(image_emb) @ normalise(text_emb).T
  log_softmax = lambda z, axis: z - np.log(np.exp(z).sum(axis, keepdims=True))
  i2t = -np.mean(np.diag(log_softmax(logits, 1)))
  t2i = -np.mean(np.diag(log_softmax(logits, 0)))
  return {"caption_loss": caption, "text_loss": text_out.loss.item(), "contrastive_loss": (i2t + t2i) / 2}


@pytest.mark.parametrize("concat", [False, True])
def test_loss_equals_fromage_reference(tiny_model, concat):
  config, vision_config, llm_config, frozen, gemma = tiny_model
  config.concat_prob = 1.0 if concat else 0.0
  model = BridgeModel.create(config, vision_config, llm_config)
  trainable = model.init_trainable(jax.random.key(0), frozen)
  batch = caption_batch()
  loss, metrics = jax.jit(model.loss)(trainable, frozen, batch, jax.random.key(1))
  reference = _fromage_reference(model, {**frozen, **trainable}, gemma, batch, concat)
  for key, value in reference.items():
    assert float(metrics[key]) == pytest.approx(value, rel=1e-4, abs=1e-5), key
  assert float(metrics["concat"]) == float(concat)
  assert float(loss) == pytest.approx(sum(reference.values()), rel=1e-4)


def test_trainable_tree_and_gradients(tiny_model):
  config, vision_config, llm_config, frozen, _ = tiny_model
  model = BridgeModel.create(config, vision_config, llm_config)
  trainable = model.init_trainable(jax.random.key(0), frozen)
  assert tuple(sorted(trainable)) == TRAINABLE
  assert trainable["ret"]["ret_embedding"].shape == (1, llm_config.hidden_size)
  # the [RET] row starts at the frozen rows' mean norm, as FROMAGe keeps it
  table = np.asarray(frozen["llm"]["embedding"])
  assert np.linalg.norm(trainable["ret"]["ret_embedding"]) == pytest.approx(
      np.linalg.norm(table, axis=1).mean(), rel=1e-5)
  grads = jax.grad(lambda t: model.loss(t, frozen, caption_batch(), jax.random.key(0))[0])(trainable)
  assert jax.tree.structure(grads) == jax.tree.structure(trainable)
  nonzero = jax.tree.map(lambda g: float(jnp.abs(g).max()) > 0, grads)
  assert all(jax.tree.leaves(nonzero)), nonzero


def test_odd_batch_with_concat_trick_is_a_clear_error(tiny_model):
  config, vision_config, llm_config, frozen, _ = tiny_model
  config.concat_prob = 0.5
  model = BridgeModel.create(config, vision_config, llm_config)
  trainable = model.init_trainable(jax.random.key(0), frozen)
  batch = {k: v[:3] for k, v in caption_batch().items()}
  with pytest.raises(ValueError, match="batch_size must be even, got 3"):
    model.loss(trainable, frozen, batch, jax.random.key(0))


def test_pair_up_joins_rows_2i_and_2i_plus_1():
  x = np.arange(4 * 3).reshape(4, 3)
  np.testing.assert_array_equal(pair_up(x), [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11]])


@pytest.mark.parametrize("coin", [False, True])
def test_concat_prob_half_gives_fromage_loss_on_both_sides_of_the_coin(tiny_model, coin):
  """One program for both layouts: a segment mask keeps the pair apart when the coin says no."""
  config, vision_config, llm_config, frozen, gemma = tiny_model
  config.concat_prob = 0.5
  model = BridgeModel.create(config, vision_config, llm_config)
  trainable = model.init_trainable(jax.random.key(0), frozen)
  rng = next(jax.random.key(i) for i in range(64) if bool(jax.random.bernoulli(jax.random.key(i), 0.5)) == coin)
  batch = caption_batch()
  _, metrics = jax.jit(model.loss)(trainable, frozen, batch, rng)
  assert float(metrics["concat"]) == float(coin)
  reference = _fromage_reference(model, {**frozen, **trainable}, gemma, batch, coin)
  for key, value in reference.items():
    assert float(metrics[key]) == pytest.approx(value, rel=1e-4, abs=1e-5), key


@pytest.mark.parametrize("scale", ["sqrt_d", "none"])
def test_visual_tokens_enter_the_llm_at_the_configured_scale(tiny_model, scale):
  """The LLM's input at the visual positions, recomputed from the bridge alone: transformers 4.x's
  GemmaModel.forward (the thesis's stack) multiplied all inputs_embeds by sqrt(hidden_size)."""
  from bridgejax.bridges import VisionFeatures
  config, vision_config, llm_config, frozen, gemma = tiny_model
  config.concat_prob, config.visual_token_scale = 0.0, scale
  model = BridgeModel.create(config, vision_config, llm_config)
  params = {**frozen, **model.init_trainable(jax.random.key(0), frozen)}
  batch = caption_batch()
  tokens = model.encode_images(params, jnp.asarray(batch["image"])).tokens
  embeds, *_ = model.caption_inputs(params, tokens, jnp.asarray(batch["text_ids"]), jnp.asarray(batch["text_mask"]))
  hidden_states = model.vision.apply({"params": params["vision"]}, jnp.asarray(batch["image"])).hidden_states
  features = VisionFeatures.from_tower(hidden_states, params["vision"]["post_norm"], vision_config.layer_norm_eps)
  raw = np.asarray(model.bridge.apply({"params": params["bridge"]}, features).tokens)
  factor = np.sqrt(gemma.config.hidden_size) if scale == "sqrt_d" else 1.0
  np.testing.assert_allclose(np.asarray(embeds[:, :K]), raw * factor, rtol=1e-6)
  # text positions: transformers 5.x's scaled embedding layer, whatever the visual scale
  with torch.no_grad():
    text = gemma.get_input_embeddings()(torch.from_numpy(np.minimum(batch["text_ids"], VOCAB - 1)).long()).numpy()
  real = (batch["text_ids"] < VOCAB) & (batch["text_mask"] > 0)
  np.testing.assert_allclose(np.asarray(embeds[:, K:])[real], text[real], rtol=1e-5, atol=1e-6)
