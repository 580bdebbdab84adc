"""LLaVA-1.5's projector: every patch token of one layer through a 2-layer GELU MLP (256 LLM tokens).

Axis legend: B batch, N tokens (1 + P), P patches (grid²), D vision width, E LLM width.

  Z = GELU(Y W_1 + b_1) W_2 + b_2    (B, P, E),   W_1 (D, E), W_2 (E, E)
  Y = `hidden_states[layer][:, 1:]`  (B, P, D): the patches, CLS dropped

Source. The lecture notes on multimodal LLMs this family comes from cover BLIP-2 and Flamingo and
say only that a module between a frozen encoder and a frozen LLM makes the LLM's input (BLIP-2:
"passed to the LLM through a projection layer"; Flamingo: "a vision-language resampler module
outperforms a plain Transformer and an MLP"); they do not describe LLaVA. LLaVA-1.5 (Liu et al.
2023, "Improved Baselines with Visual Instruction Tuning", projector type "mlp2x_gelu"): an
nn.Sequential(Linear(d_v, d_llm), GELU(), Linear(d_llm, d_llm)) over the patch tokens of the
penultimate CLIP layer (`hidden_states[-2][:, 1:]`, no post-LayerNorm), one LLM token per patch.
bridgejax does the same: layer=-2, post_norm=False, CLS dropped, torch's exact (erf) GELU and
nn.Linear initialisation. k = grid² (256 for ViT-L/14 at 224, 576 at 336).

image_feature (for W_i; LLaVA has no retrieval head), `retrieval_feature` as in alltokens.py:
  "mean" (default): the mean of the P patch vectors the MLP consumes (D dims), thesis 6.3's rule
    for bridges that make several tokens;
  "attention_pool": a 1-query multi-head attention (num_heads heads) over all N tokens of the layer.

Parameters: D·E + E + E·E + E (+ D + 4·(D² + D) with the pool).
  CLIP ViT-L/14 + Gemma-2B: 2,099,200 + 4,196,352 = 6,295,552; with W_i, W_t, [RET] and the logit
  scale (788,993) 7,084,545 trainable (`python -m bridgejax.param_count --config configs/mlp_projector.py`).

`GeluMLP` is also the feed-forward block of the resampler and the Q-Former (querying.py).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bridgejax.bridges import alltokens, base
from bridgejax.bridges.base import BridgeOutput


class GeluMLP(nn.Module):
  """Linear(W, hidden) -> GELU -> Linear(hidden, out), torch-initialised; (..., W) -> (..., out).

  GELU is the exact (erf) form of torch's nn.GELU(), which LLaVA, BERT (the Q-Former) and
  Flamingo's resampler use; Flax's default is the tanh approximation.
  """

  hidden: int
  out: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = base.dense(self.hidden, x.shape[-1], name="fc1", **kw)(x)
    return base.dense(self.out, self.hidden, name="fc2", **kw)(jax.nn.gelu(h, approximate=False))

  @staticmethod
  def num_params(width: int, hidden: int, out: int) -> int:
    return width * hidden + hidden + hidden * out + out


class MLPProjector(alltokens._AllTokens, base.Bridge):
  registry_name = "mlp_projector"
  grid_size: int
  layer: int = -2  # LLaVA-1.5: the penultimate layer
  post_norm: bool = False
  num_heads: int = 4  # the attention pool's heads
  retrieval_feature: str = "mean"  # alltokens.RETRIEVAL_FEATURES

  @property
  def num_tokens(self) -> int:
    return self.grid_size**2

  @property
  def num_params(self) -> int:
    return GeluMLP.num_params(self.vision_width, self.llm_width, self.llm_width) + self._pool_params

  @nn.compact
  def __call__(self, features: base.VisionFeatures) -> BridgeOutput:
    x = self._tokens(features)  # (B, N, D)
    patches = x[:, 1:]  # (B, P, D)
    z = GeluMLP(self.llm_width, self.llm_width, dtype=self.dtype, param_dtype=self.param_dtype,
                name="mlp")(patches)  # (B, P, E)
    return BridgeOutput(z, self._feature(x, patches))


base.register("mlp_projector", MLPProjector, check=alltokens._check_common,
              doc="LLaVA-1.5: every patch token of layer L-1 through Linear(D, E), GELU, Linear(E, E)")
