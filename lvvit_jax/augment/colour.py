"""The colour RandAugment ops on one image: PIL `ImageOps` / `ImageEnhance` in JAX.

Images are float32 (H, W, 3) holding the integers 0..255 that a PIL uint8 image would hold;
every op returns such an image. The per-channel ops are look-up tables (`*_lut`, float32
(3, 256)) applied by `apply_lut`, so a RandAugment round selects one table and applies it once
instead of computing every op; Color and Sharpness blend with a degenerate image (grayscale,
smoothed) as PIL does. Statistics (histograms, means) use exact integer arithmetic where PIL's
is exact; blends use float32, as PIL's C code.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lvvit_jax.augment.geometry import check_image

_FILE = 'lvvit_jax/augment/colour.py'
_VALUES = np.arange(256, dtype=np.int32)  # NumPy: importing must not start a JAX backend.
_CHANNEL_OFFSET = np.array([0, 256, 512], np.uint32)


def _flat_index(image: jax.Array) -> jax.Array:
  """Index of each value in a flattened (3, 256) table (channel c at 256 c)."""
  return jnp.clip(image, 0, 255).astype(jnp.uint32) + _CHANNEL_OFFSET


def apply_lut(image: jax.Array, lut: jax.Array) -> jax.Array:
  """out[..., c] = lut[c, image[..., c]]; `lut` float32 (3, 256), image integer-valued."""
  return jnp.reshape(lut, (-1,)).at[_flat_index(image)].get(mode='promise_in_bounds')


def channel_histograms(image: jax.Array) -> jax.Array:
  """int32 (3, 256): per-channel counts of each value (PIL `Image.histogram`).

  One scatter-add of H*W*3 ones into 768 bins. On 2 CPU cores at batch 128 x 224 x 224 it takes
  about 0.08 s vmapped, against 0.8 s for a 16 x 16 (high, low nibble) one-hot factorisation
  contracted by a matmul and 2.8 s for a sort with `searchsorted`; a 256-wide one-hot per pixel
  is larger still. (A flat scatter with explicit batch offsets is ~0.05 s on CPU, but its
  indices hide the batch axis from SPMD partitioning, which the vmapped form keeps local.)
  """
  index = _flat_index(image).reshape(-1)
  hist = jnp.zeros((768,), jnp.int32).at[index].add(1, mode='promise_in_bounds')
  return hist.reshape(3, 256)


def grayscale(image: jax.Array) -> jax.Array:
  """PIL's "L" conversion, (19595 R + 38470 G + 7471 B + 2**15) >> 16, as float32 (H, W, 1)."""
  rgb = image.astype(jnp.int32)
  gray = (rgb[..., 0:1] * 19595 + rgb[..., 1:2] * 38470 + rgb[..., 2:3] * 7471 + 32768) >> 16
  return gray.astype(jnp.float32)


def mean_gray(image: jax.Array) -> jax.Array:
  """int(mean of the "L" image + 0.5), as PIL's `ImageEnhance.Contrast`, in exact integers."""
  gray = grayscale(image).astype(jnp.int32)
  n = gray.size
  total = jnp.sum(gray)  # <= 255 * H * W: exact in int32 below 8.4M pixels.
  quotient, remainder = total // n, total % n
  return (quotient + (2 * remainder >= n)).astype(jnp.float32)


def smooth(image: jax.Array) -> jax.Array:
  """PIL's `ImageFilter.SMOOTH` (3x3 kernel [1 1 1; 1 5 1; 1 1 1] / 13, rounded); border kept."""
  h, w = image.shape[:2]
  if h < 3 or w < 3:
    return image
  total = 4.0 * image[1:-1, 1:-1]  # the centre's weight 5: 4 here and 1 in the 3x3 sum.
  for dy in range(3):
    for dx in range(3):
      total = total + image[dy:h - 2 + dy, dx:w - 2 + dx]
  # Integer sums: total / 13 is never within 1 / 26 of a rounding boundary.
  inner = jnp.pad(jnp.floor(total / 13.0 + 0.5), ((1, 1), (1, 1), (0, 0)))
  interior = np.zeros((h, w, 1), bool)
  interior[1:-1, 1:-1] = True
  return jnp.where(interior, inner, image)


def blend(degenerate: jax.Array, image: jax.Array, factor) -> jax.Array:
  """PIL `Image.blend(degenerate, image, factor)`: float32 math, clipped, truncated."""
  out = degenerate + jnp.asarray(factor, jnp.float32) * (image - degenerate)
  return jnp.floor(jnp.clip(out, 0.0, 255.0))


def identity_lut() -> jax.Array:
  """float32 (3, 256) table that leaves every value unchanged."""
  return jnp.broadcast_to(jnp.asarray(_VALUES, jnp.float32), (3, 256))


def auto_contrast_lut(lo: jax.Array, hi: jax.Array) -> jax.Array:
  """PIL `ImageOps.autocontrast` table from per-channel (3,) min and max.

  floor((v - lo) * 255 / (hi - lo)) clipped to [0, 255], identity where hi <= lo, in exact
  integers. PIL evaluates `v * scale + offset` in double and truncates; at exact multiples its
  round-off sometimes lands one level lower (0.4% of the (lo, hi, v) cases; the channel maximum
  becomes 254 for 15% of (lo, hi) pairs): here those take the exact value.
  """
  lo = jnp.asarray(lo).astype(jnp.int32)[:, None]
  hi = jnp.asarray(hi).astype(jnp.int32)[:, None]
  lut = jnp.clip((_VALUES - lo) * 255 // jnp.maximum(hi - lo, 1), 0, 255)
  return jnp.where(hi > lo, lut, _VALUES).astype(jnp.float32)


def equalize_lut(hist: jax.Array) -> jax.Array:
  """PIL `ImageOps.equalize` table from int32 (3, 256) histograms (exact integers).

  step = (count - count of the last non-empty bin) // 255; lut[v] = (step // 2 + number of
  values below v) // step, clipped to 255 (PIL clips tables); identity where step is 0.
  """
  hist = jnp.asarray(hist, jnp.int32)
  last_bin = 255 - jnp.argmax(hist[:, ::-1] > 0, axis=1)
  last_count = jnp.take_along_axis(hist, last_bin[:, None], axis=1)[:, 0]
  step = (jnp.sum(hist, axis=1) - last_count) // 255
  safe_step = jnp.maximum(step, 1)[:, None]
  below = jnp.cumsum(hist, axis=1) - hist
  lut = jnp.minimum((below + safe_step // 2) // safe_step, 255)
  return jnp.where(step[:, None] > 0, lut, _VALUES).astype(jnp.float32)


def invert_lut() -> jax.Array:
  """255 - v (PIL `ImageOps.invert`)."""
  return 255.0 - identity_lut()


def posterize_lut(bits) -> jax.Array:
  """Keeps the `bits` (0..8) most significant bits (PIL `ImageOps.posterize`; 0 gives black)."""
  shift = 8 - jnp.clip(jnp.asarray(bits).astype(jnp.int32), 0, 8)
  lut = (_VALUES >> shift) << shift
  return jnp.broadcast_to(lut.astype(jnp.float32), (3, 256))


def solarize_lut(threshold) -> jax.Array:
  """Inverts the values >= threshold (PIL `ImageOps.solarize`)."""
  v = identity_lut()
  return jnp.where(v < jnp.asarray(threshold, jnp.float32), v, 255.0 - v)


def solarize_add_lut(addition, threshold=128) -> jax.Array:
  """Adds `addition` (saturating) to the values < threshold (timm `solarize_add`)."""
  v = identity_lut()
  added = jnp.minimum(v + jnp.asarray(addition, jnp.float32), 255.0)
  return jnp.where(v < jnp.asarray(threshold, jnp.float32), added, v)


def brightness_lut(factor) -> jax.Array:
  """Blend with black (PIL `ImageEnhance.Brightness`), as a table."""
  v = identity_lut()
  return blend(jnp.zeros_like(v), v, factor)


def contrast_lut(mean, factor) -> jax.Array:
  """Blend with the uniform image of grey level `mean` (PIL `ImageEnhance.Contrast`)."""
  v = identity_lut()
  return blend(jnp.full_like(v, jnp.asarray(mean, jnp.float32)), v, factor)


def auto_contrast(image: jax.Array) -> jax.Array:
  """Stretches each channel's [min, max] to [0, 255] (PIL `ImageOps.autocontrast`)."""
  image = check_image(image, _FILE)
  return apply_lut(image, auto_contrast_lut(image.min(axis=(0, 1)), image.max(axis=(0, 1))))


def equalize(image: jax.Array) -> jax.Array:
  """Per-channel histogram equalisation (PIL `ImageOps.equalize`)."""
  image = check_image(image, _FILE)
  return apply_lut(image, equalize_lut(channel_histograms(image)))


def invert(image: jax.Array) -> jax.Array:
  """255 - x (PIL `ImageOps.invert`)."""
  return 255.0 - check_image(image, _FILE)


def posterize(image: jax.Array, bits) -> jax.Array:
  """PIL `ImageOps.posterize` (0 bits gives black, as older PIL and timm)."""
  return apply_lut(check_image(image, _FILE), posterize_lut(bits))


def solarize(image: jax.Array, threshold) -> jax.Array:
  """PIL `ImageOps.solarize`."""
  return apply_lut(check_image(image, _FILE), solarize_lut(threshold))


def solarize_add(image: jax.Array, addition, threshold=128) -> jax.Array:
  """timm `solarize_add`."""
  return apply_lut(check_image(image, _FILE), solarize_add_lut(addition, threshold))


def color(image: jax.Array, factor) -> jax.Array:
  """Blends with the grayscale image (PIL `ImageEnhance.Color`)."""
  image = check_image(image, _FILE)
  return blend(grayscale(image), image, factor)


def contrast(image: jax.Array, factor) -> jax.Array:
  """Blends with the mean grey level (PIL `ImageEnhance.Contrast`)."""
  image = check_image(image, _FILE)
  return apply_lut(image, contrast_lut(mean_gray(image), factor))


def brightness(image: jax.Array, factor) -> jax.Array:
  """Blends with black (PIL `ImageEnhance.Brightness`)."""
  return apply_lut(check_image(image, _FILE), brightness_lut(factor))


def sharpness(image: jax.Array, factor) -> jax.Array:
  """Blends with the SMOOTH-filtered image (PIL `ImageEnhance.Sharpness`)."""
  image = check_image(image, _FILE)
  return blend(smooth(image), image, factor)
