"""Bridges: shapes, exact parameter formulas (tiny and thesis sizes), numpy/torch recomputation of every
equation, error paths, and a tiny overfitting smoke test per bridge."""

import ast
import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import torch

from bridge_helper import (BATCH, DIMS, THESIS, abstract_count, abstract_features, np64, np_hidden, np_post_norm,
                           param_count, random_hidden_states, torch_mha, torch_pool, tower_features)
from bridgejax import bridges
from bridgejax.bridges import MultiHeadCrossAttention, VisionFeatures

CONFIGS = {  # id: (config, number of output tokens)
    "cls_linear": (dict(name="cls_linear"), 1),
    "cls_linear_k4_l2_raw": (dict(name="cls_linear", k=4, layer=-2, post_norm=False), 4),
    "cls_multi_3x2": (dict(name="cls_multi", layers=(-1, -3, -5), copies=2), 6),
    "l4l": (dict(name="l4l"), 4),
    "l2l_postnorm": (dict(name="l2l", post_norm=True), 2),
    "l2lx2": (dict(name="l2lx2"), 4),
    "comp": (dict(name="comp"), 4),
    "grouped": (dict(name="grouped"), 4),
    "grouped_k2_l2_pool": (dict(name="grouped", k=2, layer=-2, num_heads=2, retrieval_feature="attention_pool"), 2),
    "regions": (dict(name="regions"), 5),
    "regions_postnorm": (dict(name="regions", post_norm=True), 5),
    "regions_pool": (dict(name="regions", retrieval_feature="attention_pool"), 5),
    "wavg": (dict(name="wavg"), 4),
    "wavg_k8_bias": (dict(name="wavg", k=8, use_bias=True), 8),
    "wavg_pool": (dict(name="wavg", retrieval_feature="attention_pool"), 4),
    "crossatt": (dict(name="crossatt"), 4),
    "crossatt_k12_l2": (dict(name="crossatt", k=12, layer=-2), 12),
    "crossatt_no_out": (dict(name="crossatt", k=3, attention="mha_no_out", post_norm=True, num_heads=8), 3),
    "crossatt_equation": (dict(name="crossatt", k=3, attention="equation", num_heads=2), 3),
    "crossatt_equation_k12_l2": (dict(name="crossatt", k=12, layer=-2, attention="equation"), 12),
}


def _feature_width(cfg, dims=DIMS):
  """W_i's input width: S·D for grouped/regions reading the mean of their concatenated groups, else D."""
  full = {**bridges.REGISTRY[cfg["name"]].defaults, **cfg}
  if cfg["name"] in ("grouped", "regions") and full["retrieval_feature"] == "mean":
    s = dims["grid_size"] ** 2 // full["k"] if cfg["name"] == "grouped" else (dims["grid_size"] // 2) ** 2
    return s * dims["vision_width"]
  return dims["vision_width"]


def _bare(hs):
  """Hidden states only, no post-LayerNorm: enough for every bridge with post_norm=False."""
  return VisionFeatures(hs)


def _init(cfg, dims=DIMS):
  """(bridge, params, hidden states), initialised once per config and shared by the tests."""
  return _init_cached(tuple(sorted(cfg.items())), tuple(sorted(dims.items())))


@functools.cache
def _init_cached(cfg, dims):
  cfg, dims = dict(cfg), dict(dims)
  bridge = bridges.build_bridge(cfg, **dims)
  hs = random_hidden_states(dims)
  params = bridge.init(jax.random.key(0), tower_features(hs))["params"]
  return bridge, params, hs


# --- shapes and parameter counts ------------------------------------------------------------------

@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_shapes_and_parameter_formula(case):
  cfg, k = CONFIGS[case]
  bridge, params, hs = _init(cfg)
  out = bridge.apply({"params": params}, tower_features(hs))
  assert out.tokens.shape == (BATCH, k, DIMS["llm_width"])
  assert out.image_feature.shape == (BATCH, _feature_width(cfg))
  assert out.tokens.dtype == jnp.float32 and np.all(np.isfinite(out.tokens))
  assert bridges.num_tokens(cfg, **DIMS) == k
  assert param_count(params) == bridges.num_params(cfg, **DIMS)


POOL = 1024 + 4 * (1024 * 1024 + 1024)  # AttentionPool: the 1-query attention for W_i
_POOLED = dict(retrieval_feature="attention_pool")
THESIS_COUNTS = {  # the numbers written in the module docstrings, at ViT-L/14 + Gemma-2B sizes
    **{f"cls_linear_k{k}": (dict(name="cls_linear", k=k), k * 2048 * 1025) for k in (1, 4, 8, 12, 16, 20)},
    "l4l": (dict(name="l4l"), 8_396_800), "l2l": (dict(name="l2l"), 4_198_400),
    "l2lx2": (dict(name="l2lx2"), 8_396_800), "comp": (dict(name="comp"), 8_396_800),
    "grouped": (dict(name="grouped"), 134_219_776), "regions": (dict(name="regions"), 134_219_776),
    "wavg": (dict(name="wavg"), 2_097_216),
    "grouped_pool": (dict(name="grouped", **_POOLED), 134_219_776 + POOL),
    "regions_pool": (dict(name="regions", **_POOLED), 134_219_776 + POOL),
    "wavg_pool": (dict(name="wavg", **_POOLED), 2_097_216 + POOL),
    "crossatt_k4": (dict(name="crossatt"), 6_301_696 + POOL),
    "crossatt_k12_l2": (dict(name="crossatt", k=12, layer=-2), 6_309_888 + POOL),
    "crossatt_k12_l2_no_out": (dict(name="crossatt", k=12, layer=-2, attention="mha_no_out"), 5_260_288 + POOL),
    "crossatt_k4_equation": (dict(name="crossatt", attention="equation"), 4_200_448 + POOL),
    "crossatt_k12_l2_equation": (dict(name="crossatt", k=12, layer=-2, attention="equation"), 4_208_640 + POOL),
}


@pytest.mark.parametrize("case", sorted(THESIS_COUNTS))
def test_parameter_counts_at_thesis_sizes(case):
  cfg, expected = THESIS_COUNTS[case]
  count, out = abstract_count(cfg, THESIS)
  assert count == expected == bridges.num_params(cfg, **THESIS)
  assert out.tokens.shape[1:] == (bridges.num_tokens(cfg, **THESIS), 2048)
  assert out.image_feature.shape == (1, _feature_width(cfg, THESIS))


def _heads(feature_width):
  """W_i (feature_width -> 256), W_t (2048 -> 256), the [RET] row and the logit scale (model.py)."""
  return feature_width * 256 + 256 + 2048 * 256 + 256 + 2048 + 1


def _total(cfg):
  return bridges.num_params(cfg, **THESIS) + _heads(_feature_width(cfg, THESIS))


def test_thesis_reported_totals():
  assert _heads(1024) == 788_993 and _heads(64 * 1024) == 17_304_065
  # 7.1: "the CLS-based models with k = 20 train 42M parameters while the Regions model trains 151M"
  assert _total(dict(name="cls_linear", k=20)) == 42_772_993
  assert _total(dict(name="regions")) == 151_523_841  # W_i on the mean of the five 65,536-d regions
  assert _total(dict(name="regions", **_POOLED)) == 139_208_193  # the attention pool reading: not 151M
  assert _total(dict(name="grouped")) == 151_523_841 and _total(dict(name="grouped", **_POOLED)) == 139_208_193
  assert _total(dict(name="wavg")) == 2_886_209 and _total(dict(name="wavg", **_POOLED)) == 7_085_633
  # 7.4: k=12 at L-1 has "just slightly more parameters than the CLS model with 4 tokens"
  cls4 = _total(dict(name="cls_linear", k=4))
  crossatt12 = {a: _total(dict(name="crossatt", k=12, layer=-2, attention=a)) for a in ("equation", "mha_no_out", "mha")}
  assert cls4 == 9_185_793
  assert crossatt12 == {"equation": 9_197_057, "mha_no_out": 10_248_705, "mha": 11_298_305}
  assert crossatt12["equation"] - cls4 == 11_264


# --- each equation against an independent recomputation ---------------------------------------------

def test_cls_linear_equation():
  cfg = dict(name="cls_linear", k=4, layer=-1, post_norm=True)
  bridge, params, hs = _init(cfg)
  out = bridge.apply({"params": params}, tower_features(hs))
  p, h = np64(params), np_hidden(hs)
  y = np_post_norm(h[-1][:, 0])  # pooler_output
  z = (y @ p["proj"]["kernel"] + p["proj"]["bias"]).reshape(BATCH, 4, 8)
  np.testing.assert_allclose(out.tokens, z, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out.image_feature, y, rtol=1e-5, atol=1e-5)
  # the thesis fork: hidden_states[l][:, 0] without the post-LayerNorm
  bridge, params, hs = _init(dict(name="cls_linear", k=2, layer=-3, post_norm=False))
  out = bridge.apply({"params": params}, _bare(hs))
  p = np64(params)
  z = (h[-3][:, 0] @ p["proj"]["kernel"] + p["proj"]["bias"]).reshape(BATCH, 2, 8)
  np.testing.assert_allclose(out.tokens, z, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out.image_feature, h[-3][:, 0], rtol=1e-6)


@pytest.mark.parametrize("name", ["l4l", "l2l", "l2lx2", "comp"])
@pytest.mark.parametrize("post_norm", [False, True])
def test_multi_cls_equations(name, post_norm):
  bridge, params, hs = _init(dict(name=name, post_norm=post_norm))
  out = bridge.apply({"params": params}, tower_features(hs))
  p, h = np64(params), np_hidden(hs)
  y = {l: (np_post_norm(h[l][:, 0]) if post_norm else h[l][:, 0]) for l in (-1, -2, -3, -4)}
  inputs = {  # eq. 6.5-6.8, in the thesis's token order
      "l4l": [y[-1], y[-2], y[-3], y[-4]],
      "l2l": [y[-1], y[-2]],
      "l2lx2": [y[-1], y[-1], y[-2], y[-2]],
      "comp": [y[-1], y[-2], y[-1] - y[-2], y[-1] * y[-2]],
  }[name]
  z = np.stack([x @ p["kernel"][i] + p["bias"][i] for i, x in enumerate(inputs)], axis=1)
  np.testing.assert_allclose(out.tokens, z, rtol=1e-5, atol=1e-5)
  extracted = {"l4l": 4}.get(name, 2)
  np.testing.assert_allclose(out.image_feature, np.mean([y[-1 - i] for i in range(extracted)], axis=0),
                             rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cfg", [dict(name="crossatt", k=5, layer=-2), dict(name="crossatt", k=3, num_heads=8),
                                 dict(name="crossatt", k=2, attention="mha_no_out", post_norm=True)],
                         ids=["k5_l2", "k3_h8", "no_out_postnorm"])
def test_crossatt_equals_torch_multihead_attention(cfg):
  full = {**bridges.REGISTRY["crossatt"].defaults, **cfg}
  bridge, params, hs = _init(cfg)
  out = bridge.apply({"params": params}, tower_features(hs))
  p, h = np64(params), np_hidden(hs)
  y = h[full["layer"]]
  y = np_post_norm(y) if full["post_norm"] else y
  mha = torch_mha(p["attn"], 16, full["num_heads"], out_proj=full["attention"] == "mha")
  q = torch.from_numpy(np.broadcast_to(p["queries"], (BATCH, full["k"], 16)).copy())
  t = torch.from_numpy(y)
  with torch.no_grad():
    heads = mha(q, t, t, need_weights=False)[0].numpy()
  z = heads @ p["proj"]["kernel"] + p["proj"]["bias"]
  np.testing.assert_allclose(out.tokens, z, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out.image_feature, torch_pool(p["feature_pool"], y, full["num_heads"]),
                             rtol=1e-5, atol=1e-5)


def _np_softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("heads,layer,post_norm", [(4, -1, False), (2, -2, True)])
def test_crossatt_equation_is_eq_7_15_to_7_17(heads, layer, post_norm):
  """attention="equation": numpy, head by head, as the thesis writes it."""
  cfg = dict(name="crossatt", k=3, num_heads=heads, layer=layer, post_norm=post_norm, attention="equation")
  bridge, params, hs = _init(cfg)
  assert set(params["attn"]) == {"k_proj", "v_proj"} and set(params["attn"]["k_proj"]) == {"kernel"}
  out = bridge.apply({"params": params}, tower_features(hs))
  p, h = np64(params), np_hidden(hs)
  y = np_post_norm(h[layer]) if post_norm else h[layer]  # Y_v (B, N, D)
  f = 16 // heads
  w_k = p["attn"]["k_proj"]["kernel"].reshape(16, 16)  # [W_0^K ... W_{H-1}^K], each (D, F)
  w_v = p["attn"]["v_proj"]["kernel"].reshape(16, 16)
  head = []
  for i in range(heads):
    cols = slice(i * f, (i + 1) * f)
    k_i, v_i = y @ w_k[:, cols], y @ w_v[:, cols]  # (7.17)
    q_i = p["queries"][:, cols]
    head.append(_np_softmax(q_i @ k_i.transpose(0, 2, 1) / np.sqrt(f)) @ v_i)  # (7.16)
  z = np.concatenate(head, axis=-1) @ p["proj"]["kernel"] + p["proj"]["bias"]  # (7.15)
  np.testing.assert_allclose(out.tokens, z, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out.image_feature, torch_pool(p["feature_pool"], y, heads), rtol=1e-5, atol=1e-5)


def _groups(h, k):
  """Consecutive groups of the row-major patch sequence y^1..y^P (eq. 7.2-7.5)."""
  patches = h[:, 1:]
  s = patches.shape[1] // k
  return [patches[:, i * s:(i + 1) * s] for i in range(k)]


@pytest.mark.parametrize("k", [4, 2])
def test_grouped_equation(k):
  bridge, params, hs = _init(dict(name="grouped", k=k, layer=-2))
  out = bridge.apply({"params": params}, _bare(hs))
  p, h = np64(params), np_hidden(hs)
  groups = [g.reshape(BATCH, -1) for g in _groups(h[-2], k)]  # Y_v^0 .. Y_v^{k-1} (eq. 7.2-7.5)
  z = np.stack([g @ p["proj"]["kernel"] + p["proj"]["bias"] for g in groups], 1)
  np.testing.assert_allclose(out.tokens, z, rtol=1e-5, atol=1e-5)
  assert "feature_pool" not in p  # retrieval_feature="mean": W_i reads the mean of the concatenated groups
  np.testing.assert_allclose(out.image_feature, sum(groups) / k, rtol=1e-6, atol=1e-6)
  bridge, params, hs = _init(dict(name="grouped", k=k, layer=-2, retrieval_feature="attention_pool"))
  out, p = bridge.apply({"params": params}, _bare(hs)), np64(params)
  np.testing.assert_allclose(out.tokens, np.stack([g @ p["proj"]["kernel"] + p["proj"]["bias"] for g in groups], 1),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out.image_feature, torch_pool(p["feature_pool"], h[-2], 4), rtol=1e-5, atol=1e-5)


def test_regions_equation_on_an_8x8_grid():
  dims = dict(DIMS, grid_size=8)
  bridge, params, hs = _init(dict(name="regions"), dims=dims)
  out = bridge.apply({"params": params}, _bare(hs))
  p, h = np64(params), np_hidden(hs)
  # token index of patch (row, col) is 1 + 8·row + col; quadrants 4x4 and the centre rows/cols 2..5
  idx = lambda rows, cols: [1 + 8 * r + c for r in rows for c in cols]
  regions = [idx(range(0, 4), range(0, 4)), idx(range(0, 4), range(4, 8)), idx(range(4, 8), range(0, 4)),
             idx(range(4, 8), range(4, 8)), idx(range(2, 6), range(2, 6))]
  assert all(len(r) == 16 for r in regions)
  z = np.stack([h[-1][:, r].reshape(BATCH, -1) @ p["proj"]["kernel"] + p["proj"]["bias"] for r in regions], 1)
  np.testing.assert_allclose(out.tokens, z, rtol=1e-5, atol=1e-5)
  # W_i's input: the mean of the five concatenated regions (thesis 6.3's rule), 16·D wide
  mean = np.mean([h[-1][:, r].reshape(BATCH, -1) for r in regions], axis=0)
  assert out.image_feature.shape == (BATCH, 16 * 16)
  np.testing.assert_allclose(out.image_feature, mean, rtol=1e-6, atol=1e-6)


def test_regions_attention_pool_feature():
  bridge, params, hs = _init(dict(name="regions", layer=-2, retrieval_feature="attention_pool"))
  out = bridge.apply({"params": params}, _bare(hs))
  p, h = np64(params), np_hidden(hs)
  np.testing.assert_allclose(out.image_feature, torch_pool(p["feature_pool"], h[-2], 4), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use_bias", [False, True])
def test_wavg_equation(use_bias):
  bridge, params, hs = _init(dict(name="wavg", use_bias=use_bias))
  params = jax.tree.map(lambda x: x, params)
  params["weights"] = params["weights"] + jnp.arange(4.0) / 10  # off the uniform init, to see W_a
  out = bridge.apply({"params": params}, _bare(hs))
  p, h = np64(params), np_hidden(hs)
  assert ("bias" in p["proj"]) == use_bias
  pooled = [np.einsum("s,bsd->bd", p["weights"], g) for g in _groups(h[-1], 4)]  # W_a [y^n .. y^n+S-1]
  z = np.stack([x @ p["proj"]["kernel"] + p["proj"].get("bias", 0) for x in pooled], 1)
  np.testing.assert_allclose(out.tokens, z, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out.image_feature, sum(pooled) / 4, rtol=1e-6, atol=1e-6)  # the mean of the 4


def test_wavg_attention_pool_feature():
  bridge, params, hs = _init(dict(name="wavg", retrieval_feature="attention_pool"))
  out = bridge.apply({"params": params}, _bare(hs))
  p, h = np64(params), np_hidden(hs)
  np.testing.assert_allclose(out.image_feature, torch_pool(p["feature_pool"], h[-1], 4), rtol=1e-5, atol=1e-5)


def test_wavg_starts_as_the_group_mean():
  _, params, _ = _init(dict(name="wavg"))
  np.testing.assert_allclose(params["weights"], np.full(4, 0.25))


def test_mha_param_layout_and_count():
  _, params, _ = _init(dict(name="crossatt", k=2))
  assert set(params) == {"queries", "attn", "proj", "feature_pool"}
  assert set(params["attn"]) == {"q_proj", "k_proj", "v_proj", "out_proj"}
  assert param_count(params["attn"]) == MultiHeadCrossAttention.num_params(16)
  _, params, _ = _init(dict(name="crossatt", k=2, attention="equation"))
  assert jax.tree.map(np.shape, params["attn"]) == {"k_proj": {"kernel": (16, 4, 4)}, "v_proj": {"kernel": (16, 4, 4)}}
  assert param_count(params["attn"]) == MultiHeadCrossAttention.num_params(16, False, False, False) == 2 * 16 * 16


# --- config handling and errors -------------------------------------------------------------------

def test_config_dict_and_list_layers():
  cfg = ml_collections.ConfigDict(dict(name="l2l", layers=[-2, -3]))
  bridge = bridges.build_bridge(cfg, **DIMS)
  assert bridge.layers == (-2, -3)
  feats = _bare(random_hidden_states())
  out = bridge.apply(bridge.init(jax.random.key(0), feats), feats)
  assert out.tokens.shape == (BATCH, 2, 8)


def test_bf16_compute_keeps_float32_params():
  bridge = bridges.build_bridge(dict(name="crossatt", k=2), **DIMS, dtype=jnp.bfloat16)
  feats = _bare(tuple(h.astype(jnp.bfloat16) for h in random_hidden_states()))
  variables = bridge.init(jax.random.key(0), feats)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables))
  out = bridge.apply(variables, feats)
  assert out.tokens.dtype == jnp.bfloat16 and out.tokens.shape == (BATCH, 2, 8)


ERRORS = {  # id: (config, dims override, message fragment)
    "unknown_name": (dict(name="blip3"), {}, "unknown bridge name 'blip3'; set config.bridge.name to one of"),
    "no_name": (dict(k=4), {}, "unknown bridge name None"),
    "unknown_key": (dict(name="cls_linear", heads=4), {},
                    "has no config key(s) ['heads']; its keys are: k (default 1)"),
    "preset_key": (dict(name="l2lx2", copies=3), {}, "has no config key(s) ['copies']"),
    "layer_low": (dict(name="cls_linear", layer=-6), {}, "from -1 (layer L) to -5 (the embeddings)"),
    "layer_positive": (dict(name="crossatt", layer=3), {}, "use a negative index into hidden_states"),
    "layers_out": (dict(name="l4l", layers=(-1, -2, -3, -9)), {}, "layers=-9 is not a valid layer"),
    "l4l_two": (dict(name="l4l", layers=(-1, -2)), {}, "takes exactly 4 layers"),
    "comp_three": (dict(name="cls_multi", layers=(-1, -2, -3), compare=True), {}, "compare=True needs exactly two"),
    "k_zero": (dict(name="crossatt", k=0), {}, "k=0 must be a positive integer"),
    "post_norm_str": (dict(name="cls_linear", post_norm="yes"), {}, "post_norm='yes' must be True or False"),
    "heads": (dict(name="crossatt", num_heads=3), {}, "num_heads=3 does not divide the vision width 16; use one of"),
    "grouped_split": (dict(name="grouped", k=3), {},
                      "16 patches, which cannot be split into k=3 equal groups; use k in [1, 2, 4, 8, 16]"),
    "wavg_split": (dict(name="wavg", k=5), {"grid_size": 6}, "36 patches, which cannot be split into k=5"),
    "regions_grid": (dict(name="regions"), {"grid_size": 6}, "divisible by 4"),
    "retrieval_feature": (dict(name="grouped", retrieval_feature="cls"), {},
                          "retrieval_feature='cls' is not one of 'mean', 'attention_pool'"),
    "pool_heads": (dict(name="wavg", retrieval_feature="attention_pool", num_heads=3), {}, "num_heads=3 does not divide"),
    "attention": (dict(name="crossatt", attention="torch"), {},
                  "attention='torch' is not one of 'equation', 'mha', 'mha_no_out'"),
    "bad_dims": (dict(name="cls_linear"), {"llm_width": 0}, "llm_width=0 must be a positive integer"),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_config_errors(case):
  cfg, override, message = ERRORS[case]
  with pytest.raises(ValueError) as info:
    bridges.build_bridge(cfg, **{**DIMS, **override})
  assert message in str(info.value), str(info.value)


def test_call_time_errors():
  bridge = bridges.build_bridge(dict(name="cls_linear", post_norm=True), **DIMS)
  with pytest.raises(ValueError, match="has post_norm=True but its VisionFeatures carry no post-LayerNorm"):
    bridge.init(jax.random.key(0), _bare(random_hidden_states()))
  bridge = bridges.build_bridge(dict(name="crossatt"), **DIMS)  # built for a 4x4 grid
  wrong = random_hidden_states(dict(DIMS, grid_size=3))
  with pytest.raises(ValueError, match=r"built for 17 tokens \(CLS \+ 4x4 patches\) of width 16"):
    bridge.init(jax.random.key(0), _bare(wrong))


def test_describe_lists_every_bridge():
  text = bridges.describe()
  for name in ("cls_linear", "cls_multi", "l4l", "l2l", "l2lx2", "comp", "grouped", "regions", "wavg", "crossatt"):
    assert name in bridges.names() and name in text


def _described():
  """{name: {key: default}} parsed back from describe()'s key lines."""
  out = {}
  for line in bridges.describe().splitlines():
    if line.startswith(" "):  # the doc line under each bridge
      continue
    name, _, keys = line.partition(" ")
    pairs = re.split(r" (?=\w+=)", keys.strip())
    out[name] = {k: ast.literal_eval(v) for k, v in (pair.split("=", 1) for pair in pairs)}
  return out


def test_describe_defaults_are_the_module_fields():
  not_keys = {"vision_width", "llm_width", "grid_size", "vision_layers", "llm_layers", "dtype", "param_dtype",
              "parent", "name"}
  described = _described()
  assert sorted(described) == bridges.names()
  for name, spec in bridges.REGISTRY.items():
    fields = {f.name: f.default for f in dataclasses.fields(spec.module) if f.name not in not_keys}
    assert described[name] == {k: v for k, v in fields.items() if k not in spec.fixed}, name
    assert spec.fixed == {k: fields[k] for k in spec.fixed}, name
    bridge = bridges.build_bridge(dict(name=name), **DIMS)  # defaults reach the module unchanged
    assert {k: getattr(bridge, k) for k in fields} == fields, name
  # the defaults the thesis configs rely on
  assert described["cls_linear"]["post_norm"] is True and described["l2l"]["layers"] == (-1, -2)
  assert bridges.REGISTRY["l2lx2"].fixed == dict(copies=2, compare=False)


@pytest.mark.parametrize("name", bridges.names())
def test_num_tokens_and_params_of_every_registered_bridge(name):
  """num_tokens/num_params (known from the config alone) equal what the built module produces."""
  cfg = dict(name=name)
  bridge = bridges.build_bridge(cfg, **DIMS)
  hs = tuple(jax.ShapeDtypeStruct((BATCH, 17, 16), jnp.float32) for _ in range(5))
  feats = abstract_features(hs, 16)
  params = jax.eval_shape(lambda f: bridge.init(jax.random.key(0), f)["params"], feats)
  out = jax.eval_shape(lambda p, f: bridge.apply({"params": p}, f), params, feats)
  assert out.tokens.shape == (BATCH, bridges.num_tokens(cfg, **DIMS), DIMS["llm_width"])
  assert param_count(params) == bridges.num_params(cfg, **DIMS)


# --- each bridge learns: a tiny fixed batch overfits ---------------------------------------------

OVERFIT = ["cls_linear_k4_l2_raw", "l4l", "l2l_postnorm", "l2lx2", "comp", "grouped", "regions", "wavg",
           "wavg_pool", "crossatt_k12_l2", "crossatt_equation"]


@pytest.mark.parametrize("case", OVERFIT)
def test_overfits_a_tiny_batch(case):
  cfg, k = CONFIGS[case]
  bridge, params, hs = _init(cfg)
  rng = np.random.default_rng(7)
  target = jnp.asarray(rng.standard_normal((BATCH, k, 8)), jnp.float32)
  has_pool = "feature_pool" in params
  feature_target = jnp.asarray(rng.standard_normal((BATCH, 16)), jnp.float32)

  def loss_fn(p):
    out = bridge.apply({"params": p}, tower_features(hs))
    loss = jnp.mean(jnp.square(out.tokens - target))
    if has_pool:  # the W_i feature of all-token bridges is trainable too
      loss = loss + jnp.mean(jnp.square(out.image_feature - feature_target))
    return loss

  opt = optax.adam(3e-2)

  @jax.jit
  def train(p):
    def step(carry, _):
      p, s = carry
      loss, g = jax.value_and_grad(loss_fn)(p)
      updates, s = opt.update(g, s, p)
      return (optax.apply_updates(p, updates), s), loss
    (p, _), losses = jax.lax.scan(step, (p, opt.init(p)), None, length=60)
    return losses, loss_fn(p)

  losses, final = train(params)
  assert float(final) < 0.02 * float(losses[0]), (float(losses[0]), float(final))


def test_on_the_clip_tower_post_layer_norm_is_pooler_output():
  from bridgejax.models.clip import CLIPVisionConfig, CLIPVisionTransformer
  config = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_layers=4, num_heads=4, image_size=16,
                            patch_size=4)
  tower = CLIPVisionTransformer(config)
  pixels = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, 16, 16)), jnp.float32)
  tower_params = tower.init(jax.random.key(0), pixels)["params"]
  vision = tower.apply({"params": tower_params}, pixels)
  feats = VisionFeatures.from_tower(vision.hidden_states, tower_params["post_norm"], config.layer_norm_eps)
  np.testing.assert_allclose(feats.cls(-1, post_norm=True), vision.pooler_output, rtol=1e-5, atol=1e-5)
  # FROMAGe's input: cls_linear with post_norm=True feeds W_c and W_i the pooler_output
  bridge = bridges.build_bridge(dict(name="cls_linear", k=2), vision_width=16, vision_layers=config.num_layers,
                                grid_size=config.grid_size, llm_width=8)
  out = bridge.apply(bridge.init(jax.random.key(1), feats), feats)
  np.testing.assert_allclose(out.image_feature, vision.pooler_output, rtol=1e-5, atol=1e-5)
  assert out.tokens.shape == (2, 2, 8)


@pytest.mark.parametrize("cfg,path,fan_in", [
    (dict(name="l4l"), ("kernel",), 256), (dict(name="cls_linear", k=4), ("proj", "kernel"), 256),
    (dict(name="grouped"), ("proj", "kernel"), 16 * 256), (dict(name="crossatt"), ("proj", "kernel"), 256)])
def test_linear_init_matches_torch_scale(cfg, path, fan_in):
  """Every Linear starts as torch.nn.Linear: U(±1/sqrt(fan_in)), fan_in the input width of one map."""
  dims = dict(vision_width=256, vision_layers=4, grid_size=8, llm_width=64)
  bridge = bridges.build_bridge(cfg, **dims)
  hs = tuple(jnp.zeros((1, 65, 256)) for _ in range(5))
  feats = tower_features(hs, {"scale": jnp.ones(256), "bias": jnp.zeros(256)})
  params = jax.jit(lambda key, f: bridge.init(key, f)["params"])(jax.random.key(0), feats)
  kernel = np.asarray(functools.reduce(lambda tree, key: tree[key], path, params))
  bound = 1 / np.sqrt(fan_in)
  assert np.abs(kernel).max() <= bound and np.abs(kernel).max() > 0.98 * bound
  np.testing.assert_allclose(kernel.std(), bound / np.sqrt(3), rtol=0.05)
