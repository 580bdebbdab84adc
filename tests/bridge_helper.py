"""What the bridge tests share (test_bridges, test_bridges_resampler_qformer_mlp, test_blip2_parity):
the tiny and thesis-size backbone geometry, random tower features, parameter counts, and numpy/torch
references."""

import jax
import jax.numpy as jnp
import numpy as np
import torch

from bridgejax import bridges
from bridgejax.bridges import VisionFeatures

# Tiny backbone geometry: width 16, 4 layers (5 hidden states), a 4x4 grid (17 tokens), LLM width 8.
DIMS = dict(vision_width=16, vision_layers=4, grid_size=4, llm_width=8)
BATCH = 3
# ViT-L/14 at 224 + Gemma-2B, only through jax.eval_shape.
THESIS = dict(vision_width=1024, vision_layers=24, grid_size=16, llm_width=2048)


def random_hidden_states(dims=DIMS, batch=BATCH, seed=0):
  rng = np.random.default_rng(seed)
  n = 1 + dims["grid_size"] ** 2
  return tuple(jnp.asarray(rng.standard_normal((batch, n, dims["vision_width"])), jnp.float32)
               for _ in range(dims["vision_layers"] + 1))


def post_norm_params(width=DIMS["vision_width"], seed=1):
  rng = np.random.default_rng(seed)
  return {"scale": jnp.asarray(1 + 0.1 * rng.standard_normal(width), jnp.float32),
          "bias": jnp.asarray(0.1 * rng.standard_normal(width), jnp.float32)}


def tower_features(hs, params=None, eps=1e-5):
  """The tower's features: hidden states plus a (random) post-LayerNorm."""
  p = post_norm_params() if params is None else params
  return VisionFeatures(hs, p["scale"], p["bias"], eps)


def abstract_features(hs, width):
  norm = jax.ShapeDtypeStruct((width,), jnp.float32)
  return VisionFeatures(hs, norm, norm)


def np_post_norm(x, eps=1e-5):
  p = jax.tree.map(np.asarray, post_norm_params())
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def param_count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def abstract_count(cfg, dims):
  bridge = bridges.build_bridge(cfg, **dims)
  n = 1 + dims["grid_size"] ** 2
  hs = tuple(jax.ShapeDtypeStruct((1, n, dims["vision_width"]), jnp.float32) for _ in range(dims["vision_layers"] + 1))
  feats = abstract_features(hs, dims["vision_width"])
  shapes = jax.eval_shape(lambda f: bridge.init(jax.random.key(0), f)["params"], feats)
  out = jax.eval_shape(lambda p, f: bridge.apply({"params": p}, f), shapes, feats)
  return param_count(shapes), out


def np64(tree):
  return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


def np_hidden(hs):
  return [np.asarray(h, np.float64) for h in hs]


def torch_mha(p, width, heads, out_proj=True):
  """torch.nn.MultiheadAttention carrying our q/k/v/out weights (Flax kernels are (in, out))."""
  mha = torch.nn.MultiheadAttention(width, heads, batch_first=True).double()
  to_t = lambda a: torch.from_numpy(np.asarray(a, np.float64))
  with torch.no_grad():
    mha.in_proj_weight.copy_(to_t(np.concatenate(
        [p[n]["kernel"].reshape(width, width).T for n in ("q_proj", "k_proj", "v_proj")], axis=0)))
    mha.in_proj_bias.copy_(to_t(np.concatenate([p[n]["bias"].reshape(width) for n in ("q_proj", "k_proj", "v_proj")])))
    if out_proj:
      mha.out_proj.weight.copy_(to_t(p["out_proj"]["kernel"].T))
      mha.out_proj.bias.copy_(to_t(p["out_proj"]["bias"]))
    else:  # identity out-projection: the concatenated heads themselves
      mha.out_proj.weight.copy_(torch.eye(width, dtype=torch.float64))
      mha.out_proj.bias.zero_()
  return mha


def torch_pool(p, tokens, heads):
  mha = torch_mha(p["attn"], tokens.shape[-1], heads)
  q = torch.from_numpy(np.broadcast_to(p["query"], (tokens.shape[0], 1, tokens.shape[-1])).copy())
  t = torch.from_numpy(tokens)
  with torch.no_grad():
    return mha(q, t, t, need_weights=False)[0][:, 0].numpy()
