"""The transformer blocks' dense layers, with a CPU lowering of their backward pass.

`nn.Dense` computes `x @ W` over tokens x of shape (B, N, D_in); autodiff turns it into
`dx = g W^T` and `dW = x^T g`, a contraction over the B*N rows of two 3-D arrays. XLA:CPU lays
that contraction out badly: it writes g column-major, from inside the fusion that produces it,
before a product whose operands are both transposed. `product()` gives `nn.Dense` (its
`dot_general` field) the same product with the backward written out: x and g flattened to rows,
the weight gradient as (g^T x)^T, whose small (D_out, D_in) transpose is all that moves. The
sums are the same up to their order in float32. Measured (benchmarks/results/train_step_cpu.txt,
the two steps alternating in one process, Intel CPU): the demo model's step 1.088x, with the
64-channel stem 1.035x, lvvit_s's at 224 px, batch 8, 1.076x.

`product()` returns it on the CPU backend only (`lowering.lowering()`); accelerators keep
`lax.dot_general` and XLA's own gradient. Parameters and checkpoints do not change.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import jax
from jax import lax

from lvvit_jax.models.lowering import lowering


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def matmul(x: jax.Array, w: jax.Array, precision=None) -> jax.Array:
  """x (..., D_in) @ w (D_in, D_out): `nn.Dense`'s product, with the backward below."""
  return lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), precision=precision)


def _matmul_fwd(x, w, precision):
  return matmul(x, w, precision), (x, w)


def _matmul_bwd(precision, residuals, g):
  x, w = residuals
  dx = lax.dot_general(g, w, (((g.ndim - 1,), (1,)), ((), ())), precision=precision)
  rows_x = x.reshape(-1, x.shape[-1])
  rows_g = g.reshape(-1, g.shape[-1])
  dw_t = lax.dot_general(rows_g, rows_x, (((0,), (0,)), ((), ())), precision=precision)
  return dx, dw_t.T


matmul.defvjp(_matmul_fwd, _matmul_bwd)


def _dense_dot_general(lhs, rhs, dimension_numbers, precision=None,
                       preferred_element_type=None):
  """`lax.dot_general`'s signature, for `nn.Dense(dot_general=...)`: `matmul` on Dense's
  contraction (the last axis of the input with the kernel's first), lax otherwise."""
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
  if (tuple(lhs_contract) == (lhs.ndim - 1,) and tuple(rhs_contract) == (0,) and rhs.ndim == 2
      and not lhs_batch and not rhs_batch and preferred_element_type is None):
    return matmul(lhs, rhs, precision)
  return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                         preferred_element_type=preferred_element_type)


def product() -> Optional[Callable]:
  """The `dot_general` to give `nn.Dense`: the CPU lowering, or None (Flax's default)."""
  return _dense_dot_general if lowering() == 'matmul' else None
