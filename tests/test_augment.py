"""Train/eval image processing (`lvvit_jax.data.augment`, `randaugment`): shapes, values,
determinism, formats, crop statistics, eval geometry, and op parity with PIL (timm's ops)."""
import importlib.util
import io
import pathlib

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from lvvit_jax.data import augment
from lvvit_jax.data import randaugment

MEAN = np.array(augment.IMAGENET_MEAN, np.float32)
STD = np.array(augment.IMAGENET_STD, np.float32)
PLAIN = augment.AugmentConfig(image_size=64, randaug_num_ops=0, erase_prob=0.0)


def _load_pil_augment():
  path = pathlib.Path(__file__).resolve().parents[1] / 'benchmarks' / 'pil_augment.py'
  spec = importlib.util.spec_from_file_location('pil_augment', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


pil_augment = _load_pil_augment()


def _smooth_rgb(h, w, seed=0):
  """A natural-ish image: smooth colour field plus a little noise."""
  rng = np.random.default_rng(seed)
  small = rng.integers(0, 256, (6, 8, 3)).astype(np.uint8)
  img = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC), np.float32)
  return np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)


def _unnormalize(image):
  return image * STD * 255 + MEAN * 255


@pytest.fixture(scope='module')
def files(tmp_path_factory):
  """Encoded test images written with PIL to a temporary folder: name -> bytes."""
  folder = tmp_path_factory.mktemp('images')
  rgb = _smooth_rgb(150, 200)
  gray = rgb.mean(-1).astype(np.uint8)
  rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 128, np.uint8)], -1)
  images = {
      'rgb.jpg': (Image.fromarray(rgb), 'JPEG'),
      'rgb.png': (Image.fromarray(rgb), 'PNG'),
      'gray.jpg': (Image.fromarray(gray, 'L'), 'JPEG'),
      'gray.png': (Image.fromarray(gray, 'L'), 'PNG'),
      'rgba.png': (Image.fromarray(rgba, 'RGBA'), 'PNG'),
  }
  out = {}
  for name, (img, fmt) in images.items():
    img.save(folder / name, format=fmt)
    out[name] = (folder / name).read_bytes()
  return out


def _run_dataset(encoded_list, cfg, seed0=0):
  """train_preprocess inside Dataset.map (graph mode), seed (seed0, index)."""
  ds = tf.data.Dataset.from_tensor_slices(encoded_list).enumerate().map(
      lambda i, e: augment.train_preprocess(e, tf.stack([tf.constant(seed0, tf.int64), i]), cfg))
  return list(ds.as_numpy_iterator())


def test_train_outputs_for_every_format(files):
  names = sorted(files)
  outs = _run_dataset([files[n] for n in names] * 2, PLAIN)
  lo, hi = (0 - MEAN) / STD, (1 - MEAN) / STD
  for name, out in zip(names * 2, outs):
    assert out['image'].shape == (64, 64, 3) and out['image'].dtype == np.float32, name
    assert out['label_affine'].shape == (2, 3) and out['label_affine'].dtype == np.float32
    assert np.all(out['image'] >= lo - 1e-5) and np.all(out['image'] <= hi + 1e-5), name
    a = out['label_affine']
    # A crop (+ flip) only: axis aligned, the crop inside the source, area in the scale range.
    assert a[0, 1] == 0 and a[1, 0] == 0
    corners = np.array([[0, 0, 1], [1, 1, 1]], np.float32) @ a.T
    assert corners.min() >= -1e-6 and corners.max() <= 1 + 1e-6, (name, a)
    assert 0.08 * 0.9 <= abs(a[0, 0] * a[1, 1]) <= 1.0 + 1e-6


def test_default_recipe_values_are_plausible(files):
  cfg = augment.AugmentConfig(image_size=64)
  outs = _run_dataset([files['rgb.jpg']] * 16, cfg)
  images = np.stack([o['image'] for o in outs])
  assert np.all(np.isfinite(images))
  # Erased noise is N(0, 1); everything else lies in the normalised [0, 255] range.
  assert np.abs(images).max() < 8.0
  assert 0.2 < np.abs(images).mean() < 2.0
  affines = np.stack([o['label_affine'] for o in outs])
  assert np.all(np.isfinite(affines))
  assert len({a.tobytes() for a in affines}) == 16


def test_grayscale_and_rgba_become_rgb(files):
  outs = _run_dataset([files['gray.jpg'], files['gray.png'], files['rgba.png']], PLAIN)
  for out in outs[:2]:
    rgb = _unnormalize(out['image'])
    np.testing.assert_allclose(rgb[..., 0], rgb[..., 1], atol=1e-3)
    np.testing.assert_allclose(rgb[..., 0], rgb[..., 2], atol=1e-3)
  # RGBA: alpha dropped, as PIL's convert('RGB'): same pixels as the RGB PNG for the same seed.
  rgb_png = _run_dataset([files['rgb.png'], files['rgb.png'], files['rgb.png']], PLAIN)[2]
  np.testing.assert_array_equal(outs[2]['image'], rgb_png['image'])


def test_jpeg_and_png_paths_share_the_crop(files):
  cfg = augment.AugmentConfig(image_size=64, erase_prob=0.0)
  seed = tf.constant([3, 4], tf.int64)
  a = augment.train_preprocess(tf.constant(files['rgb.jpg']), seed, cfg)
  b = augment.train_preprocess(tf.constant(files['rgb.png']), seed, cfg)
  np.testing.assert_array_equal(a['label_affine'].numpy(), b['label_affine'].numpy())
  # Same crop of nearly the same pixels (JPEG loss only).
  assert np.abs(_unnormalize(a['image'].numpy()) - _unnormalize(b['image'].numpy())).mean() < 6


def test_determinism_and_seed_sensitivity(files):
  cfg = augment.AugmentConfig(image_size=64)
  encoded = tf.constant(files['rgb.jpg'])
  run = tf.function(lambda s: augment.train_preprocess(encoded, s, cfg))
  first = run(tf.constant([7, 11], tf.int64))
  again = run(tf.constant([7, 11], tf.int64))
  as_int32 = run(tf.constant([7, 11], tf.int32))
  eager = augment.train_preprocess(encoded, tf.constant([7, 11], tf.int64), cfg)
  for other in (again, as_int32):
    for key in ('image', 'label_affine'):
      np.testing.assert_array_equal(first[key].numpy(), other[key].numpy())
  # Eager runs the same ops; kernels may differ in the last float bit, not in the draws.
  for key in ('image', 'label_affine'):
    np.testing.assert_allclose(first[key].numpy(), eager[key].numpy(), atol=1e-5)
  different = run(tf.constant([7, 12], tf.int64))
  assert not np.array_equal(first['image'].numpy(), different['image'].numpy())
  assert not np.array_equal(first['label_affine'].numpy(), different['label_affine'].numpy())


def _boxes(image_hw, n=1000, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
  ds = tf.data.Dataset.range(n).map(
      lambda i: augment.random_resized_crop_box(
          tf.constant(image_hw, tf.int32), tf.stack([i, tf.constant(5, tf.int64)]), scale, ratio))
  return next(iter(ds.batch(n))).numpy()


def test_random_resized_crop_box_stays_in_bounds():
  h_img, w_img = 400, 400
  boxes = _boxes((h_img, w_img))
  y, x, h, w = boxes.T
  assert np.all(y >= 0) and np.all(x >= 0) and np.all(h >= 1) and np.all(w >= 1)
  assert np.all(y + h <= h_img) and np.all(x + w <= w_img)
  frac = h * w / (h_img * w_img)
  aspect = w / h
  # Rounding w and h to integers moves area and aspect by < 1% at these sizes.
  assert frac.min() >= 0.08 * 0.99 and frac.max() <= 1.0
  assert aspect.min() >= 0.75 * 0.99 and aspect.max() <= 4 / 3 * 1.01
  # The distribution spans the ranges; log-uniform ratio on a square image is symmetric.
  assert frac.min() < 0.1 and frac.max() > 0.9
  assert 0.4 < np.mean(aspect > 1.0) / max(np.mean(aspect != 1.0), 1e-9) < 0.6
  assert np.log(aspect).min() < np.log(0.8) and np.log(aspect).max() > np.log(1.25)
  # Offsets are uniform over the valid positions: both ends are reached.
  assert np.mean(y == 0) > 0 and np.mean(y + h == h_img) > 0
  assert len({tuple(b) for b in boxes}) > 900


def test_random_resized_crop_fallback_is_timm_centre_crop():
  # Every try is too tall for a 20-pixel-high image, so all seeds take the fallback.
  wide = _boxes((20, 400), n=8)
  np.testing.assert_array_equal(wide, np.tile([[0, (400 - 27) // 2, 20, 27]], (8, 1)))
  tall = _boxes((400, 20), n=8)
  np.testing.assert_array_equal(tall, np.tile([[(400 - 27) // 2, 0, 27, 20]], (8, 1)))


def test_eval_geometry_and_pixels_match_pil(files):
  size, crop_pct = 64, 0.875
  out = augment.eval_preprocess(tf.constant(files['rgb.png']), size, crop_pct)
  image, affine = out['image'].numpy(), out['label_affine'].numpy()
  assert image.shape == (size, size, 3) and image.dtype == np.float32
  # 150x200 -> shorter side int(64 / 0.875) = 73, longer int(73 * 200 / 150) = 97.
  new_h, new_w = 73, 97
  top, left = int(round((new_h - size) / 2)), int(round((new_w - size) / 2))
  expected = np.array([[size / new_h, 0, top / new_h], [0, size / new_w, left / new_w]])
  np.testing.assert_allclose(affine, expected, rtol=1e-6, atol=1e-7)
  # timm/torchvision eval: PIL bicubic resize, centre crop, normalise.
  pil = Image.open(io.BytesIO(files['rgb.png'])).convert('RGB').resize((new_w, new_h),
                                                                       Image.BICUBIC)
  ref = np.asarray(pil, np.float32)[top:top + size, left:left + size]
  diff = np.abs(_unnormalize(image) - ref)
  assert diff.mean() < 1.0 and np.percentile(diff, 99) < 4.0, (diff.mean(), diff.max())
  with pytest.raises(ValueError, match='augment.py'):
    augment.eval_preprocess(tf.constant(files['rgb.png']), size, 1.2)


@pytest.mark.parametrize('name', randaugment.RAND_INCREASING_OPS)
def test_randaugment_op_matches_pil(name):
  rgb = _smooth_rgb(48, 64, seed=1)
  rgb[:, 40:] = np.random.default_rng(2).integers(0, 256, (48, 24, 3))  # some texture
  for level, negate in ((9.0, False), (6.3, True)):
    ref = np.asarray(pil_augment.apply_op(Image.fromarray(rgb), name, level, negate), np.float32)
    out, affine = randaugment.apply_op(tf.constant(rgb, tf.float32), name, level, negate)
    diff = np.abs(out.numpy() - ref)
    if name in randaugment.GEOMETRIC_OPS:
      # Bilinear at the same points, fill outside: PIL and TF differ by float round-off only.
      assert diff.max() <= 1.0 and diff.mean() < 0.1, (name, diff.max(), diff.mean())
      assert not np.allclose(affine.numpy(), np.eye(3))
    else:
      np.testing.assert_array_equal(out.numpy(), ref, err_msg=name)
      np.testing.assert_array_equal(affine.numpy(), np.eye(3))


def _randaug_batch(image, n, **kwargs):
  ds = tf.data.Dataset.range(n).map(
      lambda i: randaugment.randaugment(image, tf.stack([i, tf.constant(1, tf.int64)]), **kwargs))
  return [x.numpy() for x in next(iter(ds.batch(n)))]


def test_randaugment_levels_signs_and_probability():
  image = tf.constant(_smooth_rgb(16, 16), tf.float32)
  # Fixed magnitude 9: rotation by exactly +-27 degrees (timm: 30 at magnitude 10), both signs.
  _, affines = _randaug_batch(image, 64, num_ops=1, magnitude=9.0, magnitude_std=0.0, prob=1.0,
                              ops=('Rotate',))
  angles = np.degrees(np.arctan2(affines[:, 0, 1], affines[:, 0, 0]))
  np.testing.assert_allclose(np.abs(angles), 27.0, atol=1e-3)
  assert 0.25 < np.mean(angles > 0) < 0.75
  # Magnitude noise N(9, 0.5) clipped to [0, 10]: 30 * m / 10 degrees.
  _, affines = _randaug_batch(image, 256, num_ops=1, magnitude=9.0, magnitude_std=0.5,
                              prob=1.0, ops=('Rotate',))
  mags = np.abs(np.degrees(np.arctan2(affines[:, 0, 1], affines[:, 0, 0]))) / 3.0
  assert mags.max() <= 10.0 + 1e-4 and 8.8 < mags.mean() < 9.2 and 0.3 < mags.std() < 0.6
  # Each op is applied with probability `prob`.
  images, affines = _randaug_batch(image, 400, num_ops=1, prob=0.5, ops=('Invert',))
  inverted = np.array([np.array_equal(x, 255.0 - image.numpy()) for x in images])
  unchanged = np.array([np.array_equal(x, image.numpy()) for x in images])
  assert np.all(inverted | unchanged) and 0.42 < inverted.mean() < 0.58
  np.testing.assert_array_equal(affines, np.broadcast_to(np.eye(3), affines.shape))
  # Ops are drawn uniformly, with replacement, from the pool.
  pool = ('Invert', 'ShearX')
  images, affines = _randaug_batch(image, 400, num_ops=2, prob=1.0, ops=pool)
  sheared = np.array([not np.allclose(a, np.eye(3)) for a in affines])
  assert 0.65 < sheared.mean() < 0.85  # P(at least one ShearX in two draws) = 3/4.


def test_randaugment_identity_cases():
  image = tf.constant(_smooth_rgb(20, 24), tf.float32)
  out, affine = randaugment.randaugment(image, tf.constant([1, 2]), prob=0.0)
  np.testing.assert_array_equal(out.numpy(), image.numpy())
  np.testing.assert_array_equal(affine.numpy(), np.eye(3))
  out, _ = randaugment.randaugment(image, tf.constant([1, 2]), num_ops=2, prob=1.0,
                                   ops=('Invert',))
  np.testing.assert_array_equal(out.numpy(), image.numpy())  # inverted twice


def test_random_erasing_box():
  zeros = tf.zeros((64, 64, 3))
  fractions, erased_any = [], 0
  for i in range(24):
    out = augment.random_erasing(zeros, tf.constant([i, 9]), prob=1.0).numpy()
    mask = np.any(out != 0, axis=-1)
    if not mask.any():
      continue
    erased_any += 1
    rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
    h, w = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
    assert mask.sum() == h * w  # one solid rectangle of per-pixel noise
    assert 0.3 * 0.9 <= h / w <= 1 / 0.3 * 1.1 or min(h, w) < 8
    fractions.append(h * w / 64**2)
    noise = out[mask]
    assert abs(noise.mean()) < 0.5 and 0.5 < noise.std() < 1.5
  assert erased_any >= 20
  assert min(fractions) >= 0.02 * 0.8 and max(fractions) <= 1 / 3 * 1.1
  kept = augment.random_erasing(zeros + 1.0, tf.constant([0, 9]), prob=0.0)
  np.testing.assert_array_equal(kept.numpy(), np.ones((64, 64, 3)))


def test_config_and_seed_errors_name_the_fix(files):
  with pytest.raises(ValueError, match='augment.py.*scale'):
    augment.AugmentConfig(scale=(0.5, 0.1))
  with pytest.raises(ValueError, match='randaugment.py.*RAND_INCREASING_OPS'):
    augment.AugmentConfig(randaug_ops=('Cutout',))
  with pytest.raises(ValueError, match='interpolations'):
    augment.AugmentConfig(interpolations=('cubic',))
  with pytest.raises(ValueError, match='seed'):
    augment.train_preprocess(tf.constant(files['rgb.png']), tf.constant([1, 2, 3]), PLAIN)
  with pytest.raises(ValueError, match='seed'):
    augment.train_preprocess(tf.constant(files['rgb.png']), tf.constant([1.0, 2.0]), PLAIN)


def test_pil_reference_augment(files):
  cfg = augment.AugmentConfig(image_size=64)
  outs = [pil_augment.PilTrainAugment.from_config(cfg, seed=3)(files['rgb.jpg'])
          for _ in range(2)]
  for out in outs:
    assert out.shape == (64, 64, 3) and out.dtype == np.float32 and np.all(np.isfinite(out))
  np.testing.assert_array_equal(outs[0], outs[1])
  aug = pil_augment.PilTrainAugment(image_size=64, seed=0)
  images = np.stack([aug(files[n]) for n in sorted(files) for _ in range(3)])
  assert np.abs(images).max() < 8.0 and 0.2 < np.abs(images).mean() < 2.0
  assert len({x.tobytes() for x in images}) == len(images)
