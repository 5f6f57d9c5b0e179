"""A convolution whose kernel gradient is computed by matmuls on CPU (XLA:CPU's is ~20x slower).

XLA:CPU (jaxlib 0.10) runs f32 convolutions through YNNPACK. The forward pass and the input
gradient are fast, but the kernel gradient (a "convolution" whose window is the whole output
cotangent) is not: 1.7 s for the stem's 3x3 64->64 conv at batch 64 and 32x32, where the
forward takes 0.09 s (`benchmarks/results/train_step_cpu.txt`). Here the forward and the input
gradient stay XLA's convolution; the kernel gradient is written as matmuls: for kernel position
(i, j), dK[i, j] = (input seen through that position)^T . cotangent, contracted over batch and
output pixels, one dot per position (or one dot against all positions side by side when the
input has few channels). The products are the same, summed in another order: gradients equal
XLA's to float32 rounding, and the forward and input gradient are XLA's own.

`conv_general_dilated` is a drop-in for `nn.Conv(..., conv_general_dilated=...)`. It takes this
path on CPU (decided at trace time by `jax.default_backend()`) for plain NHWC/HWIO 2-D convs and
is `lax.conv_general_dilated` everywhere else (accelerators; dilated or grouped convs).
`use_matmul_grad(False)` forces the plain one (the tests compare the two).
"""
from __future__ import annotations

import contextlib
import functools
from typing import Iterator, Optional, Sequence, Tuple, Union

import jax
from jax import lax
import jax.numpy as jnp

Padding = Union[str, Sequence[Tuple[int, int]]]
Pads = Tuple[Tuple[int, int], Tuple[int, int]]

_NHWC = ('NHWC', 'HWIO', 'NHWC')
# Inputs with fewer channels get one dot against all kernel positions side by side (im2col):
# one dot per position would have a tiny output dimension (and many ops to compile).
_FEW_CHANNELS = 16
_force: Optional[bool] = None  # None: by backend; True / False: set by `use_matmul_grad`.


@contextlib.contextmanager
def use_matmul_grad(enabled: Optional[bool]) -> Iterator[None]:
  """Forces the matmul kernel gradient on (True) or off (False) for convs traced in the block.

  None: by backend (the default). `jax.jit` caches traces by function, not by this switch:
  trace a fresh function (or `.lower()` a new jit) inside the block.
  """
  global _force
  saved, _force = _force, enabled
  try:
    yield
  finally:
    _force = saved


def matmul_grad_enabled() -> bool:
  """Whether a conv traced now takes the matmul kernel gradient (CPU backend, unless forced)."""
  return jax.default_backend() == 'cpu' if _force is None else _force


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int],
                         padding: Padding, lhs_dilation: Optional[Sequence[int]] = None,
                         rhs_dilation: Optional[Sequence[int]] = None,
                         dimension_numbers=None, feature_group_count: int = 1,
                         batch_group_count: int = 1, precision=None,
                         preferred_element_type=None) -> jax.Array:
  """`lax.conv_general_dilated`; on CPU a plain 2-D NHWC/HWIO conv gets the matmul dK."""
  plain = (lhs.ndim == 4 and feature_group_count == 1 and batch_group_count == 1
           and preferred_element_type is None
           and all(d == 1 for d in tuple(lhs_dilation or ()) + tuple(rhs_dilation or ()))
           and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
           == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC))
  if not (plain and matmul_grad_enabled()):
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
        feature_group_count, batch_group_count, precision, preferred_element_type)
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
  pads = tuple((int(lo), int(hi)) for lo, hi in padding)
  return conv_matmul_grad(lhs, rhs, tuple(window_strides), pads, precision)


def _conv(x, kernel, strides, pads, precision):
  return lax.conv_general_dilated(x, kernel, strides, pads, dimension_numbers=_NHWC,
                                  precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv_matmul_grad(x: jax.Array, kernel: jax.Array, strides: Tuple[int, int], pads: Pads,
                     precision=None) -> jax.Array:
  """XLA's NHWC x HWIO convolution, with `kernel_grad` as its kernel gradient."""
  return _conv(x, kernel, strides, pads, precision)


def _fwd(x, kernel, strides, pads, precision):
  return _conv(x, kernel, strides, pads, precision), (x, kernel)


def _bwd(strides, pads, precision, residuals, ct):
  x, kernel = residuals
  _, x_vjp = jax.vjp(lambda x: _conv(x, kernel, strides, pads, precision), x)
  dk = kernel_grad(x, ct, kernel.shape, strides, pads, precision)
  return x_vjp(ct)[0], dk.astype(kernel.dtype)


conv_matmul_grad.defvjp(_fwd, _bwd)


def kernel_grad(x: jax.Array, ct: jax.Array, kernel_shape: Sequence[int],
                strides: Tuple[int, int], pads: Pads, precision=None) -> jax.Array:
  """d(sum(ct * conv(x, K)))/dK as matmuls over batch and output pixels, HWIO like K."""
  kh, kw, cin, cout = kernel_shape
  (sh, sw), (b, oh, ow, _) = strides, ct.shape
  # The cotangent leads, (out, pixels): its transpose is the smaller operand to copy.
  dims = (((0, 1, 2), (0, 1, 2)), ((), ()))
  if (kh, kw) == (sh, sw) and pads == ((0, 0), (0, 0)):
    # Patchify (`proj`): the windows tile the input, a reshape puts each under its pixel.
    x = x[:, :oh * kh, :ow * kw].reshape(b, oh, kh, ow, kw, cin)
    dk = lax.dot_general(ct, x, (((0, 1, 2), (0, 1, 3)), ((), ())), precision=precision)
    return dk.transpose(1, 2, 3, 0)  # (out, kh, kw, in) -> HWIO
  if cin < _FEW_CHANNELS:
    # One dot against every window position side by side (im2col), ordered (in, kh, kw).
    cols = lax.conv_general_dilated_patches(x, (kh, kw), strides, pads, dimension_numbers=_NHWC,
                                            precision=lax.Precision.HIGHEST)
    dk = lax.dot_general(ct, cols, dims, precision=precision)
    return dk.reshape(cout, cin, kh, kw).transpose(2, 3, 1, 0)
  # One dot per kernel position (i, j), against the input pixels it sees: (B, oh, ow, in).
  x = jnp.pad(x, ((0, 0), *pads, (0, 0)))
  taps = [lax.slice(x, (0, i, j, 0), (b, i + (oh - 1) * sh + 1, j + (ow - 1) * sw + 1, cin),
                    (1, sh, sw, 1)) for i in range(kh) for j in range(kw)]
  dk = jnp.stack([lax.dot_general(ct, t, dims, precision=precision) for t in taps])
  return dk.reshape(kh, kw, cout, cin).transpose(0, 1, 3, 2)
