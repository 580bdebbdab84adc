"""The model bench/train_step.py times, at 'real' or 'reduced' size, with random frozen weights made
on the device and a random batch of fixed shape: no weights are read, only the backbones' config.json
(the toy ones at 'reduced' size when the config's are not folders) or a GGUF file's header.
A helper of the bench scripts (bench/ is not a package: they put this folder on sys.path).
"""

from __future__ import annotations

import math
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY_ASSETS = os.path.join(ROOT, "bridgejax", "toy", "assets")


def backbone_sizes(config, size: str):
  """(vision config, LLM config) of the config at 'real' or 'reduced' size, of any family
  (`bridgejax.param_count`'s names; config.json's architecture)."""
  from bridgejax.param_count import LLM_ARCHS, VISION_ARCHS
  from bridgejax.weights import language, safetensors_io, vision

  if size == "real":
    for part, archs in (("vision", VISION_ARCHS), ("llm", LLM_ARCHS)):
      if config[part].arch not in archs:
        raise SystemExit(f"--size real: config.{part}.arch={config[part].arch!r} is not one of {sorted(archs)}")
    return VISION_ARCHS[config.vision.arch], LLM_ARCHS[config.llm.arch]
  own = lambda path, toy: path if os.path.isfile(os.path.join(path, "config.json")) else os.path.join(TOY_ASSETS, toy)
  if str(config.llm.path).endswith(".gguf") and os.path.isfile(config.llm.path):  # a real LLM as a GGUF file:
    llm = language.family_of(config.llm.path).read_gguf(config.llm.path)[0]  # its header, no weights read
  else:
    llm = language.config_from_hf(safetensors_io.read_hf_config(own(config.llm.path, "gemma")))
  return vision.config_from_hf(safetensors_io.read_hf_config(own(config.vision.path, "clip"))), llm


def random_batch(rng, batch: int, text_len: int, vision, llm) -> dict:
  """BOS + random caption + [RET], right padded to text_len, lengths from half to full."""
  import numpy as np

  r = np.random.default_rng(rng)
  ids = r.integers(3, llm.vocab_size, (batch, text_len)).astype(np.int32)
  lengths = r.integers(max(2, text_len // 2), text_len + 1, batch)
  pos = np.arange(text_len)[None]
  ids[:, 0] = llm.bos_token_id
  ids = np.where(pos == lengths[:, None] - 1, llm.vocab_size, ids)  # [RET] = vocab_size
  mask = (pos < lengths[:, None]).astype(np.int32)
  ids = np.where(mask > 0, ids, llm.pad_token_id).astype(np.int32)
  image = r.standard_normal((batch, vision.num_channels, vision.image_size, vision.image_size), np.float32)
  return {"image": image, "text_ids": ids, "text_mask": mask}


def build_model(config, vision, llm):
  import jax.numpy as jnp

  from bridgejax.model import BridgeModel

  return BridgeModel.create(config, vision, llm, compute_dtype=jnp.dtype(config.compute_dtype),
                            frozen_param_dtype=jnp.dtype(config.frozen_param_dtype))


def frozen_init(model):
  """key -> random frozen {vision, llm} in frozen_param_dtype, by the modules' own initialisers."""
  import jax
  import jax.numpy as jnp

  c = model.vision.config

  def init(key):
    kv, kl = jax.random.split(key)
    image = jnp.zeros((1, c.num_channels, c.image_size, c.image_size), jnp.float32)
    return {"vision": model.vision.init(kv, image)["params"],
            "llm": model.llm.init(kl, jnp.zeros((1, 1), jnp.int32))["params"]}

  return init


def random_tree(abstract, seed: int = 0, fill=lambda path: None):
  """Random arrays shaped like `abstract`, made on the device: uniform with std 0.02, or the
  constant `fill(path)` returns. One small program per distinct (shape, dtype, constant), from
  XLA's RngBitGenerator: Gemma-2B + ViT-L/14 have 556 leaves but 14 shapes, and whole-tree or
  threefry programs take many times longer to compile. The step's speed does not depend on values."""
  import functools

  import jax
  import jax.numpy as jnp

  @functools.partial(jax.jit, static_argnums=(2, 3, 4))
  def leaf(key, i, shape, dtype, value):
    if value is not None:
      return jnp.full(shape, value, dtype)
    bound = 0.02 * math.sqrt(3)
    return jax.random.uniform(jax.random.fold_in(key, i), shape, jnp.float32, -bound, bound).astype(dtype)

  key = jax.random.key(seed, impl="unsafe_rbg")
  leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
  return jax.tree_util.tree_unflatten(
      treedef, [leaf(key, i, x.shape, jnp.dtype(x.dtype), fill(path)) for i, (path, x) in enumerate(leaves)])


def random_frozen(model, seed: int = 0):
  """Random frozen {vision, llm} on the device, once: CLIP LayerNorm scales at 1, Gemma's
  (1 + scale) RMSNorm scales and all biases at 0, the rest random."""
  import jax

  def fill(path):
    top, name = path[0].key, path[-1].key
    if name in ("scale", "bias"):
      return 1.0 if (top, name) == ("vision", "scale") else 0.0
    return None

  return random_tree(jax.eval_shape(frozen_init(model), jax.random.key(0)), seed, fill)
