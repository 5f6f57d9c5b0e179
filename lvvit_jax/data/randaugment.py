"""RandAugment (timm `rand-m9-mstd0.5-inc1`) in TensorFlow graph ops, with affine tracking.

Every op works on one float32 image (H, W, 3) holding integer values in [0, 255] (the values a PIL
uint8 image would hold; each op rounds its result) and returns `(image, affine)`: `affine` is a
float32 (3, 3) matrix taking (y, x, 1), normalised over the op's OUTPUT image, to (y, x, 1)
normalised over its INPUT image. Photometric ops return the identity. Composing the matrices of
a chain of ops by right-multiplication gives the map from the final image back to the first.

Normalised coordinates (shared with `lvvit_jax.token_labeling`): continuous, 0 is the top/left
edge of the first pixel and 1 the bottom/right edge of the last; pixel j of n has its centre at
(j + 0.5) / n. Geometric ops follow PIL's `Image.transform(AFFINE)` exactly: the output pixel
centred at p samples the input bilinearly at `M p` (continuous pixel coordinates), neighbours
outside the image are clamped to the edge, and points outside the image take the fill colour.

Ops, levels and randomness follow timm's `RandAugment` with `_RAND_INCREASING_TRANSFORMS`:
`num_ops` ops drawn uniformly with replacement; each is applied with probability `prob`; each
application draws its magnitude from N(magnitude, magnitude_std) clipped to [0, 10] and, for
signed ops, a random sign. Geometric ops resample bilinearly (timm picks bilinear or bicubic at
random; `ImageProjectiveTransformV3` has no bicubic) and fill with the ImageNet mean
(124, 116, 104). All randomness is stateless, from the (2,) seed passed in.
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple

import tensorflow as tf

# The functions here use explicit tf.cond / tf.switch_case, so AutoGraph has nothing to convert;
# skipping it cuts the first trace inside Dataset.map from ~15 s to ~2 s.
_no_autograph = tf.autograph.experimental.do_not_convert

MAX_LEVEL = 10.0
FILL = (124, 116, 104)  # timm `img_mean`: round(255 * ImageNet mean).

RAND_INCREASING_OPS = (
    'AutoContrast', 'Equalize', 'Invert', 'Rotate', 'PosterizeIncreasing',
    'SolarizeIncreasing', 'SolarizeAdd', 'ColorIncreasing', 'ContrastIncreasing',
    'BrightnessIncreasing', 'SharpnessIncreasing', 'ShearX', 'ShearY', 'TranslateXRel',
    'TranslateYRel',
)
GEOMETRIC_OPS = ('Rotate', 'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel')
PHOTOMETRIC_OPS = tuple(op for op in RAND_INCREASING_OPS if op not in GEOMETRIC_OPS)


# ---------------------------------------------------------------------------------------------
# Geometry.


def _matrix(rows) -> tf.Tensor:
  """Stacks a nested list of scalars (Python or tensors) into a float32 (3, 3) matrix."""
  return tf.stack([tf.stack([tf.cast(v, tf.float32) for v in row]) for row in rows])


def _image_hw(image: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor]:
  shape = tf.shape(image)
  return tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)


@_no_autograph
def pixel_to_normalized(matrix: tf.Tensor, in_hw, out_hw) -> tf.Tensor:
  """Converts an output->input map in continuous pixel coordinates to normalised coordinates.

  Args:
    matrix: float32 (3, 3) on (y, x, 1), continuous pixel coordinates (0 = top/left edge).
    in_hw: (height, width) of the input image (scalars, Python or tensors).
    out_hw: (height, width) of the output image.

  Returns:
    float32 (3, 3) on (y, x, 1) normalised to [0, 1] over each image.
  """
  d_in_inv = _matrix([[1.0 / tf.cast(in_hw[0], tf.float32), 0, 0],
                      [0, 1.0 / tf.cast(in_hw[1], tf.float32), 0], [0, 0, 1]])
  d_out = _matrix([[out_hw[0], 0, 0], [0, out_hw[1], 0], [0, 0, 1]])
  return d_in_inv @ tf.cast(matrix, tf.float32) @ d_out


@_no_autograph
def warp_affine(image: tf.Tensor, matrix: tf.Tensor, fill: Sequence[float] = FILL) -> tf.Tensor:
  """Warps `image` (H, W, C) by an output->input affine, as PIL's AFFINE transform does.

  The output pixel centred at p = (i + 0.5, j + 0.5) takes the bilinear sample of `image` at
  `matrix @ p` (continuous pixel coordinates, (y, x, 1) order) with neighbours clamped to the
  edge; where `matrix @ p` lies outside [0, H) x [0, W) it takes `fill` instead. The output has
  the input's size.

  `ImageProjectiveTransformV3` puts pixel centres at integer coordinates, so the matrix is
  conjugated by a half-pixel shift; its scalar `fill_value` cannot give a colour, so it clamps
  (`NEAREST`) and the fill region is computed here from the same matrix.
  """
  matrix = tf.cast(matrix, tf.float32)
  to_index = _matrix([[1, 0, -0.5], [0, 1, -0.5], [0, 0, 1]])
  from_index = _matrix([[1, 0, 0.5], [0, 1, 0.5], [0, 0, 1]])
  m = to_index @ matrix @ from_index
  # The op maps (x, y) to (a0 x + a1 y + a2, a3 x + a4 y + a5); ours maps (y, x).
  transform = tf.stack([m[1, 1], m[1, 0], m[1, 2], m[0, 1], m[0, 0], m[0, 2], 0.0, 0.0])
  shape = tf.shape(image)
  warped = tf.raw_ops.ImageProjectiveTransformV3(
      images=tf.cast(image, tf.float32)[None],
      transforms=transform[None],
      output_shape=shape[:2],
      fill_value=0.0,
      interpolation='BILINEAR',
      fill_mode='NEAREST')[0]
  h, w = _image_hw(image)
  ys = tf.range(h, dtype=tf.float32)[:, None] + 0.5
  xs = tf.range(w, dtype=tf.float32)[None, :] + 0.5
  src_y = matrix[0, 0] * ys + matrix[0, 1] * xs + matrix[0, 2]
  src_x = matrix[1, 0] * ys + matrix[1, 1] * xs + matrix[1, 2]
  inside = (src_y >= 0) & (src_y < h) & (src_x >= 0) & (src_x < w)
  fill = tf.constant(fill, tf.float32)
  out = tf.where(inside[..., None], warped, fill)
  out.set_shape(image.shape)
  return out


def _pil_warp(image: tf.Tensor, matrix_px: tf.Tensor, fill: Sequence[float]) -> tf.Tensor:
  # PIL truncates the interpolated value to uint8; the epsilon absorbs float32 round-off.
  return tf.floor(warp_affine(image, matrix_px, fill) + 1e-3)


def _geometric(image: tf.Tensor, matrix_px: tf.Tensor,
               fill: Sequence[float]) -> Tuple[tf.Tensor, tf.Tensor]:
  hw = _image_hw(image)
  return _pil_warp(image, matrix_px, fill), pixel_to_normalized(matrix_px, hw, hw)


@_no_autograph
def geometric_matrix(height, width, degrees=0.0, shear_x_factor=0.0, shear_y_factor=0.0,
                     translate_x_px=0.0, translate_y_px=0.0) -> tf.Tensor:
  """PIL's output->input matrix of ONE geometric op, in continuous pixel coordinates.

  Exactly one argument is meant to be non-zero (RandAugment applies one op per slot; with all
  zero it is the identity). In PIL's terms, on (x, y):
    rotate (`Image.rotate(degrees)`, counter-clockwise about the centre (w/2, h/2)):
      x_in = c dx - s dy + w/2, y_in = s dx + c dy + h/2, (dx, dy) = (x - w/2, y - h/2);
    shear x: AFFINE (1, f, 0, 0, 1, 0), x_in = x + f y;
    shear y: AFFINE (1, 0, 0, f, 1, 0), y_in = y + f x;
    translate: AFFINE (1, 0, tx, 0, 1, ty), x_in = x + tx, y_in = y + ty.
  Their sum of deviations from the identity is built as one formula, so the chain needs no
  branch per op (untaken tf.data branches are not free).

  Returns:
    float32 (3, 3) on (y, x, 1).
  """
  h = tf.cast(height, tf.float32)
  w = tf.cast(width, tf.float32)
  theta = tf.cast(degrees, tf.float32) * (math.pi / 180.0)
  c, s = tf.cos(theta), tf.sin(theta)
  cy, cx = h / 2.0, w / 2.0
  return _matrix([
      [c, s + shear_y_factor, cy - c * cy - s * cx + translate_y_px],
      [shear_x_factor - s, c, cx + s * cy - c * cx + translate_x_px],
      [0, 0, 1],
  ])


@_no_autograph
def rotate(image: tf.Tensor, degrees, fill: Sequence[float] = FILL):
  """Rotates counter-clockwise by `degrees` about the image centre (PIL `Image.rotate`).

  Returns:
    (image, affine): the rotated image and its normalised output->input (3, 3) map.
  """
  h, w = _image_hw(image)
  return _geometric(image, geometric_matrix(h, w, degrees=degrees), fill)


@_no_autograph
def shear_x(image: tf.Tensor, factor, fill: Sequence[float] = FILL):
  """PIL affine (1, factor, 0, 0, 1, 0): x_in = x + factor * y, about the top-left corner."""
  h, w = _image_hw(image)
  return _geometric(image, geometric_matrix(h, w, shear_x_factor=factor), fill)


@_no_autograph
def shear_y(image: tf.Tensor, factor, fill: Sequence[float] = FILL):
  """PIL affine (1, 0, 0, factor, 1, 0): y_in = y + factor * x, about the top-left corner."""
  h, w = _image_hw(image)
  return _geometric(image, geometric_matrix(h, w, shear_y_factor=factor), fill)


@_no_autograph
def translate_x_rel(image: tf.Tensor, pct, fill: Sequence[float] = FILL):
  """PIL affine (1, 0, pct * width, 0, 1, 0): x_in = x + pct * width."""
  h, w = _image_hw(image)
  return _geometric(image, geometric_matrix(h, w, translate_x_px=pct * w), fill)


@_no_autograph
def translate_y_rel(image: tf.Tensor, pct, fill: Sequence[float] = FILL):
  """PIL affine (1, 0, 0, 0, 1, pct * height): y_in = y + pct * height."""
  h, w = _image_hw(image)
  return _geometric(image, geometric_matrix(h, w, translate_y_px=pct * h), fill)


# ---------------------------------------------------------------------------------------------
# Photometric ops (PIL ImageOps / ImageEnhance semantics on integer-valued float32 images).


def _grayscale(image: tf.Tensor) -> tf.Tensor:
  """PIL's "L" conversion, (19595 R + 38470 G + 7471 B + 2**15) >> 16, as float32 (H, W, 1)."""
  rgb = tf.cast(tf.round(image), tf.int32)
  weights = tf.constant([19595, 38470, 7471], tf.int32)
  gray = tf.bitwise.right_shift(tf.reduce_sum(rgb * weights, axis=-1, keepdims=True) + 32768, 16)
  return tf.cast(gray, tf.float32)


def _blend(degenerate: tf.Tensor, image: tf.Tensor, factor) -> tf.Tensor:
  """PIL `Image.blend(degenerate, image, factor)`: clipped, then truncated to an integer."""
  out = degenerate + tf.cast(factor, tf.float32) * (image - degenerate)
  return tf.floor(tf.clip_by_value(out, 0.0, 255.0))


@_no_autograph
def auto_contrast(image: tf.Tensor) -> tf.Tensor:
  """Stretches each channel's [min, max] to [0, 255] (PIL `ImageOps.autocontrast`)."""
  lo = tf.reduce_min(image, axis=[0, 1])
  hi = tf.reduce_max(image, axis=[0, 1])
  scale = 255.0 / tf.maximum(hi - lo, 1.0)
  stretched = tf.clip_by_value(tf.floor(image * scale - lo * scale), 0.0, 255.0)
  return tf.where(hi > lo, stretched, image)


@_no_autograph
def equalize(image: tf.Tensor) -> tf.Tensor:
  """Histogram equalisation per channel (PIL `ImageOps.equalize`)."""
  values = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.int32)
  values = values + tf.constant([0, 256, 512], tf.int32)
  hist = tf.reshape(
      tf.math.bincount(tf.reshape(values, [-1]), minlength=768, maxlength=768), (3, 256))
  # PIL: step = (sum of the histogram - count of the last non-empty bin) // 255.
  last_bin = 255 - tf.argmax(tf.cast(tf.reverse(hist, axis=[1]) > 0, tf.int32), axis=1,
                             output_type=tf.int32)
  last_count = tf.gather(hist, last_bin, axis=1, batch_dims=1)
  step = (tf.reduce_sum(hist, axis=1) - last_count) // 255
  safe_step = tf.maximum(step, 1)[:, None]
  lut = (tf.cumsum(hist, axis=1, exclusive=True) + safe_step // 2) // safe_step
  lut = tf.minimum(lut, 255)
  lut = tf.where(step[:, None] > 0, lut, tf.range(256, dtype=tf.int32)[None, :])
  return tf.cast(tf.gather(tf.reshape(lut, [-1]), values), tf.float32)


@_no_autograph
def invert(image: tf.Tensor) -> tf.Tensor:
  """255 - x."""
  return 255.0 - image


@_no_autograph
def posterize(image: tf.Tensor, bits) -> tf.Tensor:
  """Keeps the `bits` most significant bits (PIL `ImageOps.posterize`; 0 bits gives black)."""
  divisor = tf.pow(2.0, 8.0 - tf.cast(bits, tf.float32))
  return tf.floor(tf.round(image) / divisor) * divisor


@_no_autograph
def solarize(image: tf.Tensor, threshold) -> tf.Tensor:
  """Inverts the values >= threshold (PIL `ImageOps.solarize`)."""
  return tf.where(image < tf.cast(threshold, tf.float32), image, 255.0 - image)


@_no_autograph
def solarize_add(image: tf.Tensor, addition, threshold=128) -> tf.Tensor:
  """Adds `addition` (saturating) to the values < threshold (timm `solarize_add`)."""
  added = tf.minimum(image + tf.cast(addition, tf.float32), 255.0)
  return tf.where(image < tf.cast(threshold, tf.float32), added, image)


@_no_autograph
def color(image: tf.Tensor, factor) -> tf.Tensor:
  """Blends with the grayscale image (PIL `ImageEnhance.Color`)."""
  return _blend(tf.broadcast_to(_grayscale(image), tf.shape(image)), image, factor)


@_no_autograph
def contrast(image: tf.Tensor, factor) -> tf.Tensor:
  """Blends with the mean gray level (PIL `ImageEnhance.Contrast`)."""
  mean = tf.floor(tf.reduce_mean(_grayscale(image)) + 0.5)
  return _blend(tf.fill(tf.shape(image), mean), image, factor)


@_no_autograph
def brightness(image: tf.Tensor, factor) -> tf.Tensor:
  """Blends with black (PIL `ImageEnhance.Brightness`)."""
  return _blend(tf.zeros_like(image), image, factor)


@_no_autograph
def sharpness(image: tf.Tensor, factor) -> tf.Tensor:
  """Blends with PIL's SMOOTH-filtered image, border pixels kept (PIL `ImageEnhance.Sharpness`)."""
  kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
  smooth = tf.nn.depthwise_conv2d(image[None], kernel, [1, 1, 1, 1], 'VALID')[0]
  smooth = tf.pad(tf.round(smooth), [[1, 1], [1, 1], [0, 0]])
  interior = tf.pad(tf.ones(tf.shape(smooth)[:2] - 2, tf.bool), [[1, 1], [1, 1]])
  degenerate = tf.where(interior[..., None], smooth, image)
  return _blend(degenerate, image, factor)


# ---------------------------------------------------------------------------------------------
# timm magnitude -> argument mapping and the RandAugment chain.


def _signed(value: tf.Tensor, negate: tf.Tensor) -> tf.Tensor:
  return tf.where(negate, -value, value)


def _enhance_factor(level: tf.Tensor, negate: tf.Tensor) -> tf.Tensor:
  return tf.maximum(0.1, 1.0 + _signed(level / MAX_LEVEL * 0.9, negate))


_PHOTOMETRIC_FNS = {
    'AutoContrast': lambda im, lv, neg: auto_contrast(im),
    'Equalize': lambda im, lv, neg: equalize(im),
    'Invert': lambda im, lv, neg: invert(im),
    'PosterizeIncreasing': lambda im, lv, neg: posterize(
        im, 4.0 - tf.floor(lv / MAX_LEVEL * 4.0)),
    'SolarizeIncreasing': lambda im, lv, neg: solarize(
        im, 256.0 - tf.minimum(256.0, tf.floor(lv / MAX_LEVEL * 256.0))),
    'SolarizeAdd': lambda im, lv, neg: solarize_add(
        im, tf.minimum(128.0, tf.floor(lv / MAX_LEVEL * 110.0))),
    'ColorIncreasing': lambda im, lv, neg: color(im, _enhance_factor(lv, neg)),
    'ContrastIncreasing': lambda im, lv, neg: contrast(im, _enhance_factor(lv, neg)),
    'BrightnessIncreasing': lambda im, lv, neg: brightness(im, _enhance_factor(lv, neg)),
    'SharpnessIncreasing': lambda im, lv, neg: sharpness(im, _enhance_factor(lv, neg)),
}


def _level_matrix(name_index: tf.Tensor, ops: Sequence[str], level: tf.Tensor,
                  negate: tf.Tensor, height, width) -> tf.Tensor:
  """Pixel matrix of ops[name_index] at `level` (timm's level_to_arg); identity if photometric."""
  def scale(op, max_value):
    positions = [i for i, n in enumerate(ops) if n == op]
    if not positions:
      return tf.constant(0.0)
    hit = tf.reduce_any(tf.equal(name_index, tf.constant(positions, tf.int32)))
    return tf.where(hit, _signed(level / MAX_LEVEL * max_value, negate), 0.0)
  return geometric_matrix(
      height, width,
      degrees=scale('Rotate', 30.0),
      shear_x_factor=scale('ShearX', 0.3),
      shear_y_factor=scale('ShearY', 0.3),
      translate_x_px=scale('TranslateXRel', 0.45) * tf.cast(width, tf.float32),
      translate_y_px=scale('TranslateYRel', 0.45) * tf.cast(height, tf.float32))


def check_ops(ops: Sequence[str]) -> Tuple[str, ...]:
  """Returns `ops` as a tuple; raises ValueError naming the fix if a name is unknown."""
  ops = tuple(ops)
  unknown = [op for op in ops if op not in RAND_INCREASING_OPS]
  if unknown or not ops:
    raise ValueError(
        f'lvvit_jax/data/randaugment.py: unknown or empty RandAugment op list {ops!r} '
        f'(unknown: {unknown}); use names from RAND_INCREASING_OPS = {RAND_INCREASING_OPS}.')
  return ops


def _apply_indexed(image: tf.Tensor, ops: Tuple[str, ...], index: tf.Tensor, apply: tf.Tensor,
                   level: tf.Tensor, negate: tf.Tensor,
                   fill: Sequence[float]) -> Tuple[tf.Tensor, tf.Tensor]:
  """Applies ops[index] if `apply` (all scalar tensors); the body of one RandAugment slot.

  The geometric ops share one warp under a single `tf.cond`; the photometric ops are the
  branches of one `tf.switch_case`. Returns (image rounded to [0, 255], normalised affine).
  """
  static_shape = image.shape
  h, w = _image_hw(image)
  geometric = tf.constant([name in GEOMETRIC_OPS for name in ops])
  is_geometric = apply & tf.gather(geometric, index)
  matrix = _level_matrix(tf.where(is_geometric, index, -1), ops, level, negate, h, w)
  image = tf.cond(is_geometric, lambda: _pil_warp(image, matrix, fill), lambda: image)
  photometric = [name for name in ops if name not in GEOMETRIC_OPS]
  if photometric:
    # Position of each op in `photometric`; geometric ops and skipped slots -> identity branch.
    position = tf.constant([photometric.index(n) if n in photometric else len(photometric)
                            for n in ops])
    branch = tf.where(apply, tf.gather(position, index), len(photometric))
    branches = [lambda fn=_PHOTOMETRIC_FNS[n]: fn(image, level, negate) for n in photometric]
    branches.append(lambda: image)
    image = tf.switch_case(branch, branches)
  image = tf.clip_by_value(tf.round(image), 0.0, 255.0)
  image.set_shape(static_shape)
  return image, pixel_to_normalized(matrix, (h, w), (h, w))


@_no_autograph
def apply_op(image: tf.Tensor, name: str, magnitude, negate=False,
             fill: Sequence[float] = FILL) -> Tuple[tf.Tensor, tf.Tensor]:
  """Applies one named op at a (clipped) magnitude, as timm's `AugmentOp` after its draws.

  Args:
    image: float32 (H, W, 3) in [0, 255].
    name: one of RAND_INCREASING_OPS.
    magnitude: level in [0, 10] (scalar; clipped here).
    negate: whether signed ops (rotate, shear, translate, enhance) take the negative side.
    fill: RGB fill for the geometric ops.

  Returns:
    (image rounded to integers in [0, 255], normalised output->input affine (3, 3)).
  """
  ops = check_ops([name])
  level = tf.clip_by_value(tf.cast(magnitude, tf.float32), 0.0, MAX_LEVEL)
  return _apply_indexed(tf.cast(image, tf.float32), ops, tf.constant(0), tf.constant(True),
                        level, tf.cast(negate, tf.bool), fill)


@_no_autograph
def randaugment(image: tf.Tensor, seed: tf.Tensor, num_ops: int = 2, magnitude: float = 9.0,
                magnitude_std: float = 0.5, prob: float = 0.5,
                ops: Sequence[str] = RAND_INCREASING_OPS,
                fill: Sequence[float] = FILL) -> Tuple[tf.Tensor, tf.Tensor]:
  """timm RandAugment (`rand-m{magnitude}-n{num_ops}-mstd{magnitude_std}-inc1`) with affine.

  Args:
    image: float32 (H, W, 3) with values in [0, 255].
    seed: (2,) int32/int64 stateless seed; the same seed gives the same result.
    num_ops: number of ops drawn (uniformly, with replacement) from `ops`.
    magnitude: mean magnitude on timm's 0..10 scale.
    magnitude_std: std of the per-application magnitude noise; 0 fixes it, inf draws
      uniformly from [0, magnitude] (timm).
    prob: probability that each drawn op is applied.
    ops: op names (a subset of RAND_INCREASING_OPS; tests force single ops with it).
    fill: RGB fill for the geometric ops.

  Returns:
    (image, affine): the augmented float32 image (integer values in [0, 255]) and the float32
    (3, 3) map from its normalised coordinates to those of the input image.
  """
  ops = check_ops(ops)
  seed = tf.cast(seed, tf.int64)
  image = tf.cast(image, tf.float32)
  affine = tf.eye(3)
  for k in range(num_ops):
    op_seed = tf.random.experimental.stateless_fold_in(seed, k)
    index = tf.random.stateless_uniform((), op_seed, 0, len(ops), dtype=tf.int32)
    gate, sign = tf.unstack(
        tf.random.stateless_uniform((2,), tf.random.experimental.stateless_fold_in(op_seed, 1)))
    noise_seed = tf.random.experimental.stateless_fold_in(op_seed, 2)
    if magnitude_std == float('inf'):
      level = tf.random.stateless_uniform((), noise_seed, 0.0, magnitude)
    elif magnitude_std > 0:
      level = magnitude + magnitude_std * tf.random.stateless_normal((), noise_seed)
    else:
      level = tf.constant(magnitude, tf.float32)
    level = tf.clip_by_value(level, 0.0, MAX_LEVEL)
    # timm skips an op when random() > prob.
    image, op_affine = _apply_indexed(image, ops, index, gate <= prob, level, sign > 0.5, fill)
    affine = affine @ op_affine
  return image, affine
