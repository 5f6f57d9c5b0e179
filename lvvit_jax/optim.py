"""Optimizer pieces of the recipe (SPEC section 6) as pure functions of params and config."""
from __future__ import annotations

from typing import Any, Optional

import jax
import optax

NO_DECAY_NAMES = ('cls_token', 'pos_embed')


def weight_decay_mask(params: Any) -> Any:
  """True for leaves that get weight decay: ndim >= 2, except cls_token and pos_embed."""
  def decays(path, leaf):
    names = {getattr(p, 'key', None) for p in path}
    return leaf.ndim >= 2 and not names & set(NO_DECAY_NAMES)
  return jax.tree_util.tree_map_with_path(decays, params)


def lr_schedule(peak_lr: float, total_steps: int, warmup_steps: int, *, init_lr: float = 1e-6,
                end_lr: float = 1e-5, cooldown_steps: int = 0) -> optax.Schedule:
  """Linear warm-up from init_lr, cosine to end_lr, then cooldown_steps at end_lr."""
  decay_steps = max(total_steps - cooldown_steps, warmup_steps + 1)
  cosine = optax.warmup_cosine_decay_schedule(init_lr, peak_lr, warmup_steps, decay_steps,
                                              end_value=end_lr)
  return lambda step: cosine(jax.numpy.minimum(step, decay_steps))


def adamw(schedule: optax.Schedule, params: Any, *, weight_decay: float = 0.05,
          b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> optax.GradientTransformation:
  """AdamW with the recipe's decay mask (no clipping, as the release)."""
  return optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                     mask=weight_decay_mask(params))


def make_optimizer(params: Any, schedule: optax.Schedule, *, weight_decay: float = 0.05,
                   b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                   grad_clip_norm: Optional[float] = None) -> optax.GradientTransformation:
  """The recipe's AdamW with its decay mask, after optional global-norm gradient clipping."""
  tx = adamw(schedule, params, weight_decay=weight_decay, b1=b1, b2=b2, eps=eps)
  if grad_clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(grad_clip_norm), tx)
  return tx


def ema_update(ema: Any, new: Any, decay: float) -> Any:
  """`decay * ema + (1 - decay) * new`, leaf by leaf, in the EMA's dtype (float32)."""
  return jax.tree.map(lambda e, n: (decay * e + (1.0 - decay) * n.astype(e.dtype)).astype(e.dtype),
                      ema, new)
