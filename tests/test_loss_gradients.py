"""Every loss term trains what its method says it trains: the gradient of each term of config.loss
with respect to the bridge's parameters, on the tiny CLIP + Gemma with a cross-attention bridge, is
non-zero exactly where the term's student states depend on the bridge. FROMAGe's three terms are
listed here; each optional term declares it in its own file (bridgejax/terms/, `trains_bridge`),
and every registered term, with every value it reports, is held to its declaration:

    caption               the bridge's tokens enter the captioning pass                       trains it
    text                  the text pass has no image                                          does not
    contrastive           W_i reads the bridge's attention pool (crossatt's image_feature)    trains it
    cmli, image_tokens    "bridge" / "llm": the bridge's tokens, the LLM's states at them     trains it
                          "tower": the frozen patches (the matching space, heads only)        does not
    target_cmli_i2t       the bridge's visual tokens regress the teacher's patches (eq. 7)    trains it
    target_cmli_t2i       target_text "caption": the captioning pass's text states see it    trains it
                          "text": the text pass's states (frozen)                             does not
    pic2word              f_M only; the rest is stop-gradient (Pic2Word trains f_M alone)      does not
"""

import jax
import ml_collections
import numpy as np
import pytest

from bridgejax import terms
from bridgejax.model import BridgeModel
from model_helper import VOCAB, caption_batch

TRAINS = {"caption": True, "text": False, "contrastive": True}  # FROMAGe's own terms (model.py)


class _Tokenizer:
  """What pic2word.prompt_ids needs: "a photo of *" as ids of the tiny vocabulary."""
  bos_id, pad_id = 2, 0

  def encode(self, text, add_bos=False):
    return ([2] if add_bos else []) + [3 + sum(map(ord, word)) % (VOCAB - 4) for word in text.split()]


def _model(tiny_model, **cmli):
  config, vision_config, llm_config, frozen, _ = tiny_model
  config = config.copy_and_resolve_references()
  config.bridge = ml_collections.ConfigDict({"name": "crossatt", "k": 3, "layer": -1, "num_heads": 4})
  config.concat_prob = 0.0
  config.loss.update({name: 1.0 for name in terms.names()})  # every optional term on
  config.cmli.update(chunk=0, **cmli)
  config.pic2word.hidden = 16
  return BridgeModel.create(config, vision_config, llm_config, tokenizer=_Tokenizer()), frozen


def _bridge_grad_norms(model, frozen, names):
  trainable = model.init_trainable(jax.random.key(0), frozen)
  batch = caption_batch()

  def term(bridge, name):
    return model.loss({**trainable, "bridge": bridge}, frozen, batch, jax.random.key(1))[1][f"{name}_loss"]

  out = {}
  for name in names:
    grads = jax.jit(jax.grad(term), static_argnums=1)(trainable["bridge"], name)
    out[name] = float(sum(np.sum(np.abs(np.asarray(g))) for g in jax.tree.leaves(grads)))
  return out


@pytest.mark.parametrize("image_tokens, target_text", [("bridge", "caption"), ("llm", "text"), ("tower", "caption")])
def test_each_term_trains_the_bridge_where_its_method_says(tiny_model, image_tokens, target_text):
  model, frozen = _model(tiny_model, image_tokens=image_tokens, target_text=target_text)
  assert {active.name for active in model.terms} == set(terms.names())
  expected = dict(TRAINS)
  for active in model.terms:
    expected.update(active.term.trains_bridge(active.options))
  assert expected["cmli"] == (image_tokens != "tower") and expected["target_cmli_t2i"] == (target_text == "caption")
  norms = _bridge_grad_norms(model, frozen, expected)
  assert {name: norm > 0 for name, norm in norms.items()} == expected, norms


@pytest.mark.parametrize("directions", ["i2t", "t2i"])
def test_target_cmli_keeps_one_direction(tiny_model, directions):
  """cmli.target_directions keeps one of eq. 10's two regressions; with the text pass as the t2i student
  (frozen), the t2i-only term cannot move the bridge, and its gradient there is exactly 0."""
  model, frozen = _model(tiny_model, image_tokens="tower", target_text="text", target_directions=directions)
  trainable = model.init_trainable(jax.random.key(0), frozen)
  metrics = model.loss(trainable, frozen, caption_batch(), jax.random.key(1))[1]
  assert float(metrics["target_cmli_loss"]) == pytest.approx(float(metrics[f"target_cmli_{directions}_loss"]))
  (active,) = [a for a in model.terms if a.name == "target_cmli"]
  trains = active.term.trains_bridge(active.options)["target_cmli"]
  assert trains == (directions == "i2t")
  norm = _bridge_grad_norms(model, frozen, ["target_cmli"])["target_cmli"]
  assert (norm > 0) == trains, norm
