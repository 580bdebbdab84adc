"""Every bridge h of the thesis behind one registry, built from a config.

  bridge = build_bridge(cfg, vision_width=1024, vision_layers=24, grid_size=16, llm_width=2048)
  features = VisionFeatures.from_tower(tower_out.hidden_states, vision_params["post_norm"], eps)
  params = bridge.init(rng, features)["params"]
  out = bridge.apply({"params": params}, features)
  out.tokens          # (B, k, llm_width): the visual prefix; k = bridge.num_tokens
  out.image_feature   # (B, vision_width): the input of W_i (retrieval image head, model.py)

`features.hidden_states` is the vision tower's tuple (num_layers + 1 arrays of (B, 1 + grid², D),
CLS first, [-1] = layer L); its post-LayerNorm (γ, β, eps) is applied only by bridges whose config
says post_norm=True.

`cfg` is an ml_collections.ConfigDict (or a dict) with `name` and that bridge's keys. A bridge's
keys and defaults are the fields of its module class; list them all with

  python -c "import bridgejax.bridges as b; print(b.describe())"

Each family's module docstring gives the equations, the choices made where the thesis is ambiguous
and the parameter-count formula (the module's `num_params`; tests hold it against the real tree).
The thesis's bridges are in cls.py, alltokens.py and crossatt.py; querying.py (Flamingo's Perceiver
resampler, BLIP-2's Q-Former; qformer_text.py its stage-1 text branch and heads) and projector.py
(LLaVA-1.5's MLP) add bridges from other work, and epalm.py and flamingo.py two that also act inside
the frozen LLM (inllm.py: they need `llm_layers`). Every bridge module is a base.Bridge (its fields).
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any

import jax.numpy as jnp

from bridgejax.bridges import alltokens, cls, crossatt, epalm, flamingo, projector, querying  # noqa: F401  (they fill the registry)
from bridgejax.bridges.base import (REGISTRY, AttentionPool, BridgeOutput, BridgeSpec, MultiHeadCrossAttention,
                                    VisionFeatures)
from bridgejax.errors import UserError

__all__ = ["REGISTRY", "AttentionPool", "BridgeOutput", "BridgeSpec", "MultiHeadCrossAttention", "VisionFeatures",
           "build_bridge", "describe", "names", "num_params", "num_tokens", "resolve"]


def names() -> list[str]:
  return sorted(REGISTRY)


def describe() -> str:
  """One line per bridge (name, then each config key=default, read from its module's fields), then
  what it does and any fields its preset fixes."""
  lines = []
  for name in names():
    spec = REGISTRY[name]
    keys = " ".join(f"{k}={v!r}" for k, v in spec.defaults.items())
    fixed = " ".join(f"{k}={v!r}" for k, v in spec.fixed.items())
    lines.append(f"{name:11s} {keys}\n{'':11s} {spec.doc}" + (f" [fixed: {fixed}]" if fixed else ""))
  return "\n".join(lines)


def resolve(cfg, *, vision_width: int, vision_layers: int, grid_size: int, llm_width: int,
            llm_layers: int | None = None) -> tuple[BridgeSpec, dict]:
  """Validates a bridge config against the tower/LLM sizes: (spec, full keys with defaults filled in)."""
  raw = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
  name = raw.pop("name", None)
  if name not in REGISTRY:
    raise UserError(f"unknown bridge name {name!r}; set config.bridge.name to one of {names()}")
  spec = REGISTRY[name]
  unknown = sorted(set(raw) - set(spec.defaults))
  if unknown:
    valid = ", ".join(f"{k} (default {v!r})" for k, v in spec.defaults.items())
    raise UserError(f"bridge {name!r} has no config key(s) {unknown}; its keys are: {valid}")
  keys = {**spec.defaults, **{k: _plain(v) for k, v in raw.items()}}
  dims = dict(vision_width=vision_width, vision_layers=vision_layers, grid_size=grid_size, llm_width=llm_width)
  if llm_layers is not None:  # the LLM's depth: only bridges acting inside it (inllm.py) read it
    dims["llm_layers"] = llm_layers
  for key, value in dims.items():
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise UserError(f"build_bridge: {key}={value!r} must be a positive integer")
  if spec.check is not None:
    spec.check(name, dims, **keys, **spec.fixed)
  return spec, keys


def _plain(value):
  """Config values as plain hashable Python: lists -> tuples, numpy integers -> int."""
  if isinstance(value, (list, tuple)):
    return tuple(_plain(v) for v in value)
  if isinstance(value, numbers.Integral) and not isinstance(value, bool):
    return int(value)
  return value


def build_bridge(cfg, *, vision_width: int, vision_layers: int, grid_size: int, llm_width: int,
                 llm_layers: int | None = None, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32):
  """The Flax module for `cfg` (cfg.name in `names()`), checked against the backbone sizes.

  Raises ValueError naming the problem and the fix for an unknown name or key, a layer outside the
  tower, heads that do not divide the width, or a patch grid that cannot be split as asked.
  """
  spec, keys = resolve(cfg, vision_width=vision_width, vision_layers=vision_layers, grid_size=grid_size,
                       llm_width=llm_width, llm_layers=llm_layers)
  fields = {f.name for f in dataclasses.fields(spec.module)}
  dims = dict(vision_width=vision_width, llm_width=llm_width, grid_size=grid_size, vision_layers=vision_layers)
  if llm_layers is not None:
    dims["llm_layers"] = llm_layers
  return spec.module(**{k: v for k, v in dims.items() if k in fields}, **keys, dtype=dtype,
                     param_dtype=param_dtype)


def num_params(cfg, *, vision_width: int, vision_layers: int, grid_size: int, llm_width: int,
               llm_layers: int | None = None) -> int:
  """The closed-form trainable parameter count of the bridge (its docstring's formula)."""
  return build_bridge(cfg, vision_width=vision_width, vision_layers=vision_layers, grid_size=grid_size,
                      llm_width=llm_width, llm_layers=llm_layers).num_params


def num_tokens(cfg, *, vision_width: int, vision_layers: int, grid_size: int, llm_width: int) -> int:
  """k: how many LLM input embeddings the bridge produces (known before any array exists)."""
  return build_bridge(cfg, vision_width=vision_width, vision_layers=vision_layers, grid_size=grid_size,
                      llm_width=llm_width).num_tokens
