"""The geometric RandAugment ops on one image: PIL's bilinear AFFINE transform in JAX.

Images are float32 (H, W, C) holding the integers 0..255 that a PIL uint8 image would hold.
Every op returns `(image, affine)`: `affine` is a float32 (3, 3) matrix taking (y, x, 1),
normalised over the op's OUTPUT image, to (y, x, 1) normalised over its INPUT image. Chains
compose by right multiplication, as `lvvit_jax.data.augment.crop_affine` starts them.

Normalised coordinates (shared with `lvvit_jax.token_labeling`): continuous, 0 is the top/left
edge of the first pixel and 1 the bottom/right edge of the last; pixel j of n is centred at
(j + 0.5) / n. Pixel matrices use the same (y, x, 1) order in continuous pixel coordinates.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from lvvit_jax.augment.config import FILL

_FILE = 'lvvit_jax/augment/geometry.py'


def check_image(image: jax.Array, where: str = _FILE) -> jax.Array:
  """Returns `image` as float32 after checking it is one (H, W, 3) image."""
  if image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f'{where}: expected one RGB image (H, W, 3), got shape {image.shape}; '
                     'vmap the op over a batch.')
  return jnp.asarray(image, jnp.float32)


def geometric_matrix(height, width, degrees=0.0, shear_x_factor=0.0, shear_y_factor=0.0,
                     translate_x_px=0.0, translate_y_px=0.0) -> jax.Array:
  """PIL's output->input matrix of ONE geometric op, float32 (3, 3) on (y, x, 1) in pixels.

  Exactly one argument is meant to be non-zero; all zero give exactly the identity. In PIL's
  terms, on (x, y):
    rotate (`Image.rotate(degrees)`, counter-clockwise about the centre (w/2, h/2)):
      x_in = c dx - s dy + w/2, y_in = s dx + c dy + h/2, (dx, dy) = (x - w/2, y - h/2);
    shear x: AFFINE (1, f, 0, 0, 1, 0), x_in = x + f y;
    shear y: AFFINE (1, 0, 0, f, 1, 0), y_in = y + f x;
    translate: AFFINE (1, 0, tx, 0, 1, ty), x_in = x + tx, y_in = y + ty.
  """
  f32 = lambda v: jnp.asarray(v, jnp.float32)
  h, w = f32(height), f32(width)
  theta = f32(degrees) * (math.pi / 180.0)
  c, s = jnp.cos(theta), jnp.sin(theta)
  cy, cx = h / 2.0, w / 2.0
  zero, one = jnp.zeros((), jnp.float32), jnp.ones((), jnp.float32)
  return jnp.stack([
      jnp.stack([c, s + f32(shear_y_factor), cy - c * cy - s * cx + f32(translate_y_px)]),
      jnp.stack([f32(shear_x_factor) - s, c, cx + s * cy - c * cx + f32(translate_x_px)]),
      jnp.stack([zero, zero, one]),
  ])


def pixel_to_normalized(matrix: jax.Array, in_hw: Tuple[int, int],
                        out_hw: Tuple[int, int]) -> jax.Array:
  """Converts an output->input (3, 3) map from continuous pixel to normalised coordinates."""
  # diag(1 / in_hw, 1) @ matrix @ diag(out_hw, 1), elementwise.
  rows = np.array([1.0 / in_hw[0], 1.0 / in_hw[1], 1.0], np.float32)[:, None]
  cols = np.array([out_hw[0], out_hw[1], 1.0], np.float32)[None, :]
  return jnp.asarray(matrix, jnp.float32) * rows * cols


def compose(a: jax.Array, b: jax.Array) -> jax.Array:
  """a @ b for (3, 3) maps, as explicit products and sums.

  Elementwise arithmetic, so the result does not depend on how XLA tiles a batched dot, i.e.
  on the batch size or the device layout.
  """
  return a[:, 0:1] * b[0:1, :] + a[:, 1:2] * b[1:2, :] + a[:, 2:3] * b[2:3, :]


def warp_affine(image: jax.Array, matrix: jax.Array, fill: Sequence[float] = FILL,
                out_hw: Optional[Tuple[int, int]] = None) -> jax.Array:
  """Warps `image` (H, W, C) by an output->input affine, as PIL's AFFINE BILINEAR transform.

  The output pixel centred at p = (i + 0.5, j + 0.5) takes the bilinear sample of `image` at
  q = `matrix @ p` ((y, x, 1), continuous pixel coordinates): with (y, x) = q - 0.5, the
  neighbours floor(y) + {0, 1}, floor(x) + {0, 1} are clamped to the image and interpolated
  first along x, then along y, in PIL's order of operations. Where q lies outside
  [0, H) x [0, W) the pixel takes `fill`. The result is not rounded (`pil_warp` truncates it,
  as PIL does). The output has the input's size unless `out_hw` gives another; the identity
  matrix returns `image` exactly.
  """
  image = jnp.asarray(image, jnp.float32)
  h, w, channels = image.shape
  out_h, out_w = out_hw or (h, w)
  m = jnp.asarray(matrix, jnp.float32)
  ys = jnp.arange(out_h, dtype=jnp.float32)[:, None] + 0.5
  xs = jnp.arange(out_w, dtype=jnp.float32)[None, :] + 0.5
  src_y = m[0, 0] * ys + m[0, 1] * xs + m[0, 2]
  src_x = m[1, 0] * ys + m[1, 1] * xs + m[1, 2]
  inside = (src_y >= 0) & (src_y < h) & (src_x >= 0) & (src_x < w)
  fy, fx = src_y - 0.5, src_x - 0.5
  # Far-away points are clipped before the int cast; they take the fill anyway.
  y0 = jnp.floor(jnp.clip(fy, -1.0, h))
  x0 = jnp.floor(jnp.clip(fx, -1.0, w))
  dy, dx = (fy - y0)[..., None], (fx - x0)[..., None]
  y0, x0 = y0.astype(jnp.int32), x0.astype(jnp.int32)
  row0, row1 = jnp.clip(y0, 0, h - 1) * w, jnp.clip(y0 + 1, 0, h - 1) * w
  col0, col1 = jnp.clip(x0, 0, w - 1), jnp.clip(x0 + 1, 0, w - 1)
  flat = image.reshape(h * w, channels)
  v00, v01, v10, v11 = flat[row0 + col0], flat[row0 + col1], flat[row1 + col0], flat[row1 + col1]
  top = v00 + (v01 - v00) * dx
  bottom = v10 + (v11 - v10) * dx
  out = top + (bottom - top) * dy
  return jnp.where(inside[..., None], out, jnp.asarray(fill, jnp.float32))


def pil_warp(image: jax.Array, matrix: jax.Array, fill: Sequence[float] = FILL) -> jax.Array:
  """`warp_affine` truncated to integers, as PIL stores the bilinear sample in a uint8.

  The epsilon absorbs float32 round-off just below an integer (PIL interpolates in double).
  """
  return jnp.floor(warp_affine(image, matrix, fill) + 1e-3)


def _geometric(image, matrix, fill) -> Tuple[jax.Array, jax.Array]:
  image = check_image(image)
  hw = image.shape[:2]
  return pil_warp(image, matrix, fill), pixel_to_normalized(matrix, hw, hw)


def rotate(image: jax.Array, degrees, fill: Sequence[float] = FILL):
  """Rotates counter-clockwise by `degrees` about the centre (PIL `Image.rotate`).

  Returns:
    (image, affine): the rotated image and its normalised output->input (3, 3) map.
  """
  h, w = image.shape[:2]
  return _geometric(image, geometric_matrix(h, w, degrees=degrees), fill)


def shear_x(image: jax.Array, factor, fill: Sequence[float] = FILL):
  """PIL affine (1, factor, 0, 0, 1, 0), x_in = x + factor y: (image, affine)."""
  h, w = image.shape[:2]
  return _geometric(image, geometric_matrix(h, w, shear_x_factor=factor), fill)


def shear_y(image: jax.Array, factor, fill: Sequence[float] = FILL):
  """PIL affine (1, 0, 0, factor, 1, 0), y_in = y + factor x: (image, affine)."""
  h, w = image.shape[:2]
  return _geometric(image, geometric_matrix(h, w, shear_y_factor=factor), fill)


def translate_x_rel(image: jax.Array, pct, fill: Sequence[float] = FILL):
  """PIL affine (1, 0, pct * width, 0, 1, 0), x_in = x + pct * width: (image, affine)."""
  h, w = image.shape[:2]
  return _geometric(image, geometric_matrix(h, w, translate_x_px=pct * w), fill)


def translate_y_rel(image: jax.Array, pct, fill: Sequence[float] = FILL):
  """PIL affine (1, 0, 0, 0, 1, pct * height), y_in = y + pct * height: (image, affine)."""
  h, w = image.shape[:2]
  return _geometric(image, geometric_matrix(h, w, translate_y_px=pct * h), fill)
