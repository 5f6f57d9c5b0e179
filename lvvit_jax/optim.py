"""Optimizer pieces of the recipes as pure functions of params and settings.

Two recipes: LV-ViT's AdamW (SPEC section 6) and NFNet's SGD with Nesterov momentum, adaptive
gradient clipping and L2 weight decay (DeepMind's `nfnets/experiment_nfnets.py` and
`nfnets/optim.py::SGD_AGC`). `make_optimizer` builds either from the config's values; the
weight-decay mask is chosen per model family (`DECAY_MASKS`).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence

import jax
import jax.numpy as jnp
import optax

_FILE = 'lvvit_jax/optim.py'

NO_DECAY_NAMES = ('cls_token', 'pos_embed')
OPTIMIZERS = ('adamw', 'sgd')


def _names(path) -> list:
  return [getattr(p, 'key', getattr(p, 'name', None)) for p in path]


def weight_decay_mask(params: Any) -> Any:
  """LV-ViT: True for leaves that get weight decay: ndim >= 2, except cls_token and pos_embed."""
  def decays(path, leaf):
    return leaf.ndim >= 2 and not set(_names(path)) & set(NO_DECAY_NAMES)
  return jax.tree_util.tree_map_with_path(decays, params)


def is_gain_or_bias(name: str) -> bool:
  """DeepMind's NFNet test of a parameter name: gains, biases, norm scale/offset (`pred_gb`)."""
  return name in ('scale', 'offset', 'b') or 'gain' in name or 'bias' in name


def nfnet_decay_mask(params: Any) -> Any:
  """NFNet: decay every weight (conv, squeeze-excite and classifier kernels); gains
  (`gain`, `skip_gain`) and biases are exempt, as DeepMind's reference."""
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: not is_gain_or_bias(str(_names(path)[-1])), params)


DECAY_MASKS: Dict[str, Callable[[Any], Any]] = {
    'lvvit': weight_decay_mask, 'nfnet': nfnet_decay_mask}


def agc_mask(params: Any, exempt_modules: Sequence[str] = ('linear',)) -> Any:
  """True where adaptive gradient clipping applies: everywhere except the weights of the
  top-level `exempt_modules` (the classifier). DeepMind exempts only the final linear's `w`;
  its bias is clipped with the gains and biases (`experiment_nfnets.Experiment._make_opt`)."""
  def clipped(path, leaf):
    names = _names(path)
    return not (names[0] in exempt_modules and not is_gain_or_bias(str(names[-1])))
  return jax.tree_util.tree_map_with_path(clipped, params)


def lr_schedule(peak_lr: float, total_steps: int, warmup_steps: int, *, init_lr: float = 1e-6,
                end_lr: float = 1e-5, cooldown_steps: int = 0) -> optax.Schedule:
  """Linear warm-up from init_lr, cosine to end_lr, then cooldown_steps at end_lr."""
  decay_steps = max(total_steps - cooldown_steps, warmup_steps + 1)
  cosine = optax.warmup_cosine_decay_schedule(init_lr, peak_lr, warmup_steps, decay_steps,
                                              end_value=end_lr)
  return lambda step: cosine(jax.numpy.minimum(step, decay_steps))


def adamw(schedule: optax.Schedule, params: Any, *, weight_decay: float = 0.05,
          b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
          decay_mask: Callable[[Any], Any] = weight_decay_mask) -> optax.GradientTransformation:
  """AdamW (decoupled decay) with the recipe's decay mask (no clipping, as the release)."""
  return optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                     mask=decay_mask(params))


def sgd(schedule: optax.Schedule, params: Any, *, momentum: float = 0.9, nesterov: bool = True,
        weight_decay: float = 2e-5,
        decay_mask: Callable[[Any], Any] = nfnet_decay_mask) -> optax.GradientTransformation:
  """SGD as DeepMind's `optim.SGD`: g += wd * p (L2, masked), buf = m * buf + g, then the step
  is lr * (g + m * buf) with Nesterov, lr * buf without."""
  parts = []
  if weight_decay:
    parts.append(optax.add_decayed_weights(weight_decay, mask=decay_mask(params)))
  parts.append(optax.sgd(schedule, momentum=momentum or None, nesterov=nesterov))
  return optax.chain(*parts)


def adaptive_grad_clip(params: Any, clip: float, *, eps: float = 1e-3,
                       exempt_modules: Sequence[str] = ('linear',)
                       ) -> optax.GradientTransformation:
  """Unit-wise AGC (Brock et al. 2021) on every leaf but the exempt weights (`agc_mask`).

  optax's `adaptive_grad_clip` is DeepMind's: unit-wise norms over all axes but the last
  (HWIO kernels: per output channel; (in, out) dense: per output unit; vectors and scalars:
  whole), max norm `clip * max(|p|, eps)`, rescaled where |g| exceeds it (optax keeps g where
  |g| < max norm, DeepMind where |g| <= max norm: the same value at equality).
  """
  return optax.masked(optax.adaptive_grad_clip(clip, eps=eps), agc_mask(params, exempt_modules))


def make_optimizer(params: Any, schedule: optax.Schedule, *, optimizer: str = 'adamw',
                   weight_decay: float = 0.05, decay_mask: str = 'lvvit', b1: float = 0.9,
                   b2: float = 0.999, eps: float = 1e-8, momentum: float = 0.9,
                   nesterov: bool = True, grad_clip_norm: Optional[float] = None,
                   agc_clip: Optional[float] = None, agc_eps: float = 1e-3,
                   agc_exempt: Sequence[str] = ()) -> optax.GradientTransformation:
  """The recipe's optimizer: [global-norm clip] -> [AGC] -> AdamW or SGD, with its decay mask.

  `optimizer` 'adamw' (LV-ViT: b1, b2, eps) or 'sgd' (NFNet: momentum, nesterov);
  `decay_mask` a key of DECAY_MASKS; `agc_clip` enables adaptive gradient clipping on every
  parameter but the weights of the top-level modules `agc_exempt` (the classifier).
  """
  if optimizer not in OPTIMIZERS:
    raise ValueError(f'{_FILE}: config.optimizer={optimizer!r}; use one of {OPTIMIZERS}.')
  if decay_mask not in DECAY_MASKS:
    raise ValueError(f'{_FILE}: config.decay_mask={decay_mask!r}; use one of '
                     f'{sorted(DECAY_MASKS)}.')
  mask = DECAY_MASKS[decay_mask]
  if optimizer == 'adamw':
    tx = adamw(schedule, params, weight_decay=weight_decay, b1=b1, b2=b2, eps=eps,
               decay_mask=mask)
  else:
    tx = sgd(schedule, params, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
             decay_mask=mask)
  if agc_clip:
    tx = optax.chain(adaptive_grad_clip(params, agc_clip, eps=agc_eps, exempt_modules=agc_exempt),
                     tx)
  if grad_clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(grad_clip_norm), tx)
  return tx


def ema_decay_at(step: jax.Array, decay: float, warmup: bool = False) -> Any:
  """The EMA decay of update `step` (0-based): `decay`, or with `warmup`
  min(decay, (1 + step) / (10 + step)) (TF1's ExponentialMovingAverage with num_updates,
  DeepMind's `utils.tf1_ema`)."""
  if not warmup:
    return decay  # A Python float: 1 - decay is computed in float64, as it always was.
  step = jnp.asarray(step, jnp.float32)
  return jnp.minimum(jnp.float32(decay), (1.0 + step) / (10.0 + step))


def ema_update(ema: Any, new: Any, decay: Any) -> Any:
  """`decay * ema + (1 - decay) * new`, leaf by leaf, in the EMA's dtype (float32)."""
  return jax.tree.map(lambda e, n: (decay * e + (1.0 - decay) * n.astype(e.dtype)).astype(e.dtype),
                      ema, new)
