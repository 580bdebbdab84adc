"""The range of every numeric config value, checked in one place before anything loads.

    check_config_values(config)   # train.py, eval.py, sweep, ablate, main.run: UserError on one line

A negative or NaN learning rate, a zero logging cadence or `keep_checkpoints=0` would otherwise
train to exit 0 on nonsense, end in a ZeroDivisionError, or keep no checkpoint at all. Each rule
names the key (dotted, as on the command line), what it must be, and why where it is not obvious.
Keys a config lacks are skipped; `evals.*` applies to every eval task's dict.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from bridgejax import terms
from bridgejax.errors import UserError


def _number(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _int_at_least(low: int) -> tuple[Callable, str]:
  return (lambda x: isinstance(x, int) and not isinstance(x, bool) and x >= low), f"an integer >= {low}"


def _at_least(low: float, strict: bool = False) -> tuple[Callable, str]:
  test = (lambda x: _number(x) and x > low) if strict else (lambda x: _number(x) and x >= low)
  return test, f"a finite number {'>' if strict else '>='} {low:g}"


def _between(low: float, high: float, high_open: bool = False) -> tuple[Callable, str]:
  test = (lambda x: _number(x) and low <= x < high) if high_open else (lambda x: _number(x) and low <= x <= high)
  return test, f"a number in [{low:g}, {high:g}{')' if high_open else ']'}"


# key -> (test, what it must be[, why])
RULES: dict[str, tuple] = {
    "total_steps": (*_int_at_least(1), "the step training ends at"),
    "batch_size": _int_at_least(1),
    "seed": _int_at_least(0),
    "log_every_steps": _int_at_least(1),
    "checkpoint_every_steps": _int_at_least(1),
    "eval_every_steps": _int_at_least(1),
    "keep_checkpoints": (*_int_at_least(1), "0 would keep no checkpoint: the trained model would be thrown away"),
    "max_nonfinite_steps": _int_at_least(1),
    "concat_prob": _between(0, 1),
    "representation_share": (*_between(0, 1, high_open=True), "stage 1's share of total_steps; 0 = no stage 1"),
    "optim.lr": (*_at_least(0, strict=True), "the peak learning rate"),
    "optim.b1": _between(0, 1, high_open=True),
    "optim.b2": _between(0, 1, high_open=True),
    "optim.eps": _at_least(0),
    "optim.weight_decay": _at_least(0),
    "optim.grad_clip": (*_at_least(0), "the global-norm clip; 0 = no clipping"),
    "optim.warmup_steps": _int_at_least(0),
    "optim.decay_steps": _int_at_least(1),
    "optim.final_lr_fraction": _between(0, 1),
    "optim.grad_accum_steps": _int_at_least(1),
    "optim.init_lr_fraction": _between(0, 1),
    "optim.groups.*.lr": _at_least(0, strict=True),
    "optim.groups.*.warmup_steps": _int_at_least(0),
    "optim.groups.*.decay_steps": _int_at_least(1),
    "optim.groups.*.final_lr_fraction": _between(0, 1),
    "optim.groups.*.init_lr_fraction": _between(0, 1),
    "optim.groups.*.weight_decay": _at_least(0),
    "optim.groups.*.eps": _at_least(0),
    "optim.groups.*.b1": _between(0, 1, high_open=True),
    "optim.groups.*.b2": _between(0, 1, high_open=True),
    "loss.caption": _at_least(0),
    "loss.text": _at_least(0),
    "loss.contrastive": _at_least(0),
    **{f"loss.{name}": _at_least(0) for name in terms.names()},  # the optional terms' weights
    "ret.embed_dim": _int_at_least(1),
    "data.max_caption_tokens": (*_int_at_least(3), "BOS, at least one caption token and [RET]"),
    "data.num_workers": _int_at_least(0),
    "data.val_examples": _int_at_least(1),
    "data.val_batch_size": _int_at_least(1),
    "evals.*.batch_size": _int_at_least(1),
    "evals.*.max_examples": (*_int_at_least(0), "0 = the whole split"),
    "evals.*.num_workers": _int_at_least(0),
    "evals.*.report_examples": _int_at_least(0),
    "evals.*.max_new_tokens": _int_at_least(1),
    "evals.*.num_beams": _int_at_least(1),
    "evals.*.captions_per_image": _int_at_least(1),
    "evals.*.chunk_size": _int_at_least(1),
    "evals.*.rounds_per_step": _int_at_least(1),
    "evals.*.max_dialog_tokens": _int_at_least(1),
}


def _lookup(config, dotted: str):
  """[(key, value)] of `dotted` in config ('*' matches every child); [] where a key is absent."""
  found = [("", config)]
  for part in dotted.split("."):
    nxt = []
    for prefix, node in found:
      if not hasattr(node, "items"):
        continue
      children = list(node.items()) if part == "*" else [(part, node[part])] if part in node else []
      nxt += [(f"{prefix}{key}.", value) for key, value in children]
    found = nxt
  return [(key[:-1], value) for key, value in found]


def problems(config) -> list[str]:
  """One phrase per config value out of its range."""
  out = []
  for dotted, rule in RULES.items():
    test, must, why = (*rule, "")[:3]
    for key, value in _lookup(config, dotted):
      if not test(value):
        out.append(f"--config.{key}={value!r} must be {must}" + (f" ({why})" if why else ""))
  return out


def check_config_values(config) -> None:
  """Raises UserError naming every value out of range (see RULES), before anything loads."""
  found = problems(config)
  if found:
    raise UserError("; ".join(found))
