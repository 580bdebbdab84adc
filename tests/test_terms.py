"""The loss-term registry: every optional term is one module declaring a TERM, and a new one is one
new file. The docs' example (docs/training.md, "Adding a loss term") is dropped into the package as
it is printed there and trains through the whole model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bridgejax import terms
from bridgejax.model import BridgeModel
from model_helper import caption_batch
from registry_helper import docs_example, dropped_in

def test_every_term_declares_itself_in_its_own_module():
  from configs import base
  config = base.get_config()
  assert terms.names() == ["cmli", "pic2word", "target_cmli"]
  for name, term in terms.REGISTRY.items():
    assert term.loss.__module__ == f"bridgejax.terms.{name}"
    assert config.loss[name] == 0.0  # off by default, a weight on the command line
    assert set(term.defaults()) <= set(config[term.section])  # its keys, from its declaration
    assert set(term.reads) <= set(terms.States._fields) | {"tower:cls", "tower:all"}, name
  assert terms.sections() == {"cmli": {"dim": 256, "chunk": 0, "image_tokens": "bridge", "target_text": "caption",
                                       "target_image": "auto", "target_directions": "both"}, "pic2word": {"hidden": 512, "layers": 2}}


def test_a_term_option_outside_its_choices_is_one_line(tiny_model):
  config, vision_config, llm_config, _, _ = tiny_model
  config = config.copy_and_resolve_references()
  config.loss.cmli = 1.0
  config.cmli.image_tokens = "patches"
  with pytest.raises(ValueError, match=r"^--config.cmli.image_tokens='patches': use one of bridge, llm, tower$"):
    BridgeModel.create(config, vision_config, llm_config)


@pytest.fixture()
def visual_l2(monkeypatch):
  """The docs' visual_l2.py, dropped into the terms package."""
  with dropped_in(monkeypatch, terms, "visual_l2", docs_example("training.md", "## Adding a loss term")) as found:
    yield found


def test_a_new_loss_term_is_one_file(visual_l2, tiny_model):
  from configs import base
  config = base.get_config()  # the declaration's weight and section are in every config now
  assert config.loss.visual_l2 == 0.0 and config.visual_l2.scale == 1.0
  _, vision_config, llm_config, frozen, _ = tiny_model
  config.bridge = tiny_model[0].bridge
  config.loss.visual_l2, config.visual_l2.scale, config.concat_prob = 0.5, 2.0, 0.0
  model = BridgeModel.create(config, vision_config, llm_config)
  assert [active.name for active in model.terms] == ["visual_l2"]
  trainable = model.init_trainable(jax.random.key(0), frozen)
  batch = caption_batch()
  total, metrics = jax.jit(model.loss)(trainable, frozen, batch, jax.random.key(1))
  tokens = model.encode_images({**frozen, **trainable}, jnp.asarray(batch["image"])).tokens
  np.testing.assert_allclose(metrics["visual_l2_loss"], np.mean(np.square(np.asarray(tokens, np.float32))) / 4,
                             rtol=1e-5)
  parts = metrics["caption_loss"] + metrics["text_loss"] + metrics["contrastive_loss"]
  np.testing.assert_allclose(total, parts + 0.5 * metrics["visual_l2_loss"], rtol=1e-6)
  grads = jax.grad(lambda b: model.loss({**trainable, "bridge": b}, frozen, batch, jax.random.key(1))[1][
      "visual_l2_loss"])(trainable["bridge"])
  assert visual_l2.trains_bridge({})["visual_l2"] and any(np.any(np.asarray(g) != 0) for g in jax.tree.leaves(grads))
