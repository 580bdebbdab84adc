"""The jitted similarity kernels of retrieval ranking and top-k lists: one (chunk, gallery) block of
dot products at a time, in float32 with Precision.HIGHEST (TPUs would otherwise round to bf16 passes).
retrieval.py and the evaluators call them on host arrays, chunk by chunk.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def on_device(x: np.ndarray) -> jax.Array:
  """A gallery placed once, reused by every chunk's call."""
  return jnp.asarray(x)


@jax.jit
def best_positive_ranks(queries, gallery, query_keys, gallery_keys, left_out):
  """1-based rank of each query's best-ranked positive, under the stable-descending tie rule.

  queries (C, D), gallery (G, D); gallery item g is a positive of query c iff
  gallery_keys[g] == query_keys[c]; item left_out[c] (-1: none) is not ranked for query c.
  """
  sims = jnp.einsum("cd,gd->cg", queries, gallery, precision=jax.lax.Precision.HIGHEST)
  positives = gallery_keys[None, :] == query_keys[:, None]
  # The best positive: highest similarity, lowest index among equals (what a stable sort puts first).
  masked = jnp.where(positives, sims, -jnp.inf)
  best = jnp.max(masked, axis=1, keepdims=True)
  best_index = jnp.argmax(masked, axis=1)[:, None]  # argmax returns the first maximum
  gallery_index = jnp.arange(gallery.shape[0])[None, :]
  ahead = ((sims > best) | ((sims == best) & (gallery_index < best_index))) & (gallery_index != left_out[:, None])
  return jnp.sum(ahead, axis=1) + 1



@functools.partial(jax.jit, static_argnames="k")
def top_k_block(queries, gallery, k: int):
  """(C, k) indices of the k most similar gallery rows of each query."""
  sims = jnp.einsum("cd,gd->cg", queries, gallery, precision=jax.lax.Precision.HIGHEST)
  return jax.lax.top_k(sims, k)[1]
