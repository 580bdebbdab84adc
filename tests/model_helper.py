"""What the model, loss and config tests share: the geometry of conftest.py's `tiny_model` (a tiny
CLIP + Gemma BridgeModel) and a caption batch for it, tiny backbone configs that build every
experiment config, and a loop reference of FILIP's CMLI."""

import numpy as np

from bridgejax.models.clip import CLIPVisionConfig
from bridgejax.models.gemma import GemmaConfig

VOCAB, K = 40, 3  # the tiny Gemma's vocabulary (then [RET] = VOCAB) and the bridge's k


def caption_batch(seed=0):
  """Right-padded BOS + caption + [RET] rows of different lengths."""
  rng = np.random.default_rng(seed)
  lengths = [7, 4, 6, 3]
  ids = np.zeros((4, 8), np.int32)
  mask = np.zeros((4, 8), np.int32)
  for row, n in enumerate(lengths):
    ids[row, :n] = [2, *rng.integers(3, VOCAB, n - 2), VOCAB]  # BOS ... [RET]
    mask[row, :n] = 1
  images = rng.standard_normal((4, 3, 28, 28)).astype(np.float32)
  return {"image": images, "text_ids": ids, "text_mask": mask}


# Backbones small enough to build every experiment config for real (test_configs and
# test_bridges_resampler_qformer_mlp).
TINY_VISION = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_layers=4, num_heads=2, image_size=28,
                               patch_size=7)
TINY_LLM = GemmaConfig(vocab_size=30, hidden_size=24, intermediate_size=32, num_layers=1, num_heads=2,
                       num_kv_heads=1, head_dim=8, query_pre_attn_scalar=8)


def experiment_config(name: str, arg: str | None = None):
  """configs/NAME.py's config for the argument ARG, as `--config configs/NAME.py:ARG` gives it."""
  module = __import__(f"configs.{name}", fromlist=["get_config"])
  return module.get_config(arg)


def np_cmli(v, w, vm, tm, scale):
  """FILIP's CMLI with explicit loops over pairs (FILIP eq. 1-4)."""
  v = v / np.linalg.norm(v, axis=-1, keepdims=True)
  w = w / np.linalg.norm(w, axis=-1, keepdims=True)
  n = len(v)
  s_i2t, s_t2i = np.zeros((n, n)), np.zeros((n, n))
  for i in range(n):
    for t in range(n):
      c = v[i][vm[i]] @ w[t][tm[t]].T  # (valid patches, valid tokens)
      s_i2t[i, t] = c.max(axis=1).mean()
      s_t2i[i, t] = c.max(axis=0).mean()
  ce = lambda logits: np.mean([np.log(np.exp(row).sum()) - row[k] for k, row in enumerate(logits)])
  return ce(scale * s_i2t), ce(scale * s_t2i.T)
