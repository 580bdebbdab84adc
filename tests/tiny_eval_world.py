"""Shared by the evaluation and inference tests: tiny random backbones in Hugging Face format, a
tiny prepared toy dataset, a config pointing at them, and a checkpoint of an untrained bridge.

Built once per test process (functools.cache) in a temporary directory.
"""

from __future__ import annotations

import functools
import os
import tempfile

import jax
import numpy as np

VOCAB = 320


@functools.cache
def world() -> dict:
  root = tempfile.mkdtemp(prefix="bridgejax_eval_test_")
  from bridgejax.toy.prepare import prepare_toy
  prepare_toy(os.path.join(root, "data"), num_train=4, num_val=6, num_test=1, seed=0)
  _save_backbones(root)
  return {"root": root, "data": os.path.join(root, "data"), "clip": os.path.join(root, "clip"),
          "gemma": os.path.join(root, "gemma")}


def _save_backbones(root: str) -> None:
  from bridgejax.models.clip import CLIPVisionConfig, CLIPVisionTransformer
  from bridgejax.toy import pretrain
  from bridgejax.weights.clip import save_hf

  scene_texts = pretrain.corpus(60, seed=0)
  tokenizer = pretrain.train_tokenizer(scene_texts, VOCAB)
  assert tokenizer.get_vocab_size() <= VOCAB
  config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, image_size=28,
                            patch_size=7)
  params = CLIPVisionTransformer(config).init(jax.random.key(0), np.zeros((1, 3, 28, 28), np.float32))["params"]
  save_hf(os.path.join(root, "clip"), config, params)

  import torch  # tests only: transformers writes the reference Gemma checkpoint
  from transformers import GemmaConfig, GemmaForCausalLM
  torch.manual_seed(0)
  lm = GemmaForCausalLM(GemmaConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                    max_position_embeddings=512, bos_token_id=2, eos_token_id=1, pad_token_id=0))
  with torch.no_grad():  # a larger init than 0.02 gives random text some variety, and small
    lm.model.embed_tokens.weight.normal_(0, 1.0)  # special-token rows keep it from repeating BOS
    lm.model.embed_tokens.weight[:4] *= 0.05
  lm.save_pretrained(os.path.join(root, "gemma"))
  pretrain.save_tokenizer(tokenizer, os.path.join(root, "gemma"))


SPLITS = {"caption": "val", "retrieval": "val", "vqa": "vqa_val", "visdial": "visdial_val"}


def config(**overrides):
  """configs/base.py pointed at the tiny world, float32, small eval batches. `overrides`: a task's
  name with a dict of its keys (visdial={"rounds_per_step": 3}), or key=value for every task that
  has the key (max_examples=3)."""
  from configs import base
  w = world()
  c = base.get_config()
  c.name = "tiny"
  c.vision.path, c.llm.path = w["clip"], w["gemma"]
  c.compute_dtype = c.frozen_param_dtype = "float32"
  c.bridge.k = 2
  c.ret.embed_dim = 16
  c.data.dir, c.data.num_workers, c.data.val_examples, c.data.val_batch_size = w["data"], 0, 5, 4
  c.batch_size = 4
  for name, task in c.evals.items():
    task.update(data=w["data"], split=SPLITS[name], batch_size=4, report_examples=3, progress=False)
  c.evals.caption.max_new_tokens, c.evals.vqa.max_new_tokens = 6, 4
  for key, value in overrides.items():
    if key in c.evals:
      c.evals[key].update(value)
      continue
    having = [task for task in c.evals.values() if key in task]
    assert having, f"no eval task has the key {key!r}"
    for task in having:
      task[key] = value
  return c


@functools.cache
def setup_and_params():
  """(setup, trainable params) of an untrained bridge on the tiny backbones; [RET] made likelier so
  that random generations sometimes contain it."""
  from bridgejax.experiment import build
  setup = build(config())
  trainable = setup.model.init_trainable(jax.random.key(1), setup.frozen)
  return setup, trainable


@functools.cache
def workdir_with_checkpoint(step: int = 3) -> str:
  """A workdir holding a checkpoint (TrainState at `step`) of the untrained bridge."""
  from bridgejax.train.checkpoint import Checkpointer
  from bridgejax.train.optimizer import make_optimizer
  from bridgejax.train.step import TrainState
  setup, trainable = setup_and_params()
  workdir = os.path.join(world()["root"], f"work_{step}")
  state = TrainState.create(trainable, make_optimizer(setup.config.optim))
  state = state.replace(step=np.int32(step))
  checkpointer = Checkpointer(workdir)
  checkpointer.save(step, state, force=True)
  checkpointer.wait()
  checkpointer.close()
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(setup.config.to_json_best_effort(indent=2))
  return workdir
