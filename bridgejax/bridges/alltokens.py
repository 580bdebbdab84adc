"""All-token reduction bridges (thesis 7.1): the patch tokens of one layer -> a few LLM embeddings.

Axis legend (einsum letters): B batch, N tokens (1 + P), P patches (grid²), D vision width,
E LLM width, G groups/regions, S tokens per group (or region), R region side.

All three drop the CLS (y^0) and read the patches y^1..y^P in the tower's row-major grid order.
`layer` (default -1: the thesis ran them on layer L) picks hidden_states[layer]; post_norm (default
False, the thesis fork's raw hidden states) sends every token through the tower's post-LayerNorm.
Config keys and defaults are the module fields below (`bridgejax.bridges.describe()` lists them).

image_feature (for W_i), `retrieval_feature`:
  "mean" (default): the mean of the G vectors that LL consumes, f = (1/G) Σ_g Y^g: the concatenated
    groups or regions (S·D = 65,536 dims on ViT-L/14, so W_i is (65,536, 256)), or W avg's pooled
    groups (D dims). This is thesis 6.3's rule for models that extract several tokens ("we use the
    average of these token embeddings as the retrieval token embedding"), and FROMAGe's W_i reads
    the same visual input as its W_c.
  "attention_pool": this project's earlier choice, not the thesis's: a separate 1-query multi-head
    attention (`AttentionPool`, num_heads heads) over all N tokens of the same layer, CLS included,
    the head that 7.3 describes for the cross-attention models. D + 4·(D² + D) = 4,199,424 for D=1024.
  num_heads is used by "attention_pool" only.

Why "mean". ViT-L/14 + Gemma-2B, embed 256; W_t (2048 -> 256), the [RET] row and the logit scale
are 524,544 + 2,048 + 1 = 526,593, W_i is 65,536·256 + 256 = 16,777,472 on the 65,536-d mean and
1024·256 + 256 = 262,400 on a D-vector. All trainable parameters, as `python -m bridgejax.param_count`
counts them:
  regions, "mean":            134,219,776 + 16,777,472 + 526,593             = 151,523,841
  regions, "attention_pool":  134,219,776 + 4,199,424 + 262,400 + 526,593    = 139,208,193
  The thesis (7.1): "the CLS-based models with k = 20 train 42M parameters while the Regions model
  trains 151M". The same count gives cls k=20 41,984,000 + 262,400 + 526,593 = 42,772,993 ("42M"),
  so "mean" reproduces both figures (each cut to the million) and "attention_pool" misses 151M by
  12M. Regions of 72 tokens (72·1024·2048 + 2048 = 150,999,040 for the Linear alone) give 151M only
  if nothing but the Linear is counted, and the text says 64 tokens per region and 65,536 dims.
  grouped, "mean": 151,523,841 (its Linear has the same shape); "attention_pool": 139,208,193.
  wavg, "mean": 2,097,216 + 262,400 + 526,593 = 2,886,209; "attention_pool": 7,085,633.
  The thesis reports no count for Grouped or W avg. They are the same family, in the same section,
  defined from one another (Regions applies "the same linear transformation LL as in the previous
  method"; W avg averages "instead of concatenating"), so they take the retrieval input that the
  Regions count pins down.

`grouped` (eq. 7.1-7.7): the P patches in k groups of S = P/k *consecutive* tokens (for ViT-L/14:
  y^1..y^64, y^65..y^128, ...: four horizontal bands of 4 rows), each group concatenated to S·D and
  sent through ONE shared LL(Y) = Y W + b, W (S·D, E) (eq. 7.6 names a single LL).
  Needs P % k == 0.
  Parameters: S·D·E + E (+ pool). D=1024, E=2048, P=256, k=4: 134,219,776 (+ 4,199,424).

`regions` (eq. 7.8-7.9): five square regions of the grid, [top-left, top-right, bottom-left,
  bottom-right, centre]: the four quadrants (g/2 x g/2) and the centred g/2 x g/2 window starting at
  row/column g/4, which overlaps all four ("Each region contains 64 tokens, with some tokens
  overlapping between quadrants and the center": 8x8 on ViT-L/14's 16x16). Each region's tokens are
  concatenated row-major and sent through one shared LL, W ((g/2)²·D, E).
  Needs grid_size % 4 == 0 (else the centre window would start half a patch off).
  Parameters: (g/2)²·D·E + E (+ pool). ViT-L/14 and Gemma-2B: 134,219,776 (+ 4,199,424); totals above.

`wavg` (eq. 7.10-7.14): the same k consecutive groups as `grouped`, each reduced by a learned
  weighting W_a (S weights, ONE vector shared by the groups as the equations write a single W_a),
  then LL(Y) = Y W with W (D, E) and, as eq. 7.14's text defines LL, no bias (use_bias=True adds one).
  W_a starts at 1/S (the plain mean) and is not normalised (the equations apply W_a as a matrix
  product; "weighted average" is the initial state, not a constraint). With "mean", W_i reads the
  mean of the W_a-pooled groups, so W_a also learns from the retrieval loss.
  Needs P % k == 0.
  Parameters: S + D·E (+ E) (+ pool). ViT-L/14, Gemma-2B, k=4: 2,097,216 (+ 4,199,424).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from bridgejax.bridges import base
from bridgejax.bridges.base import AttentionPool, BridgeOutput
from bridgejax.errors import UserError

RETRIEVAL_FEATURES = ("mean", "attention_pool")  # what W_i reads (module docstring)


class _AllTokens(nn.Module):
  """Shared plumbing: layer selection, post-norm, the grid check and the retrieval feature.

  A mixin without fields: the module brings vision_width, grid_size, layer, post_norm, num_heads,
  retrieval_feature and the dtypes (a bridge: `class Grouped(_AllTokens, base.Bridge)`; flamingo.py's
  resampler, which is no bridge, declares them itself).
  """

  def _tokens(self, features: base.VisionFeatures):
    base.check_tokens(self.registry_name, features, self.grid_size, self.vision_width)
    return features.tokens(self.layer, self.post_norm).astype(self.dtype)  # (B, N, D)

  def _feature(self, tokens, vectors):
    """tokens (B, N, D), vectors (B, G, S·D or D) the LL inputs -> W_i's input: their mean, or the pool's (B, D)."""
    if self.retrieval_feature == "mean":  # summed in float32: S·D is 65,536 wide on ViT-L/14
      return jnp.mean(vectors.astype(jnp.float32), axis=1).astype(self.dtype)
    return AttentionPool(self.num_heads, dtype=self.dtype, param_dtype=self.param_dtype,
                         name="feature_pool")(tokens)

  @property
  def _pool_params(self) -> int:
    return AttentionPool.num_params(self.vision_width) if self.retrieval_feature == "attention_pool" else 0


class Grouped(_AllTokens, base.Bridge):
  registry_name = "grouped"  # class attribute, not a field: names the bridge in errors
  grid_size: int
  k: int = 4
  layer: int = -1
  post_norm: bool = False
  num_heads: int = 4  # the attention pool's heads
  retrieval_feature: str = "mean"  # RETRIEVAL_FEATURES

  @property
  def num_params(self) -> int:
    s = self.grid_size**2 // self.k
    return s * self.vision_width * self.llm_width + self.llm_width + self._pool_params

  @nn.compact
  def __call__(self, features: base.VisionFeatures) -> BridgeOutput:
    x = self._tokens(features)
    b, n, d = x.shape
    groups = x[:, 1:].reshape(b, self.k, (n - 1) // self.k * d)  # (B, G, S·D): y^i ⊕ ... ⊕ y^{i+S-1}
    z = base.dense(self.llm_width, groups.shape[-1], name="proj", dtype=self.dtype,
                   param_dtype=self.param_dtype)(groups)
    return BridgeOutput(z, self._feature(x, groups))


def _region_corners(g: int) -> list[tuple[int, int]]:
  """Top-left (row, col) of each g/2 x g/2 region: TL, TR, BL, BR, centre."""
  r = g // 2
  return [(0, 0), (0, r), (r, 0), (r, r), (g // 4, g // 4)]


class Regions(_AllTokens, base.Bridge):
  registry_name = "regions"
  grid_size: int
  layer: int = -1
  post_norm: bool = False
  num_heads: int = 4  # the attention pool's heads
  retrieval_feature: str = "mean"  # RETRIEVAL_FEATURES

  @property
  def num_tokens(self) -> int:
    return len(_region_corners(self.grid_size))

  @property
  def num_params(self) -> int:
    r = self.grid_size // 2
    return r * r * self.vision_width * self.llm_width + self.llm_width + self._pool_params

  @nn.compact
  def __call__(self, features: base.VisionFeatures) -> BridgeOutput:
    x = self._tokens(features)
    b, _, d = x.shape
    g, r = self.grid_size, self.grid_size // 2
    grid = x[:, 1:].reshape(b, g, g, d)
    regions = jnp.stack([grid[:, i:i + r, j:j + r].reshape(b, r * r * d) for i, j in _region_corners(g)], axis=1)
    z = base.dense(self.llm_width, r * r * d, name="proj", dtype=self.dtype,
                   param_dtype=self.param_dtype)(regions)  # (B, 5, E)
    return BridgeOutput(z, self._feature(x, regions))


class WeightedAverage(_AllTokens, base.Bridge):
  registry_name = "wavg"
  grid_size: int
  k: int = 4
  layer: int = -1
  post_norm: bool = False
  num_heads: int = 4  # the attention pool's heads
  retrieval_feature: str = "mean"  # RETRIEVAL_FEATURES
  use_bias: bool = False  # eq. 7.14's LL has no bias

  @property
  def num_params(self) -> int:
    d, e = self.vision_width, self.llm_width
    return self.grid_size**2 // self.k + d * e + (e if self.use_bias else 0) + self._pool_params

  @nn.compact
  def __call__(self, features: base.VisionFeatures) -> BridgeOutput:
    x = self._tokens(features)
    b, n, d = x.shape
    s = (n - 1) // self.k
    weights = self.param("weights", nn.initializers.constant(1 / s), (s,), self.param_dtype)  # W_a
    groups = x[:, 1:].reshape(b, self.k, s, d)
    pooled = jnp.einsum("BGSD,S->BGD", groups, weights.astype(self.dtype))
    z = base.dense(self.llm_width, d, use_bias=self.use_bias, name="proj", dtype=self.dtype,
                   param_dtype=self.param_dtype)(pooled)
    return BridgeOutput(z, self._feature(x, pooled))


# --- registry ----------------------------------------------------------------------------------------

def _check_common(name, dims, *, layer, post_norm, num_heads, retrieval_feature):
  base.check_layer(name, "layer", layer, dims["vision_layers"])
  base.check_bool(name, "post_norm", post_norm)
  base.check_choice(name, "retrieval_feature", retrieval_feature, RETRIEVAL_FEATURES)
  if retrieval_feature == "attention_pool":  # the only user of num_heads
    base.check_heads(name, num_heads, dims["vision_width"])


def _check_groups(name, dims, *, k, **kw):
  base.check_positive_int(name, "k", k)
  patches = dims["grid_size"] ** 2
  if patches % k:
    valid = [d for d in range(1, patches + 1) if patches % d == 0]
    raise UserError(f"bridge {name!r}: the {dims['grid_size']}x{dims['grid_size']} grid has {patches} patches, "
                     f"which cannot be split into k={k} equal groups; use k in {valid}")
  _check_common(name, dims, **kw)


def _check_regions(name, dims, **kw):
  g = dims["grid_size"]
  if g % 4:
    raise UserError(f"bridge 'regions' needs a patch grid whose side is divisible by 4 (quadrants of g/2 "
                     f"and a centre window at g/4), got a {g}x{g} grid; use an image_size/patch_size "
                     f"ratio divisible by 4 (e.g. 224/14 = 16) or the 'grouped'/'crossatt' bridge")
  _check_common(name, dims, **kw)


def _check_wavg(name, dims, *, use_bias, **kw):
  base.check_bool(name, "use_bias", use_bias)
  _check_groups(name, dims, **kw)


base.register("grouped", Grouped, check=_check_groups,
              doc="k groups of consecutive patches, concatenated, one shared Linear (eq. 7.1-7.7)")
base.register("regions", Regions, check=_check_regions,
              doc="4 quadrants + centre window, concatenated, one shared Linear (eq. 7.8-7.9)")
base.register("wavg", WeightedAverage, check=_check_wavg,
              doc="k groups of consecutive patches, learned weighted sum, one Linear (eq. 7.10-7.14)")
