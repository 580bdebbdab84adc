"""Bridges from other work (querying.py, projector.py): Flamingo's Perceiver resampler, BLIP-2's Q-Former,
LLaVA-1.5's MLP projector. Shapes, exact parameter formulas (tiny and real sizes), a torch recomputation
of each equation, config errors in one line, and a jitted loss + gradient through the tiny BridgeModel."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bridge_helper import (BATCH, DIMS, THESIS, abstract_count, np64, np_hidden, np_post_norm, param_count,
                           random_hidden_states, torch_mha, torch_pool, tower_features)
from bridgejax import bridges, cli
from bridgejax.bridges.querying import QFormerLayer, ResamplerLayer
from bridgejax.param_count import count
from bridgejax.model import BridgeModel
from bridgejax.models.clip import CLIPVisionTransformer
from bridgejax.models.gemma import Gemma
from model_helper import TINY_LLM, TINY_VISION, experiment_config

# The module defaults (64 latents, 6 layers) are counted at real size below and, at tiny size, by
# test_bridges.py's test over every registered bridge; these smaller settings run for real.
CONFIGS = {  # id: (config, number of output tokens)
    "resampler_small_raw_pool": (dict(name="perceiver_resampler", k=5, num_layers=2, num_heads=4, mlp_ratio=2,
                                      layer=-2, post_norm=False, retrieval_feature="attention_pool"), 5),
    "resampler_l1": (dict(name="perceiver_resampler", k=4, num_layers=1), 4),
    "qformer_every2": (dict(name="qformer", k=6, num_layers=3, cross_attention_every=2, num_heads=4), 6),
    "qformer_l1_postnorm_pool": (dict(name="qformer", k=3, num_layers=1, mlp_ratio=1, layer=-1, post_norm=True,
                                      num_heads=2, retrieval_feature="attention_pool"), 3),
    "mlp_projector": (dict(name="mlp_projector"), 16),
    "mlp_projector_l1_pool": (dict(name="mlp_projector", layer=-1, num_heads=2, retrieval_feature="attention_pool"),
                              16),
}


@functools.cache
def _run(case):
  """(config with defaults filled in, params, hidden states, output) of CONFIGS[case], jitted, once."""
  cfg, _ = CONFIGS[case]
  bridge = bridges.build_bridge(cfg, **DIMS)
  hs = random_hidden_states()
  params = jax.jit(bridge.init)(jax.random.key(0), tower_features(hs))["params"]
  out = jax.jit(bridge.apply)({"params": params}, tower_features(hs))
  return {**bridges.REGISTRY[cfg["name"]].defaults, **cfg}, params, hs, out


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_shapes_and_parameter_formula(case):
  cfg, k = CONFIGS[case]
  _, params, _, out = _run(case)
  assert out.tokens.shape == (BATCH, k, DIMS["llm_width"]) and np.all(np.isfinite(out.tokens))
  assert out.image_feature.shape == (BATCH, DIMS["vision_width"])
  assert bridges.num_tokens(cfg, **DIMS) == k
  assert param_count(params) == bridges.num_params(cfg, **DIMS)


def test_layer_formulas_and_cross_attention_placement():
  d = DIMS["vision_width"]
  _, params, _, _ = _run("qformer_every2")  # cross-attention in layers 0 and 2 of 3
  assert [("cross_attn" in params[f"layer_{i}"]) for i in range(3)] == [True, False, True]
  assert param_count(params["layer_0"]) == QFormerLayer.num_params(d, 4, True)
  assert param_count(params["layer_1"]) == QFormerLayer.num_params(d, 4, False) == 4 * (d * d + d) + 8 * d * d + 5 * d + 4 * d
  _, params, _, _ = _run("resampler_small_raw_pool")
  assert param_count(params["layer_1"]) == ResamplerLayer.num_params(d, 2) == 6 * d + 4 * (d * d + d) + 4 * d * d + 3 * d


@pytest.mark.parametrize("name", ["perceiver_resampler", "qformer", "mlp_projector"])
def test_bf16_compute_keeps_float32_params(name):
  """The training dtype setting (compute_dtype=bfloat16), from shapes only."""
  bridge = bridges.build_bridge(dict(name=name), **DIMS, dtype=jnp.bfloat16)
  hs = tuple(jax.ShapeDtypeStruct((BATCH, 17, 16), jnp.bfloat16) for _ in range(5))
  norm = jax.ShapeDtypeStruct((16,), jnp.float32)
  feats = bridges.VisionFeatures(hs, norm, norm)
  params = jax.eval_shape(lambda f: bridge.init(jax.random.key(0), f)["params"], feats)
  out = jax.eval_shape(lambda p, f: bridge.apply({"params": p}, f), params, feats)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  assert out.tokens.dtype == out.image_feature.dtype == jnp.bfloat16


REAL_COUNTS = {  # ViT-L/14 + Gemma-2B: the figures in the module docstrings, from shapes only
    "resampler": (dict(name="perceiver_resampler"), 77_756_416),
    "qformer": (dict(name="qformer"), 35_729_408),
    "qformer_blip2_depth": (dict(name="qformer", num_layers=12, cross_attention_every=2),
                            32 * 1024 + 4 * 1024 + 12 * 16_796_672 - 6 * (4 * (1024**2 + 1024) + 2048) + 2_099_200),
    "mlp_projector": (dict(name="mlp_projector"), 2_099_200 + 4_196_352),
    # configs/qformer.py:blip2 (width 768, 12 layers, cross-attention in 0, 2, ..., 10 reading the 1024-wide tokens)
    "qformer_blip2": (dict(name="qformer", num_layers=12, cross_attention_every=2, num_heads=12, width=768,
                           layer_norm_eps=1e-12),
                      32 * 768 + 2 * 768 + 2 * 1024 + 12 * (4 * (768**2 + 768) + 2 * 768 * 3072 + 3072 + 768 + 4 * 768)
                      + 6 * (2 * (768**2 + 768) + 2 * (1024 * 768 + 768) + 2 * 768) + 768 * 2048 + 2048),
}


@pytest.mark.parametrize("case", sorted(REAL_COUNTS))
def test_parameter_counts_at_real_sizes(case):
  cfg, expected = REAL_COUNTS[case]
  n, out = abstract_count(cfg, THESIS)
  assert n == expected == bridges.num_params(cfg, **THESIS)
  assert out.tokens.shape[1:] == (bridges.num_tokens(cfg, **THESIS), 2048)
  assert out.image_feature.shape == (1, cfg.get("width") or 1024)  # the Q-Former's mean query state


# the totals `python -m bridgejax.param_count --config configs/X.py --json` prints (the table of
# docs/experiments.md quotes them: test_docs_quote_the_inspect_counts)
INSPECT = {"resampler": 78_545_409, "qformer": 36_518_401, "mlp_projector": 7_084_545, "blip2": 103_923_713}


@pytest.mark.parametrize("name", sorted(INSPECT))
def test_inspect_counts_every_config_at_real_size(name):
  config = experiment_config(name)
  result = count(config)
  width = config.bridge.get("width") or 1024  # W_i reads the mean of the queries' states
  heads = width * 256 + 256 + 2048 * 256 + 256 + 2048 + 1  # W_i, W_t, [RET], logit scale
  assert result["trainable_params"] == bridges.num_params(config.bridge, **THESIS) + heads == INSPECT[name]
  assert sum(result["by_module"].values()) == result["trainable_params"]


def test_docs_quote_the_inspect_counts():
  with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "experiments.md")) as f:
    rows = [line for line in f if line.startswith("| ")]
  for name, total in INSPECT.items():
    assert any(f"`configs/{name}.py" in row and f"| {total:,} |" in row for row in rows), (name, total)


# --- each equation, recomputed in torch (float64) from the same parameters ---------------------------

def _t(x):
  return torch.from_numpy(np.array(x, np.float64))  # a writable copy


def _ln(x, p):
  return F.layer_norm(x, x.shape[-1:], _t(p["scale"]), _t(p["bias"]), eps=1e-5)


def _linear(x, p):
  return x @ _t(p["kernel"]) + _t(p["bias"])


def _mlp(x, p):
  return _linear(F.gelu(_linear(x, p["fc1"])), p["fc2"])  # torch's default GELU: the exact erf form


def _attn(p, queries, tokens, heads):
  with torch.no_grad():
    return torch_mha(p, queries.shape[-1], heads)(queries, tokens, tokens, need_weights=False)[0]


def _layer_tokens(hs, full):
  y = np_hidden(hs)[full["layer"]]
  return np_post_norm(y) if full["post_norm"] else y


def _check_feature(out, full, p, y, h):
  expected = h.mean(1) if full["retrieval_feature"] == "mean" else torch_pool(p["feature_pool"], y,
                                                                               full["num_heads"])
  np.testing.assert_allclose(out.image_feature, np.asarray(expected), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["resampler_small_raw_pool", "resampler_l1"])
def test_resampler_equation(case):
  """Flamingo: L += Attn(LN(L), [LN(X); LN(L)]); L += FFN(LN(L)); Z = LL_O(LN(L)), X the patches."""
  full, params, hs, out = _run(case)
  k = CONFIGS[case][1]
  p, y = np64(params), _layer_tokens(hs, full)
  x = _t(y[:, 1:])
  h = _t(np.broadcast_to(p["latents"], (BATCH, k, DIMS["vision_width"])))
  for i in range(full["num_layers"]):
    layer = p[f"layer_{i}"]
    q = _ln(h, layer["latent_norm"])
    h = h + _attn(layer["attn"], q, torch.cat([_ln(x, layer["media_norm"]), q], 1), full["num_heads"])
    h = h + _mlp(_ln(h, layer["ffn_norm"]), layer["ffn"])
  h = _ln(h, p["norm"])
  np.testing.assert_allclose(out.tokens, np.asarray(_linear(h, p["proj"])), rtol=1e-5, atol=1e-5)
  _check_feature(out, full, p, y, h)


@pytest.mark.parametrize("case", ["qformer_every2", "qformer_l1_postnorm_pool"])
def test_qformer_equation(case):
  """BLIP-2 (post-LN): Q = LN(Q + SA(Q)); Q = LN(Q + CA(Q, LN_v(X))) every n-th layer; Q = LN(Q + FFN(Q))."""
  full, params, hs, out = _run(case)
  k = CONFIGS[case][1]
  p, y = np64(params), _layer_tokens(hs, full)
  tokens = _ln(_t(y), p["vision_norm"])  # every token, CLS included
  h = _ln(_t(np.broadcast_to(p["queries"], (BATCH, k, DIMS["vision_width"]))), p["query_norm"])
  heads = full["num_heads"]
  for i in range(full["num_layers"]):
    layer = p[f"layer_{i}"]
    h = _ln(h + _attn(layer["self_attn"], h, h, heads), layer["self_attn_norm"])
    if i % full["cross_attention_every"] == 0:
      h = _ln(h + _attn(layer["cross_attn"], h, tokens, heads), layer["cross_attn_norm"])
    h = _ln(h + _mlp(h, layer["ffn"]), layer["ffn_norm"])
  np.testing.assert_allclose(out.tokens, np.asarray(_linear(h, p["proj"])), rtol=1e-5, atol=1e-5)
  _check_feature(out, full, p, y, h)


@pytest.mark.parametrize("case", ["mlp_projector", "mlp_projector_l1_pool"])
def test_mlp_projector_equation(case):
  """LLaVA-1.5: Z = Linear(GELU(Linear(Y))) over the patches of layer L-1 (CLS dropped)."""
  full, params, hs, out = _run(case)
  p, y = np64(params), _layer_tokens(hs, full)
  patches = _t(y[:, 1:])
  np.testing.assert_allclose(out.tokens, np.asarray(_mlp(patches, p["mlp"])), rtol=1e-5, atol=1e-5)
  _check_feature(out, full, p, y, patches)


# --- config errors, in one line ----------------------------------------------------------------------

ERRORS = {  # id: (config, message fragment)
    "unknown_key": (dict(name="qformer", depth=3), "bridge 'qformer' has no config key(s) ['depth']; its keys are: k"),
    "eps_zero": (dict(name="qformer", layer_norm_eps=0.0), "layer_norm_eps=0.0 must be a number in (0, 1)"),
    "width_heads": (dict(name="qformer", width=10, num_heads=4), "num_heads=4 does not divide the vision width 10"),
    "every_zero": (dict(name="qformer", cross_attention_every=0), "cross_attention_every=0 must be a positive integer"),
    "layers_zero": (dict(name="perceiver_resampler", num_layers=0), "num_layers=0 must be a positive integer"),
    "mlp_ratio": (dict(name="qformer", mlp_ratio=1.5), "mlp_ratio=1.5 must be a positive integer"),
    "heads": (dict(name="perceiver_resampler", num_heads=3), "num_heads=3 does not divide the vision width 16"),
    "layer": (dict(name="mlp_projector", layer=-6), "from -1 (layer L) to -5 (the embeddings)"),
    "feature": (dict(name="qformer", retrieval_feature="max"), "retrieval_feature='max' is not one of 'mean'"),
    "post_norm": (dict(name="mlp_projector", post_norm="no"), "post_norm='no' must be True or False"),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_config_errors_are_one_line(case, capsys):
  cfg, message = ERRORS[case]
  with pytest.raises(ValueError) as info:
    bridges.build_bridge(cfg, **DIMS)
  assert message in str(info.value) and "\n" not in str(info.value), str(info.value)
  assert cli.call(lambda: bridges.build_bridge(cfg, **DIMS)) == 2  # what train.py, eval.py, predict print
  assert capsys.readouterr().err == f"error: {info.value}\n"


def test_config_files_take_every_bridge_key():
  """Every key of each bridge is in its config file, so --config.bridge.KEY overrides any of them."""
  for name, bridge in [("resampler", "perceiver_resampler"), ("qformer", "qformer"), ("mlp_projector", "mlp_projector")]:
    config = experiment_config(name)
    assert config.bridge.to_dict() == {"name": bridge, **bridges.REGISTRY[bridge].defaults}
  assert experiment_config("qformer", "num_layers=12,cross_attention_every=2").bridge.num_layers == 12
  blip2 = experiment_config("qformer", "blip2")
  assert (blip2.name, blip2.stage, blip2.representation_share) == ("blip2", "generative", 0.5)
  assert {k: blip2.bridge[k] for k in ("width", "num_layers", "cross_attention_every", "num_heads",
                                       "layer_norm_eps")} == dict(width=768, num_layers=12, cross_attention_every=2,
                                                                  num_heads=12, layer_norm_eps=1e-12)
  assert experiment_config("qformer", "blip2,num_layers=4").bridge.num_layers == 4  # a key given wins over the preset
  assert experiment_config("qformer", "blip2,stage=representation").representation_share == 0.0  # stage 1 alone
  assert experiment_config("blip2").to_dict() == blip2.to_dict()
  e = cli.config_override_error(["train.py", "--config", "configs/qformer.py", "--workdir", "w",
                                 "--config.bridge.cross_attention_evry=3"])
  assert str(e) == ("unknown config key --config.bridge.cross_attention_evry; "
                    "did you mean --config.bridge.cross_attention_every?")


# --- inside the model: one jitted loss and gradient per bridge ----------------------------------------

@pytest.fixture(scope="module")
def frozen():
  x = jnp.zeros((1, 3, 28, 28))
  return {"vision": jax.jit(CLIPVisionTransformer(TINY_VISION).init)(jax.random.key(0), x)["params"],
          "llm": jax.jit(Gemma(TINY_LLM).init)(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]}


@pytest.mark.parametrize("name,arg", [("resampler", "num_layers=1,k=3"), ("qformer", "num_layers=1,k=3"),
                                      ("mlp_projector", None)])
def test_loss_and_gradients_through_the_tiny_model(frozen, name, arg):
  config = experiment_config(name, arg)
  model = BridgeModel.create(config, TINY_VISION, TINY_LLM)
  trainable = model.init_trainable(jax.random.key(1), frozen)
  rng = np.random.default_rng(0)
  ret = TINY_LLM.vocab_size  # [RET] is the row after the vocabulary
  ids = np.array([[2, *rng.integers(3, 30, 4), ret], [2, *rng.integers(3, 30, 2), ret, 0, 0]], np.int32)
  batch = {"image": jnp.asarray(rng.standard_normal((2, 3, 28, 28)), jnp.float32), "text_ids": ids,
           "text_mask": (np.arange(6) < np.array([[6], [4]])).astype(np.int32)}
  (loss, metrics), grads = jax.jit(jax.value_and_grad(model.loss, has_aux=True))(trainable, frozen, batch,
                                                                                  jax.random.key(2))
  assert np.isfinite(float(loss)) and float(metrics["caption_loss"]) > 0
  assert jax.tree.structure(grads) == jax.tree.structure(trainable)
  nonzero = jax.tree.map(lambda g: bool(np.all(np.isfinite(g))) and float(jnp.abs(g).max()) > 0, grads["bridge"])
  assert all(jax.tree.leaves(nonzero)), nonzero
