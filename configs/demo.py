"""The README's main command: a cross-attention bridge on the toy world, minutes on a laptop CPU.

    python train.py --config configs/demo.py --workdir /tmp/demo

It generates the toy world into data.dir on first use, trains, then evaluates captioning and
retrieval on held-out toy images and prints the metrics and sample captions (eval/report.html).

The frozen backbones are the toy CLIP and toy Gemma shipped in bridgejax/toy/assets (pretrained on
the toy world by `python -m bridgejax.toy.pretrain`), loaded through the same code as real ones.
"""

import os

import ml_collections

import bridgejax.toy
from bridgejax.evaluation.evaluators import eval_task
from configs import base

TOY_ASSETS = os.path.join(os.path.dirname(bridgejax.toy.__file__), "assets")


def get_config(arg=None):
  config = base.get_config(arg)
  config.name = "demo"
  config.vision.path = os.path.join(TOY_ASSETS, "clip")
  config.llm.path = os.path.join(TOY_ASSETS, "gemma")
  config.compute_dtype = "float32"
  config.frozen_param_dtype = "float32"
  config.bridge = base.ml_collections.ConfigDict({"name": "crossatt", "k": 4, "layer": -2, "num_heads": 4})
  # The toy world is generated into data.toy.dir on first use, and only there: a data.dir pointing
  # elsewhere must be a prepared dataset (examples/own_data.md), never a folder the demo writes into.
  config.data.dir = "/tmp/bridgejax_toy_data"
  config.data.toy = base.ml_collections.ConfigDict({"dir": "/tmp/bridgejax_toy_data", "num_train": 10_000,
                                                    "num_val": 500, "num_test": 500, "seed": 0})
  config.data.max_caption_tokens = 40  # toy captions are long-winded; 24 would cut many
  config.data.num_workers = 0
  config.data.val_examples = 256
  config.optim.lr = 3e-3
  config.optim.warmup_steps = 20
  config.total_steps = 400
  config.batch_size = 32
  config.log_every_steps = 20
  config.checkpoint_every_steps = 200
  config.eval_every_steps = 200
  config.data.val_batch_size = 32
  # caption and retrieval on the held-out toy images (val is what training validates on). Each task's
  # `data` follows --config.data.dir until set itself: a derived reference per task (`+ ""`), so
  # --config.evals.caption.data moves that task alone, not the training data.
  config.evals = ml_collections.ConfigDict({
      task: eval_task(task, data=config.data.get_ref("dir") + "", split="test", batch_size=32)
      for task in ("caption", "retrieval")})
  config.eval_after_training = True
  return config
