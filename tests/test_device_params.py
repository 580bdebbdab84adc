"""Frozen weights stay on device: the loaders return committed jax.Arrays (on this process's first
device, or on the sharding the caller passes), and later calls, generation and the eval Engine send
no weights again (checked with jax's host-to-device transfer guard)."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import bridgejax.toy
from bridgejax import generate as generation, mesh as mesh_lib, weights
from bridgejax.weights import LanguageModel

sys.path.insert(0, os.path.dirname(__file__))
ASSETS = os.path.join(os.path.dirname(bridgejax.toy.__file__), "assets")
no_upload = lambda: jax.transfer_guard_host_to_device("disallow")


@pytest.fixture(scope="module")
def backbones():
  return (weights.load_vision_tower(os.path.join(ASSETS, "clip")),
          weights.load_language_model(os.path.join(ASSETS, "gemma")))


def _assert_placed(params, sharding):
  for leaf in jax.tree.leaves(params):
    assert isinstance(leaf, jax.Array) and leaf.committed, type(leaf)
    assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim), leaf.sharding


def test_loaders_put_params_on_the_first_device_once(backbones):
  vision, lm = backbones
  here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  _assert_placed(vision.params, here)
  _assert_placed(lm.params, here)
  size = vision.config.image_size
  pixels = jnp.zeros((2, 3, size, size), jnp.float32)
  ids = jnp.asarray([[2, 5, 6, 7], [2, 8, 9, 0]], jnp.int32)
  mask = jnp.asarray([[1, 1, 1, 1], [1, 1, 1, 0]], jnp.int32)
  first = vision(pixels).pooler_output, lm(input_ids=ids, attention_mask=mask).logits
  with no_upload():  # any host-to-device copy (the weights, above all) raises here
    for _ in range(2):
      again = vision(pixels).pooler_output, lm(input_ids=ids, attention_mask=mask).logits
  np.testing.assert_array_equal(first[1], again[1])
  host = jax.tree.map(np.asarray, lm.params)
  with no_upload(), pytest.raises(Exception, match="host-to-device"):  # the guard has teeth
    lm._apply(host, ids, mask, None, None)


def test_generate_sends_no_weights(backbones, monkeypatch):
  """The prefill and the decoding loop run under the guard: their params are the device ones."""
  _, lm = backbones
  for name in ("prefill", "_sample_loop"):
    jitted = getattr(generation, name)

    def guarded(*args, _jitted=jitted, **kwargs):
      with no_upload():
        return _jitted(*args, **kwargs)

    monkeypatch.setattr(generation, name, guarded)
  ids = jnp.asarray([[2, 5, 6, 7]], jnp.int32)
  embeds, mask = lm.embed(ids), jnp.ones_like(ids)
  outs = [np.asarray(lm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=4)) for _ in range(2)]
  np.testing.assert_array_equal(*outs)


def test_sharding_argument_places_on_the_callers_sharding():
  mesh = mesh_lib.make_mesh(1, 1, devices=jax.local_devices()[:1])
  one = NamedSharding(mesh, P())
  lm = weights.load_language_model(os.path.join(ASSETS, "gemma"), sharding=one)
  _assert_placed(lm.params, one)
  # a function of the host tree, as the training mesh's frozen_shardings (shape-dependent)
  fsdp = lambda tree: mesh_lib.frozen_shardings(tree, mesh, "fsdp")
  vision = weights.load_vision_tower(os.path.join(ASSETS, "clip"), sharding=fsdp)
  _assert_placed(vision.params, one)
  # host params given to a wrapper go to the first device
  wrapped = LanguageModel(lm.module, jax.tree.map(np.asarray, lm.params), lm.config)
  _assert_placed(wrapped.params, jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))


def test_engine_places_params_once_and_sends_only_batches():
  import tiny_eval_world as tw
  from bridgejax.engine import Engine
  setup, trainable = tw.setup_and_params()
  host_trainable = jax.tree.map(np.asarray, trainable)  # e.g. a checkpoint read to host
  engine = Engine(setup.model, {**setup.frozen, **host_trainable}, setup.tokenizer, mesh=setup.mesh)
  devices = set(setup.mesh.devices.flat)
  assert all(isinstance(x, jax.Array) and x.sharding.device_set == devices for x in jax.tree.leaves(engine.params))
  # frozen leaves already on the mesh are kept as they are, not copied
  assert all(a is b for a, b in zip(jax.tree.leaves(engine.params["llm"]), jax.tree.leaves(setup.frozen["llm"])))
  size = setup.model.vision.config.image_size
  pixels = np.zeros((3, 3, size, size), np.float32)
  ids, mask = np.asarray([[2, 5, setup.model.ret_id]] * 3, np.int32), np.ones((3, 3), np.int32)
  engine.encode(pixels), engine.text_embedding(ids, mask)
  with no_upload():  # batches go up explicitly (device_put); the weights are not sent at all
    for _ in range(2):
      tokens, emb = engine.encode(pixels)
      text = engine.text_embedding(ids, mask)
  assert tokens.shape[0] == emb.shape[0] == text.shape[0] == 3
