"""The runtime evaluation and inference share: the model's pieces, each jitted once per Engine, on the mesh.

    engine = Engine(model, params, tokenizer, mesh=setup.mesh)   # params: the full {vision, llm, bridge, ret}
    tokens, image_emb = engine.encode(images)        # visual tokens (B, K, D), W_i embedding (B, E)
    emb = engine.text_embedding(ids, mask)           # text pass ending in [RET] -> W_t (B, E)
    new = engine.generate(tokens, ids, mask)         # KV-cache decoding after [visual] + text
    text = engine.decode_new(new[0])                 # up to the first EOS / [RET]
    nll = engine.candidate_nll(tokens, ctx, ctx_mask, cand, cand_mask)   # (R, N) summed token CE
    ids, word = engine.composed_ids("but blue")      # a composed query's ids, its pseudo word's position
    emb = engine.composed_query(images, ids, mask, words)    # (B, E): image + modification queries

Placement: the params are put on the mesh once (frozen trees stay as the training mesh laid them
out, anything else is replicated). Abstract params (jax.ShapeDtypeStruct leaves, no tokenizer) give
an engine whose jitted functions can only be lowered: bench/tpu_compile.py compiles them for a TPU
topology through `programs`. Every batch is split over the mesh's 'data' axis, on all devices
of all processes; rows are padded (repeating the last row) to a multiple of the 'data' size, so pass
`round_batch(n)` rows to waste nothing. Inputs are host arrays, the same on every process; outputs
come back as numpy, replicated to every process. Without a mesh, the params' own mesh is used (one
device when they sit on one device).

Embeddings are returned as the model makes them (not normalised); `bridgejax.losses.l2_normalize` is for ranking.
Shapes are the caller's business: pass fixed shapes (pad the last batch) and nothing recompiles.

Axis legend: B batch, K visual tokens, T text length, D LLM width, E retrieval width, R rounds
(prefixes), N candidates per prefix, C candidate length, V logit columns (vocab + [RET]).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from bridgejax import losses, mesh as mesh_lib, pic2word
from bridgejax.terms import pic2word as pic2word_term
from bridgejax.generate import generate, prefill, round_up  # round_up: evaluators and inference import it here


def mesh_of(params) -> jax.sharding.Mesh:
  """The largest mesh any leaf of `params` is laid out on, else a one-device mesh on the device of
  the first device-resident leaf (or this process's first device)."""
  leaves = jax.tree.leaves(params)
  meshes = [x.sharding.mesh for x in leaves
            if isinstance(x, jax.Array) and isinstance(x.sharding, jax.sharding.NamedSharding)]
  if meshes:
    return max(meshes, key=lambda m: m.devices.size)
  devices = [next(iter(x.sharding.device_set)) for x in leaves if isinstance(x, jax.Array)]
  return mesh_lib.make_mesh(1, 1, devices=[devices[0] if devices else jax.local_devices()[0]])


def place_on_mesh(params, mesh):
  """Leaves already laid out on this mesh stay (frozen trees keep their training layout); every
  other leaf is replicated over the mesh. Called once: later calls send nothing."""
  devices, replicated = set(mesh.devices.flat), mesh_lib.replicated(mesh)

  def put(x):
    if isinstance(x, jax.ShapeDtypeStruct):  # an abstract engine's: the layout only
      keep = isinstance(x.sharding, jax.sharding.NamedSharding) and x.sharding.mesh == mesh
      return x if keep else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated)
    if isinstance(x, jax.Array) and x.sharding.device_set == devices and (
        len(devices) == 1 or getattr(x.sharding, "mesh", None) == mesh):  # same devices in the same order
      return x
    if isinstance(x, jax.Array) and (jax.process_count() > 1 or not x.is_fully_addressable):
      x = np.asarray(x)  # across processes, a global array is built from the same host value everywhere
    return jax.device_put(x, replicated)

  return jax.tree.map(put, params)


def shard_rows(x, mesh) -> jax.Array:
  """A host batch (the same on every process) -> a global array split over 'data'. The row count
  must be a multiple of the 'data' size (see Engine.round_batch)."""
  return jax.device_put(np.asarray(x), mesh_lib.batch_sharding(mesh))  # each device gets its rows only


class Engine:
  """Jitted functions of one BridgeModel over one parameter dict, on one mesh."""

  def __init__(self, model, params, tokenizer, *, mesh=None, max_new_tokens: int = 32, method: str = "greedy",
               num_beams: int = 1):
    self.mesh = mesh_of(params) if mesh is None else mesh
    self.model, self.params, self.tokenizer = model, place_on_mesh(params, self.mesh), tokenizer
    self.data_size = int(self.mesh.shape["data"])
    self.max_new_tokens, self.method, self.num_beams = max_new_tokens, method, num_beams
    llm = model.llm.config
    # Generation stops at EOS and at [RET]: what follows a [RET] is a new segment (an image), not
    # more of this caption or answer. (An abstract engine has no tokenizer: the config's EOS.)
    eos = {tokenizer.eos_id} if tokenizer is not None else set()
    self.stop_ids = tuple(sorted(set(llm.eos_token_ids) | eos | {model.ret_id}))
    rows, replicated = mesh_lib.batch_sharding(self.mesh), mesh_lib.replicated(self.mesh)
    # Host-bound outputs are replicated (each process reads them whole); what stays on device
    # for the next jitted piece (generation's prefix) stays split over 'data'.
    self._encode = jax.jit(self._encode_fn, out_shardings=replicated)
    self._text_embedding = jax.jit(lambda p, ids, mask: model.text_embedding(p, ids, mask)[1],
                                   out_shardings=replicated)
    self._prefix = jax.jit(self._prefix_fn, out_shardings=(rows, replicated))
    self._text_prefix = jax.jit(lambda p, ids, mask: (model.embed_text(p, ids), mask),
                                out_shardings=(rows, replicated))
    self._candidate_nll = jax.jit(self._candidate_nll_fn, out_shardings=replicated, static_argnames="unshifted")
    self._composed = jax.jit(self._composed_fn, out_shardings=replicated)
    self._replicate = jax.jit(lambda x: x, out_shardings=replicated)

  # ------------------------------------------------------------------ batches on the mesh

  def round_batch(self, n: int) -> int:
    """n rounded up to a multiple of the mesh's 'data' size: a batch size every device gets rows of."""
    return round_up(n, self.data_size)

  def _shard(self, *arrays):
    """Host batches of B rows -> global arrays of round_batch(B) rows split over 'data' (extra rows
    repeat the last one, a valid input whose outputs are dropped)."""
    out = []
    for x in arrays:
      x = np.asarray(x)
      pad = self.round_batch(x.shape[0]) - x.shape[0]
      if pad:
        x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)])
      out.append(shard_rows(x, self.mesh))
    return out

  # ------------------------------------------------------------------ images and texts

  def _encode_fn(self, params, images):
    out = self.model.encode_images(params, images)
    return out.tokens, self.model.image_embedding(params, out)

  def encode(self, images):
    """(B, 3, S, S) CLIP-normalised pixels -> visual tokens (B, K, D), image embedding (B, E)."""
    n = len(images)
    tokens, emb = self._encode(self.params, *self._shard(images))
    return np.asarray(tokens)[:n], np.asarray(emb)[:n]

  def text_embedding(self, ids, mask):
    """(B, T) ids ending in [RET] (right padded) -> W_t embedding (B, E) of the [RET] hidden state."""
    n = len(ids)
    return np.asarray(self._text_embedding(self.params, *self._shard(ids, mask)))[:n]

  def _prefix_fn(self, params, visual_tokens, ids, mask):
    embeds, full_mask, _, _ = self.model.caption_inputs(params, visual_tokens, ids, mask)
    return embeds, full_mask

  # ------------------------------------------------------------------ composed queries

  def composed_ids(self, modification: str) -> tuple[list[int], int]:
    """A composed query's ids and the position of the image's pseudo word in them. With Pic2Word's
    mapping network: pic2word.QUERY_TEMPLATE ("a photo of * , {modification}") + [RET], the pseudo
    word at "*". Without: BOS + modification + [RET] after the image's visual tokens (position -1)."""
    ret = self.model.ret_id
    if self.model.has_term("pic2word"):
      return pic2word.prompt_ids(self.tokenizer, pic2word.query_text(modification), ret)
    return self.tokenizer.encode(modification, add_bos=True) + [ret], -1

  def _composed_fn(self, params, images, ids, mask, word_positions):
    model = self.model
    if model.has_term("pic2word"):
      words = pic2word_term.pseudo_words(model, params, model.vision_features(params, images))
      return model.word_query_embedding(params, words, ids, mask, word_positions)
    last = jnp.sum(mask, axis=1, keepdims=True) - 1
    return ret_embeddings_after(model, params, model.encode_images(params, images).tokens, ids, mask, last)[:, 0]

  def composed_query(self, images, ids, mask, word_positions):
    """(B, 3, S, S) reference images, composed_ids rows right padded to (B, T), their word positions
    (B,) -> W_t embeddings (B, E) of the composed queries, not normalised."""
    n = len(ids)
    return np.asarray(self._composed(self.params, *self._shard(images, ids, mask, np.asarray(word_positions))))[:n]

  # ------------------------------------------------------------------ generation

  def generate(self, visual_tokens, ids, mask, *, max_new_tokens: int | None = None, num_beams: int | None = None,
               stop_at_ret: bool = True) -> np.ndarray:
    """New tokens (B, max_new_tokens) after [visual tokens] + right-padded text ids (BOS + prompt).

    visual_tokens may be None (a text-only prompt). Greedy, or beam search when num_beams > 1
    (default: the engine's max_new_tokens and num_beams).
    Rows stop at EOS and, unless stop_at_ret=False (interleaved output), at [RET].
    """
    n = len(ids)
    rows = [None, *self._shard(ids, mask)] if visual_tokens is None else self._shard(visual_tokens, ids, mask)
    new = self.generation(self.params, *rows,
                          max_new_tokens=max_new_tokens or self.max_new_tokens,
                          num_beams=self.num_beams if num_beams is None else num_beams, stop_at_ret=stop_at_ret)
    return np.asarray(self._replicate(new))[:n]

  def generation(self, params, visual_tokens, ids, mask, *, max_new_tokens: int, num_beams: int,
                 stop_at_ret: bool = True):
    """generate's device work on global arrays split over 'data': the prefix, then KV-cache decoding
    (generate.generate: prefill and the loop). Traceable as a whole: `programs` jits it."""
    hook = None  # a bridge acting inside the LLM (bridges/inllm.py) hands the decoder its hook
    if visual_tokens is None:
      embeds, full_mask = self._text_prefix(params, ids, mask)
    else:
      embeds, full_mask = self._prefix(params, visual_tokens, ids, mask)
      hook = self.model.llm_hook(params, visual_tokens, embeds.shape[1])
    method = "beam" if num_beams > 1 else self.method
    return generate(self.model.llm, params["llm"], inputs_embeds=embeds, attention_mask=full_mask,
                    extra_embeddings=params["ret"]["ret_embedding"], embed_offset=self.model.text_type_offset(params),
                    max_new_tokens=max_new_tokens, method=method, num_beams=max(num_beams, 1),
                    eos_token_ids=self.stops(stop_at_ret), hook=hook)

  def programs(self, *, max_new_tokens: int | None = None, num_beams: int | None = None) -> dict:
    """The jitted functions behind encode, text_embedding and generate, by name, each taking
    (params, *global arrays): what bench/tpu_compile.py lowers for a TPU topology. The generation
    is jitted whole here (the runtime runs its prefix, prefill and loop as separate programs)."""
    num_beams = self.num_beams if num_beams is None else num_beams
    generation = functools.partial(self.generation, max_new_tokens=max_new_tokens or self.max_new_tokens,
                                   num_beams=num_beams)
    return {"encode": self._encode, "text_embedding": self._text_embedding,
            "generation": jax.jit(generation, out_shardings=mesh_lib.replicated(self.mesh))}

  def stops(self, stop_at_ret: bool = True) -> tuple[int, ...]:
    """The ids generation stops at: EOS, and [RET] unless stop_at_ret=False (interleaved output)."""
    return self.stop_ids if stop_at_ret else tuple(i for i in self.stop_ids if i != self.model.ret_id)

  def until_stop(self, new_ids, *, stop_at_ret: bool = True) -> list[int]:
    """A row of generated ids up to (not including) its first stop (`stops`)."""
    stops, out = self.stops(stop_at_ret), []
    for i in np.asarray(new_ids).tolist():
      if i in stops:
        break
      out.append(i)
    return out

  def decode_new(self, new_ids) -> str:
    """The text of a generated row up to its first EOS / [RET] (special tokens skipped)."""
    return self.tokenizer.decode(self.until_stop(new_ids), skip_special_tokens=True)

  # ------------------------------------------------------------------ candidate scoring

  def _candidate_nll_fn(self, params, visual_tokens, ctx_ids, ctx_mask, cand_ids, cand_mask, unshifted=False):
    """Summed next-token CE of N candidate continuations of each of R prefixes (with `unshifted`,
    FROMAGe's VisDial script's CE instead: the logits at candidate position j against token j).

    The prefix [visual] + context runs once into a KV cache of P + C slots; the cache is repeated
    for the N candidates, which are then decoded together at positions len(prefix) + j. Candidate
    token 0 is predicted by the prefix's last real position, token j > 0 by candidate token j - 1.
    Equal to running every [visual] + context + candidate sequence in full (tested), at a fraction
    of the cost: the prefix is usually much longer than an answer.
    """
    llm, llm_params = self.model.llm, params["llm"]
    extra = params["ret"]["ret_embedding"]
    apply = lambda *args, method: llm.apply({"params": llm_params}, *args, method=method)
    embeds, mask = self._prefix_fn(params, visual_tokens, ctx_ids, ctx_mask)  # (R, P, D), (R, P)
    rows, slots = mask.shape
    n, c = cand_ids.shape[1:]
    lengths = jnp.sum(mask, axis=1)
    # the prefix into a cache with room for the candidates; first_logits (R, V) predicts token 0
    hook = self.model.llm_hook(params, visual_tokens, slots)
    first_logits, cache = prefill(llm, llm_params, None, embeds, lengths, extra, slots + c, hook)
    hook = None if hook is None else hook.map_rows(lambda a: jnp.repeat(a, n, axis=0))

    cache = jax.tree.map(lambda a: jnp.repeat(a, n, axis=0), cache)  # row r -> rows r*N .. r*N+N-1
    flat_ids = cand_ids.reshape(rows * n, c)
    x = self.model.embed_text(params, flat_ids)
    cand_positions = jnp.repeat(lengths, n)[:, None] + jnp.arange(c)[None, :]
    h, _, _ = apply(x, cand_positions, None, cache, None, hook, method="decode")
    if unshifted:
      logits = apply(h, extra, method="logits")  # (RN, C, V): position j, scored against token j
    else:
      logits = apply(h[:, :-1], extra, method="logits")  # (RN, C-1, V): predicts tokens 1..C-1
      logits = jnp.concatenate([jnp.repeat(first_logits, n, axis=0)[:, None], logits], axis=1)
    nll = losses.token_nll(logits, flat_ids)  # (RN, C)
    nll = jnp.sum(jnp.where(cand_mask.reshape(rows * n, c) > 0, nll, 0.0), axis=1)
    return nll.reshape(rows, n)

  def candidate_nll(self, visual_tokens, ctx_ids, ctx_mask, cand_ids, cand_mask, *, unshifted: bool = False) -> np.ndarray:
    """visual_tokens (R, K, D), context ids/mask (R, T) (BOS + text, right padded), candidates
    (R, N, C) ids/mask (right padded) -> (R, N) summed CE of each candidate's tokens (`unshifted`:
    see _candidate_nll_fn)."""
    n = len(ctx_ids)
    out = self._candidate_nll(self.params, *self._shard(visual_tokens, ctx_ids, ctx_mask, cand_ids, cand_mask),
                              unshifted=unshifted)
    return np.asarray(out)[:n]


def ret_embeddings_after(model, params, visual_tokens, ids, mask, positions):
  """W_t embeddings (B, P, E) of the final hidden states at text `positions` (B, P) of [visual tokens]
  + ids (B, T), every [RET] a real input (visual_tokens None: the text alone)."""
  if visual_tokens is None:
    embeds, full, hook = model.embed_text(params, ids), mask, None
  else:
    embeds, full, _, _ = model.caption_inputs(params, visual_tokens, ids, mask, ret_is_input=True)
    hook = model.llm_hook(params, visual_tokens, embeds.shape[1])  # an in-LLM bridge's (bridges/inllm.py)
  offset = embeds.shape[1] - ids.shape[1]  # the prefix in the sequence (an in-LLM bridge's context is not)
  hidden = model.llm_hidden(params, embeds, full, hook=hook)
  return model.ret_embeddings(params, hidden, positions + offset)


def cached_encoder(tokenizer, *, add_bos: bool):
  """tokenizer.encode with a cache: VisDial repeats each answer string thousands of times."""
  return functools.lru_cache(maxsize=1 << 17)(lambda text: tuple(tokenizer.encode(text, add_bos=add_bos)))


def pad_rows(rows: list, length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Right-pads token lists to (len(rows), length) ids and mask; longer rows raise."""
  ids = np.full((len(rows), length), pad_id, np.int32)
  mask = np.zeros((len(rows), length), np.int32)
  for i, row in enumerate(rows):
    if len(row) > length:
      raise ValueError(f"a row of {len(row)} tokens does not fit {length}")
    ids[i, :len(row)] = row
    mask[i, :len(row)] = 1
  return ids, mask
