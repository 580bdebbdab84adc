"""CLS-based bridges (thesis chapter 6): one or a few CLS tokens -> k LLM embeddings.

Axis legend (einsum letters): B batch, D vision width, E LLM width, K output tokens, T CLS inputs.

Config keys and defaults are the module fields below (`bridgejax.bridges.describe()` lists them).

`cls_linear` (eq. 6.1-6.4; FROMAGe's W_c with k tokens)
  Z = reshape(Y W + b) with Y the CLS of hidden_states[layer], W (D, k·E), b (k·E): one nn.Linear
  whose output is cut into k consecutive blocks of E (FROMAGe's `visual_embeddings` + reshape, so
  a converted FROMAGe checkpoint is this tree with the kernel transposed).
  post_norm default True = FROMAGe's `pooler_output` (layer L's CLS after the post-LayerNorm). The
  thesis fork (`--cls-layer l`) takes `hidden_states[l][:, 0]` without it, for every layer including
  L, so the thesis rows of tables 6.1-6.18 set post_norm=False.
  image_feature: the same CLS (post-normed iff post_norm), as FROMAGe feeds one tensor to W_c and W_i.
  Parameters: k·E·(D + 1).
    D=1024, E=2048: k=1 2,099,200; k=4 8,396,800; k=8 16,793,600; k=12 25,190,400;
    k=16 33,587,200; k=20 41,984,000. Thesis 7.1: "CLS-based models with k = 20 train 42M" (with
    W_i, W_t, the [RET] row and the logit scale, 788,993 more: 42.77M in all).

`cls_multi` and its presets (eq. 6.5-6.8): T CLS inputs, one Linear(D, E) per output token,
  LL_i(Y) = Y W_i + b_i. Kernels are stacked into one (K, D, E) array and applied by one einsum.
  l4l   = [LL0(Y^L), LL1(Y^L-1), LL2(Y^L-2), LL3(Y^L-3)]                   layers=(-1, -2, -3, -4)
  l2l   = [LL0(Y^L), LL1(Y^L-1)]                                            layers=(-1, -2)
  l2lx2 = [LL0(Y^L), LL1(Y^L), LL2(Y^L-1), LL3(Y^L-1)]       layers=(-1, -2), copies=2
  comp  = [LL0(Y^L), LL1(Y^L-1), LL2(Y^L - Y^L-1), LL3(Y^L ⊙ Y^L-1)]  layers=(-1, -2), compare=True
  Each preset is a subclass of MultiCLS whose field defaults are its row above; copies and compare
  are fixed, `layers` moves the window (l4l takes any four, l2l/l2lx2/comp any two). `cls_multi`
  itself exposes every field.
  post_norm default False: these models exist only in the thesis fork, which reads
  `hidden_states[l][:, 0]`. With post_norm=True each CLS is normalised before any difference/product.
  image_feature: the mean of the *extracted* CLS tokens (4 for l4l, 2 for the others); for comp the
  difference and product are derived tokens, not extracted, so they are not averaged (thesis 6.3:
  "we use the average of these token embeddings as the retrieval token embedding").
  Parameters: K·E·(D + 1), K = T·copies (+2 with compare). D=1024, E=2048: l4l, l2lx2 and comp
  8,396,800 (= cls_linear k=4), l2l 4,198,400. The thesis reports no counts for these.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from bridgejax.bridges import base
from bridgejax.bridges.base import BridgeOutput
from bridgejax.errors import UserError


class CLSLinear(base.Bridge):
  k: int = 1
  layer: int = -1
  post_norm: bool = True  # FROMAGe's pooler_output; the thesis rows of tables 6.1-6.18 set False

  @property
  def num_params(self) -> int:
    return self.k * self.llm_width * (self.vision_width + 1)

  @nn.compact
  def __call__(self, features: base.VisionFeatures) -> BridgeOutput:
    cls = features.cls(self.layer, self.post_norm)  # (B, D)
    z = base.dense(self.k * self.llm_width, self.vision_width, name="proj", dtype=self.dtype,
                   param_dtype=self.param_dtype)(cls.astype(self.dtype))
    return BridgeOutput(z.reshape(z.shape[0], self.k, self.llm_width), cls)


class MultiCLS(base.Bridge):
  layers: tuple = (-1, -2, -3, -4)
  copies: int = 1
  compare: bool = False
  post_norm: bool = False  # these models exist only in the thesis fork, which reads raw hidden states

  @property
  def num_tokens(self) -> int:
    return len(self.layers) * self.copies + (2 if self.compare else 0)

  @property
  def num_params(self) -> int:
    return self.num_tokens * self.llm_width * (self.vision_width + 1)

  @nn.compact
  def __call__(self, features: base.VisionFeatures) -> BridgeOutput:
    # float32 until the projection: the product of two raw CLS (norms in the tens) would lose bits in bf16
    ys = [features.cls(l, self.post_norm).astype(jnp.float32) for l in self.layers]
    inputs = [y for y in ys for _ in range(self.copies)]  # l2lx2: Y^L, Y^L, Y^L-1, Y^L-1
    if self.compare:  # eq. 6.8: how the CLS moved from L-1 to L, and their interaction
      inputs += [ys[0] - ys[1], ys[0] * ys[1]]
    x = jnp.stack(inputs, axis=1).astype(self.dtype)  # (B, K, D)
    kernel = self.param("kernel", base.torch_stacked_linear_kernel,
                        (self.num_tokens, self.vision_width, self.llm_width), self.param_dtype)
    bias = self.param("bias", base.torch_linear_bias(self.vision_width),
                      (self.num_tokens, self.llm_width), self.param_dtype)
    z = jnp.einsum("BKD,KDE->BKE", x, kernel.astype(self.dtype)) + bias.astype(self.dtype)
    return BridgeOutput(z, jnp.mean(jnp.stack(ys, axis=1), axis=1))


# The presets of eq. 6.5-6.8: MultiCLS with their own defaults (copies and compare fixed at registration).

class L4L(MultiCLS):
  layers: tuple = (-1, -2, -3, -4)


class L2L(MultiCLS):
  layers: tuple = (-1, -2)


class L2Lx2(MultiCLS):
  layers: tuple = (-1, -2)
  copies: int = 2


class Comp(MultiCLS):
  layers: tuple = (-1, -2)
  compare: bool = True


# --- registry ----------------------------------------------------------------------------------------

def _check_cls_linear(name, dims, *, k, layer, post_norm):
  base.check_positive_int(name, "k", k)
  base.check_layer(name, "layer", layer, dims["vision_layers"])
  base.check_bool(name, "post_norm", post_norm)


def _check_multi(name, dims, *, layers, copies, compare, post_norm, n_layers=None):
  if isinstance(layers, (str, bytes)) or not hasattr(layers, "__len__") or not len(layers):
    raise UserError(f"bridge {name!r}: layers={layers!r} must be a non-empty tuple of negative "
                     f"hidden_states indices, e.g. (-1, -2)")
  if n_layers is not None and len(layers) != n_layers:
    raise UserError(f"bridge {name!r} takes exactly {n_layers} layers, got layers={tuple(layers)}")
  for l in layers:
    base.check_layer(name, "layers", l, dims["vision_layers"])
  base.check_positive_int(name, "copies", copies)
  base.check_bool(name, "compare", compare)
  base.check_bool(name, "post_norm", post_norm)
  if compare and len(layers) != 2:
    raise UserError(f"bridge {name!r}: compare=True needs exactly two layers (Y^a - Y^b and Y^a ⊙ Y^b), "
                     f"got layers={tuple(layers)}")


def _check_preset(name, dims, **fields):
  """A preset's window moves but keeps its width: as many layers as its default."""
  _check_multi(name, dims, n_layers=len(base.REGISTRY[name].defaults["layers"]), **fields)


base.register("cls_linear", CLSLinear, check=_check_cls_linear,
              doc="CLS of one layer -> Linear(D, k·E) -> k tokens (eq. 6.1-6.4)")
base.register("cls_multi", MultiCLS, check=_check_multi,
              doc="CLS of several layers, copies Linear(D, E) each (+ difference and product with compare)")
_PRESET = dict(fixed=("copies", "compare"), check=_check_preset)
base.register("l4l", L4L, doc="CLS of the last 4 layers, one Linear(D, E) each (eq. 6.5)", **_PRESET)
base.register("l2l", L2L, doc="CLS of the last 2 layers, one Linear(D, E) each (eq. 6.6)", **_PRESET)
base.register("l2lx2", L2Lx2, doc="CLS of the last 2 layers, two Linear(D, E) each (eq. 6.7)", **_PRESET)
base.register("comp", Comp, doc="CLS of L and L-1, their difference and product, one Linear each (eq. 6.8)",
              **_PRESET)
