"""Train and eval image processing for the tf.data pipeline, with exact label geometry.

Everything here is TensorFlow graph ops usable inside `tf.data.Dataset.map` (no py_function),
and all randomness is stateless, drawn from a per-example (2,) seed: the same encoded bytes and
seed give the same output.

Train (`train_preprocess`), the LV-ViT recipe (SPEC section 6) in timm's semantics:
1. fused decode + random-resized crop: the crop box is sampled like timm's
   `RandomResizedCropAndInterpolation` (scale (0.08, 1), log-uniform ratio (3/4, 4/3), ten tries
   vectorised, then timm's centre-crop fallback) and JPEGs are decoded only inside it with
   `decode_and_crop_jpeg`; other formats (PNG, GIF, BMP) are decoded whole, then cropped.
   Grayscale and RGBA inputs are converted to RGB (alpha dropped, as PIL's `convert('RGB')`);
2. resize to the train size, bilinear or bicubic at random (antialiased, as PIL);
3. horizontal flip;
4. RandAugment `rand-m9-mstd0.5-inc1` (`randaugment.py`);
5. scale to [0, 1] and normalise with the ImageNet mean/std;
6. random erasing (timm `RandomErasing`, mode 'pixel': one box, per-pixel N(0, 1) noise in
   normalised space).

Order differs from the released LV-ViT loader in one place: it applies RandAugment to the full
image *before* the random-resized crop (so the label map can be warped with it); here the crop
comes first, so that decoding and cropping fuse, and flip and RandAugment act on the crop (timm's
own order). Content that a geometric op brings in from outside the crop is filled with the mean
colour, while `label_affine` still points at the source image there: `crop_box` (optional
output) lets the label code mask such tokens if it wants to.

Label geometry. Every example also gets `label_affine`, a float32 (2, 3) matrix A with
`(y_src, x_src) = A @ (y, x, 1)`: (y, x) normalised over the OUTPUT image, (y_src, x_src)
normalised over the SOURCE image (full decoded image, before any crop). Normalised coordinates
are continuous: 0 is the top/left edge of the first pixel, 1 the bottom/right edge of the last,
pixel j of n has its centre at (j + 0.5) / n. A is the product crop @ flip @ op_1 @ ... @ op_n of
the output->input maps of every step that moved pixels (the photometric ops contribute the
identity), so the output pixel centred at p shows (up to interpolation) the source at A p.

Eval (`eval_preprocess`): resize the shorter side to `int(size / crop_pct)` (bicubic, the
longer side truncated as torchvision's `Resize`), centre crop `size` (torchvision's rounding),
normalise; its `label_affine` is the centre-crop map.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Dict, Sequence, Tuple

import tensorflow as tf

from lvvit_jax.data import randaugment as randaugment_lib

# The functions here use explicit tf.cond / tf.switch_case, so AutoGraph has nothing to convert;
# skipping it cuts the first trace inside Dataset.map from ~15 s to ~2 s.
_no_autograph = tf.autograph.experimental.do_not_convert

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE_METHODS = ('bilinear', 'bicubic', 'nearest', 'area', 'lanczos3', 'lanczos5',
                  'gaussian', 'mitchellcubic')
CROP_TRIES = 10
ERASE_AREA = (0.02, 1.0 / 3.0)
ERASE_ASPECT = (0.3, 1.0 / 0.3)

# Sub-seed tags: fold_in(seed, tag) gives each random step its own stream.
_SEED_CROP, _SEED_INTERP, _SEED_FLIP, _SEED_RANDAUG, _SEED_ERASE = range(5)


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """Train-time augmentation; the defaults are the LV-ViT ImageNet recipe (SPEC section 6).

  Attributes:
    image_size: output side S (the crop is resized to S x S).
    scale: random-resized-crop area range, as a fraction of the source area.
    ratio: random-resized-crop aspect-ratio (width / height) range, sampled log-uniformly.
    hflip: probability of a horizontal flip.
    interpolations: resize methods drawn uniformly per example (tf.image.resize names).
    antialias: antialiased downscaling, as PIL (the default). False is the speed knob: the
      crop's resize costs ~3x less on CPU, and aliasing appears when a crop shrinks a lot.
    randaug_num_ops: RandAugment ops per image (2; LV-ViT-L uses 3); 0 disables RandAugment.
    randaug_magnitude: RandAugment magnitude on timm's 0..10 scale.
    randaug_mstd: std of the per-op magnitude noise (inf: uniform in [0, magnitude]).
    randaug_prob: probability that each drawn op is applied.
    randaug_ops: the op pool (timm's 15 "increasing" ops; a subset forces ops in tests).
    erase_prob: random-erasing probability; 0 disables it.
    mean: per-channel mean for normalisation, on the [0, 1] scale.
    std: per-channel std for normalisation, on the [0, 1] scale.
  """
  image_size: int = 224
  scale: Tuple[float, float] = (0.08, 1.0)
  ratio: Tuple[float, float] = (3 / 4, 4 / 3)
  hflip: float = 0.5
  interpolations: Tuple[str, ...] = ('bilinear', 'bicubic')
  antialias: bool = True
  randaug_num_ops: int = 2
  randaug_magnitude: float = 9.0
  randaug_mstd: float = 0.5
  randaug_prob: float = 0.5
  randaug_ops: Tuple[str, ...] = randaugment_lib.RAND_INCREASING_OPS
  erase_prob: float = 0.25
  mean: Tuple[float, float, float] = IMAGENET_MEAN
  std: Tuple[float, float, float] = IMAGENET_STD

  def __post_init__(self):
    where = 'AugmentConfig (lvvit_jax/data/augment.py)'
    if int(self.image_size) < 1:
      raise ValueError(f'{where}: image_size={self.image_size}; set a positive int.')
    if not 0 < self.scale[0] <= self.scale[1]:
      raise ValueError(f'{where}: scale={self.scale}; need 0 < scale[0] <= scale[1].')
    if not 0 < self.ratio[0] <= self.ratio[1]:
      raise ValueError(f'{where}: ratio={self.ratio}; need 0 < ratio[0] <= ratio[1].')
    for name in ('hflip', 'randaug_prob', 'erase_prob'):
      if not 0.0 <= getattr(self, name) <= 1.0:
        raise ValueError(f'{where}: {name}={getattr(self, name)}; set a probability in [0, 1].')
    bad = [m for m in self.interpolations if m not in RESIZE_METHODS]
    if bad or not self.interpolations:
      raise ValueError(f'{where}: interpolations={self.interpolations}; '
                       f'use a non-empty tuple of {RESIZE_METHODS}.')
    if self.randaug_num_ops < 0 or self.randaug_magnitude < 0 or self.randaug_mstd < 0:
      raise ValueError(f'{where}: randaug_num_ops, randaug_magnitude and randaug_mstd must be '
                       f'>= 0 (got {self.randaug_num_ops}, {self.randaug_magnitude}, '
                       f'{self.randaug_mstd}).')
    if self.randaug_num_ops:
      randaugment_lib.check_ops(self.randaug_ops)
    if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
      raise ValueError(f'{where}: mean={self.mean}, std={self.std}; give 3 values each, '
                       'std > 0, on the [0, 1] scale.')


# ---------------------------------------------------------------------------------------------
# Pieces.


def _check_seed(seed) -> tf.Tensor:
  seed = tf.convert_to_tensor(seed)
  if seed.dtype not in (tf.int32, tf.int64) or (seed.shape.rank is not None and
                                                 seed.shape.as_list() not in ([2], [None])):
    raise ValueError(
        f'lvvit_jax/data/augment.py: seed must be a (2,) int32/int64 tensor, got {seed.dtype} '
        f'{seed.shape}; derive one per example, e.g. tf.stack([global_seed, example_index]).')
  return tf.cast(seed, tf.int64)


def _sub_seed(seed: tf.Tensor, tag: int) -> tf.Tensor:
  return tf.random.experimental.stateless_fold_in(seed, tag)


@_no_autograph
def random_resized_crop_box(image_hw: tf.Tensor, seed: tf.Tensor,
                            scale: Sequence[float] = (0.08, 1.0),
                            ratio: Sequence[float] = (3 / 4, 4 / 3),
                            tries: int = CROP_TRIES) -> tf.Tensor:
  """Samples a crop box as timm's `RandomResizedCropAndInterpolation.get_params`.

  Each try draws area ~ U(scale) * H * W and aspect w/h ~ exp(U(log ratio)), rounds
  w = sqrt(area * aspect), h = sqrt(area / aspect) and accepts the first try that fits (offsets
  uniform over the valid integers); if none fits, the centre crop of the largest box whose aspect
  is clipped to `ratio`.

  Args:
    image_hw: int32 (2,) source (height, width).
    seed: (2,) stateless seed.
    scale: area range as a fraction of the source area.
    ratio: aspect-ratio (width / height) range.
    tries: number of tries before the fallback.

  Returns:
    int32 (4,) = (y, x, h, w) in source pixels: the `crop_window` of `decode_and_crop_jpeg`.
  """
  hw = tf.cast(image_hw, tf.float64)
  height, width = hw[0], hw[1]
  u = tf.random.stateless_uniform((tries, 4), seed, dtype=tf.float64)
  area = height * width * (scale[0] + (scale[1] - scale[0]) * u[:, 0])
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  aspect = tf.exp(log_lo + (log_hi - log_lo) * u[:, 1])
  w = tf.round(tf.sqrt(area * aspect))  # tf.round rounds half to even, as Python's round.
  h = tf.round(tf.sqrt(area / aspect))
  fits = (w <= width) & (h <= height) & (w >= 1) & (h >= 1)
  y = tf.minimum(tf.floor(u[:, 2] * (height - h + 1)), height - h)
  x = tf.minimum(tf.floor(u[:, 3] * (width - w + 1)), width - w)
  first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
  sampled = tf.stack([y[first], x[first], h[first], w[first]])
  # Fallback: centre crop with the aspect ratio clipped into `ratio`.
  in_ratio = width / height
  fb_w = tf.where(in_ratio > ratio[1], tf.round(height * ratio[1]), width)
  fb_h = tf.where(in_ratio < ratio[0], tf.round(width / ratio[0]), height)
  fb_w = tf.clip_by_value(fb_w, 1.0, width)
  fb_h = tf.clip_by_value(fb_h, 1.0, height)
  fallback = tf.stack([tf.floor((height - fb_h) / 2), tf.floor((width - fb_w) / 2), fb_h, fb_w])
  box = tf.where(tf.reduce_any(fits), sampled, fallback)
  return tf.cast(box, tf.int32)


@_no_autograph
def decode_rgb(encoded: tf.Tensor) -> tf.Tensor:
  """Decodes JPEG/PNG/GIF/BMP bytes to uint8 RGB (H, W, 3); gray/RGBA are converted."""
  image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
  image.set_shape((None, None, 3))
  return image


@_no_autograph
def decode_and_random_crop(encoded: tf.Tensor, seed: tf.Tensor,
                           scale: Sequence[float] = (0.08, 1.0),
                           ratio: Sequence[float] = (3 / 4, 4 / 3)
                           ) -> Tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
  """Decodes and random-resized-crops (without the resize) an encoded image.

  JPEGs are decoded only inside the box (`decode_and_crop_jpeg`); other formats are decoded
  whole and sliced. The box depends only on the image size and the seed, so both paths agree.

  Returns:
    (crop uint8 (h, w, 3), box int32 (4,) = (y, x, h, w), source (height, width) int32 (2,)).
  """
  def jpeg():
    image_hw = tf.io.extract_jpeg_shape(encoded)[:2]
    box = random_resized_crop_box(image_hw, seed, scale, ratio)
    crop = tf.io.decode_and_crop_jpeg(encoded, box, channels=3)
    return crop, box, image_hw

  def other():
    image = decode_rgb(encoded)
    image_hw = tf.shape(image)[:2]
    box = random_resized_crop_box(image_hw, seed, scale, ratio)
    crop = image[box[0]:box[0] + box[2], box[1]:box[1] + box[3]]
    return crop, box, image_hw

  crop, box, image_hw = tf.cond(tf.io.is_jpeg(encoded), jpeg, other)
  crop.set_shape((None, None, 3))
  return crop, box, image_hw


@_no_autograph
def crop_affine(box: tf.Tensor, image_hw: tf.Tensor) -> tf.Tensor:
  """Normalised (3, 3) map from a crop resized to any size back to the source image.

  Args:
    box: (4,) = (y, x, h, w) in source pixels (the resize maps the crop's [0, 1] square onto it).
    image_hw: (2,) source (height, width).
  """
  box = tf.cast(box, tf.float32)
  hw = tf.cast(image_hw, tf.float32)
  return tf.stack([
      tf.stack([box[2] / hw[0], 0.0, box[0] / hw[0]]),
      tf.stack([0.0, box[3] / hw[1], box[1] / hw[1]]),
      tf.constant([0.0, 0.0, 1.0]),
  ])


@_no_autograph
def resize(image: tf.Tensor, size: Sequence[int], method: str = 'bilinear',
           antialias: bool = True) -> tf.Tensor:
  """Resize to `size` = (h, w) with half-pixel centres; float32 rounded to [0, 255].

  Antialiased by default, as PIL's resize (the filter widens when an axis shrinks). Geometry:
  output normalised coordinates equal input normalised coordinates (the output pixel centred at
  (i + 0.5) / h samples the input there), for every method.
  """
  image = tf.cast(image, tf.float32)
  shape = tf.shape(image)
  upsampling = ((shape[0] <= size[0]) & (shape[1] <= size[1])) | (not antialias)
  # Antialiasing changes nothing when no axis shrinks, and the plain kernels are ~3x faster.
  out = tf.cond(upsampling,
                lambda: tf.image.resize(image, size, method=method, antialias=False),
                lambda: tf.image.resize(image, size, method=method, antialias=True))
  return tf.clip_by_value(tf.round(out), 0.0, 255.0)


@_no_autograph
def random_resize(image: tf.Tensor, size: int, seed: tf.Tensor,
                  methods: Sequence[str] = ('bilinear', 'bicubic'),
                  antialias: bool = True) -> tf.Tensor:
  """Resizes to (size, size) with a method drawn uniformly from `methods`."""
  methods = tuple(methods)
  if len(methods) == 1:
    out = resize(image, (size, size), methods[0], antialias)
  else:
    index = tf.random.stateless_uniform((), seed, 0, len(methods), dtype=tf.int32)
    out = tf.switch_case(
        index, [lambda m=m: resize(image, (size, size), m, antialias) for m in methods])
  out.set_shape((size, size, 3))
  return out


@_no_autograph
def random_flip(image: tf.Tensor, seed: tf.Tensor, prob: float = 0.5
                ) -> Tuple[tf.Tensor, tf.Tensor]:
  """Flips left-right with probability `prob`.

  Returns:
    (image, affine): affine is the normalised (3, 3) output->input map (x -> 1 - x if flipped).
  """
  flip = tf.random.stateless_uniform((), seed) < prob
  out = tf.cond(flip, lambda: tf.reverse(image, axis=[1]), lambda: image)
  out.set_shape(image.shape)
  s = tf.where(flip, -1.0, 1.0)
  affine = tf.stack([tf.constant([1.0, 0.0, 0.0]),
                     tf.stack([0.0, s, (1.0 - s) / 2.0]),
                     tf.constant([0.0, 0.0, 1.0])])
  return out, affine


@_no_autograph
def normalize(image: tf.Tensor, mean: Sequence[float] = IMAGENET_MEAN,
              std: Sequence[float] = IMAGENET_STD) -> tf.Tensor:
  """(image / 255 - mean) / std, for an image in [0, 255]; mean and std on the [0, 1] scale."""
  scale = 1.0 / (255.0 * tf.constant(std, tf.float32))
  offset = -tf.constant(mean, tf.float32) / tf.constant(std, tf.float32)
  # A 1x1 convolution and bias_add: TF's CPU kernels broadcast a (3,) vector over the channel
  # axis several times slower than this.
  out = tf.nn.conv2d(tf.cast(image, tf.float32)[None], tf.linalg.diag(scale)[None, None], 1,
                     'VALID')
  return tf.nn.bias_add(out, offset)[0]


@_no_autograph
def random_erasing(image: tf.Tensor, seed: tf.Tensor, prob: float = 0.25,
                   area: Sequence[float] = ERASE_AREA,
                   aspect: Sequence[float] = ERASE_ASPECT,
                   tries: int = 10) -> tf.Tensor:
  """timm `RandomErasing(prob, mode='pixel', max_count=1)` on a normalised (H, W, C) image.

  With probability `prob`, up to `tries` boxes are drawn (area ~ U(area) * H * W, aspect
  ~ exp(U(log aspect))); the first with h < H and w < W is filled with N(0, 1) noise per pixel
  and channel. If none fits, nothing is erased (timm).
  """
  shape = tf.shape(image)
  height = tf.cast(shape[0], tf.float32)
  width = tf.cast(shape[1], tf.float32)
  u = tf.random.stateless_uniform((tries + 1, 4), seed)
  do_erase = u[tries, 0] < prob
  u = u[:tries]
  target = height * width * (area[0] + (area[1] - area[0]) * u[:, 0])
  log_lo, log_hi = math.log(aspect[0]), math.log(aspect[1])
  ar = tf.exp(log_lo + (log_hi - log_lo) * u[:, 1])
  h = tf.round(tf.sqrt(target * ar))
  w = tf.round(tf.sqrt(target / ar))
  fits = (h < height) & (w < width)
  top = tf.minimum(tf.floor(u[:, 2] * (height - h + 1)), height - h)
  left = tf.minimum(tf.floor(u[:, 3] * (width - w + 1)), width - w)
  i = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)

  def erase():
    box = tf.cast(tf.stack([top[i], left[i], h[i], w[i]]), tf.int32)
    noise = tf.random.stateless_normal(
        tf.concat([box[2:], shape[2:]], 0), _sub_seed(seed, 1), dtype=image.dtype)
    pads = [[box[0], shape[0] - box[0] - box[2]], [box[1], shape[1] - box[1] - box[3]], [0, 0]]
    inside = tf.pad(tf.ones(box[2:], tf.bool), pads[:2])
    return tf.where(inside[..., None], tf.pad(noise, pads), image)

  out = tf.cond(do_erase & tf.reduce_any(fits), erase, lambda: image)
  out.set_shape(image.shape)
  return out


# ---------------------------------------------------------------------------------------------
# Train and eval.


@_no_autograph
def train_preprocess(encoded: tf.Tensor, seed: tf.Tensor, cfg: AugmentConfig = AugmentConfig(),
                     *, with_crop_box: bool = False) -> Dict[str, tf.Tensor]:
  """Decodes and augments one training image (see the module docstring for the steps).

  Args:
    encoded: scalar tf.string, the encoded file bytes (JPEG, PNG, GIF or BMP).
    seed: (2,) int32/int64 per-example stateless seed (e.g. from global seed, epoch, index).
    cfg: the augmentation config.
    with_crop_box: also return 'crop_box', float32 (4,) = (y0, x0, y1, x1), the crop in
      normalised source coordinates (image pixels whose `label_affine` point lies outside it show
      fill colour, not source content).

  Returns:
    {'image': float32 (S, S, 3) normalised, 'label_affine': float32 (2, 3)} (+ 'crop_box').
  """
  seed = _check_seed(seed)
  size = int(cfg.image_size)
  crop, box, image_hw = decode_and_random_crop(
      encoded, _sub_seed(seed, _SEED_CROP), cfg.scale, cfg.ratio)
  affine = crop_affine(box, image_hw)
  image = random_resize(crop, size, _sub_seed(seed, _SEED_INTERP), cfg.interpolations,
                        cfg.antialias)
  if cfg.hflip > 0:
    image, flip_affine = random_flip(image, _sub_seed(seed, _SEED_FLIP), cfg.hflip)
    affine = affine @ flip_affine
  if cfg.randaug_num_ops > 0:
    image, ra_affine = randaugment_lib.randaugment(
        image, _sub_seed(seed, _SEED_RANDAUG), num_ops=cfg.randaug_num_ops,
        magnitude=cfg.randaug_magnitude, magnitude_std=cfg.randaug_mstd,
        prob=cfg.randaug_prob, ops=cfg.randaug_ops,
        fill=tuple(min(255, round(255 * m)) for m in cfg.mean))
    affine = affine @ ra_affine
  image = normalize(image, cfg.mean, cfg.std)
  if cfg.erase_prob > 0:
    image = random_erasing(image, _sub_seed(seed, _SEED_ERASE), cfg.erase_prob)
  image = tf.ensure_shape(image, (size, size, 3))
  out = {'image': image, 'label_affine': tf.ensure_shape(affine[:2], (2, 3))}
  if with_crop_box:
    b = tf.cast(box, tf.float32)
    hw = tf.cast(tf.tile(image_hw, [2]), tf.float32)
    out['crop_box'] = tf.stack([b[0], b[1], b[0] + b[2], b[1] + b[3]]) / hw
  return out


@_no_autograph
def eval_resize_shape(image_hw: tf.Tensor, resize_size: int) -> tf.Tensor:
  """torchvision `Resize(int)`: shorter side -> resize_size, longer side truncated; int32 (2,)."""
  hw = tf.cast(image_hw, tf.float64)
  short = tf.minimum(hw[0], hw[1])
  size = tf.constant(float(resize_size), tf.float64)
  long_side = tf.floor(size * tf.maximum(hw[0], hw[1]) / short)
  new_h = tf.where(hw[0] <= hw[1], size, long_side)
  new_w = tf.where(hw[0] <= hw[1], long_side, size)
  return tf.cast(tf.stack([new_h, new_w]), tf.int32)


@_no_autograph
def eval_preprocess(encoded: tf.Tensor, image_size: int, crop_pct: float,
                    mean: Sequence[float] = IMAGENET_MEAN,
                    std: Sequence[float] = IMAGENET_STD) -> Dict[str, tf.Tensor]:
  """Resize the shorter side to int(image_size / crop_pct) (bicubic), centre crop, normalise.

  Args:
    encoded: scalar tf.string, the encoded file bytes.
    image_size: output side S.
    crop_pct: fraction of the resized shorter side kept by the crop, in (0, 1].
    mean: per-channel mean on the [0, 1] scale.
    std: per-channel std on the [0, 1] scale.

  Returns:
    {'image': float32 (S, S, 3) normalised, 'label_affine': float32 (2, 3)}: the affine maps
    normalised output coordinates to normalised source coordinates (centre crop, no flip).
  """
  if not 0 < crop_pct <= 1:
    raise ValueError(f'lvvit_jax/data/augment.py: eval crop_pct={crop_pct}; it must be in '
                     '(0, 1] (SPEC table: 0.9 for lvvit_t/s, 1.0 for m/l).')
  size = int(image_size)
  resize_size = int(math.floor(size / crop_pct))
  image = decode_rgb(encoded)
  new_hw = eval_resize_shape(tf.shape(image)[:2], resize_size)
  image = resize(image, new_hw, 'bicubic')
  # torchvision CenterCrop: int(round((n - size) / 2)), Python (half to even) rounding.
  top = tf.cast(tf.round(tf.cast(new_hw[0] - size, tf.float64) / 2), tf.int32)
  left = tf.cast(tf.round(tf.cast(new_hw[1] - size, tf.float64) / 2), tf.int32)
  image = image[top:top + size, left:left + size]
  image = tf.ensure_shape(normalize(image, mean, std), (size, size, 3))
  nh, nw = tf.cast(new_hw[0], tf.float32), tf.cast(new_hw[1], tf.float32)
  affine = tf.stack([
      tf.stack([size / nh, 0.0, tf.cast(top, tf.float32) / nh]),
      tf.stack([0.0, size / nw, tf.cast(left, tf.float32) / nw]),
  ])
  return {'image': image, 'label_affine': tf.ensure_shape(affine, (2, 3))}
