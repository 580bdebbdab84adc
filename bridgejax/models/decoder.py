"""The decoder every LLM family shares (Gemma: models/gemma.py, LLaMA: models/llama.py, GPT-Neo:
models/gptneo.py), in Flax Linen: the layer stack with its masks and KV cache (`CausalDecoder`), the
pre-norm layer skeleton (`DecoderLayer`), attention after a family's own projections (`attend`),
rotary embeddings, the hook through which in-LLM bridges act at every layer (`DecoderHook`), and the
interface the multimodal model and generation call (`CausalLM`). A family adds its config, its
norms, attention projections and MLP, and its LM head (`split_logits`).

Axis legend (einsum letters):
  B batch, T query positions, S key positions (the sequence itself, or the KV cache), D width,
  H query heads, K key/value heads, G query heads per key/value head (H = K * G), F head dim,
  M MLP width, V vocabulary rows (frozen table), X extra rows ([RET], trainable, outside the params).

Conventions the rest of bridgejax relies on:
  * Padding is on the right; positions are 0..T-1 whatever the mask (as transformers' forward).
  * `inputs_embeds` are in the *scaled* space: `embed(ids) = table[ids] * embed_scale` (Gemma's
    sqrt(D), 1 elsewhere); visual tokens injected by a bridge enter after that scaling.
  * Token ids >= vocab_size look up `extra_embeddings[id - vocab_size]`, and the LM head gets
    the same rows as extra logit columns: logits have V + X columns. The frozen table is never
    written; gradients reach `extra_embeddings` and `inputs_embeds` through ordinary arguments.
  * Norm statistics, attention softmax and logits are float32 whatever the compute dtype; the LM
    head's GEMM itself runs in the compute dtype (see Gemma's `split_logits`).
  * float32 compute traces its matmuls at "highest" precision (models/precision.py).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol, runtime_checkable

import flax.linen as nn
import jax
import jax.numpy as jnp

from bridgejax.models.activations import ACTIVATIONS
from bridgejax.models.precision import matmul_precision

Array = jax.Array

FULL, SLIDING = "full_attention", "sliding_attention"
_MASKED = -1e30  # added to masked attention logits (finite, so an all-masked row gives no NaN)


def settle_decoder_config(config, default_layer_types: tuple[str, ...]) -> None:
  """What every decoder config's __post_init__ does first: JSON (the converted format) turns tuples
  into lists, so make layer_types (() = the family's default) and eos_token_ids tuples again, keeping
  the config hashable; then check the layer types, the window and the activation."""
  object.__setattr__(config, "layer_types", tuple(config.layer_types) or default_layer_types)
  object.__setattr__(config, "eos_token_ids", tuple(config.eos_token_ids))
  if len(config.layer_types) != config.num_layers:
    raise ValueError(f"layer_types has {len(config.layer_types)} entries for {config.num_layers} layers")
  if set(config.layer_types) - {FULL, SLIDING}:
    raise ValueError(f"unknown layer types {set(config.layer_types) - {FULL, SLIDING}}")
  if SLIDING in config.layer_types and not config.sliding_window:
    raise ValueError("sliding layers need a sliding_window")
  if config.hidden_act not in ACTIVATIONS:
    raise ValueError(f"hidden_act={config.hidden_act!r} is not supported; use one of {sorted(ACTIVATIONS)}")



class DecoderConfig(Protocol):
  """What the shared code reads of a family's config (GemmaConfig, LlamaConfig, GPTNeoConfig):
  the stack's shape, its attention layout, the KV cache layout and generation's limits."""

  @property
  def vocab_size(self) -> int: ...

  @property
  def hidden_size(self) -> int: ...

  @property
  def num_layers(self) -> int: ...

  @property
  def num_kv_heads(self) -> int: ...

  @property
  def head_dim(self) -> int: ...

  @property
  def layer_types(self) -> tuple[str, ...]: ...  # FULL or SLIDING per layer

  @property
  def sliding_window(self) -> int | None: ...

  @property
  def max_position_embeddings(self) -> int: ...

  @property
  def eos_token_ids(self) -> tuple[int, ...]: ...


class LayerCache(NamedTuple):
  k: Array  # (B, S, K, F), keys after RoPE (and k-norm)
  v: Array  # (B, S, K, F)


class LMOutput(NamedTuple):
  logits: Array  # (B, T, V + X) float32
  last_hidden_state: Array  # (B, T, D) after the final norm: what [RET] retrieval reads
  hidden_states: tuple[Array, ...]  # num_layers + 1 entries, transformers' convention: [0] the
  #   input embeddings, [i] the output of layer i, [-1] the final-norm output (= last_hidden_state)
  cache: tuple[LayerCache, ...] | None = None  # the updated KV cache when one was passed in


class DecoderHook(Protocol):
  """Trainable code acting inside the frozen decoder, at every layer (bridges/inllm.py implements it
  for eP-ALM and Flamingo). `decode(..., hook=None)`, the default, traces exactly the plain decoder.
  A hook is a pytree (its arrays are traced: jit, remat and generation's while_loop carry it).

  at(layer) -> the hook of layer `layer` (0-based), which the decoder then calls:
    before_layer(x, mask, columns) -> (x, mask), before the layer: x (B, T, D) its input, mask
      (B, T, S) its attention mask, columns (B, T) the key column of each query (its index in the
      sequence without a cache; its cache slot, i.e. its position, with one). Injects or replaces
      tokens, hides keys, or runs a block between layers.
    after_sublayer(kind, h) -> h, inside the layer: h (B, T, D) the output of its "attn" or "mlp"
      sublayer (after any post-norm), before the residual add (adapters).
  map_rows(fn) -> the hook with fn applied to each of its per-row arrays (B, ...), for callers that
    regroup rows (the concat trick's pairs, beam search's copies of the cache).
  """

  def at(self, layer: int) -> "DecoderHook": ...

  def before_layer(self, x: Array, mask: Array, columns: Array) -> tuple[Array, Array]: ...

  def after_sublayer(self, kind: str, h: Array) -> Array: ...

  def map_rows(self, fn) -> "DecoderHook": ...



def init_cache(config: DecoderConfig, batch: int, length: int, dtype=jnp.float32) -> tuple[LayerCache, ...]:
  """An empty KV cache of `length` positions for every layer."""
  shape = (batch, length, config.num_kv_heads, config.head_dim)
  return tuple(LayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(config.num_layers))


def attention_mask_for(q_pos, k_pos, k_valid, window: int | None) -> Array:
  """(B, T, S) bool: query t sees key s when s is valid, not in its future and inside the window.

  q_pos (B, T) and k_pos (B, S) are absolute positions; k_valid (B, S) marks real (unpadded) keys,
  or (B, T, S) per query (packed segments).
  """
  q, k = q_pos[:, :, None], k_pos[:, None, :]
  visible = (k <= q) & (k_valid if k_valid.ndim == 3 else k_valid[:, None, :])
  if window is not None:
    visible &= q - k < window
  return visible


def rope(x, positions, theta: float, scaling_factor: float = 1.0):
  """Rotary embedding, half-split layout (transformers' rotate_half). x (B, T, N, F), positions (B, T)."""
  head_dim = x.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)) / scaling_factor
  angles = positions[..., None].astype(jnp.float32) * inv_freq  # (B, T, F/2)
  cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def softcap(x, cap: float | None):
  return x if cap is None else jnp.tanh(x / cap) * cap


def attend(q, k, v, positions, mask, cache: LayerCache | None, scale: float, dtype, logit_cap: float | None = None):
  """Attention every decoder family shares, after its own projections and position encoding.

  q (B, T, H, F), k and v (B, T, K, F), positions (B, T), mask (B, T, S) -> ((B, T, H * F), the
  updated cache or None). Without a cache the keys are the inputs' own positions (S = T). With one,
  this step's keys/values are written at `positions` and the queries attend over the whole cache
  (S = cache length). Scores are float32, times `scale` (then soft-capped at `logit_cap`).
  """
  if cache is not None:
    rows = jnp.broadcast_to(jnp.arange(q.shape[0])[:, None], positions.shape)
    cache = LayerCache(cache.k.at[rows, positions].set(k.astype(cache.k.dtype)),
                       cache.v.at[rows, positions].set(v.astype(cache.v.dtype)))
    k, v = cache.k.astype(dtype), cache.v.astype(dtype)
  batch, length, heads, head_dim = q.shape
  kv_heads = k.shape[2]
  q = q.reshape(batch, length, kv_heads, heads // kv_heads, head_dim)  # (B, T, K, G, F)
  scores = jnp.einsum("BTKGF,BSKF->BKGTS", q, k).astype(jnp.float32) * scale
  scores = softcap(scores, logit_cap)
  scores = jnp.where(mask[:, None, None], scores, _MASKED)
  probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
  out = jnp.einsum("BKGTS,BSKF->BTKGF", probs, v).reshape(batch, length, heads * head_dim)
  return out, cache



class DecoderLayer(nn.Module):
  """Pre-norm attention and MLP blocks with residuals, and optional post-norms (a config with
  `post_norms` True: Gemma 2/3). A family's subclass sets the class attributes `attention_class`
  (config, layer_type, dtype=, param_dtype=, name=) -> (x, positions, mask, cache) -> (h, cache),
  `mlp_class` (config, dtype=, param_dtype=, name=) -> x -> h and `norm_class` (config.rms_norm_eps,
  param_dtype, name=); Gemma's and LLaMA's layers are this one with their own three."""

  config: Any
  layer_type: str
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, positions, mask, cache: LayerCache | None = None, hook: DecoderHook | None = None):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    post_norms = getattr(c, "post_norms", False)
    norm = lambda name: self.norm_class(c.rms_norm_eps, self.param_dtype, name=name)
    h, cache = self.attention_class(c, self.layer_type, name="attn", **kw)(norm("pre_attn_norm")(x), positions,
                                                                           mask, cache)
    if post_norms:
      h = norm("post_attn_norm")(h)
    if hook is not None:
      h = hook.after_sublayer("attn", h)
    x = x + h
    h = self.mlp_class(c, name="mlp", **kw)(norm("pre_ffw_norm")(x))
    if post_norms:
      h = norm("post_ffw_norm")(h)
    if hook is not None:
      h = hook.after_sublayer("mlp", h)
    return x + h, cache


class CausalDecoder(nn.Module):
  """What every decoder family shares: the embedding lookup, the layer stack with its masks and KV
  cache, and the full forward pass. A family sets `layer_class` and `norm_class` and defines
  `embed_scale` and `split_logits` (and, if it has them, `norm_eps` and `add_positions`); its config
  has vocab_size, hidden_size, num_layers, `layer_types` and `sliding_window` (and rms_norm_eps for
  the default `norm_eps`), and the module the fields dtype, param_dtype and remat."""

  def setup(self):
    c = self.config
    self.embedding = self.param("embedding", nn.initializers.normal(0.02), (c.vocab_size, c.hidden_size),
                                self.param_dtype)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    # Frozen layers still keep activations for the gradient that flows through them to the visual
    # tokens; remat trades them for one more forward pass of the layers.
    layer = nn.remat(self.layer_class) if self.remat else self.layer_class
    self.layers = [layer(c, c.layer_types[i], **kw) for i in range(c.num_layers)]
    self.final_norm = self.norm_class(self.norm_eps, self.param_dtype)

  @property
  def norm_eps(self) -> float:
    """The epsilon of the family's norms (`norm_class(eps, param_dtype)`)."""
    return self.config.rms_norm_eps

  def add_positions(self, x, positions):
    """(B, T, D) input embeddings at positions (B, T) -> the first layer's input: unchanged for
    rotary families; GPT-Neo adds its learned position embeddings here."""
    del positions
    return x

  def embed(self, input_ids, extra_embeddings=None):
    """(B, T) ids -> (B, T, D) in the embedding space `inputs_embeds` live in (times `embed_scale`);
    ids >= vocab_size read extra_embeddings (X, D)."""
    c = self.config
    rows = jnp.take(self.embedding, jnp.minimum(input_ids, c.vocab_size - 1), axis=0).astype(self.dtype)
    if extra_embeddings is not None:
      extra_index = jnp.clip(input_ids - c.vocab_size, 0, extra_embeddings.shape[0] - 1)
      extra = jnp.take(extra_embeddings, extra_index, axis=0).astype(self.dtype)
      rows = jnp.where((input_ids >= c.vocab_size)[..., None], extra, rows)
    # transformers multiplies by sqrt(D) cast to the embedding's dtype (55.4 -> 55.5 in bf16): same
    # here (a scale of 1 leaves the rows as they are).
    return rows * jnp.asarray(self.embed_scale, self.dtype)

  def logits(self, hidden, extra_embeddings=None):
    """(..., D) final-norm hidden states -> (..., V + X) float32 logits of the LM head."""
    vocab, extra = self.split_logits(hidden, extra_embeddings)
    return vocab if extra is None else jnp.concatenate([vocab, extra], axis=-1)

  def decode(self, inputs_embeds, positions, attention_mask=None, cache=None, segment_ids=None,
             hook: DecoderHook | None = None):
    """The layers and final norm: (B, T, D) embeddings at positions (B, T) -> (final-norm hidden
    (B, T, D), hidden_states tuple, cache).

    Without a cache, keys are the inputs themselves and `attention_mask` (B, T) marks real tokens;
    `segment_ids` (B, T), if given, packs several sequences in one row: a query sees only keys of
    its own segment (positions then restart per segment, as the caller lays them out).
    With a cache (from `init_cache`), the inputs are written at `positions` and attend over every
    cache slot up to their own position: slots past a row's prompt hold padding until generation
    overwrites them, and causality keeps them out of sight until then.
    `hook` (DecoderHook) lets trainable code act at every layer; None runs the plain decoder.
    """
    with matmul_precision(self.dtype):
      return self._decode(inputs_embeds, positions, attention_mask, cache, segment_ids, hook)

  def _decode(self, inputs_embeds, positions, attention_mask, cache, segment_ids, hook=None):
    c = self.config
    x = self.add_positions(inputs_embeds.astype(self.dtype), positions)
    if cache is None:
      k_pos = positions
      k_valid = jnp.ones(x.shape[:2], bool) if attention_mask is None else attention_mask.astype(bool)
      if segment_ids is not None:  # (B, T, S) pairs in one segment, folded into the keys' validity
        k_valid = k_valid[:, None, :] & (segment_ids[:, :, None] == segment_ids[:, None, :])
    else:
      if segment_ids is not None:
        raise ValueError("segment_ids are for a forward pass without a KV cache")
      length = cache[0].k.shape[1]
      k_pos = jnp.broadcast_to(jnp.arange(length), (x.shape[0], length))
      k_valid = jnp.ones(k_pos.shape, bool)
    masks = {FULL: attention_mask_for(positions, k_pos, k_valid, None)}
    if SLIDING in c.layer_types:
      masks[SLIDING] = attention_mask_for(positions, k_pos, k_valid, c.sliding_window)
    hidden_states, new_cache = [x], []
    if hook is not None:  # a query's key column: its index in the sequence, or with a cache its slot (= position)
      columns = positions if cache is not None else jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
    for i, layer in enumerate(self.layers):
      mask, layer_cache = masks[c.layer_types[i]], None if cache is None else cache[i]
      if hook is None:
        x, layer_cache = layer(x, positions, mask, layer_cache)
      else:
        layer_hook = hook.at(i)
        x, mask = layer_hook.before_layer(x, mask, columns)
        x, layer_cache = layer(x, positions, mask, layer_cache, layer_hook)
      hidden_states.append(x)
      new_cache.append(layer_cache)
    x = self.final_norm(x)
    hidden_states[-1] = x  # transformers' convention: the last entry is after the final norm
    return x, tuple(hidden_states), (None if cache is None else tuple(new_cache))

  def __call__(self, input_ids=None, attention_mask=None, inputs_embeds=None, extra_embeddings=None):
    """Full forward pass over right-padded (B, T) ids or (B, T, D) embeddings (the space `embed` returns) -> LMOutput."""
    if (input_ids is None) == (inputs_embeds is None):
      raise ValueError("pass exactly one of input_ids and inputs_embeds")
    if inputs_embeds is None:
      inputs_embeds = self.embed(input_ids, extra_embeddings)
    batch, length = inputs_embeds.shape[:2]
    positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
    hidden, hidden_states, _ = self.decode(inputs_embeds, positions, attention_mask)
    return LMOutput(self.logits(hidden, extra_embeddings), hidden, hidden_states)



@runtime_checkable
class CausalLM(Protocol):
  """A decoder as the multimodal model (model.py), generation (generate.py) and the bound
  `weights.LanguageModel` use it: a Flax module (a `CausalDecoder`: Gemma, Llama, GPTNeo) whose
  methods run through `apply(variables, ..., method=name)`, by name, with one KV cache layout."""

  @property
  def config(self) -> DecoderConfig: ...

  @property
  def dtype(self) -> Any: ...  # the compute dtype

  @property
  def embed_scale(self) -> float: ...  # what `embed` multiplies the table rows by

  def apply(self, variables, *args, method=None, **kwargs) -> Any: ...

  def embed(self, input_ids: Array, extra_embeddings: Array | None = None) -> Array: ...

  def decode(self, inputs_embeds: Array, positions: Array, attention_mask: Array | None = None,
             cache: tuple[LayerCache, ...] | None = None, segment_ids: Array | None = None,
             hook: DecoderHook | None = None) -> tuple[Array, tuple[Array, ...], tuple[LayerCache, ...] | None]: ...

  def logits(self, hidden: Array, extra_embeddings: Array | None = None) -> Array: ...

  def split_logits(self, hidden: Array, extra_embeddings: Array | None = None) -> tuple[Array, Array | None]: ...

  def __call__(self, input_ids=None, attention_mask=None, inputs_embeds=None, extra_embeddings=None) -> LMOutput: ...
