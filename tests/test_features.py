"""Cached frozen features (bridgejax.data.features): what is cached, that training from the cache
equals training from the images (and resumes exactly), and that a stale cache is refused."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_world

from bridgejax import bridges, experiment
from bridgejax.checks import check_training_data
from bridgejax.data.records import split_fingerprint
from bridgejax.data import Split, clip_preprocess, decode_image, features
from bridgejax.errors import UserError
from bridgejax.train import loop
from bridgejax.train.program import MODEL_INPUTS
from bridgejax.train.optimizer import make_optimizer
from bridgejax.train.step import TrainState, make_train_step

CACHED = {"data.features": "auto"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """The tiny world (demo config: crossatt k=4 on layer -2 of a 2-layer tower) and its cache."""
  paths = tiny_world.make(str(tmp_path_factory.mktemp("features_world")))
  config = tiny_world.config(paths, total_steps=3)
  setup = experiment.build(config)
  out = features.cache_dir(tiny_world.config(paths, **CACHED))
  manifest = features.write_cache(config, setup, paths["data.dir"], "train", out, batch_size=8, quiet=True)
  return paths, setup, manifest


def test_the_manifest_and_records_hold_what_the_bridge_reads(world):
  paths, setup, manifest = world
  assert manifest["reads"] == {"hidden_1": {"tokens": "all", "shape": [257, 32]}}  # layer -2 of 3 hidden states
  assert manifest["vision"]["path"] == paths["vision.path"] and len(manifest["vision"]["weights_hash"]) == 24
  assert manifest["vision"]["weights_hash"] == features.tower_hash(jax.tree.map(lambda x: x.astype(jnp.bfloat16),
                                                                                setup.frozen["vision"]))
  assert manifest["dataset"] == {"dir": paths["data.dir"], "split": "train", "num_records": 32,
                                 "fingerprint": split_fingerprint(paths["data.dir"], "train")}
  assert (manifest["image_size"], manifest["image_resize"], manifest["dtype"]) == (112, "clip", "bfloat16")
  assert manifest["num_hidden_states"] == 3 and manifest["bytes"] >= 32 * 257 * 32 * 2
  folder = os.path.join(paths["data.dir"], "features", "train")
  assert json.load(open(os.path.join(folder, features.MANIFEST_FILE))) == manifest
  # the records against the tower run here on the decoded images, two at a time
  split, cache = Split(paths["data.dir"], "train"), features.FeatureCache(folder)
  rows = (0, 31)
  images = np.stack([clip_preprocess(decode_image(split[i]["image"]), 112) for i in rows])
  hidden = jax.jit(lambda p, x: setup.model.vision.apply({"params": p}, x).hidden_states[1])(setup.frozen["vision"], images)
  for row, index in enumerate(rows):
    cached = cache[index]
    assert cached["id"] == split[index]["id"] and cached["hidden_1"].dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(cached["hidden_1"], np.float32), hidden[row], rtol=1e-2, atol=1e-2)


def _bridge_reads(cfg, layers=4):
  bridge = bridges.build_bridge(cfg, vision_width=16, vision_layers=layers, grid_size=4, llm_width=8)
  tower = dataclasses.make_dataclass("Tower", ["grid_size", "hidden_size", "num_layers"])(4, 16, layers)
  return features.bridge_reads(bridge, tower)


@pytest.mark.parametrize("cfg, reads", [
    (dict(name="cls_linear"), {"hidden_4": "cls"}),  # FROMAGe: layer L's CLS (post-LayerNormed)
    (dict(name="l4l"), {f"hidden_{i}": "cls" for i in (1, 2, 3, 4)}),
    (dict(name="crossatt", layer=-2), {"hidden_3": "all"}),
    (dict(name="mlp_projector"), {"hidden_3": "all"}),  # LLaVA: layer L-1's patches
])
def test_bridge_reads_are_the_layers_and_tokens_of_the_bridge_docstrings(cfg, reads):
  assert _bridge_reads(cfg) == reads


def test_training_from_features_equals_training_from_images(world, tmp_path):
  paths, setup, _ = world
  images, cached = tiny_world.config(paths, total_steps=2), tiny_world.config(paths, total_steps=2, **CACHED)
  by_images = loop.train(images, str(tmp_path / "images"), loop.train_iterator(images, setup), setup=setup)
  by_features = loop.train(cached, str(tmp_path / "cached"), loop.train_iterator(cached, setup), setup=setup)
  loss = lambda name: [json.loads(line)["train/loss"] for line in open(tmp_path / name / "metrics.jsonl")]
  np.testing.assert_allclose(loss("cached"), loss("images"), rtol=1e-4)  # measured: 5e-6 (bfloat16 features)
  start = jax.tree.leaves(setup.model.init_trainable(jax.random.key(images.seed), setup.frozen))
  moved = lambda summary: np.concatenate([np.ravel(a - b) for a, b in zip(jax.tree.leaves(summary["state"].params), start)])
  # the updates of 2 steps agree to 1% (measured: 0.04%)
  assert np.linalg.norm(moved(by_features) - moved(by_images)) < 0.01 * np.linalg.norm(moved(by_images))


def test_a_restored_cached_stream_goes_on_with_the_next_batch(world):
  paths, setup, _ = world
  config = tiny_world.config(paths, **CACHED)
  stream = loop.train_iterator(config, setup)
  next(stream), next(stream)
  restored = loop.train_iterator(config, setup)
  restored.set_state(stream.get_state())
  expected, batch = next(stream), next(restored)
  assert sorted(batch) == ["hidden_1", "index", "text_ids", "text_mask"]
  for name in batch:
    np.testing.assert_array_equal(batch[name], expected[name])
  images = loop.train_iterator(tiny_world.config(paths), setup)  # the same stream as from the images
  images.set_state(stream.get_state() | {"step": 2})
  np.testing.assert_array_equal(next(images)["index"], batch["index"])


def test_the_cached_step_does_not_run_the_tower(world):
  paths, setup, _ = world
  config = tiny_world.config(paths, **CACHED)
  batch = next(loop.train_iterator(config, setup))
  assert sorted(loop.global_batch(batch, setup.mesh)) == ["hidden_1", "text_ids", "text_mask"]
  optimizer = make_optimizer(config.optim)
  state = TrainState.create(setup.model.init_trainable(jax.random.key(0), setup.frozen), optimizer)
  step = make_train_step(setup.model, optimizer, seed=0)
  program = lambda b: str(jax.make_jaxpr(step)(state, setup.frozen, b, 1.0))
  assert "conv_general_dilated" not in program({k: batch[k] for k in ("hidden_1", "text_ids", "text_mask")})
  image_batch = next(loop.train_iterator(tiny_world.config(paths), setup))
  assert "conv_general_dilated" in program({k: image_batch[k] for k in MODEL_INPUTS})  # the patch embedding


def _refusal(config, setup) -> str:
  with pytest.raises(UserError) as error:
    loop.train_iterator(config, setup)
  message = str(error.value)
  assert "\n" not in message and "Rebuild it with: python -m bridgejax.features --config" in message
  return message


def test_a_stale_cache_is_refused_in_one_line_naming_what_differs(world, tmp_path):
  paths, setup, _ = world
  config = tiny_world.config(paths, **CACHED, **{"bridge.layer": -1})
  other_layer = dataclasses.replace(setup, model=dataclasses.replace(setup.model, bridge=setup.model.bridge.clone(layer=-1)))
  assert "hidden states: cached layer -2 (all tokens), the run reads layer -1 (all tokens)" in _refusal(config, other_layer)
  config = tiny_world.config(paths, **CACHED)
  vision = {**setup.frozen["vision"], "post_norm": jax.tree.map(lambda x: x + 1, setup.frozen["vision"]["post_norm"])}
  other_tower = dataclasses.replace(setup, frozen={**setup.frozen, "vision": vision})
  assert "vision tower: cached from" in _refusal(config, other_tower)
  squash = tiny_world.config(paths, **CACHED, **{"data.image_resize": "squash"})
  assert "image_resize: cached 'clip', the run uses 'squash'" in _refusal(squash, setup)
  missing = tiny_world.config(paths, **{"data.features": str(tmp_path / "nowhere")})
  with pytest.raises(UserError, match="holds no cached features .* build it with: python -m bridgejax.features"):
    check_training_data(missing)


def test_a_split_prepared_again_with_other_images_has_another_fingerprint(tmp_path):
  from bridgejax.data.records import load_info
  from bridgejax.toy.prepare import prepare_toy
  prepare_toy(tmp_path / "a", num_train=4, num_val=2, num_test=2)
  prepare_toy(tmp_path / "b", num_train=4, num_val=2, num_test=2)
  prepare_toy(tmp_path / "c", num_train=4, num_val=2, num_test=2, seed=1)
  fingerprint = lambda d, split="train": split_fingerprint(tmp_path / d, split)
  assert fingerprint("a") == fingerprint("b") != fingerprint("c")
  assert fingerprint("a", "val") != fingerprint("c", "val")  # through its image table
  info_path = tmp_path / "a" / "dataset_info.json"  # a dataset from before fingerprints: its files are hashed
  info = load_info(tmp_path / "a")
  del info["splits"]["train"]["fingerprint"]
  info_path.write_text(json.dumps(info))
  assert fingerprint("a") != fingerprint("b") and fingerprint("a") == fingerprint("a")
