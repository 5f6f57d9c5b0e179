"""The 15 RandAugment ops by name, with timm's level -> argument mapping, on one image.

An op takes an image (float32 (H, W, 3) holding integers 0..255), a level on timm's 0..10 scale
and `negate` (the negative side of signed ops); both may be traced, so ops vmap over a batch.
It returns `(image, affine)`: the normalised output->input (3, 3) map of `geometry.py` (the
identity for colour ops). The mapping is timm's for `_RAND_INCREASING_TRANSFORMS`, as in
`benchmarks/pil_augment.py`:

  Rotate                  +-30 degrees * level / 10
  ShearX, ShearY          +-0.3 * level / 10
  TranslateXRel, ...YRel  +-0.45 * level / 10 of the width / height
  PosterizeIncreasing     4 - int(level / 10 * 4) bits
  SolarizeIncreasing      threshold 256 - min(256, int(level / 10 * 256))
  SolarizeAdd             add min(128, int(level / 10 * 110)) below 128
  Color, Contrast, Brightness, SharpnessIncreasing   factor max(0.1, 1 +- 0.9 * level / 10)
  AutoContrast, Equalize, Invert                      no argument

Geometric ops are PIL `Image.transform(AFFINE, BILINEAR)` with the fill colour (timm draws
bilinear or bicubic; this warp is bilinear only, as the TF pipeline's).
"""
from __future__ import annotations

import functools
from typing import Callable, Dict, Sequence, Tuple

import jax
import jax.numpy as jnp

from lvvit_jax.augment import colour
from lvvit_jax.augment import geometry
from lvvit_jax.augment.config import FILL
from lvvit_jax.augment.config import GEOMETRIC_OPS
from lvvit_jax.augment.config import MAX_LEVEL
from lvvit_jax.augment.config import check_ops

_FILE = 'lvvit_jax/augment/ops.py'


def signed(value: jax.Array, negate) -> jax.Array:
  """-value if `negate` else value (timm's `_randomly_negate` after its draw)."""
  return jnp.where(negate, -value, value)


def enhance_factor(level, negate) -> jax.Array:
  """Color / Contrast / Brightness / Sharpness: max(0.1, 1 +- level / 10 * 0.9)."""
  level = jnp.asarray(level, jnp.float32)
  return jnp.maximum(0.1, 1.0 + signed(level / MAX_LEVEL * 0.9, negate))


def posterize_bits(level) -> jax.Array:
  """PosterizeIncreasing: 4 - int(level / 10 * 4)."""
  return 4.0 - jnp.floor(jnp.asarray(level, jnp.float32) / MAX_LEVEL * 4.0)


def solarize_threshold(level) -> jax.Array:
  """SolarizeIncreasing: 256 - min(256, int(level / 10 * 256))."""
  level = jnp.asarray(level, jnp.float32)
  return 256.0 - jnp.minimum(256.0, jnp.floor(level / MAX_LEVEL * 256.0))


def solarize_addition(level) -> jax.Array:
  """SolarizeAdd: min(128, int(level / 10 * 110))."""
  return jnp.minimum(128.0, jnp.floor(jnp.asarray(level, jnp.float32) / MAX_LEVEL * 110.0))


# Geometric op -> (`geometric_matrix` keyword, its value at level 10, image axis it scales by).
GEOMETRIC_ARGS = {
    'Rotate': ('degrees', 30.0, None),
    'ShearX': ('shear_x_factor', 0.3, None),
    'ShearY': ('shear_y_factor', 0.3, None),
    'TranslateXRel': ('translate_x_px', 0.45, 1),
    'TranslateYRel': ('translate_y_px', 0.45, 0),
}


def geometric_level_matrix(amounts: Dict[str, jax.Array], height: int,
                           width: int) -> jax.Array:
  """Pixel matrix from {geometric op name: signed level / 10}; missing ops count as 0.

  With one non-zero amount this is that op's matrix; with all zero, exactly the identity. One
  formula for every op, so a RandAugment round needs one warp, not five.
  """
  kwargs = {}
  for name, (keyword, max_value, axis) in GEOMETRIC_ARGS.items():
    value = jnp.asarray(amounts.get(name, 0.0), jnp.float32) * max_value
    kwargs[keyword] = value if axis is None else value * (height, width)[axis]
  return geometry.geometric_matrix(height, width, **kwargs)


class ImageStats:
  """Statistics of one image that the table ops need, each computed on first use.

  With `histogram_for_range`, the per-channel min and max come from the histogram (which
  Equalize computes anyway) instead of two more passes over the image.
  """

  def __init__(self, image: jax.Array, histogram_for_range: bool = False):
    self.image = image
    self.histogram_for_range = histogram_for_range

  @functools.cached_property
  def histograms(self) -> jax.Array:
    return colour.channel_histograms(self.image)

  @functools.cached_property
  def min_max(self) -> Tuple[jax.Array, jax.Array]:
    if not self.histogram_for_range:
      return self.image.min(axis=(0, 1)), self.image.max(axis=(0, 1))
    nonzero = self.histograms > 0
    return jnp.argmax(nonzero, axis=1), 255 - jnp.argmax(nonzero[:, ::-1], axis=1)

  @functools.cached_property
  def mean_gray(self) -> jax.Array:
    return colour.mean_gray(self.image)


# Colour ops that are a per-channel table: name -> fn(stats, level, negate) -> (3, 256) table.
LUT_FNS: Dict[str, Callable] = {
    'AutoContrast': lambda st, lv, neg: colour.auto_contrast_lut(*st.min_max),
    'Equalize': lambda st, lv, neg: colour.equalize_lut(st.histograms),
    'Invert': lambda st, lv, neg: colour.invert_lut(),
    'PosterizeIncreasing': lambda st, lv, neg: colour.posterize_lut(posterize_bits(lv)),
    'SolarizeIncreasing': lambda st, lv, neg: colour.solarize_lut(solarize_threshold(lv)),
    'SolarizeAdd': lambda st, lv, neg: colour.solarize_add_lut(solarize_addition(lv)),
    'ContrastIncreasing': lambda st, lv, neg: colour.contrast_lut(st.mean_gray,
                                                                  enhance_factor(lv, neg)),
    'BrightnessIncreasing': lambda st, lv, neg: colour.brightness_lut(enhance_factor(lv, neg)),
}
# Colour ops that blend with a degenerate image: name -> fn(image) -> degenerate image.
DEGENERATE_FNS: Dict[str, Callable] = {
    'ColorIncreasing': colour.grayscale,
    'SharpnessIncreasing': colour.smooth,
}
LUT_OPS = tuple(LUT_FNS)
BLEND_OPS = tuple(DEGENERATE_FNS)
COLOUR_OPS = LUT_OPS + BLEND_OPS


def apply_op(image: jax.Array, name: str, level, negate=False,
             fill: Sequence[float] = FILL) -> Tuple[jax.Array, jax.Array]:
  """Applies one named op at `level` (clipped to [0, 10]), as timm's `AugmentOp` after its draws.

  Args:
    image: float32 (H, W, 3) holding integers in [0, 255].
    name: one of RAND_INCREASING_OPS (static).
    level: magnitude on timm's 0..10 scale (may be traced).
    negate: whether signed ops take the negative side (may be traced).
    fill: RGB fill for the geometric ops.

  Returns:
    (image, affine): the integer-valued float32 image and the normalised output->input (3, 3)
    map (the identity for colour ops).
  """
  (name,) = check_ops([name])
  image = geometry.check_image(image, _FILE)
  level = jnp.clip(jnp.asarray(level, jnp.float32), 0.0, MAX_LEVEL)
  h, w = image.shape[:2]
  if name in GEOMETRIC_OPS:
    matrix = geometric_level_matrix({name: signed(level / MAX_LEVEL, negate)}, h, w)
    return (geometry.pil_warp(image, matrix, fill),
            geometry.pixel_to_normalized(matrix, (h, w), (h, w)))
  if name in LUT_FNS:
    out = colour.apply_lut(image, LUT_FNS[name](ImageStats(image), level, negate))
  else:
    out = colour.blend(DEGENERATE_FNS[name](image), image, enhance_factor(level, negate))
  return out, jnp.eye(3, dtype=jnp.float32)
