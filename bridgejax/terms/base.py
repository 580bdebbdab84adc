"""What an optional loss term is: the declaration each term's module makes (terms/<name>.py).

FROMAGe's three terms (caption CE, text CE, InfoNCE) are the model's own (model.py). An optional
term is one file here ending with

    TERM = LossTerm(name="cmli", section="cmli", keys={...}, heads=heads, reads=(...), loss=loss,
                    trains_bridge=trains_bridge)

and is on when config.loss.<name> > 0. The registry (bridgejax.terms) finds it; BridgeModel builds
the heads it declares into the `ret` subtree, hands its loss the states it names, adds its value
times its weight to the total and logs `<name>_loss` and its parts. This module imports nothing
heavy, so that configs/base.py can build config.loss and the terms' sections from the declarations
without loading jax.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple


@dataclasses.dataclass(frozen=True)
class Head:
  """One parameter or module a term adds to the `ret` subtree, under `name` (its checkpoint path ret/<name>).

  kind  "dense": nn.Dense(width), applied to a `reads` input ("llm": D wide, "vision": W wide);
        "scalar": a learned scalar starting at `init`;
        "module": `factory()`, a flax module applied to a `reads` input (its parameters under ret/<name>).
  Two terms may declare the same head (CMLI and Target-CMLI share the CMLI space): it is built once.
  """
  name: str
  kind: str
  width: int = 0
  reads: str = "llm"
  init: float = 0.0
  factory: Callable[[], Any] | None = None


class Dims(NamedTuple):
  """The sizes a term's heads and checks need."""
  llm_width: int  # D
  vision_width: int  # W
  logit_scale_init: float  # config.ret.logit_scale_init, for a term's own temperature


class States(NamedTuple):
  """What one training step has computed that a term may read (LossTerm.reads names the fields).

  features        the tower's VisionFeatures (frozen)
  visual_tokens   (B, K, D) the bridge's tokens as they enter the LLM
  visual_hidden   (B, K', D) the captioning pass's final-norm states at the visual positions
  caption_hidden  (B, T, D) the captioning pass's states at the caption's positions (they see the image)
  text_hidden     (B, T, D) the text pass's states (no image: frozen functions of the caption)
  caption_tokens  (B, T) bool: the caption's own tokens (BOS, [RET] and padding out)
  patches         (B, N, W) the tower's layer-L patches, post-LayerNorm, CLS left out (frozen)
  image_emb       (B, E) W_i of the bridge's image feature
  """
  features: Any
  visual_tokens: Any
  visual_hidden: Any
  caption_hidden: Any
  text_hidden: Any
  caption_tokens: Any
  patches: Any
  image_emb: Any


@dataclasses.dataclass(frozen=True)
class LossTerm:
  """One optional term.

  name           its weight is config.loss.<name>; its value is logged as <name>_loss
  section        the config section its keys live in (config.<section>); terms may share one
  keys           its keys there, with their defaults; a tuple default lists the choices, the first
                 being the default (the config holds the chosen string)
  heads          heads(options, dims) -> (Head, ...) it adds to `ret`
  reads          the States fields its loss reads; "tower:cls" / "tower:all" what it reads of the
                 tower's last layer beyond the bridge's own (a feature cache keeps it: data/features)
  loss           loss(model, params, states, options) -> {name: value, name_<part>: value, ...}
  trains_bridge  trains_bridge(options) -> {each value's name: whether its gradient reaches the
                 bridge}; tests/test_loss_gradients.py holds every term to it
  check          check(options, dims) raising UserError on options it cannot run with
  prepare        prepare(options, tokenizer, vocab_size) -> options completed with what needs the
                 tokenizer (a prompt's ids)
  """
  name: str
  section: str
  keys: Mapping[str, Any]
  heads: Callable[[Mapping[str, Any], Dims], tuple[Head, ...]]
  reads: tuple[str, ...]
  loss: Callable[..., dict]
  trains_bridge: Callable[[Mapping[str, Any]], dict[str, bool]]
  check: Callable[[Mapping[str, Any], Dims], None] | None = None
  prepare: Callable[..., Mapping[str, Any]] | None = None

  def defaults(self) -> dict[str, Any]:
    return {k: v[0] if isinstance(v, tuple) else v for k, v in self.keys.items()}


@dataclasses.dataclass(frozen=True)
class Active:
  """A term switched on by its weight (BridgeModel.loss_weights), with its resolved options (its section's keys)."""
  term: LossTerm
  options: Mapping[str, Any]

  @property
  def name(self) -> str:
    return self.term.name
