"""What every bridge shares: its input and output types, its fields (Bridge), the registry, initialisers,
attention blocks.

A bridge h maps the frozen vision tower's features (`VisionFeatures`: every layer's hidden states
and the tower's post-LayerNorm) to k LLM input embeddings plus the image feature that the retrieval
head W_i consumes. It never sees the LLM.

  post_normed(x) = (x - mean(x)) / sqrt(var(x) + eps) · γ + β   (CLIP's post-LayerNorm, over D)

Each bridge's config keys and their defaults are the fields of its module class (everything but
the backbone sizes, the dtypes and the fields a preset fixes); `register` reads them from there.

Axis legend (einsum letters):
  B batch, N vision tokens (1 + grid²), D vision width, E LLM width, K bridge tokens (k) or
  learned queries, H heads, F head dim, G groups/regions, S tokens per group.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from bridgejax.errors import UserError

Array = jax.Array


class BridgeOutput(NamedTuple):
  tokens: Array  # (B, K, E): the visual prefix, in the LLM's input-embedding space
  # (B, D): what W_i (the retrieval image head, in model.py) consumes; (B, S·D) for grouped and
  # regions with retrieval_feature="mean" (W_i is built for its width)
  image_feature: Array


class VisionFeatures(NamedTuple):
  """What the frozen vision tower hands every bridge (a pytree: jit, eval_shape and remat see arrays).

  hidden_states: num_layers + 1 arrays (B, N, D), CLS first (or its stand-in for a tower without
    one: CLS_EQUIVALENTS); [0] the embeddings (after the pre-LayerNorm), [-1] layer L.
  post_norm_scale, post_norm_bias: (D,) the tower's post-LayerNorm γ and β, applied only by bridges
    whose config says post_norm=True; None when the caller has no post-LayerNorm to give.
  eps: that LayerNorm's epsilon.
  """

  hidden_states: tuple
  post_norm_scale: Array | None = None
  post_norm_bias: Array | None = None
  eps: float = 1e-5

  @classmethod
  def from_tower(cls, hidden_states, post_norm_params, eps: float = 1e-5, *, cls_equivalent: str | None = None,
                 pooled: Array | None = None) -> "VisionFeatures":
    """From the tower's output hidden states and its `params["post_norm"]` ({"scale", "bias"}).

    A tower without a CLS token (SigLIP: only patches) names a `cls_equivalent` (CLS_EQUIVALENTS),
    which is put first in every layer's tokens, so every bridge reads it as CLIP's CLS; `pooled` is
    the tower's pooler_output (B, D), needed for "pooled".
    """
    hidden_states = tuple(hidden_states)
    if cls_equivalent is not None:
      hidden_states = with_cls_equivalent(hidden_states, cls_equivalent, pooled)
    return cls(hidden_states, post_norm_params["scale"], post_norm_params["bias"], eps)

  def post_normed(self, x: Array) -> Array:
    """x (..., D) through the post-LayerNorm: statistics in float32, output in x's dtype."""
    if self.post_norm_scale is None or self.post_norm_bias is None:
      raise ValueError("this bridge has post_norm=True but its VisionFeatures carry no post-LayerNorm; pass "
                       "VisionFeatures.from_tower(hidden_states, vision_params['post_norm'], eps) or set "
                       "post_norm=False in its config")
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mean).mean(-1, keepdims=True)
    y = ((xf - mean) * jax.lax.rsqrt(var + self.eps) * self.post_norm_scale.astype(jnp.float32)
         + self.post_norm_bias.astype(jnp.float32))
    return y.astype(x.dtype)

  def tokens(self, layer: int, post_norm: bool) -> Array:
    """(B, N, D): every token of hidden_states[layer], post-normed iff post_norm."""
    x = self.hidden_states[layer]
    return self.post_normed(x) if post_norm else x

  def cls(self, layer: int, post_norm: bool) -> Array:
    """(B, D): the CLS of hidden_states[layer], post-normed iff post_norm (layer L's = pooler_output)."""
    x = self.hidden_states[layer][:, 0]
    return self.post_normed(x) if post_norm else x


# What stands in for the CLS token of a tower that has none (SigLIP), prepended to each layer's tokens:
#   "mean":   the mean of that layer's patches (every layer; post_norm=True normalises it like CLIP's CLS);
#   "pooled": at layer L the tower's pooled output (SigLIP's attention-pool head over the post-LayerNormed
#             patches: already normalised, so pair it with post_norm=False), the mean at the other layers.
# All-token bridges then see the stand-in plus the patches, as they see CLS plus the patches in CLIP.
CLS_EQUIVALENTS = ("mean", "pooled")


def with_cls_equivalent(hidden_states: tuple, cls_equivalent: str, pooled: Array | None = None) -> tuple:
  """Each (B, N, D) of hidden_states -> (B, 1 + N, D), the CLS_EQUIVALENTS stand-in first."""
  if cls_equivalent not in CLS_EQUIVALENTS:
    raise UserError(f"cls_equivalent={cls_equivalent!r} is not one of {', '.join(map(repr, CLS_EQUIVALENTS))}")
  if cls_equivalent == "pooled" and pooled is None:
    raise UserError('cls_equivalent="pooled" needs the tower\'s pooled output (a SigLIP tower with its head)')
  last = len(hidden_states) - 1
  stand_ins = [pooled if cls_equivalent == "pooled" and i == last else x.astype(jnp.float32).mean(1)
               for i, x in enumerate(hidden_states)]
  return tuple(jnp.concatenate([s[:, None].astype(x.dtype), x], axis=1) for s, x in zip(stand_ins, hidden_states))


# --- initialisers matching PyTorch's defaults (FROMAGe and the thesis are PyTorch code) ---------

# nn.Linear: kaiming_uniform(a=sqrt(5)) on the weight = U(±1/sqrt(fan_in)), i.e. variance 1/(3 fan_in).
torch_linear_kernel = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
# The same for a stack of Linears, kernel (K, fan_in, out): K is a batch axis, not part of fan_in.
torch_stacked_linear_kernel = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform", batch_axis=(0,))


def torch_linear_bias(fan_in: int):
  """nn.Linear's bias init, U(±1/sqrt(fan_in)); Flax bias initialisers do not see fan_in."""
  bound = 1 / math.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def dense(features: int, fan_in: int, *, use_bias: bool = True, name: str | None = None, **kw) -> nn.Dense:
  """nn.Dense initialised like torch.nn.Linear(fan_in, features)."""
  return nn.Dense(features, use_bias=use_bias, kernel_init=torch_linear_kernel,
                  bias_init=torch_linear_bias(fan_in), name=name, **kw)


# nn.MultiheadAttention: xavier_uniform on the packed (3D, D) in-projection (limit sqrt(6/(4D))),
# zero in-projection and out-projection biases, the out-projection weight as nn.Linear.
torch_mha_in_kernel = nn.initializers.variance_scaling(0.5, "fan_avg", "uniform")


# --- layers --------------------------------------------------------------------------------------

def layer_norm(name: str, **kw) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=1e-5, name=name, **kw)  # torch's nn.LayerNorm eps


def ln_params(width: int) -> int:
  return 2 * width  # γ and β


class MultiHeadCrossAttention(nn.Module):
  """Multi-head attention of learned queries over tokens: torch.nn.MultiheadAttention's math by default.

  queries (K, D) (parameters, shared over the batch) x tokens (B, N, D) -> (B, K, D), the heads
  concatenated (head_0 ⊕ ... ⊕ head_{H-1}) and, with out_proj, sent through a (D, D) out-projection.

    q = queries W^Q + b^Q   (query_proj; else q = queries: Q's i-th block of F columns is Q_i)
    K = tokens W^K (+ b^K), V = tokens W^V (+ b^V)   (biases iff kv_bias)
    head_i = softmax(q_i K_i^T / sqrt(F)) V_i

  All projections are (D, D), split into H heads of F = D/H. The defaults (every projection, with
  biases) are torch's nn.MultiheadAttention; query_proj=out_proj=kv_bias=False is eq. 7.16-7.17.
  """

  num_heads: int
  out_proj: bool = True
  query_proj: bool = True
  kv_bias: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, queries, tokens):
    width = tokens.shape[-1]
    if width % self.num_heads:
      raise UserError(f"num_heads={self.num_heads} does not divide the vision width {width}")
    head_dim = width // self.num_heads
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    proj = lambda name, bias: nn.DenseGeneral((self.num_heads, head_dim), use_bias=bias,
                                              kernel_init=torch_mha_in_kernel, bias_init=nn.initializers.zeros,
                                              name=name, **kw)
    queries = queries.astype(self.dtype)
    q = (proj("q_proj", True)(queries) if self.query_proj
         else queries.reshape(*queries.shape[:-1], self.num_heads, head_dim))  # (K, H, F)
    q = q * head_dim**-0.5
    k = proj("k_proj", self.kv_bias)(tokens)  # (B, N, H, F)
    v = proj("v_proj", self.kv_bias)(tokens)
    logits = jnp.einsum("KHF,BNHF->BHKN", q, k).astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum("BHKN,BNHF->BKHF", probs, v)
    out = out.reshape(*out.shape[:2], width)  # heads concatenated: head_0 ⊕ ... ⊕ head_{H-1}
    if self.out_proj:
      out = nn.Dense(width, kernel_init=torch_linear_kernel, bias_init=nn.initializers.zeros,
                     name="out_proj", **kw)(out)
    return out

  @staticmethod
  def num_params(width: int, out_proj: bool = True, query_proj: bool = True, kv_bias: bool = True) -> int:
    kv = 2 * (width * width + (width if kv_bias else 0))
    return kv + (query_proj + out_proj) * (width * width + width)


class AttentionPool(nn.Module):
  """A retrieval feature for all-token bridges: one learned query cross-attending to every token.

  tokens (B, N, D) -> (B, D). Its own parameters: the query (D) and a MultiHeadCrossAttention.
  """

  num_heads: int = 4
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens):
    width = tokens.shape[-1]
    query = self.param("query", nn.initializers.normal(0.02), (1, width), self.param_dtype)
    out = MultiHeadCrossAttention(self.num_heads, dtype=self.dtype, param_dtype=self.param_dtype,
                                  name="attn")(query, tokens)
    return out[:, 0]

  @staticmethod
  def num_params(width: int) -> int:
    return width + MultiHeadCrossAttention.num_params(width)


# --- the bridge module ------------------------------------------------------------------------------

class Bridge(nn.Module):
  """The fields every bridge module has. Each bridge adds its own after them: the other backbone sizes
  it reads (grid_size, vision_layers, llm_layers: DIMS) and its config keys, each with its default.

    bridge(features: VisionFeatures) -> BridgeOutput
      tokens         (B, K, E)  the visual prefix, K = num_tokens (in-LLM bridges: their prefix and
                                context rows, inllm.py)
      image_feature  (B, D)     W_i's input; (B, S·D) for grouped and regions with retrieval_feature="mean"

  vision_width D and llm_width E come from the backbones, dtype and param_dtype from the run: none is
  a config key. dtype and param_dtype are keyword-only, so a bridge's fields without defaults can
  follow them, and its positional order stays (vision_width, llm_width, its own fields...).
  """

  vision_width: int
  llm_width: int
  _: dataclasses.KW_ONLY
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @property
  def num_tokens(self) -> int:
    """K, known from the config alone: the `k` field; a bridge whose count is not `k` overrides this."""
    return self.k


# --- registry --------------------------------------------------------------------------------------

DIMS = ("vision_width", "llm_width", "grid_size", "vision_layers", "llm_layers")  # fields set from the backbones, not the config
_NOT_KEYS = frozenset(DIMS + ("dtype", "param_dtype", "parent", "name"))


@dataclasses.dataclass(frozen=True)
class BridgeSpec:
  """One registry entry: the module and its config keys, both read from the module's fields.

  `defaults` are the config keys with their field defaults; `fixed` are fields a preset pins (e.g.
  l2lx2's copies=2), which are not config keys. The module class also answers, once built,
  `num_tokens` (k) and `num_params` (the closed-form count of its docstring). `check(name, dims,
  **fields)` raises ValueError for a bad value; dims = dict(vision_width, vision_layers, grid_size,
  llm_width).
  """

  name: str
  module: type
  defaults: dict
  fixed: dict
  check: Callable[..., None] | None = None
  doc: str = ""


REGISTRY: dict[str, BridgeSpec] = {}


def register(name: str, module: type, *, fixed: tuple = (), check=None, doc: str = "") -> None:
  """Adds `module` as bridge `name`: its fields minus DIMS, dtypes and `fixed` are the config keys."""
  if name in REGISTRY:
    raise ValueError(f"bridge {name!r} is registered twice")
  fields = {f.name: f for f in dataclasses.fields(module) if f.name not in _NOT_KEYS}
  if set(fixed) - set(fields):
    raise ValueError(f"bridge {name!r}: fixed {sorted(set(fixed) - set(fields))} are not fields of {module.__name__}")
  missing = [key for key, f in fields.items() if f.default is dataclasses.MISSING]
  if missing:
    raise ValueError(f"bridge {name!r}: {module.__name__} fields {missing} need a default to be config keys")
  defaults = {key: f.default for key, f in fields.items() if key not in fixed}
  pinned = {key: fields[key].default for key in fixed}
  REGISTRY[name] = BridgeSpec(name, module, defaults, pinned, check, doc)


# --- validation helpers shared by the families ---------------------------------------------------

def check_layer(name: str, key: str, layer, vision_layers: int) -> None:
  """A hidden_states index: -1 = layer L ... -(L+1) = the embeddings (after the pre-LayerNorm)."""
  lo = -(vision_layers + 1)
  if isinstance(layer, bool) or not isinstance(layer, numbers.Integral) or not lo <= layer <= -1:
    raise UserError(
        f"bridge {name!r}: {key}={layer!r} is not a valid layer for a vision tower with {vision_layers} "
        f"layers; use a negative index into hidden_states from -1 (layer L) to {lo} (the embeddings), "
        f"e.g. -2 for L-1")


def check_positive_int(name: str, key: str, value) -> None:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
    raise UserError(f"bridge {name!r}: {key}={value!r} must be a positive integer")


def check_bool(name: str, key: str, value) -> None:
  if not isinstance(value, bool):
    raise UserError(f"bridge {name!r}: {key}={value!r} must be True or False")


def check_choice(name: str, key: str, value, choices) -> None:
  if value not in choices:
    raise UserError(f"bridge {name!r}: {key}={value!r} is not one of {', '.join(map(repr, choices))}")


def check_heads(name: str, num_heads, vision_width: int) -> None:
  check_positive_int(name, "num_heads", num_heads)
  if vision_width % num_heads:
    divisors = [h for h in range(1, min(vision_width, 64) + 1) if vision_width % h == 0]
    raise UserError(f"bridge {name!r}: num_heads={num_heads} does not divide the vision width "
                     f"{vision_width}; use one of {divisors}")


def check_tokens(name: str, features: VisionFeatures, grid_size: int, vision_width: int) -> None:
  """Call-time check that the hidden states have the geometry the bridge was built for."""
  expected = (1 + grid_size**2, vision_width)
  shape = tuple(features.hidden_states[-1].shape)
  if shape[1:] != expected:
    raise UserError(f"bridge {name!r} was built for {expected[0]} tokens (CLS + {grid_size}x{grid_size} "
                     f"patches) of width {expected[1]}, got hidden states of shape {shape}; build it with "
                     f"the tower's grid_size and width")
