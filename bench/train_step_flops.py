"""The analytic FLOP count of bench/train_step.py's step (its flops_per_step; bench/tpu_compile.py's
time at the chip's peak), with the bridge's part traced from its jaxpr. A helper of those scripts
(bench/ is not a package: they put this folder on sys.path), not a script itself.

Analytic FLOPs per step (multiply-adds count 2; XLA's cost_analysis misses cuBLAS GEMMs on GPU).
B batch, T text length, K visual tokens, S = K + T.
  CLIP (frozen, forward only; N = (image/patch)^2 + 1 tokens, width W, MLP M, Lv layers):
    clip = B [2 (N-1) C P^2 W + Lv (N (8 W^2 + 4 W M) + 4 N^2 W)]
  LLM per token (width D, H query heads, G kv heads, head dim h, MLP F, Ll layers, V vocab):
    lin = 2 Ll (2 D H h + 2 D G h + 3 D F),  head = 2 D (V + 1)     ([RET] is one extra column)
  LLM attention of one sequence of length s: attn(s) = 4 Ll s^2 H h (dense: masks skip nothing)
  The caption pass is R rows of length Sc: (B, S), or (B/2, 2S) when concat_prob > 0 (the concat
  trick lays pairs out whatever the coin says). Each pass takes logits at all but its last position.
    forward = B (S + T) lin + (R (Sc - 1) + B (T - 1)) head + R attn(Sc) + B attn(T)
  The LLM is frozen but gradients flow through it to the visual tokens and the [RET] row: its
  backward computes activation gradients only, as many FLOPs as the forward for the weight GEMMs
  (2x in all) and twice the forward for attention, whose both operands are activations (3x).
  Bridge and retrieval heads (trainable): 3x their forward (forward, weight and input gradients).
  The bridge's forward is its dot/conv FLOPs read from its traced jaxpr; the heads' is
  2 B E (D + W_feature) for W_t, W_i and 4 B^2 E for the two similarity matrices of InfoNCE.
  Not counted: the optimizer and element-wise work, and the recomputation that config.remat adds
  (so utilisation is model FLOPs utilisation). A bridge reading layer L-1 lets XLA skip CLIP's last
  layer, which this count keeps (1/Lv of the CLIP term).
At fromage, batch 180, 24-token captions, ViT-L/14 + Gemma-2B this gives 116.9 TFLOP per step.
"""

from __future__ import annotations

import math


def _traced_matmul_flops(jaxpr) -> int:
  """dot_general and conv FLOPs of a jaxpr, sub-jaxprs included (no loops expected)."""
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      (contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contract)
    elif name == "conv_general_dilated":
      rhs = eqn.invars[1].aval.shape
      out_dim = eqn.params["dimension_numbers"].rhs_spec[0]
      total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(rhs) // rhs[out_dim]
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          total += _traced_matmul_flops(inner)
  return total


def _bridge_forward(config, vision, llm, batch: int) -> tuple[int, int, int]:
  """(forward FLOPs, k, image-feature width) of the config's bridge, traced from shapes."""
  import jax
  import jax.numpy as jnp

  from bridgejax.bridges import VisionFeatures, build_bridge

  bridge = build_bridge(config.bridge, vision_width=vision.hidden_size, vision_layers=vision.num_layers,
                        grid_size=vision.grid_size, llm_width=llm.hidden_size)
  hidden = tuple(jax.ShapeDtypeStruct((batch, vision.num_tokens, vision.hidden_size), jnp.float32)
                 for _ in range(vision.num_layers + 1))
  norm = jax.ShapeDtypeStruct((vision.hidden_size,), jnp.float32)
  features = VisionFeatures(hidden, norm, norm, vision.layer_norm_eps)
  params = jax.eval_shape(lambda f: bridge.init(jax.random.key(0), f), features)
  jaxpr = jax.make_jaxpr(lambda p, f: bridge.apply(p, f))(params, features)
  out = jax.eval_shape(lambda p, f: bridge.apply(p, f), params, features)
  return _traced_matmul_flops(jaxpr.jaxpr), out.tokens.shape[1], out.image_feature.shape[-1]


def flops_breakdown(config, vision_config, llm_config, batch: int, text_len: int) -> dict:
  """The analytic count of the module docstring, by part: forward FLOPs and step FLOPs."""
  v, g, B, T = vision_config, llm_config, batch, text_len
  p = float(config.concat_prob)
  N, W, M, P, C = v.num_tokens, v.hidden_size, v.intermediate_size, v.patch_size, v.num_channels
  clip = B * (2 * (N - 1) * C * P * P * W + v.num_layers * (N * (8 * W * W + 4 * W * M) + 4 * N * N * W))
  D, H, G, h, F = g.hidden_size, g.num_heads, g.num_kv_heads, g.head_dim, g.intermediate_size
  lin = 2 * g.num_layers * (2 * D * H * h + 2 * D * G * h + 3 * D * F)
  head = 2 * D * (g.vocab_size + 1)
  attn = lambda s: 4 * g.num_layers * s * s * H * h
  bridge, K, feature = _bridge_forward(config, v, g, B)
  S = K + T
  rows, length = (B // 2, 2 * S) if p > 0 else (B, S)  # the caption pass's layout
  E = config.ret.embed_dim
  fwd = {
      "clip": clip,
      "bridge": bridge,
      "llm_linear": B * (S + T) * lin,
      "lm_head": (rows * (length - 1) + B * (T - 1)) * head,
      "llm_attention": rows * attn(length) + B * attn(T),
      "heads": 2 * B * E * (D + feature) + 4 * B * B * E,
  }
  factor = {"clip": 1, "bridge": 3, "llm_linear": 2, "lm_head": 2, "llm_attention": 3, "heads": 3}
  step = {k: factor[k] * fwd[k] for k in fwd}
  return {"forward": fwd, "step": step, "total": sum(step.values()), "k": K}


def flops_per_step(config, vision_config, llm_config, batch: int, text_len: int) -> float:
  """Analytic FLOPs of one train step (formula in the module docstring)."""
  return flops_breakdown(config, vision_config, llm_config, batch, text_len)["total"]
