"""Pic2Word's term: the text pass of "a photo of *", * the image's pseudo word from the mapping
network f_M (bridgejax/pic2word.py has the network, the equations and the prompts), contrasted with
the image's W_i embedding by an InfoNCE under the model's logit scale.

Only f_M learns from it: W_i, W_t, the [RET] row, the logit scale and the bridge are stop-gradient
in this term, as Pic2Word trains its mapping network with CLIP frozen; they keep learning from the
other terms. It reads the tower's post-LayerNorm CLS of layer L (a feature cache keeps it).

Heads (ret/): pic2word, f_M: (W·M + M) + (n - 1)·(M·M + M) + (M·D + D) for config.pic2word
hidden M and layers n (Pic2Word's IM2TEXT: M = 512, n = 2).
"""

from __future__ import annotations

import functools

from bridgejax.errors import UserError
from bridgejax.terms.base import Head, LossTerm

KEYS = {"hidden": 512, "layers": 2}  # Pic2Word's IM2TEXT: middle_dim 512, n_layer 2


def _network(hidden: int, layers: int, out: int):
  from bridgejax.pic2word import MappingNetwork  # lazy: flax; configs read this declaration before jax loads
  return MappingNetwork(hidden, layers, out)


def heads(options, dims):
  return (Head("pic2word", "module", reads="vision",
               factory=functools.partial(_network, int(options["hidden"]), int(options["layers"]), dims.llm_width)),)


def check(options, dims) -> None:
  if options["hidden"] < 1 or options["layers"] < 1:
    raise UserError(f"config.pic2word needs hidden >= 1 and layers >= 1, got {dict(options)}")


def prepare(options, tokenizer, vocab_size: int) -> dict:
  """The training prompt's ids, BOS "a photo of" * [RET] (pic2word.TRAIN_PROMPT), with the tokenizer."""
  from bridgejax.pic2word import TRAIN_PROMPT, prompt_ids  # lazy: flax, as above
  return {**options, "prompt": tuple(prompt_ids(tokenizer, TRAIN_PROMPT, vocab_size)[0])}


def pseudo_words(model, params, features):
  """f_M on the frozen tower's post-LayerNorm CLS of layer L: (B, D) in the LLM's input space (times
  its embedding normaliser, as a table row), where a word's embedding goes."""
  return model.head(params, "pic2word", features.cls(-1, post_norm=True)) * model.llm.embed_scale


def loss(model, params, states, options) -> dict:
  import jax  # lazy: jax; configs read this declaration before jax loads
  import jax.numpy as jnp

  from bridgejax import losses

  prompt = options.get("prompt")
  if not prompt:
    raise ValueError("the Pic2Word term needs its prompt's ids: build the model with "
                     "BridgeModel.create(..., tokenizer=...) (experiment.build does)")
  ret = params["ret"]
  fixed = jax.lax.stop_gradient({k: v for k, v in ret.items() if k != "pic2word"})
  params = {**params, "ret": {**fixed, "pic2word": ret["pic2word"]}}
  b, t = states.image_emb.shape[0], len(prompt)
  ids = jnp.broadcast_to(jnp.asarray(prompt, jnp.int32), (b, t))
  words = pseudo_words(model, params, states.features)
  text_emb = model.word_query_embedding(params, words, ids, jnp.ones_like(ids), jnp.full((b,), t - 2))
  value, _ = losses.contrastive_loss(jax.lax.stop_gradient(states.image_emb), text_emb, fixed["logit_scale"])
  return {"pic2word": value}


TERM = LossTerm(name="pic2word", section="pic2word", keys=KEYS, heads=heads, loss=loss, check=check, prepare=prepare,
                trains_bridge=lambda options: {"pic2word": False}, reads=("features", "image_emb", "tower:cls"))
