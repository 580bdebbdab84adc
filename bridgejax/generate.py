"""KV-cache decoding for the decoders (Gemma, LLaMA family): greedy, temperature/top-p sampling and beam search.

    new = generate(module, params, ids, attention_mask=mask, max_new_tokens=32)   # (B, 32) int32
    new = generate(module, params, inputs_embeds=prefix, attention_mask=mask)     # e.g. a visual prefix

Prompts are right padded (mask 1 on real tokens) and may have different lengths; each row continues
from its own last real token. The result holds only the new tokens: a row that stops (EOS or one of
`stop_tokens`) keeps the stop token and is padded with `pad_id` after it, as transformers does.
generate may itself be traced (inputs_embeds and attention_mask traced: one program, as
bridgejax.engine.Engine.programs jits it); the host check of the mask's right padding is then skipped.

Two compiled pieces, so that nothing recompiles per token and little per prompt:
  prefill   embeddings (B, P, D) -> the first logits (B, V) and a cache of S slots. P is the prompt
            length padded to a power of two (at least 16): one compilation per bucket.
  loop      a `jax.lax.while_loop` over new tokens; its shapes depend on B, S and max_new_tokens only,
            so new prompt lengths reuse it. S defaults to P + max_new_tokens rounded up to 128; pass
            `cache_length` to fix it for a whole run.
Slot i of a row's cache holds position i. Prefill writes the padded prompt; a row's padding slots
(from its length on) are overwritten by its generated tokens before causality lets it see them.

Axis legend: B batch, P prompt slots, S cache slots, D width, V logit columns (vocab + extra rows),
N new tokens, E beams.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bridgejax.errors import UserError
# Any decoder (models/decoder.CausalLM: Gemma, LLaMA family, GPT-Neo): its methods are called by
# name, and the cache layout is shared.
from bridgejax.models.decoder import init_cache

Array = jax.Array
METHODS = ("greedy", "sample", "beam")
_MIN_BUCKET = 16
_CACHE_MULTIPLE = 128


@dataclasses.dataclass(frozen=True)
class Sampler:
  """How one token is chosen from logits (B, V). Hashable: it is a static argument of the loop."""

  method: str = "greedy"
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0

  def choose(self, logits, key):
    if self.method == "greedy" or self.temperature == 0:
      return jnp.argmax(logits, axis=-1).astype(jnp.int32)  # first maximum, as torch.argmax
    logits = logits.astype(jnp.float32) / self.temperature
    if self.top_k:
      kth = jax.lax.top_k(logits, self.top_k)[0][..., -1:]
      logits = jnp.where(logits >= kth, logits, -jnp.inf)
    if self.top_p < 1.0:
      logits = top_p_filter(logits, self.top_p)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def top_p_filter(logits, top_p: float):
  """Keeps the smallest set of most likely tokens whose probability reaches top_p (at least one)."""
  ordered = jnp.sort(logits, axis=-1)[..., ::-1]
  probs = jax.nn.softmax(ordered, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly more likely tokens
  threshold = jnp.min(jnp.where(before < top_p, ordered, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(logits >= threshold, logits, -jnp.inf)


def generate(
    module,
    params,
    input_ids=None,
    *,
    attention_mask=None,
    inputs_embeds=None,
    extra_embeddings=None,
    embed_offset=None,
    max_new_tokens: int = 32,
    method: str = "greedy",
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    num_beams: int = 4,
    length_penalty: float = 1.0,
    eos_token_ids: Sequence[int] | None = None,
    stop_tokens: Sequence[int] = (),
    pad_id: int | None = None,
    rng=None,
    cache_length: int | None = None,
    hook=None,
) -> Array:
  """New tokens (B, max_new_tokens) int32 continuing each right-padded prompt.

  input_ids (B, P) or inputs_embeds (B, P, D) (scaled space, e.g. visual tokens + embedded text);
  extra_embeddings (X, D): the [RET] rows, readable as ids >= vocab_size and generatable.
  embed_offset (D,): added to each generated token's embedding, as the prompt's text got it (the
  bridge model's token-type embedding, model.BridgeModel.text_type_offset).
  method: "greedy", "sample" (temperature, top_p, top_k; rng a jax key) or "beam" (num_beams,
  length_penalty: a beam's final score is sum log p / length ** length_penalty).
  Rows stop at eos_token_ids (default: the config's) or stop_tokens.
  hook: the decoder hook (models/decoder.DecoderHook) of a bridge acting inside the LLM, for the
  prompt's layout (the bridge model's llm_hook); every prefill and step passes it to the decoder.
  """
  if method not in METHODS:
    raise UserError(f"method={method!r}; use one of {METHODS}")
  if (input_ids is None) == (inputs_embeds is None):
    raise ValueError("pass exactly one of input_ids and inputs_embeds")
  if max_new_tokens < 1:
    raise UserError(f"max_new_tokens={max_new_tokens} must be at least 1")
  c = module.config
  if inputs_embeds is None:
    input_ids = np.asarray(input_ids, np.int32)
  batch, length = (input_ids if inputs_embeds is None else inputs_embeds).shape[:2]
  lengths = _prompt_lengths(attention_mask, batch, length)
  cache_length = cache_length or round_up(_bucket(length) + max_new_tokens, _CACHE_MULTIPLE)
  longest = length if isinstance(lengths, jax.core.Tracer) else int(lengths.max())
  if longest + max_new_tokens > cache_length or length > cache_length:
    raise UserError(f"a prompt of {length} slots (longest row {longest}) plus {max_new_tokens} new "
                     f"tokens does not fit cache_length={cache_length}")
  slots = min(_bucket(length), cache_length)  # pad the prompt to its bucket
  if inputs_embeds is None:
    ids, embeds = np.pad(input_ids, [(0, 0), (0, slots - length)]), None
  else:  # stays a jax array (on its device, with its sharding)
    ids, embeds = None, jnp.pad(jnp.asarray(inputs_embeds), [(0, 0), (0, slots - length), (0, 0)])
  extra = None if extra_embeddings is None else jnp.asarray(extra_embeddings)
  lengths = jnp.asarray(lengths, jnp.int32)

  logits, cache = prefill(module, params, ids, embeds, lengths, extra, cache_length, hook)
  stops = tuple(sorted(set(c.eos_token_ids if eos_token_ids is None else eos_token_ids) | set(stop_tokens)))
  pad_id = c.pad_token_id if pad_id is None else pad_id
  if method == "beam":
    return _beam_loop(module, params, cache, logits, lengths, extra, max_new_tokens, num_beams,
                      float(length_penalty), stops, pad_id, embed_offset, hook)
  sampler = Sampler(method, float(temperature), float(top_p), int(top_k))
  rng = jax.random.key(0) if rng is None else rng
  return _sample_loop(module, params, cache, logits, lengths, extra, rng, max_new_tokens, sampler, stops, pad_id,
                      embed_offset, hook)


def _prompt_lengths(attention_mask, batch: int, length: int) -> np.ndarray:
  if attention_mask is None:
    return np.full((batch,), length, np.int32)
  if isinstance(attention_mask, jax.core.Tracer):  # generate jitted whole (Engine.programs): no host check
    return jnp.sum(attention_mask, axis=1, dtype=jnp.int32)
  mask = np.asarray(attention_mask).astype(bool)
  lengths = mask.sum(axis=1).astype(np.int32)
  if not np.array_equal(mask, np.arange(length)[None, :] < lengths[:, None]):
    raise ValueError("attention_mask must be right padded (ones then zeros in every row); a Gemma "
                     "tokenizer pads on the left by default: use bridgejax's tokenizer or padding_side='right'")
  if lengths.min() < 1:
    raise ValueError("every prompt needs at least one real token")
  return lengths


def _bucket(length: int) -> int:
  return max(_MIN_BUCKET, 1 << (length - 1).bit_length())


def round_up(n: int, multiple: int) -> int:
  """The smallest positive multiple of `multiple` that is >= n (fixed shapes: few compilations)."""
  return max(multiple, -(-n // multiple) * multiple)


def _apply(module, params, *args, method):
  return module.apply({"params": params}, *args, method=method)


@functools.partial(jax.jit, static_argnames=("module", "cache_length"))
def prefill(module, params, input_ids, inputs_embeds, lengths, extra, cache_length, hook=None):
  """Right-padded prompts, input_ids (B, P) or (when those are None) inputs_embeds (B, P, D), of
  `lengths` (B,) real tokens -> logits (B, V) of each row's next token, and a cache of cache_length
  slots holding the prompt at positions 0..P-1. Callable inside another jit (the eval engine's).
  `hook`: the decoder's (models/decoder.DecoderHook), or None."""
  if inputs_embeds is None:
    inputs_embeds = _apply(module, params, input_ids, extra, method="embed")
  batch, slots = inputs_embeds.shape[:2]
  cache = init_cache(module.config, batch, cache_length, module.dtype)
  positions = jnp.broadcast_to(jnp.arange(slots), (batch, slots))
  hidden, _, cache = _apply(module, params, inputs_embeds, positions, None, cache, None, hook, method="decode")
  last = hidden[jnp.arange(batch), lengths - 1]  # (B, D): each row's last real token
  return _apply(module, params, last, extra, method="logits"), cache


def _step(module, params, tokens, positions, cache, extra, offset=None, hook=None):
  """One cached decoding step: tokens (B,) at positions (B,) -> logits (B, V), cache."""
  x = _apply(module, params, tokens[:, None], extra, method="embed")
  x = x if offset is None else x + offset.astype(x.dtype)
  hidden, _, cache = _apply(module, params, x, positions[:, None], None, cache, None, hook, method="decode")
  return _apply(module, params, hidden[:, 0], extra, method="logits"), cache


@functools.partial(jax.jit, static_argnames=("module", "max_new_tokens", "sampler", "stops", "pad_id"))
def _sample_loop(module, params, cache, logits, lengths, extra, rng, max_new_tokens, sampler, stops, pad_id,
                 offset=None, hook=None):
  batch = lengths.shape[0]
  stops = jnp.asarray(stops, jnp.int32)
  first = sampler.choose(logits, jax.random.fold_in(rng, 0))
  tokens = jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)

  def cond(state):
    step, _, done, _ = state
    return (step < max_new_tokens) & ~jnp.all(done)

  def body(state):
    step, tokens, done, cache = state
    previous = jax.lax.dynamic_index_in_dim(tokens, step - 1, axis=1, keepdims=False)
    logits, cache = _step(module, params, previous, lengths + step - 1, cache, extra, offset, hook)
    token = jnp.where(done, pad_id, sampler.choose(logits, jax.random.fold_in(rng, step)))
    tokens = jax.lax.dynamic_update_index_in_dim(tokens, token, step, axis=1)
    return step + 1, tokens, done | jnp.isin(token, stops), cache

  state = (jnp.int32(1), tokens, jnp.isin(first, stops), cache)
  return jax.lax.while_loop(cond, body, state)[1]


@functools.partial(jax.jit, static_argnames=("module", "max_new_tokens", "num_beams", "length_penalty",
                                             "stops", "pad_id"))
def _beam_loop(module, params, cache, logits, lengths, extra, max_new_tokens, num_beams, length_penalty,
               stops, pad_id, offset=None, hook=None):
  """Beam search with E = num_beams beams per row; finished beams stay in the beam set and extend
  only with pad_id at no cost, so they keep competing on their score until the end."""
  batch, vocab = logits.shape
  beams = min(num_beams, vocab)
  stops = jnp.asarray(stops, jnp.int32)
  scores, first = jax.lax.top_k(jax.nn.log_softmax(logits.astype(jnp.float32)), beams)  # (B, E)
  tokens = jnp.full((batch, beams, max_new_tokens), pad_id, jnp.int32).at[:, :, 0].set(first)
  done = jnp.isin(first, stops)
  generated = jnp.ones((batch, beams), jnp.int32)  # tokens per beam, the stop token included
  cache = jax.tree.map(lambda a: jnp.repeat(a, beams, axis=0), cache)  # row b -> rows b*E .. b*E+E-1
  hook = None if hook is None else hook.map_rows(lambda a: jnp.repeat(a, beams, axis=0))  # a row's beams share it
  positions = jnp.repeat(lengths, beams)
  only_pad = jnp.where(jnp.arange(vocab) == pad_id, 0.0, -jnp.inf)

  def cond(state):
    step, _, _, done, _, _ = state
    return (step < max_new_tokens) & ~jnp.all(done)

  def body(state):
    step, tokens, scores, done, generated, cache = state
    previous = jax.lax.dynamic_index_in_dim(tokens, step - 1, axis=2, keepdims=False).reshape(-1)
    logits, cache = _step(module, params, previous, positions + step - 1, cache, extra, offset, hook)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32)).reshape(batch, beams, vocab)
    logp = jnp.where(done[..., None], only_pad, logp)
    scores, flat = jax.lax.top_k((scores[..., None] + logp).reshape(batch, beams * vocab), beams)
    parent, token = flat // vocab, (flat % vocab).astype(jnp.int32)  # (B, E)
    follow = lambda a: jnp.take_along_axis(a, parent.reshape(parent.shape + (1,) * (a.ndim - 2)), axis=1)
    tokens = jax.lax.dynamic_update_index_in_dim(follow(tokens), token, step, axis=2)
    was_done = follow(done)
    generated = follow(generated) + ~was_done
    rows = (jnp.arange(batch)[:, None] * beams + parent).reshape(-1)
    cache = jax.tree.map(lambda a: a[rows], cache)
    return step + 1, tokens, scores, was_done | jnp.isin(token, stops), generated, cache

  state = (jnp.int32(1), tokens, scores, done, generated, cache)
  _, tokens, scores, _, generated, _ = jax.lax.while_loop(cond, body, state)
  best = jnp.argmax(scores / generated.astype(jnp.float32) ** length_penalty, axis=1)
  return tokens[jnp.arange(batch), best]
