"""The token-labeling loss (SPEC section 5), computed in float32 whatever the model's dtype.

`L = cls_weight * SCE(cls_logits, t_cls) + dense_weight * mean over B*N tokens SCE(aux, t_tok)`
with `SCE(x, t) = sum_k -t_k log_softmax(x)_k`, averaged over examples (and tokens).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import jax
import jax.numpy as jnp

_FILE = 'lvvit_jax/token_labeling/loss.py'


def soft_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Per-row `sum_k -t_k log_softmax(x)_k` in float32; shape logits.shape[:-1]."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.sum(targets.astype(jnp.float32) * logp, axis=-1)


def blend_ground_truth(cls_target: jax.Array, ground_truth: jax.Array) -> jax.Array:
  """The release's optional ground-truth blend of the cls target (off by default).

  `t = r * t_cls + (1 - r) * t_gt` with r = 0.5 where the two agree on the top class and r = 0.9
  where they disagree (the release's code; its comment says the opposite of what it does).
  The release blends *before* MixToken mixes the cls target, so with MixToken call this before
  `mix_targets`; `ground_truth` is the (smoothed) one-hot label target, (B, K).
  """
  if ground_truth.shape != cls_target.shape:
    raise ValueError(f'{_FILE}: ground_truth has shape {ground_truth.shape} but the cls target '
                     f'has {cls_target.shape}; pass the (B, K) label target, e.g. from '
                     'label_targets(labels, ...)[0].')
  agree = jnp.argmax(ground_truth, axis=-1) == jnp.argmax(cls_target, axis=-1)
  ratio = jnp.where(agree, 0.5, 0.9)[:, None].astype(cls_target.dtype)
  return cls_target * ratio + ground_truth * (1 - ratio)


def token_label_loss(cls_logits: jax.Array, aux_logits: jax.Array, cls_target: jax.Array,
                     token_targets: jax.Array, *, cls_weight: float = 1.0,
                     dense_weight: float = 0.5, ground_truth: Optional[jax.Array] = None
                     ) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """Token-labeling loss: returns (total, {'cls': cls term, 'dense': dense term}), float32.

  Args:
    cls_logits: (B, K) class-head logits, any float dtype.
    aux_logits: (B, N, K) aux-head logits, already un-mixed (MixToken), any float dtype.
    cls_target: (B, K) soft cls target (mixed by `mix_targets` when MixToken is on).
    token_targets: (B, gh, gw, K) or (B, N, K) token targets (never mixed); N = gh * gw.
    cls_weight: weight of the cls term (SPEC: 1.0).
    dense_weight: weight of the dense term (paper: 0.5; the released script's default: 1.0).
    ground_truth: optional (B, K) label target to blend into `cls_target` as the release does
      (`blend_ground_truth`). The blend is applied to the target given here; the release blends
      before MixToken's cls mixing, so for its exact order call `blend_ground_truth` before
      `mix_targets` and leave this None.

  The returned parts are unweighted: total = cls_weight * parts['cls'] +
  dense_weight * parts['dense'].
  """
  b, k = cls_logits.shape[0], cls_logits.shape[-1]
  if cls_logits.ndim != 2 or cls_target.shape != cls_logits.shape:
    raise ValueError(f'{_FILE}: cls_logits {cls_logits.shape} and cls_target '
                     f'{cls_target.shape} must both be (B, K).')
  if aux_logits.ndim != 3 or aux_logits.shape[0] != b or aux_logits.shape[-1] != k:
    raise ValueError(f'{_FILE}: aux_logits must be (B, N, K) = ({b}, N, {k}), got '
                     f'{aux_logits.shape}.')
  n = aux_logits.shape[1]
  if token_targets.size != b * n * k or token_targets.shape[0] != b:
    raise ValueError(f'{_FILE}: token_targets {token_targets.shape} do not match aux_logits '
                     f'{aux_logits.shape}; pass (B, gh, gw, K) with gh * gw = N (row-major) '
                     'or (B, N, K).')
  token_targets = token_targets.reshape(b, n, k)
  if ground_truth is not None:
    cls_target = blend_ground_truth(cls_target, ground_truth)
  cls_loss = jnp.mean(soft_cross_entropy(cls_logits, cls_target))
  dense_loss = jnp.mean(soft_cross_entropy(aux_logits, token_targets))
  total = cls_weight * cls_loss + dense_weight * dense_loss
  return total, {'cls': cls_loss, 'dense': dense_loss}
