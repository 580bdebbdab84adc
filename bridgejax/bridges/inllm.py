"""What the bridges that act inside the frozen LLM share (epalm.py, flamingo.py): the decoder hook
(models/decoder.DecoderHook) that carries their trainable parameters and each row's visual context into
the frozen decoder's layers, and the layout the assembled model (model.py) hands them.

A prefix bridge gives the LLM k tokens in front of the text. An in-LLM bridge gives it
  * a prefix of `num_prefix_tokens` rows that enter the sequence as any bridge's tokens do, its first
    row marking where the image is (eP-ALM: the CLS slot, then the soft prompt; Flamingo: <image>);
  * `num_context_tokens` rows C appended after the prefix in BridgeOutput.tokens that never enter the
    sequence: BridgeModel.split_visual takes them off, and the hook reads them inside the LLM (eP-ALM:
    the projected CLS tokens; Flamingo: the resampler's 64 latents).
So `num_tokens`, the rows of BridgeOutput.tokens as for every bridge, is prefix + context, and the
engine, caption_inputs and the concat trick move both as one array.

A row of the LLM's input may hold several images (the concat trick's pairs): `markers` (B, P) marks
the first prefix column of each image, and `context` (B, I·C, E) holds the images' rows in that order.
A column belongs to the most recent image whose marker is at or before it (`column_images`). In a KV
cache a slot is a column, so the prompt's markers padded with False to the cache length say the same
of generated tokens: they belong to the prompt's last image.

Axis legend: B batch, T queries, S key columns, P prompt columns, I images per row, C context rows
per image, E LLM width.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from bridgejax.bridges import base

Array = jax.Array


@struct.dataclass
class InLLMHook:
  """A DecoderHook (models/decoder.py) running an in-LLM bridge's `before_layer` and `after_sublayer`
  with its parameters on its rows' context."""

  params: Any  # the bridge's (trainable) parameters
  context: Array  # (B, I·C, E)
  markers: Array  # (B, P) bool
  module: nn.Module = struct.field(pytree_node=False)
  layer: int = struct.field(pytree_node=False, default=-1)

  def at(self, layer: int) -> "InLLMHook":
    return self.replace(layer=layer)

  def before_layer(self, x, mask, columns):
    return self.module.apply({"params": self.params}, self.layer, x, mask, columns, self.context, self.markers,
                             method="before_layer")

  def after_sublayer(self, kind: str, h):
    return self.module.apply({"params": self.params}, self.layer, kind, h, method="after_sublayer")

  def map_rows(self, fn) -> "InLLMHook":
    return self.replace(context=fn(self.context), markers=fn(self.markers))


class InLLMBridge(base.Bridge):
  """The interface epalm.py and flamingo.py implement (their own fields follow base.Bridge's)."""

  @property
  def num_prefix_tokens(self) -> int:
    raise NotImplementedError

  @property
  def num_context_tokens(self) -> int:
    raise NotImplementedError

  @property
  def num_tokens(self) -> int:
    return self.num_prefix_tokens + self.num_context_tokens

  def decoder_hook(self, params, context, markers) -> InLLMHook:
    """The hook for rows with `context` (B, I·C, E) and `markers` (B, P) (module docstring)."""
    if not self.llm_layers:
      raise ValueError(f"{type(self).__name__} acts inside the LLM: build it with llm_layers (BridgeModel does)")
    return InLLMHook(params, context, markers, self)

  def before_layer(self, layer, x, mask, columns, context, markers):  # DecoderHook.before_layer
    del layer, columns, context, markers
    return x, mask

  def after_sublayer(self, layer, kind, h):  # DecoderHook.after_sublayer
    del layer, kind
    return h


def padded_markers(markers, width: int):
  """(B, P) -> (B, S) bool, False past the prompt (S >= P: the key columns, or the cache slots)."""
  return jnp.pad(markers, ((0, 0), (0, width - markers.shape[1])))


def column_images(markers, width: int):
  """(B, P) markers -> (B, S) int32: the image each column belongs to, -1 before a row's first."""
  return jnp.cumsum(padded_markers(markers, width), axis=1, dtype=jnp.int32) - 1


def at_columns(per_column, columns):
  """(B, S) values per key column, (B, T) the queries' columns -> (B, T) the queries' values."""
  return jnp.take_along_axis(per_column, columns, axis=1)
