"""The train augmentation after the host's crop and resize, batched, inside the jitted step.

The host emits uint8 images (B, H, W, 3), each example's crop `label_affine` (B, 2, 3) and a
per-example seed (B, 2) uint32. `augment_batch` then applies, per example (vmapped, static
shapes):
  1. horizontal flip with probability `hflip`;
  2. RandAugment (`randaugment.py`);
  3. normalisation, (x / 255 - mean) / std;
  4. random erasing (timm `RandomErasing`, mode 'pixel': one box, per-pixel N(0, 1) noise in
     normalised space),
and composes `label_affine` (crop) @ flip @ op_1 @ op_2 ... (3x3 with the implicit last row).

Randomness comes only from the example's own seed (`example_key`: the threefry key with that
seed as its data; each step folds in its own tag), so an output depends on its image, seed and
crop affine alone: not on the batch size, the example's position or the device layout.

Cost: batch 128 x 224 x 224 with the recipe's defaults takes about 0.6 s on 2 CPU cores after
compilation; the per-round histogram (Equalize), the warp and erasing's noise draws (threefry)
are the largest parts.
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from lvvit_jax.augment import geometry
from lvvit_jax.augment import randaugment as randaugment_lib
from lvvit_jax.augment.config import DeviceAugmentConfig
from lvvit_jax.augment.config import IMAGENET_MEAN
from lvvit_jax.augment.config import IMAGENET_STD

_FILE = 'lvvit_jax/augment/batch.py'
ERASE_AREA = (0.02, 1.0 / 3.0)
ERASE_ASPECT = (0.3, 1.0 / 0.3)
ERASE_TRIES = 10

# Sub-key tags: fold_in(example key, tag) gives each random step its own stream.
TAG_FLIP, TAG_RANDAUG, TAG_ERASE = range(3)


def example_key(seed: jax.Array) -> jax.Array:
  """The typed threefry key of one example from its (2,) uint32 seed."""
  return jax.random.wrap_key_data(jnp.asarray(seed, jnp.uint32), impl='threefry2x32')


def normalize(images: jax.Array, mean: Sequence[float] = IMAGENET_MEAN,
              std: Sequence[float] = IMAGENET_STD, dtype=jnp.float32) -> jax.Array:
  """(images / 255 - mean) / std, for values in [0, 255] (e.g. uint8 eval batches).

  Any shape (..., 3); mean and std on the [0, 1] scale; the result in `dtype`.
  """
  mean = np.asarray(mean, np.float32)
  std = np.asarray(std, np.float32)
  scale, offset = 1.0 / (255.0 * std), -mean / std
  return (jnp.asarray(images).astype(jnp.float32) * scale + offset).astype(dtype)


def random_flip(image: jax.Array, key: jax.Array,
                prob: float = 0.5) -> Tuple[jax.Array, jax.Array]:
  """Flips (H, W, C) left-right with probability `prob`.

  Returns:
    (image, affine): affine is the normalised (3, 3) output->input map (x -> 1 - x if flipped).
  """
  flip = jax.random.uniform(key) < prob
  out = jnp.where(flip, image[:, ::-1], image)
  s = jnp.where(flip, -1.0, 1.0).astype(jnp.float32)
  zero, one = jnp.zeros((), jnp.float32), jnp.ones((), jnp.float32)
  affine = jnp.stack([jnp.stack([one, zero, zero]),
                      jnp.stack([zero, s, (1.0 - s) / 2.0]),
                      jnp.stack([zero, zero, one])])
  return out, affine


def erase_box(key: jax.Array, height: int, width: int, prob: float = 0.25,
              area: Sequence[float] = ERASE_AREA, aspect: Sequence[float] = ERASE_ASPECT,
              tries: int = ERASE_TRIES) -> Tuple[jax.Array, jax.Array]:
  """Samples timm's erasing box: (do_erase bool, int32 (4,) = (top, left, h, w)).

  With probability `prob`, up to `tries` boxes are drawn (area ~ U(area) * H * W, aspect h/w
  ~ exp(U(log aspect)), sides rounded); the first with h < H and w < W is taken, its offsets
  uniform over the valid integers. If none fits, nothing is erased (timm).
  """
  u = jax.random.uniform(key, (tries + 1, 4))
  do_erase = u[tries, 0] < prob
  u = u[:tries]
  target = height * width * (area[0] + (area[1] - area[0]) * u[:, 0])
  log_lo, log_hi = math.log(aspect[0]), math.log(aspect[1])
  ratio = jnp.exp(log_lo + (log_hi - log_lo) * u[:, 1])
  h = jnp.round(jnp.sqrt(target * ratio))  # round half to even, as Python's round.
  w = jnp.round(jnp.sqrt(target / ratio))
  fits = (h < height) & (w < width)
  top = jnp.minimum(jnp.floor(u[:, 2] * (height - h + 1)), height - h)
  left = jnp.minimum(jnp.floor(u[:, 3] * (width - w + 1)), width - w)
  i = jnp.argmax(fits)
  box = jnp.stack([top[i], left[i], h[i], w[i]]).astype(jnp.int32)
  return do_erase & jnp.any(fits), box


def random_erasing(image: jax.Array, key: jax.Array, prob: float = 0.25,
                   area: Sequence[float] = ERASE_AREA,
                   aspect: Sequence[float] = ERASE_ASPECT,
                   tries: int = ERASE_TRIES) -> jax.Array:
  """timm `RandomErasing(prob, mode='pixel', max_count=1)` on a normalised (H, W, C) image.

  The box (`erase_box`) is filled with N(0, 1) noise per pixel and channel. The noise is drawn
  for the largest box there can be, (H W area[1] + (H + W) / 2 + 1) pixels, and read in the
  box's row-major order: a third of a full image's draws, which dominate the cost on CPU.
  """
  height, width, channels = image.shape
  k_box, k_noise = jax.random.split(key)
  do_erase, box = erase_box(k_box, height, width, prob, area, aspect, tries)
  rows = jnp.arange(height)[:, None] - box[0]
  cols = jnp.arange(width)[None, :] - box[1]
  inside = do_erase & (rows >= 0) & (rows < box[2]) & (cols >= 0) & (cols < box[3])
  # h w <= target + (h + w) / 2 + 1/4 after rounding, with h < H and w < W.
  capacity = min(height * width, int(height * width * area[1] + (height + width) / 2) + 1)
  noise = jax.random.normal(k_noise, (capacity, channels), jnp.float32)
  index = jnp.clip(rows * box[3] + cols, 0, capacity - 1)
  return jnp.where(inside[..., None], noise[index], image)


def augment_example(image: jax.Array, seed: jax.Array, label_affine: jax.Array,
                    cfg: DeviceAugmentConfig = DeviceAugmentConfig(),
                    dtype=jnp.float32) -> Tuple[jax.Array, jax.Array]:
  """`augment_batch` for one example: (H, W, 3) image, (2,) seed, (2, 3) affine."""
  key = example_key(seed)
  x = jnp.asarray(image).astype(jnp.float32)
  affine = jnp.concatenate([jnp.asarray(label_affine, jnp.float32),
                            jnp.array([[0.0, 0.0, 1.0]], jnp.float32)])
  if cfg.hflip > 0:
    x, flip_affine = random_flip(x, jax.random.fold_in(key, TAG_FLIP), cfg.hflip)
    affine = geometry.compose(affine, flip_affine)
  if cfg.randaug_num_ops > 0:
    x, ra_affine = randaugment_lib.randaugment(
        x, jax.random.fold_in(key, TAG_RANDAUG), num_ops=cfg.randaug_num_ops,
        magnitude=cfg.randaug_magnitude, magnitude_std=cfg.randaug_mstd,
        prob=cfg.randaug_prob, ops=cfg.randaug_ops, fill=cfg.fill)
    affine = geometry.compose(affine, ra_affine)
  x = normalize(x, cfg.mean, cfg.std)
  if cfg.erase_prob > 0:
    x = random_erasing(x, jax.random.fold_in(key, TAG_ERASE), cfg.erase_prob)
  return x.astype(dtype), affine[:2]


def _check_batch(images, seeds, label_affine):
  b = images.shape[0] if images.ndim == 4 else None
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f'{_FILE}: images must be (B, H, W, 3) uint8 with values 0..255, got '
                     f'{images.dtype} {images.shape}; stack the resized crops.')
  if seeds.shape != (b, 2) or not jnp.issubdtype(seeds.dtype, jnp.integer):
    raise ValueError(f'{_FILE}: seeds must be (B, 2) = ({b}, 2) uint32 (or int32), got '
                     f'{seeds.dtype} {seeds.shape}; derive one per example on the host, e.g. '
                     '(global seed, example index).')
  if label_affine.shape != (b, 2, 3):
    raise ValueError(f'{_FILE}: label_affine must be (B, 2, 3) = ({b}, 2, 3), got '
                     f'{label_affine.shape}; pass the crop map of each example (identity '
                     '[[1, 0, 0], [0, 1, 0]] without token labels).')
  if seeds.dtype != jnp.uint32:
    if jnp.dtype(seeds.dtype).itemsize != 4:
      raise ValueError(f'{_FILE}: seeds dtype {seeds.dtype}; use uint32 or int32.')
    seeds = jax.lax.bitcast_convert_type(seeds, jnp.uint32)
  return seeds


def augment_batch(images: jax.Array, seeds: jax.Array, label_affine: jax.Array,
                  cfg: DeviceAugmentConfig = DeviceAugmentConfig(),
                  dtype=jnp.float32) -> Tuple[jax.Array, jax.Array]:
  """Flip, RandAugment, normalisation and random erasing of a batch, per example (module doc).

  Jit it with `cfg` (hashable) and `dtype` static, e.g.
  `jax.jit(augment_batch, static_argnames=('cfg', 'dtype'))`; shard the batch axis of all three
  inputs alike.

  Args:
    images: (B, H, W, 3) uint8 (any dtype holding integers 0..255 works).
    seeds: (B, 2) uint32 (int32 is reinterpreted bit for bit) per-example seeds.
    label_affine: (B, 2, 3) float32, each example's map from normalised output coordinates
      (y, x, 1) of the resized crop to normalised source coordinates (the crop).
    cfg: the augmentation settings.
    dtype: dtype of the returned images (float32; bfloat16 halves the batch in memory).

  Returns:
    (images (B, H, W, 3) normalised in `dtype`, label_affine (B, 2, 3) float32 =
    crop @ flip @ op_1 @ ... the map from the augmented image to the source).
  """
  images, seeds, label_affine = map(jnp.asarray, (images, seeds, label_affine))
  seeds = _check_batch(images, seeds, label_affine)
  fn = lambda im, s, a: augment_example(im, s, a, cfg, dtype)
  return jax.vmap(fn)(images, seeds, label_affine)
