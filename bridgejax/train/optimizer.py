"""The optimizer of the trainable subtree, from config (FROMAGe defaults in configs/base.py)."""

from __future__ import annotations

import optax

from bridgejax.errors import UserError


def learning_rate_schedule(cfg) -> optax.Schedule:
  """Linear warm-up from 0, then constant (FROMAGe) or cosine decay to `final_lr_fraction`."""
  warmup = optax.linear_schedule(0.0, cfg.lr, max(cfg.warmup_steps, 1))
  if cfg.schedule == "constant":
    after = optax.constant_schedule(cfg.lr)
  elif cfg.schedule == "cosine":
    after = optax.cosine_decay_schedule(cfg.lr, max(cfg.decay_steps, 1), alpha=cfg.final_lr_fraction)
  else:
    raise UserError(f"optim.schedule={cfg.schedule!r} is not known; use 'constant' or 'cosine'")
  return optax.join_schedules([warmup, after], [cfg.warmup_steps])


def make_optimizer(cfg) -> optax.GradientTransformation:
  """AdamW with global-norm clipping, optionally accumulating `grad_accum_steps` micro-steps."""
  tx = optax.chain(
      optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip else optax.identity(),
      optax.adamw(learning_rate_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                  weight_decay=cfg.weight_decay),
  )
  if cfg.grad_accum_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=cfg.grad_accum_steps)
  return tx
