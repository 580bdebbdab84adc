"""FROMAGe's concat trick as one program: with probability concat_prob, pairs of examples are joined
into one caption sequence [img_a, cap_a, img_b, cap_b]. The captioning pass always lays pairs out as
(B/2, 2S) rows, and a segment mask decides whether the second half sees the first; positions restart
when the halves are kept apart, so each half is then exactly its own sequence (BridgeModel.loss).

Axis legend: B batch, S sequence length.
"""

from __future__ import annotations

import jax.numpy as jnp


def unpair(x):
  """pair_up's inverse: (B/2, 2S, ...) -> (B, S, ...)."""
  b, s = x.shape[:2]
  return x.reshape(b, 2, s // 2, *x.shape[2:]).reshape(2 * b, s // 2, *x.shape[2:])


def pair_up(x):
  """Concat trick: rows (2i, 2i+1) become one row [x_2i, x_2i+1] (B, S, ...) -> (B/2, 2S, ...)."""
  b, s = x.shape[:2]
  return x.reshape(b // 2, 2, s, *x.shape[2:]).reshape(b // 2, 2 * s, *x.shape[2:])


def pair_layout(mask, joined):
  """Positions and segment ids of paired rows: mask (B/2, 2S), joined a bool scalar -> (B/2, 2S) each.

  joined: one segment, positions count real tokens across both halves, so padding inside the row is
  invisible and the LLM sees exactly FROMAGe's compacted [img_a, cap_a, img_b, cap_b] sequence.
  Not joined: the halves are segments 0 and 1 and positions restart at the second half, so each
  half is exactly its own sequence.
  """
  half = mask.shape[1] // 2
  second = jnp.arange(mask.shape[1]) >= half  # (2S,)
  count = jnp.cumsum(mask, axis=1)
  offset = jnp.where(second & ~joined, count[:, half - 1:half], 0)  # real tokens of the first half
  positions = jnp.maximum(count - offset - 1, 0)
  segment_ids = jnp.broadcast_to(jnp.where(joined, 0, second.astype(jnp.int32)), mask.shape)
  return positions, segment_ids
