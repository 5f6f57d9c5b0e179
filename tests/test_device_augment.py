"""The accelerator augmentation (`lvvit_jax.augment`): PIL parity, exact label geometry,
per-example determinism (batch size, position, sharding), distributions, and no TensorFlow.

References: `benchmarks/pil_augment.py` (timm's level mapping on PIL ops) for every op, a
position-encoding cell pattern for `label_affine` (as tests/test_label_geometry.py), and linear
ramps for the warp's sub-pixel sampling.
"""
import functools
import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from benchmarks import pil_augment
from lvvit_jax import augment
from lvvit_jax import token_labeling
from lvvit_jax.augment import geometry
from lvvit_jax.augment import ops
from lvvit_jax.augment import randaugment

MEAN = np.array(augment.IMAGENET_MEAN, np.float32)
STD = np.array(augment.IMAGENET_STD, np.float32)
FILL = np.array(augment.FILL, np.float32)
COLOUR_OPS = [n for n in augment.RAND_INCREASING_OPS if n not in augment.GEOMETRIC_OPS]


_augment_batch = jax.jit(augment.augment_batch, static_argnames=('cfg', 'dtype'))
_apply_op = jax.jit(ops.apply_op, static_argnames=('name',))
_apply_round = jax.jit(randaugment.apply_round, static_argnames=('ops',))


def _config(**kwargs) -> augment.DeviceAugmentConfig:
  base = dict(hflip=0.0, randaug_num_ops=0, erase_prob=0.0)
  base.update(kwargs)
  return augment.DeviceAugmentConfig(**base)


def _unnormalize(images):
  return np.asarray(images, np.float32) * STD * 255 + MEAN * 255


def _seeds(n, offset=0):
  return np.stack([np.full(n, 7, np.uint32), np.arange(offset, offset + n, dtype=np.uint32)], 1)


def _identity_affines(n):
  return np.tile(np.array([[1, 0, 0], [0, 1, 0]], np.float32), (n, 1, 1))


# ---------------------------------------------------------------------------------------------
# Test images (all 48 x 64, so each op compiles once).


def _smooth_rgb(h=48, w=64, seed=0):
  """A natural-ish image, smooth colour field plus noise, with a textured strip."""
  rng = np.random.default_rng(seed)
  small = rng.integers(0, 256, (6, 8, 3)).astype(np.uint8)
  img = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC), np.float32)
  img = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
  img[:, w * 5 // 8:] = rng.integers(0, 256, (h, w - w * 5 // 8, 3))
  return img


def _low_contrast(h=48, w=64):
  """Each channel spans a different narrow range: AutoContrast and Equalize really remap."""
  img = _smooth_rgb(h, w, seed=3).astype(np.float32) / 255.0
  lo, hi = np.array([40, 90, 10]), np.array([190, 160, 233])
  return np.round(lo + img * (hi - lo)).astype(np.uint8)


def _few_levels(h=48, w=64):
  """Four grey levels, one dominant: Equalize's table exceeds 255 and PIL clips it."""
  rng = np.random.default_rng(4)
  levels = np.array([10, 60, 120, 250], np.uint8)
  img = levels[rng.choice(4, (h, w, 3), p=[0.88, 0.03, 0.03, 0.06])]
  return img


IMAGES = {'smooth': _smooth_rgb(), 'low_contrast': _low_contrast(), 'few_levels': _few_levels()}
LEVELS = ((0.0, False), (2.7, True), (6.3, False), (6.3, True), (9.0, True), (10.0, False))


# ---------------------------------------------------------------------------------------------
# Op parity with PIL.


@pytest.mark.parametrize('name', COLOUR_OPS)
def test_colour_op_matches_pil(name):
  changed = 0
  for image_name, img in IMAGES.items():
    for level, negate in LEVELS:
      ref = np.asarray(pil_augment.apply_op(Image.fromarray(img), name, level, negate),
                       np.float32)
      out, affine = _apply_op(jnp.asarray(img, jnp.float32), name, level, negate)
      out = np.asarray(out)
      diff = np.abs(out - ref)
      where = (name, image_name, level, negate)
      assert diff.max() <= 1.0, (where, diff.max())
      # Exact but for rare round-off cases of PIL's double arithmetic (AutoContrast).
      assert np.mean(diff > 0) < 0.01, (where, np.mean(diff > 0))
      np.testing.assert_array_equal(np.asarray(affine), np.eye(3))
      changed += not np.array_equal(ref, img)
  assert changed >= len(IMAGES) * 2, (name, changed)  # the cases have power


def test_equalize_and_autocontrast_tables_are_pils():
  # The few-level image drives Equalize's table above 255 (PIL clips), the low-contrast one
  # makes AutoContrast stretch each channel differently.
  img = IMAGES['few_levels']
  hist = np.bincount(img[..., 0].reshape(-1), minlength=256)
  step = (hist.sum() - hist[hist > 0][-1]) // 255
  assert (step // 2 + hist.sum() - hist[hist > 0][-1]) // step > 255  # PIL's table clips
  out = np.asarray(_apply_op(jnp.asarray(img, jnp.float32), 'Equalize', 0.0)[0])
  np.testing.assert_array_equal(out, np.asarray(pil_augment.PHOTOMETRIC['Equalize'](
      Image.fromarray(img)), np.float32))
  assert all(out[..., c].max() == 255 and out[..., c].min() == 0 for c in range(3))
  img = IMAGES['low_contrast']
  out = np.asarray(_apply_op(jnp.asarray(img, jnp.float32), 'AutoContrast', 0.0)[0])
  assert all(out[..., c].min() == 0 and out[..., c].max() >= 254 for c in range(3))


@pytest.mark.parametrize('name', augment.GEOMETRIC_OPS)
def test_geometric_op_matches_pil(name):
  img = IMAGES['smooth']
  h, w = img.shape[:2]
  for level, negate in LEVELS[1:]:
    ref = np.asarray(pil_augment.apply_op(Image.fromarray(img), name, level, negate),
                     np.float32)
    out, affine = _apply_op(jnp.asarray(img, jnp.float32), name, level, negate)
    out, affine = np.asarray(out), np.asarray(affine)
    diff = np.abs(out - ref)
    where = (name, level, negate)
    # Bilinear at the same points, truncated: PIL (double) and JAX (float32) differ only where
    # a value lands within round-off of an integer.
    assert diff.max() <= 1.0 and diff.mean() < 0.05, (where, diff.max(), diff.mean())
    # Where the sample point is clearly outside the image, both show the fill colour exactly.
    m = np.diag([h, w, 1]) @ affine @ np.diag([1 / h, 1 / w, 1])  # back to pixels
    yx = np.stack(np.meshgrid(np.arange(h) + 0.5, np.arange(w) + 0.5, indexing='ij'), -1)
    q = yx @ m[:2, :2].T + m[:2, 2]
    outside = (q[..., 0] < -1e-3) | (q[..., 0] > h + 1e-3) | (q[..., 1] < -1e-3) | (
        q[..., 1] > w + 1e-3)
    assert outside.mean() > 0.01, where
    np.testing.assert_array_equal(out[outside], np.broadcast_to(FILL, out[outside].shape))
    np.testing.assert_array_equal(ref[outside], np.broadcast_to(FILL, ref[outside].shape))
    assert not np.allclose(affine, np.eye(3))


SLOPE = np.array([2.0, 4.0 / 3.0])  # levels per pixel: red along y, green along x.


def test_warp_affine_samples_exactly_where_the_matrix_says():
  h, w = 40, 56
  ramp = np.stack(np.broadcast_arrays((np.arange(h)[:, None] + 0.5) * SLOPE[0] + 8.0,
                                      (np.arange(w)[None, :] + 0.5) * SLOPE[1] + 8.0,
                                      np.full((h, w), 128.0)), -1).astype(np.float32)
  params = (dict(degrees=23.0), dict(degrees=-30.0), dict(shear_x_factor=0.27),
            dict(shear_y_factor=-0.3), dict(translate_x_px=-17.3), dict(translate_y_px=7.6))
  warp = jax.jit(geometry.warp_affine)
  for kwargs in params:
    matrix = np.asarray(geometry.geometric_matrix(h, w, **kwargs))
    out = np.asarray(warp(ramp, matrix, augment.FILL))
    c = np.stack(np.meshgrid(np.arange(h) + 0.5, np.arange(w) + 0.5, indexing='ij'), -1)
    q = c @ matrix[:2, :2].T + matrix[:2, 2]
    inner = (q[..., 0] > 0.5) & (q[..., 0] < h - 0.5) & (q[..., 1] > 0.5) & (q[..., 1] < w - 0.5)
    outer = (q[..., 0] < 0) | (q[..., 0] >= h) | (q[..., 1] < 0) | (q[..., 1] >= w)
    assert inner.mean() > 0.3 and outer.mean() > 0.02, kwargs
    np.testing.assert_allclose(out[..., :2][inner], (q * SLOPE + 8.0)[inner], atol=2e-3,
                               err_msg=str(kwargs))
    np.testing.assert_array_equal(out[outer], np.broadcast_to(FILL, out[outer].shape))
  # The identity matrix returns the image bit for bit (RandAugment relies on it).
  np.testing.assert_array_equal(np.asarray(warp(ramp, np.eye(3), augment.FILL)), ramp)


def test_fused_round_equals_each_single_op():
  img = jnp.asarray(IMAGES['low_contrast'], jnp.float32)
  for pool in (augment.RAND_INCREASING_OPS, ('AutoContrast', 'Invert', 'ShearY')):
    for index, name in enumerate(pool):
      for negate in (False, True):
        ref, ref_affine = _apply_op(img, name, 7.3, negate)
        out, affine = _apply_round(img, index, True, 7.3, negate, ops=pool)
        np.testing.assert_array_equal(np.asarray(out), np.asarray(ref), err_msg=name)
        np.testing.assert_allclose(np.asarray(affine), np.asarray(ref_affine), atol=1e-6)
      out, affine = _apply_round(img, index, False, 7.3, False, ops=pool)
      np.testing.assert_array_equal(np.asarray(out), np.asarray(img))
      np.testing.assert_array_equal(np.asarray(affine), np.eye(3))


# ---------------------------------------------------------------------------------------------
# augment_batch: determinism and independence.


def _batch_inputs(n, size=32, seed=0):
  rng = np.random.default_rng(seed)
  images = np.stack([_smooth_rgb(size, size, seed=i)[:, ::-1] for i in range(n)])
  images = np.clip(images.astype(int) + rng.integers(-3, 4, images.shape), 0, 255)
  affines = _identity_affines(n) * rng.uniform(0.5, 1.0, (n, 1, 1)).astype(np.float32)
  return images.astype(np.uint8), _seeds(n), affines


def test_augment_batch_is_deterministic_and_per_example():
  cfg = augment.DeviceAugmentConfig()  # the recipe: flip, 2 ops, erasing
  images, seeds, affines = _batch_inputs(8)
  out, out_affine = _augment_batch(images, seeds, affines, cfg)
  assert out.shape == images.shape and out.dtype == jnp.float32
  assert out_affine.shape == (8, 2, 3) and out_affine.dtype == jnp.float32
  again, again_affine = _augment_batch(images, seeds, affines, cfg)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(again))
  np.testing.assert_array_equal(np.asarray(out_affine), np.asarray(again_affine))
  # The same example at another position of a batch of another size: the same output.
  order = [5, 2, 7]
  sub, sub_affine = _augment_batch(images[order], seeds[order], affines[order], cfg)
  np.testing.assert_array_equal(np.asarray(sub), np.asarray(out)[order])
  np.testing.assert_array_equal(np.asarray(sub_affine), np.asarray(out_affine)[order])
  # Another seed, another augmentation; every example differs from its plain normalisation.
  other, _ = _augment_batch(images, _seeds(8, offset=100), affines, cfg)
  assert not np.array_equal(np.asarray(other), np.asarray(out))
  plain = np.asarray(augment.normalize(images))
  assert np.mean([not np.allclose(o, p) for o, p in zip(np.asarray(out), plain)]) >= 0.5
  # bfloat16 output: the same values, rounded.
  half, _ = _augment_batch(images, seeds, affines, cfg, jnp.bfloat16)
  assert half.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(half, np.float32), np.asarray(out), atol=0.02, rtol=0.01)


def test_augment_batch_sharded_over_four_devices_equals_one_device():
  devices = jax.devices()
  assert len(devices) >= 4, 'tests/conftest.py sets --xla_force_host_platform_device_count=4'
  mesh = Mesh(np.array(devices[:4]), ('batch',))
  cfg = augment.DeviceAugmentConfig(randaug_num_ops=3, randaug_prob=0.9)
  images, seeds, affines = _batch_inputs(8, seed=1)
  ref = _augment_batch(images, seeds, affines, cfg)
  sharding = NamedSharding(mesh, P('batch'))
  placed = [jax.device_put(x, sharding) for x in (images, seeds, affines)]
  fn = jax.jit(functools.partial(augment.augment_batch, cfg=cfg), out_shardings=sharding)
  out = fn(*placed)
  assert out[0].sharding.is_equivalent_to(sharding, 4)
  for a, b in zip(out, ref):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_identity_cases_and_eval_normalize():
  images, seeds, affines = _batch_inputs(4)
  # Normalisation inside the step may differ from a separate `normalize` call in the last bit
  # (XLA contracts x * scale + offset differently); any op would move a value by >= 0.017.
  plain = np.asarray(augment.normalize(images))
  out, out_affine = _augment_batch(images, seeds, affines, _config(randaug_num_ops=2,
                                                                   randaug_prob=0.0))
  np.testing.assert_allclose(np.asarray(out), plain, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(out_affine), affines)
  # Inverted twice is the image again.
  out, _ = _augment_batch(images, seeds, affines, _config(randaug_num_ops=2, randaug_prob=1.0,
                                                          randaug_ops=('Invert',)))
  np.testing.assert_allclose(np.asarray(out), plain, atol=1e-6)
  # normalize is (x / 255 - mean) / std.
  expected = (images / 255.0 - MEAN) / STD
  np.testing.assert_allclose(np.asarray(augment.normalize(images)), expected, atol=1e-5)
  assert augment.normalize(images, dtype=jnp.bfloat16).dtype == jnp.bfloat16


# ---------------------------------------------------------------------------------------------
# Distributions (a few hundred examples, 16 x 16).


def _many(n, cfg, size=16):
  img = _smooth_rgb(size, size, seed=5)
  images = np.broadcast_to(img, (n,) + img.shape)
  out, affine = _augment_batch(images, _seeds(n), _identity_affines(n), cfg)
  return img, np.asarray(out), np.asarray(affine)


def test_flip_and_erasing_probabilities_and_boxes():
  n = 400
  img, out, affine = _many(n, _config(hflip=0.5, erase_prob=0.25), size=32)
  flipped = affine[:, 1, 1] < 0
  assert 0.42 < flipped.mean() < 0.58, flipped.mean()
  np.testing.assert_allclose(affine[flipped], [[[1, 0, 0], [0, -1, 1]]] * flipped.sum())
  np.testing.assert_allclose(affine[~flipped], [[[1, 0, 0], [0, 1, 0]]] * (~flipped).sum())
  plain = np.asarray(augment.normalize(img))
  expected = np.where(flipped[:, None, None, None], plain[:, ::-1], plain)
  changed = np.any(np.abs(out - expected) > 1e-5, axis=-1)  # erased pixels
  erased = changed.any(axis=(1, 2))
  assert 0.18 < erased.mean() < 0.32, erased.mean()
  fractions, noise = [], []
  for mask, x in zip(changed[erased], out[erased]):
    rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
    h, w = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
    assert mask.sum() == h * w  # one solid rectangle
    fractions.append(h * w / mask.size)
    noise.append(x[mask].reshape(-1))
  fractions, noise = np.array(fractions), np.concatenate(noise)
  # Area 0.02..1/3 of the image before rounding the sides (32 px: up to ~0.1 more).
  assert fractions.min() >= 0.01 and fractions.max() <= 1 / 3 + 0.1, fractions
  assert fractions.max() > 0.15 and fractions.min() < 0.06
  assert abs(noise.mean()) < 0.05 and 0.95 < noise.std() < 1.05  # N(0, 1) per pixel


def test_randaugment_draws_follow_timm():
  n = 3000
  keys = jax.vmap(augment.example_key)(jnp.asarray(_seeds(n)))
  draw = lambda m, mstd, p: jax.vmap(
      lambda k: randaugment.draw_round(k, 15, m, mstd, p))(keys)
  index, apply, level, negate = (np.asarray(x) for x in jax.jit(draw, static_argnums=(0, 1, 2))(
      9.0, 0.5, 0.5))
  counts = np.bincount(index, minlength=15)
  spread = 4 * math.sqrt(n / 15)
  assert n / 15 - spread < counts.min() and counts.max() < n / 15 + spread, counts
  assert 0.46 < apply.mean() < 0.54 and 0.46 < negate.mean() < 0.54
  assert level.max() <= 10.0 and 8.95 < level.mean() < 9.05 and 0.45 < level.std() < 0.55
  _, _, level, _ = jax.jit(draw, static_argnums=(0, 1, 2))(9.0, float('inf'), 0.5)
  level = np.asarray(level)
  assert level.min() < 0.1 and level.max() > 8.9 and level.max() <= 9.0
  assert 4.3 < level.mean() < 4.7
  _, _, level, _ = jax.jit(draw, static_argnums=(0, 1, 2))(9.0, 0.0, 0.5)
  np.testing.assert_array_equal(np.asarray(level), 9.0)


def test_randaugment_levels_signs_and_probability_in_the_batch():
  # Fixed magnitude 9: rotations by exactly +-27 degrees, both signs.
  _, _, affine = _many(200, _config(randaug_num_ops=1, randaug_prob=1.0, randaug_mstd=0.0,
                                    randaug_ops=('Rotate',)))
  angles = np.degrees(np.arctan2(affine[:, 0, 1], affine[:, 0, 0]))
  np.testing.assert_allclose(np.abs(angles), 27.0, atol=1e-3)
  assert 0.38 < np.mean(angles > 0) < 0.62
  # Each op is applied with probability `prob`: Invert or nothing.
  img, out, affine = _many(400, _config(randaug_num_ops=1, randaug_prob=0.5,
                                        randaug_ops=('Invert',)))
  plain = np.asarray(augment.normalize(img))
  inverted_ref = np.asarray(augment.normalize(255 - img))
  inverted = np.array([np.allclose(x, inverted_ref, atol=1e-5) for x in out])
  unchanged = np.array([np.allclose(x, plain, atol=1e-5) for x in out])
  assert np.all(inverted | unchanged) and 0.42 < inverted.mean() < 0.58, inverted.mean()
  np.testing.assert_array_equal(affine, _identity_affines(400))
  # Ops are drawn uniformly with replacement: P(at least one ShearX in two draws) = 3/4.
  _, _, affine = _many(400, _config(randaug_num_ops=2, randaug_prob=1.0,
                                    randaug_ops=('Invert', 'ShearX')))
  sheared = np.abs(affine[:, 1, 0]) > 1e-6
  assert 0.67 < sheared.mean() < 0.83, sheared.mean()


# ---------------------------------------------------------------------------------------------
# Label geometry: the pixels show the source exactly where `label_affine` points.

CELL = 16
ROWS, COLS = 8, 12
SRC_H, SRC_W = ROWS * CELL, COLS * CELL  # 128 x 192: non-square, so a swapped x/y cannot pass.
BLUE = 200
S = 64
PATCH = 8
CROPS = ((8, 30), (40, 5), (0, 120), (64, 77))  # (top, left) of the host's S x S crop


def _cell_colour(row, col):
  return 20.0 + 28.0 * row, 20.0 + 19.0 * col


def _pattern():
  rows = np.arange(SRC_H)[:, None] // CELL
  cols = np.arange(SRC_W)[None, :] // CELL
  red, green = _cell_colour(rows, cols)
  img = np.stack(np.broadcast_arrays(red, green, np.full((SRC_H, SRC_W), BLUE)), -1)
  return img.astype(np.uint8)


def _host_crops():
  """What the host emits: S x S crops (no resize) and their crop affines."""
  src = _pattern()
  images = np.stack([src[t:t + S, l:l + S] for t, l in CROPS])
  affines = np.array([[[S / SRC_H, 0, t / SRC_H], [0, S / SRC_W, l / SRC_W]] for t, l in CROPS],
                     np.float32)
  boxes = np.array([[t, l, t + S, l + S] for t, l in CROPS], np.float64)
  return images, affines, boxes


def _forced(op):
  return _config(randaug_num_ops=1, randaug_prob=1.0, randaug_ops=(op,))


GEOMETRY_CASES = {
    'flip': _config(hflip=1.0),
    'rotate': _forced('Rotate'),
    'shear_x': _forced('ShearX'),
    'shear_y': _forced('ShearY'),
    'translate_x': _forced('TranslateXRel'),
    'translate_y': _forced('TranslateYRel'),
}


def _source_points(affine):
  """Source pixel coordinates (S, S, 2) = (y, x) of each output pixel centre."""
  c = (np.arange(S) + 0.5) / S
  yx1 = np.stack(np.broadcast_arrays(c[:, None], c[None, :], np.ones((S, S))), -1)
  return (yx1 @ np.asarray(affine, np.float64).T) * np.array([SRC_H, SRC_W])


def _pixel_errors(rgb, affine, box, margin=1.5):
  """(checked mask, error per pixel, fill mask) of an augmented image against its affine."""
  q = _source_points(affine)
  inside = ((q[..., 0] > box[0] + margin) & (q[..., 0] < box[2] - margin) &
            (q[..., 1] > box[1] + margin) & (q[..., 1] < box[3] - margin))
  outside = ((q[..., 0] < box[0] - margin) | (q[..., 0] > box[2] + margin) |
             (q[..., 1] < box[1] - margin) | (q[..., 1] > box[3] + margin))
  off_border = ((np.abs((q[..., 0] + CELL / 2) % CELL - CELL / 2) > margin) &
                (np.abs((q[..., 1] + CELL / 2) % CELL - CELL / 2) > margin))
  rows = np.clip(q[..., 0] // CELL, 0, ROWS - 1)
  cols = np.clip(q[..., 1] // CELL, 0, COLS - 1)
  red, green = _cell_colour(rows, cols)
  err = np.maximum(np.abs(rgb[..., 0] - red), np.abs(rgb[..., 1] - green))
  return inside & off_border, err, outside, _cell_class(q)


def _cell_class(q):
  rows = np.clip(q[..., 0] // CELL, 0, ROWS - 1).astype(int)
  cols = np.clip(q[..., 1] // CELL, 0, COLS - 1).astype(int)
  return rows * COLS + cols


def _to3(affine):
  return np.concatenate([np.asarray(affine, np.float64), [[0, 0, 1]]], 0)


@pytest.fixture(scope='module')
def geometry_outputs():
  images, affines, boxes = _host_crops()
  seeds = _seeds(len(CROPS), offset=11)
  out = {}
  for name, cfg in GEOMETRY_CASES.items():
    x, a = _augment_batch(images, seeds, affines, cfg)
    out[name] = (_unnormalize(x), np.asarray(a))
  return out, affines, boxes


@pytest.mark.parametrize('name', sorted(GEOMETRY_CASES))
def test_pixels_follow_label_affine(geometry_outputs, name):
  outputs, crop_affines, boxes = geometry_outputs
  rgb, affines = outputs[name]
  checked, cells, wrong_fractions = 0, set(), []
  for image, affine, crop, box in zip(rgb, affines, crop_affines, boxes):
    valid, err, outside, cls = _pixel_errors(image, affine, box)
    bad = valid & (err > 1.0)
    assert not bad.any(), (name, bad.sum(), valid.sum(), np.argwhere(bad)[:3].tolist())
    if outside.any():  # points outside the crop show the fill colour
      np.testing.assert_allclose(image[outside], np.broadcast_to(FILL, image[outside].shape),
                                 atol=1e-3)
    checked += valid.sum()
    cells |= set(cls[valid].tolist())
    # The op moved the image: the affine is not the crop's own.
    assert not np.allclose(affine, crop, atol=1e-5), (name, affine)
    # Negative control, the likeliest bug (the op's map used the wrong way round): many pixels
    # disagree with it, so the check has power.
    op = np.linalg.inv(_to3(crop)) @ _to3(affine)
    wrong = _to3(crop) if name == 'flip' else _to3(crop) @ np.linalg.inv(op)
    valid_w, err_w, _, _ = _pixel_errors(image, wrong[:2], box)
    valid_w &= np.abs(image[..., 2] - BLUE) < 1
    wrong_fractions.append(np.mean(err_w[valid_w] > 1.0) if valid_w.any() else 0.0)
  assert np.mean(wrong_fractions) > 0.3, (name, wrong_fractions)
  assert checked >= 0.2 * len(CROPS) * S * S and len(cells) >= 12, (name, checked, len(cells))


def test_token_targets_through_the_affine_point_at_the_pixels(geometry_outputs):
  outputs, _, _ = geometry_outputs
  rgb = np.concatenate([outputs[n][0] for n in sorted(GEOMETRY_CASES)])
  affines = np.concatenate([outputs[n][1] for n in sorted(GEOMETRY_CASES)])
  b, grid = len(rgb), S // PATCH
  # A score map whose class is the source cell (k = 1), covering the whole source image.
  idx = np.broadcast_to(np.arange(ROWS * COLS).reshape(1, ROWS, COLS, 1), (b, ROWS, COLS, 1))
  _, tok = token_labeling.token_targets(
      np.full(idx.shape, 10.0, np.float32), idx.astype(np.int32),
      np.tile(np.array([[0, 0, 1, 1]], np.float32), (b, 1)), affines,
      grid=grid, num_classes=ROWS * COLS, smoothing=0.0, samples=4)
  tok = np.asarray(tok).argmax(-1)
  # What the pixels show: the cell decoded from each pixel's colour, per token.
  row = np.clip(np.round((rgb[..., 0] - 20) / 28), 0, ROWS - 1).astype(int)
  col = np.clip(np.round((rgb[..., 1] - 20) / 19), 0, COLS - 1).astype(int)
  shown = (row * COLS + col).reshape(b, grid, PATCH, grid, PATCH).transpose(0, 1, 3, 2, 4)
  fill = (np.abs(rgb[..., 2] - BLUE) > 1).reshape(b, grid, PATCH, grid, PATCH).transpose(
      0, 1, 3, 2, 4)
  shown, fill = shown.reshape(b, grid, grid, -1), fill.reshape(b, grid, grid, -1)
  # Tokens whose footprint maps into one cell (all 4 x 4 samples) and show no fill.
  offsets = (np.arange(4) + 0.5) / 4
  c = ((np.arange(grid)[:, None] + offsets) / grid).reshape(-1)
  checked = 0
  for i in range(b):
    yx1 = np.stack(np.broadcast_arrays(c[:, None], c[None, :], np.ones((c.size, c.size))), -1)
    q = (yx1 @ affines[i].astype(np.float64).T) * np.array([SRC_H, SRC_W])
    cls = _cell_class(q).reshape(grid, 4, grid, 4).transpose(0, 2, 1, 3).reshape(grid, grid, -1)
    pure = (cls == cls[..., :1]).all(-1) & ~fill[i].any(-1)
    majority = np.array([[np.bincount(s).argmax() for s in r] for r in shown[i]])
    np.testing.assert_array_equal(tok[i][pure], cls[..., 0][pure], err_msg=f'example {i}')
    np.testing.assert_array_equal(majority[pure], cls[..., 0][pure], err_msg=f'example {i}')
    checked += pure.sum()
  assert checked >= 0.1 * b * grid * grid, checked


# ---------------------------------------------------------------------------------------------
# Configuration, errors, imports.


def test_config_validation_names_the_field_and_fix():
  assert augment.RAND_INCREASING_OPS == pil_augment.RAND_INCREASING_OPS
  cfg = augment.DeviceAugmentConfig(randaug_ops=['Invert', 'Rotate'], mean=[0.5] * 3)
  assert cfg.randaug_ops == ('Invert', 'Rotate') and hash(cfg) == hash(
      augment.DeviceAugmentConfig(randaug_ops=('Invert', 'Rotate'), mean=(0.5,) * 3))
  with pytest.raises(ValueError, match='config.py.*hflip'):
    augment.DeviceAugmentConfig(hflip=1.5)
  with pytest.raises(ValueError, match='randaug_ops.*RAND_INCREASING_OPS'):
    augment.DeviceAugmentConfig(randaug_ops=('Cutout',))
  with pytest.raises(ValueError, match='randaug_num_ops'):
    augment.DeviceAugmentConfig(randaug_num_ops=-1)
  with pytest.raises(ValueError, match='fill'):
    augment.DeviceAugmentConfig(fill=(300, 0, 0))
  with pytest.raises(ValueError, match='std'):
    augment.DeviceAugmentConfig(std=(0.2, 0.0, 0.2))
  images, seeds, affines = _batch_inputs(2)
  with pytest.raises(ValueError, match='batch.py.*seeds'):
    augment.augment_batch(images, seeds[:, :1], affines)
  with pytest.raises(ValueError, match='batch.py.*label_affine'):
    augment.augment_batch(images, seeds, affines[:, :1])
  with pytest.raises(ValueError, match='batch.py.*images'):
    augment.augment_batch(images[0], seeds, affines)


def test_package_imports_and_runs_with_tensorflow_blocked():
  code = ('import sys\n'
          'for m in ("tensorflow", "tensorflow_datasets", "torch"): sys.modules[m] = None\n'
          'import numpy as np\n'
          'import lvvit_jax.augment as augment\n'
          'from lvvit_jax.augment import batch, colour, config, geometry, ops, randaugment\n'
          'images = np.zeros((2, 8, 8, 3), np.uint8)\n'
          'seeds = np.zeros((2, 2), np.uint32)\n'
          'affines = np.tile(np.eye(3, dtype=np.float32)[:2], (2, 1, 1))\n'
          'x, a = augment.augment_batch(images, seeds, affines)\n'
          'assert x.shape == (2, 8, 8, 3) and a.shape == (2, 2, 3)\n'
          'assert not [m for m in sys.modules if m.startswith("lvvit_jax.data")]\n'
          'print("ok")\n')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip().endswith('ok')
