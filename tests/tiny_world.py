"""A tiny trainable world for training tests: random tiny HF backbones (CLIP 112 px / patch 7,
Gemma MQA) with a BPE tokenizer of the toy language, and a small prepared toy dataset."""

import os
import subprocess
import sys

import transformers

from bridgejax.toy import pretrain


def make(root: str, *, num_train: int = 32, num_val: int = 16) -> dict:
  import torch
  scene_texts = pretrain.corpus(100)
  tokenizer = pretrain.train_tokenizer(scene_texts, 300)
  torch.manual_seed(0)
  transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
      image_size=112, patch_size=7, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
      num_attention_heads=4)).save_pretrained(os.path.join(root, "clip"))
  transformers.GemmaForCausalLM(transformers.GemmaConfig(
      vocab_size=tokenizer.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=1, head_dim=8, pad_token_id=0, bos_token_id=2,
      eos_token_id=1)).save_pretrained(os.path.join(root, "gemma"))
  pretrain.save_tokenizer(tokenizer, os.path.join(root, "gemma"))
  subprocess.run([sys.executable, "-m", "bridgejax.prepare", "toy", "--out", os.path.join(root, "data"),
                  "--num-train", str(num_train), "--num-val", str(num_val), "--num-test", "8", "--quiet"],
                 check=True, capture_output=True)
  return {"vision.path": os.path.join(root, "clip"), "llm.path": os.path.join(root, "gemma"),
          "data.dir": os.path.join(root, "data")}


SMALL_AND_FAST = {"total_steps": 6, "batch_size": 8, "log_every_steps": 1, "checkpoint_every_steps": 2,
                  "eval_every_steps": 1000, "data.val_split": "", "tensorboard": False,
                  "eval_after_training": False}


def config(paths: dict, **overrides):
  """configs/demo.py pointed at the tiny world, small and fast; overrides as dotted keys."""
  from configs import demo
  cfg = demo.get_config()
  for key, value in {**paths, **SMALL_AND_FAST, **overrides}.items():
    node = cfg
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return cfg


def train_py_flags(paths: dict, **overrides) -> list[str]:
  """The same run as config(paths, **overrides), as train.py's command-line flags."""
  return ["--config=configs/demo.py"] + [f"--config.{key}={value}"
                                         for key, value in {**paths, **SMALL_AND_FAST, **overrides}.items()]
