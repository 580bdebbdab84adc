"""Every optional loss term behind one registry, as the bridges and the evaluators are.

    config.loss.cmli = 1.0                    # a term is on when its weight is > 0
    active = resolve(config, dims, weights)   # (Active(term, options), ...), checked; weights: config.loss resolved
    heads(active, dims)                       # the Heads they add to `ret`, each once
    sections()                                # {config section: {key: default}} (configs/base.py)

One module per term (cmli.py, target_cmli.py, pic2word.py) declares a `TERM` (base.LossTerm: its
weight's name, its config keys, the heads it needs, the states it reads, its loss and its parts,
what it trains); this package finds every module that does, so adding a term is one new file here.
BridgeModel (model.py) builds the heads, hands each loss the states it reads, and adds weight x value
to the total. Token-type embeddings (config.token_type_embeddings) are not a term: they change the
LLM's inputs, not the loss (model.py).
"""

from __future__ import annotations

import importlib
import pkgutil

from bridgejax.errors import UserError
from bridgejax.terms.base import Active, Dims, Head, LossTerm, States

__all__ = ["REGISTRY", "Active", "Dims", "Head", "LossTerm", "States", "heads", "names", "resolve", "sections"]


def _discover() -> dict[str, LossTerm]:
  found = {}
  for info in pkgutil.iter_modules(__path__):
    if info.name == "base":
      continue
    term = getattr(importlib.import_module(f"{__name__}.{info.name}"), "TERM", None)
    if isinstance(term, LossTerm):
      if term.name in found:
        raise ImportError(f"two loss terms are named {term.name!r}")
      found[term.name] = term
  return dict(sorted(found.items()))


REGISTRY: dict[str, LossTerm] = _discover()


def names() -> list[str]:
  return list(REGISTRY)


def sections() -> dict[str, dict]:
  """{section: {key: default}} of every term, terms sharing a section merged (their shared keys
  must agree on the default)."""
  out: dict[str, dict] = {}
  for term in REGISTRY.values():
    section = out.setdefault(term.section, {})
    for key, default in term.defaults().items():
      if section.setdefault(key, default) != default:
        raise ImportError(f"loss terms disagree on the default of {term.section}.{key}")
  return out


def resolve(config, dims: Dims, weights: dict[str, float]) -> tuple[Active, ...]:
  """The terms `weights` (config.loss, resolved) switch on, each with its options from its section."""
  out = []
  for name, term in REGISTRY.items():
    if weights.get(name, 0.0) <= 0:
      continue
    given = config.get(term.section, {}) or {}
    options = {key: given.get(key, default) for key, default in term.defaults().items()}
    for key, allowed in term.keys.items():
      if isinstance(allowed, tuple) and options[key] not in allowed:
        raise UserError(f"--config.{term.section}.{key}={options[key]!r}: use one of {', '.join(allowed)}")
    if term.check is not None:
      term.check(options, dims)
    out.append(Active(term, options))
  return tuple(out)


def heads(active: tuple[Active, ...], dims: Dims) -> tuple[Head, ...]:
  """The heads of the active terms, each name once (a shared head must be declared alike)."""
  out: dict[str, Head] = {}
  for a in active:
    for head in a.term.heads(a.options, dims):
      if out.setdefault(head.name, head) != head:
        raise ValueError(f"loss terms declare the head ret/{head.name} differently: {out[head.name]} vs {head}")
  return tuple(out.values())
