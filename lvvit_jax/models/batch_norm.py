"""BatchNorm + ReLU of the conv stem, with a CPU lowering whose reductions are matrix products.

`BatchNormReLU` has exactly `nn.BatchNorm`'s variables (params `scale`, `bias`; batch_stats
`mean`, `var`) and semantics (training: batch statistics, biased variance, running averages
`momentum * old + (1 - momentum) * batch`, not updated while initialising; eval: the running
statistics), followed by ReLU. Checkpoints and the converter see no difference.

Why: XLA:CPU rewrites every long reduction into reduce-window loops (its tree-reduction pass),
and `nn.BatchNorm`'s statistics over B*H*W positions per channel become its slowest ops: for
(64, 32, 32, 64) float32 (the demo's stem) BN + ReLU forward + backward takes 24-34 ms that way.
With the per-channel sums as batched ones-vector products over chunks of 32 rows (then a sum of
the chunk sums: as accurate as XLA's tree reduction) and the backward written out
(dx = scale / sigma * (g - mean(g) - x_hat * mean(g * x_hat)) on the ReLU's support): 7-8 ms.
`lowering.lowering()` picks it on the CPU backend only; accelerators keep XLA's reductions, in
`nn.BatchNorm`'s arithmetic. `LVVIT_JAX_CPU_LOWERING=0` turns it off (tests compare both).
"""
from __future__ import annotations

import functools
from typing import Any, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from lvvit_jax.models.lowering import lowering

CHUNK = 32  # rows per ones-vector product: the first level of a tree sum (XLA's reductions use 32)


def _channel_sum(x3: jax.Array) -> jax.Array:
  """Sum over axes 0 and 1 of (B, P, C): chunks of up to 32 rows summed as matrix products, then
  the chunk sums. As accurate as XLA's tree reduction (a single product over a whole image
  accumulates 3x the rounding, which Adam turns into different BatchNorm biases)."""
  b, p, c = x3.shape
  n = b * p
  k = max(d for d in range(1, CHUNK + 1) if n % d == 0)
  chunks = x3.reshape(n // k, k, c)
  return jnp.sum(jnp.matmul(jnp.ones((n // k, 1, k), x3.dtype), chunks), axis=(0, 1))


def _channel_mean(x3: jax.Array) -> jax.Array:
  return _channel_sum(x3) / (x3.shape[0] * x3.shape[1])


def _forward(x3, scale, bias, eps):
  mean = _channel_mean(x3)
  centred = x3 - mean
  var = _channel_mean(centred * centred)
  inv = jax.lax.rsqrt(var + eps)
  x_hat = centred * inv
  y = jnp.maximum(x_hat * scale + bias, 0)
  return y, mean, var, x_hat, inv


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_relu_train(x3: jax.Array, scale: jax.Array, bias: jax.Array,
                          eps: float) -> Tuple[jax.Array, jax.Array, jax.Array]:
  """Training-mode BN + ReLU of float32 (B, P, C): (y, batch mean (C,), biased var (C,)).

  The statistics are outputs for the running averages: their cotangents are ignored (they
  reach no loss; the gradient through them is part of x's, written out in `_backward`).
  """
  y, mean, var, _, _ = _forward(x3, scale, bias, eps)
  return y, mean, var


def _fwd(x3, scale, bias, eps):
  y, mean, var, x_hat, inv = _forward(x3, scale, bias, eps)
  return (y, mean, var), (x_hat, inv, scale, y)


def _backward(eps, res, cotangents):
  del eps
  x_hat, inv, scale, y = res
  g = jnp.where(y > 0, cotangents[0], 0)
  n = x_hat.shape[0] * x_hat.shape[1]
  d_bias = _channel_sum(g)
  d_scale = _channel_sum(g * x_hat)
  dx = (scale * inv) * (g - (d_bias + x_hat * d_scale) / n)
  return dx, d_scale, d_bias


batch_norm_relu_train.defvjp(_fwd, _backward)


class BatchNormReLU(nn.Module):
  """`nn.relu(nn.BatchNorm(...)(x, use_running_average))` with the CPU lowering above."""
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, use_running_average: bool) -> jax.Array:
    c = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (c,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
    ra_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable('batch_stats', 'var', lambda: jnp.ones((c,), jnp.float32))
    if use_running_average:
      mul = jax.lax.rsqrt(ra_var.value + self.epsilon) * scale  # nn.BatchNorm's order
      return nn.relu((x.astype(jnp.float32) - ra_mean.value) * mul + bias).astype(self.dtype)
    x3 = x.reshape(x.shape[0], -1, c).astype(jnp.float32)
    if lowering() == 'matmul':
      y, mean, var = batch_norm_relu_train(x3, scale, bias, self.epsilon)
    else:  # nn.BatchNorm's own arithmetic (its fast variance: E[x^2] - E[x]^2).
      mean = jnp.mean(x3, axis=(0, 1))
      var = jnp.maximum(jnp.mean(jnp.square(x3), axis=(0, 1)) - jnp.square(mean), 0)
      y = nn.relu((x3 - mean) * (jax.lax.rsqrt(var + self.epsilon) * scale) + bias)
    if not self.is_initializing():
      m = self.momentum
      ra_mean.value = m * ra_mean.value + (1 - m) * jax.lax.stop_gradient(mean)
      ra_var.value = m * ra_var.value + (1 - m) * jax.lax.stop_gradient(var)
    return y.reshape(x.shape).astype(self.dtype)
