"""The optimizer of the trainable subtree, from config (FROMAGe defaults in configs/base.py).

AdamW with global-norm clipping over every trainable parameter, or, with `optim.groups`, one AdamW
per group of parameters (optax.multi_transform), each with its own learning rate, schedule and
weight decay, as torch's per-group `param_groups` (configs/epalm.py:recipe=paper):

  config.optim.groups = {"prompt": {"params": "prompt|adapter", "lr": 1e-5, "schedule": "constant",
                                    "warmup_steps": 0}}

Each group's `params` is a regular expression searched in every trainable parameter's path, its keys
joined by "/" ("bridge/prompt_in/kernel", "ret/logit_scale"); a parameter that no group matches is
in the default group, whose settings are optim's own keys; one that two groups match is an error.
A group's other keys override the default group's: GROUP_KEYS. Clipping (over all parameters
together, as torch.nn.utils.clip_grad_norm_) and accumulation stay global. Without groups (every
config but an explicit recipe's) the optimizer and its state are exactly one AdamW's, as before.

Learning rate at step t (each group), w = warmup_steps, f = init_lr_fraction (0: FROMAGe's warm-up from 0):
  t < w:   lr · (f + (1 - f) · t / w)
  t >= w:  lr ("constant") or lr · (a + (1 - a) · (1 + cos(π · min(t - w, d) / d)) / 2) ("cosine"),
           d = decay_steps, a = final_lr_fraction
"""

from __future__ import annotations

import logging
import re

import jax
import optax

from bridgejax.config_schema import GROUP_KEYS  # what a group may set; grad_clip and grad_accum_steps are global
from bridgejax.errors import UserError

DEFAULT_GROUP = "default"


def learning_rate_schedule(cfg) -> optax.Schedule:
  """Linear warm-up from lr·init_lr_fraction, then constant (FROMAGe) or cosine decay
  to `final_lr_fraction` (module docstring)."""
  init = cfg.lr * cfg.init_lr_fraction
  warmup = optax.linear_schedule(init, cfg.lr, max(cfg.warmup_steps, 1))
  if cfg.schedule == "constant":
    after = optax.constant_schedule(cfg.lr)
  elif cfg.schedule == "cosine":
    after = optax.cosine_decay_schedule(cfg.lr, max(cfg.decay_steps, 1), alpha=cfg.final_lr_fraction)
  else:
    raise UserError(f"optim.schedule={cfg.schedule!r} is not known; use 'constant' or 'cosine'")
  return optax.join_schedules([warmup, after], [cfg.warmup_steps])


class _Settings:
  """A group's settings: its own keys over the default group's (optim's)."""

  def __init__(self, cfg, overrides=None):
    for key in GROUP_KEYS:
      setattr(self, key, cfg[key])
    for key, value in (overrides or {}).items():
      setattr(self, key, value)


def _adamw(settings) -> optax.GradientTransformation:
  return optax.adamw(learning_rate_schedule(settings), b1=settings.b1, b2=settings.b2, eps=settings.eps,
                     weight_decay=settings.weight_decay)


def groups(cfg) -> dict[str, tuple[re.Pattern, _Settings]]:
  """{name: (its pattern, its settings)} of optim.groups, checked; {} without groups."""
  raw = cfg.groups
  out = {}
  for name, group in raw.items():
    group = dict(group.to_dict() if hasattr(group, "to_dict") else group)
    pattern = group.pop("params", None)
    if not isinstance(pattern, str) or not pattern:
      raise UserError(f"optim.groups.{name} needs params: a regular expression of the parameter paths it holds, "
                      f"e.g. 'prompt|adapter'")
    unknown = sorted(set(group) - set(GROUP_KEYS))
    if unknown:
      raise UserError(f"optim.groups.{name} has no key(s) {unknown}; a group sets params and any of "
                      f"{', '.join(GROUP_KEYS)}")
    if name == DEFAULT_GROUP:
      raise UserError(f"optim.groups.{DEFAULT_GROUP}: the name is taken by the parameters no group matches "
                      "(optim's own keys set those); give the group another name")
    try:
      compiled = re.compile(pattern)
    except re.error as e:
      raise UserError(f"optim.groups.{name}.params={pattern!r} is not a regular expression ({e})") from None
    out[name] = (compiled, _Settings(cfg, group))
  return out


def param_path(keys) -> str:
  """A parameter's key path as 'bridge/prompt_in/kernel'."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in keys)


def group_labels(cfg, params):
  """The pytree of `params` with each leaf's group name (DEFAULT_GROUP where none matches)."""
  patterns = {name: pattern for name, (pattern, _) in groups(cfg).items()}
  used = set()

  def label(keys, _):
    path = param_path(keys)
    matched = [name for name, pattern in patterns.items() if pattern.search(path)]
    if len(matched) > 1:
      raise UserError(f"parameter {path} matches optim.groups {matched}; make their params patterns exclusive")
    used.update(matched)
    return matched[0] if matched else DEFAULT_GROUP

  labels = jax.tree_util.tree_map_with_path(label, params)
  for name in sorted(set(patterns) - used):
    logging.warning("optim.groups.%s (params=%r) matches no trainable parameter", name, patterns[name].pattern)
  return labels


def make_optimizer(cfg) -> optax.GradientTransformation:
  """AdamW (one per optim.groups group) with global-norm clipping, optionally accumulating
  `grad_accum_steps` micro-steps."""
  named = groups(cfg)
  if named:
    transforms = {DEFAULT_GROUP: _adamw(_Settings(cfg)), **{name: _adamw(s) for name, (_, s) in named.items()}}
    adamw = optax.multi_transform(transforms, lambda params: group_labels(cfg, params))
  else:
    adamw = _adamw(_Settings(cfg))
  tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip else optax.identity(), adamw)
  if cfg.grad_accum_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=cfg.grad_accum_steps)
  return tx
