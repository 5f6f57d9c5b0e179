"""`label_affine` is exact end to end: host crop + device augmentation, pixels and token targets.

The source image is a grid of flat cells whose colour encodes the cell (red = row, green =
column, blue constant; the fill colour has another blue). Each example goes the way training
takes it: the real host `train_preprocess` (decode, random-resized crop, PIL resize to uint8,
the crop's `label_affine`, `aug_seed`) inside tf.data, then the device `augment_batch` (jitted)
forced to one step at a time (crop alone, flip, rotate, shear x/y, translate x/y) and random
compositions, erasing and colour ops off. For every output pixel the test maps its centre
through the final `label_affine` into the source and checks that the pixel shows that cell's
colour, away from cell borders (interpolation blurs them) and from the crop's edge; pixels
that map outside the crop must show the fill colour. PNG and JPEG sources, and `eval_preprocess`.

Token level: a score map whose class is the cell index (k = 1, map_box [0, 0, 1, 1]) sampled
per token through the affine, by a NumPy sampler and by `lvvit_jax.token_labeling.token_targets`
(the train step's), must give each token the cell that dominates its pixels.

Sub-pixel level: on linear ramps (reproduced exactly by bilinear, bicubic and antialiased
resampling) the whole train and eval paths are checked to a small fraction of a pixel; a
half-pixel slip anywhere (host resize, device warp, or their composition) fails these.
"""
import io

import jax
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from lvvit_jax import augment as device
from lvvit_jax import token_labeling
from lvvit_jax.data import augment

CELL = 15
ROWS, COLS = 8, 12
H, W = ROWS * CELL, COLS * CELL  # 120 x 180: non-square, so a swapped x/y cannot pass.
BLUE = 200
S = 192
PATCH = 16
MEAN = np.array(device.IMAGENET_MEAN, np.float32)
STD = np.array(device.IMAGENET_STD, np.float32)
FILL = np.array(device.FILL, np.float32)
SEEDS = ((0, 1), (0, 2), (5, 3), (9, 4))
GEOMETRIC_OPS = device.GEOMETRIC_OPS

_augment_batch = jax.jit(device.augment_batch, static_argnames=('cfg', 'dtype'))


def cell_colour(row, col):
  return 20.0 + 28.0 * row, 20.0 + 19.0 * col


def pattern() -> np.ndarray:
  rows = np.arange(H)[:, None] // CELL
  cols = np.arange(W)[None, :] // CELL
  red, green = cell_colour(rows, cols)
  img = np.stack(np.broadcast_arrays(red, green, np.full((H, W), BLUE, np.float64)), -1)
  return img.astype(np.uint8)


@pytest.fixture(scope='module')
def sources():
  out = {}
  for fmt in ('PNG', 'JPEG'):
    buf = io.BytesIO()
    Image.fromarray(pattern()).save(buf, format=fmt, quality=95)
    out[fmt] = buf.getvalue()
  return out


def _config(**kwargs) -> device.DeviceAugmentConfig:
  base = dict(erase_prob=0.0, hflip=0.0, randaug_num_ops=0)
  base.update(kwargs)
  return device.DeviceAugmentConfig(**base)


def _forced(op):
  return dict(randaug_num_ops=1, randaug_prob=1.0, randaug_ops=(op,))


CASES = {
    'crop': (_config(), 0),
    'flip': (_config(hflip=1.0), 0),
    'rotate': (_config(**_forced('Rotate')), 1),
    'shear_x': (_config(**_forced('ShearX')), 1),
    'shear_y': (_config(**_forced('ShearY')), 1),
    'translate_x': (_config(**_forced('TranslateXRel')), 1),
    'translate_y': (_config(**_forced('TranslateYRel')), 1),
    'composition': (_config(hflip=0.5, randaug_num_ops=3, randaug_prob=0.8,
                            randaug_ops=GEOMETRIC_OPS), 3),
}


def train_examples(encoded: bytes, seeds, host: augment.AugmentConfig,
                   cfg: device.DeviceAugmentConfig):
  """The train path of one source image for each seed: host in tf.data, then the device.

  Returns NumPy {'image' normalised float32, 'label_affine' (the final map), 'crop_affine'
  (the host's), 'crop_box'}.
  """
  ds = tf.data.Dataset.from_tensor_slices(tf.constant(seeds, tf.int64)).map(
      lambda s: augment.train_preprocess(tf.constant(encoded), s, host, with_crop_box=True))
  out = {k: v.numpy() for k, v in next(iter(ds.batch(len(seeds)))).items()}
  assert out['image'].dtype == np.uint8 and out['aug_seed'].dtype == np.uint32
  image, affine = _augment_batch(out['image'], out['aug_seed'], out['label_affine'], cfg)
  return {'image': np.asarray(image), 'label_affine': np.asarray(affine),
          'crop_affine': out['label_affine'], 'crop_box': out['crop_box']}


_CACHE = {}


def _augment(sources, name: str, fmt: str = 'PNG'):
  """`train_examples` of case `name` for every seed in SEEDS, cached per (case, format): the
  token-level test reuses the pixel tests' examples."""
  if (name, fmt) not in _CACHE:
    _CACHE[name, fmt] = train_examples(sources[fmt], SEEDS, augment.AugmentConfig(image_size=S),
                                       CASES[name][0])
  return _CACHE[name, fmt]


def _rgb(image):
  return image * STD * 255 + MEAN * 255


def _source_points(affine, size):
  """Source pixel coordinates (size, size, 2) = (y, x) of each output pixel centre."""
  c = (np.arange(size) + 0.5) / size
  yx1 = np.stack(np.broadcast_arrays(c[:, None], c[None, :], np.ones((size, size))), -1)
  return (yx1 @ affine.T.astype(np.float64)) * np.array([H, W])


def _margin(affine, size, warps, jpeg):
  """Source-pixel distance within which interpolation may mix a neighbouring cell.

  Resize kernels reach 2 source pixels (bicubic; wider by the downscale factor), and each
  bilinear warp 1 output pixel, i.e. `scale` source pixels.
  """
  scale = np.linalg.norm(affine[:, :2] * np.array([[H], [W]]) / size, 2)
  return 2.0 * max(scale, 1.0) + warps * scale + (1.5 if jpeg else 0.5)


def check_pixels(image, affine, crop_box, *, warps, jpeg, strict_fill):
  """Returns (number of pixels checked, set of cells seen); asserts every check passes."""
  size = image.shape[0]
  rgb = _rgb(image)
  q = _source_points(affine, size)
  margin = _margin(affine, size, warps, jpeg)
  tol = 10.0 if jpeg else 4.0
  box = crop_box * np.array([H, W, H, W])
  inside = ((q[..., 0] > box[0] + margin) & (q[..., 0] < box[2] - margin) &
            (q[..., 1] > box[1] + margin) & (q[..., 1] < box[3] - margin))
  outside = ((q[..., 0] < box[0] - margin) | (q[..., 0] > box[2] + margin) |
             (q[..., 1] < box[1] - margin) | (q[..., 1] > box[3] + margin))
  off_border = ((np.abs((q[..., 0] + CELL / 2) % CELL - CELL / 2) > margin) &
                (np.abs((q[..., 1] + CELL / 2) % CELL - CELL / 2) > margin))
  valid = inside & off_border
  if not strict_fill:
    # After several warps a pixel can be fill though its point is inside the crop (an earlier
    # op pushed it out of frame). Such pixels have the fill's blue; they are not label errors.
    valid &= np.abs(rgb[..., 2] - BLUE) <= tol
  rows = np.clip(q[..., 0] // CELL, 0, ROWS - 1)
  cols = np.clip(q[..., 1] // CELL, 0, COLS - 1)
  red, green = cell_colour(rows, cols)
  err = np.maximum(np.abs(rgb[..., 0] - red), np.abs(rgb[..., 1] - green))
  bad = valid & (err > tol)
  assert not bad.any(), (
      f'{bad.sum()} of {valid.sum()} pixels disagree with label_affine; first at '
      f'{np.argwhere(bad)[:3].tolist()}, errors {err[bad][:3]}')
  if outside.any():
    fill_err = np.abs(rgb[outside] - FILL).max()
    assert fill_err <= (12.0 if jpeg else 1.0), f'pixels outside the crop are not fill: {fill_err}'
  cells = set(zip(rows[valid].astype(int).tolist(), cols[valid].astype(int).tolist()))
  return int(valid.sum()), cells


def mismatch_fraction(image, affine, crop_box, *, warps, jpeg):
  """Fraction of checkable pixels that disagree with `affine` (for negative controls)."""
  size = image.shape[0]
  rgb = _rgb(image)
  q = _source_points(affine, size)
  margin = _margin(affine, size, warps, jpeg)
  box = crop_box * np.array([H, W, H, W])
  valid = ((q[..., 0] > box[0] + margin) & (q[..., 0] < box[2] - margin) &
           (q[..., 1] > box[1] + margin) & (q[..., 1] < box[3] - margin) &
           (np.abs(rgb[..., 2] - BLUE) <= 10))
  rows = np.clip(q[..., 0] // CELL, 0, ROWS - 1)
  cols = np.clip(q[..., 1] // CELL, 0, COLS - 1)
  red, green = cell_colour(rows, cols)
  err = np.maximum(np.abs(rgb[..., 0] - red), np.abs(rgb[..., 1] - green))
  return float((valid & (err > 10)).sum() / max(valid.sum(), 1))


MIRROR_X = np.array([[1, 0, 0], [0, -1, 1], [0, 0, 1]], np.float32)


def _to3(affine):
  return np.concatenate([affine, [[0, 0, 1]]], 0)


@pytest.mark.parametrize('name', sorted(CASES))
def test_pixels_follow_label_affine(sources, name):
  warps = CASES[name][1]
  formats = ('PNG', 'JPEG') if name in ('crop', 'flip', 'composition') else ('PNG',)
  for fmt in formats:
    out = _augment(sources, name, fmt)
    images, affines, boxes = out['image'], out['label_affine'], out['crop_box']
    checked, cells, wrong = 0, set(), []
    for image, affine, box in zip(images, affines, boxes):
      n, seen = check_pixels(image, affine, box, warps=warps, jpeg=fmt == 'JPEG',
                             strict_fill=warps <= 1)
      checked += n
      cells |= seen
      # Negative control: the mirrored affine must fail, so the check has power.
      mirrored = (_to3(affine) @ MIRROR_X)[:2]
      wrong.append(mismatch_fraction(image, mirrored, box, warps=warps, jpeg=fmt == 'JPEG'))
    assert checked >= 0.05 * len(SEEDS) * S * S, (name, fmt, checked)
    assert len(cells) >= 6, (name, fmt, cells)
    assert np.mean(wrong) > 0.3, (name, fmt, wrong)
    crop_only = np.array([[[b[2] - b[0], 0, b[0]], [0, b[3] - b[1], b[1]]] for b in boxes])
    np.testing.assert_allclose(out['crop_affine'], crop_only, atol=1e-6)  # the host's map
    if name == 'crop':
      np.testing.assert_allclose(affines, crop_only, atol=1e-6)
    elif name == 'flip':
      np.testing.assert_allclose(affines, [(_to3(a) @ MIRROR_X)[:2] for a in crop_only],
                                 atol=1e-6)
    else:
      # The forced ops really moved the image (every time when forced with p = 1).
      moved = ~np.all(np.isclose(affines, crop_only, atol=1e-5), axis=(1, 2))
      assert moved.all() if warps == 1 else moved.any(), (name, affines)


def test_eval_pixels_follow_label_affine(sources):
  for fmt in ('PNG', 'JPEG'):
    for size, crop_pct in ((S, 0.875), (64, 1.0)):
      out = augment.eval_preprocess(tf.constant(sources[fmt]), size, crop_pct)
      image, affine = out['image'].numpy(), out['label_affine'].numpy()
      n, cells = check_pixels(image, affine, np.array([0, 0, 1, 1], np.float32), warps=0,
                              jpeg=fmt == 'JPEG', strict_fill=True)
      assert n > 0.05 * size * size and len(cells) >= 20, (fmt, size, n, len(cells))


# ---------------------------------------------------------------------------------------------
# Token level.


def _cell_class(q):
  rows = np.clip(q[..., 0] // CELL, 0, ROWS - 1).astype(int)
  cols = np.clip(q[..., 1] // CELL, 0, COLS - 1).astype(int)
  return rows * COLS + cols


def numpy_token_classes(affine, grid, samples=4):
  """Majority class and its fraction per token: the score map sampled through the affine."""
  offsets = (np.arange(samples) + 0.5) / samples
  c = ((np.arange(grid)[:, None] + offsets) / grid).reshape(-1)  # grid*samples points per axis
  yx1 = np.stack(np.broadcast_arrays(c[:, None], c[None, :], np.ones((c.size, c.size))), -1)
  q = (yx1 @ affine.T.astype(np.float64)) * np.array([H, W])
  cls = _cell_class(q).reshape(grid, samples, grid, samples).transpose(0, 2, 1, 3)
  cls = cls.reshape(grid, grid, -1)
  majority = np.zeros((grid, grid), int)
  fraction = np.zeros((grid, grid))
  for r in range(grid):
    for col in range(grid):
      values, counts = np.unique(cls[r, col], return_counts=True)
      majority[r, col], fraction[r, col] = values[counts.argmax()], counts.max() / counts.sum()
  return majority, fraction


def image_token_classes(image, grid):
  """Majority cell (decoded from pixel colours) per token, its fraction, and the fill fraction."""
  rgb = _rgb(image)
  row = np.clip(np.round((rgb[..., 0] - 20) / 28), 0, ROWS - 1).astype(int)
  col = np.clip(np.round((rgb[..., 1] - 20) / 19), 0, COLS - 1).astype(int)
  cls = row * COLS + col
  filled = np.abs(rgb[..., 2] - BLUE) > 4
  p = image.shape[0] // grid
  majority = np.zeros((grid, grid), int)
  fraction = np.zeros((grid, grid))
  fill = np.zeros((grid, grid))
  for r in range(grid):
    for c in range(grid):
      sl = np.s_[r * p:(r + 1) * p, c * p:(c + 1) * p]
      fill[r, c] = filled[sl].mean()
      values, counts = np.unique(cls[sl][~filled[sl]], return_counts=True)
      if counts.size:
        majority[r, c], fraction[r, c] = values[counts.argmax()], counts.max() / filled[sl].size
  return majority, fraction, fill


def _token_examples(sources):
  images, affines = [], []
  for name in sorted(CASES):
    out = _augment(sources, name)
    images.append(out['image'])
    affines.append(out['label_affine'])
  return np.concatenate(images), np.concatenate(affines)


def test_token_labels_follow_label_affine(sources):
  images, affines = _token_examples(sources)
  grid = S // PATCH
  label_maj = [numpy_token_classes(a, grid) for a in affines]

  # The stored-map path: class = cell index, one logit per map cell, map covering the image.
  b = len(images)
  idx = np.broadcast_to(np.arange(ROWS * COLS).reshape(1, ROWS, COLS, 1), (b, ROWS, COLS, 1))
  _, tok = token_labeling.token_targets(
      np.full(idx.shape, 10.0, np.float32), idx.astype(np.int32),
      np.tile(np.array([[0, 0, 1, 1]], np.float32), (b, 1)), affines,
      grid=grid, num_classes=ROWS * COLS, smoothing=0.0, samples=4)
  tok = np.asarray(tok)

  checked = checked_targets = 0
  for i, (image, (lab, lab_frac)) in enumerate(zip(images, label_maj)):
    img_cls, img_frac, fill = image_token_classes(image, grid)
    clear = (lab_frac >= 0.75) & (img_frac >= 0.75) & (fill == 0)
    np.testing.assert_array_equal(lab[clear], img_cls[clear], err_msg=f'example {i}')
    checked += clear.sum()
    # token_targets samples the map bilinearly: a token whose samples all lie in one cell
    # gives that cell the largest weight at every sample, so it must win the argmax.
    pure = clear & (lab_frac == 1.0)
    np.testing.assert_array_equal(tok[i].argmax(-1)[pure], img_cls[pure],
                                  err_msg=f'token_targets, example {i}')
    checked_targets += pure.sum()
  assert checked >= 0.2 * len(images) * grid * grid, checked
  assert checked_targets >= 0.1 * len(images) * grid * grid, checked_targets


# ---------------------------------------------------------------------------------------------
# Sub-pixel precision: linear ramps are reproduced exactly by bilinear, bicubic and antialiased
# resampling, so a ramp image reads off the sampled position to a fraction of a pixel.

SLOPE = np.array([2.0, 4.0 / 3.0])  # levels per source pixel: red along y, green along x.


def ramp() -> np.ndarray:
  y = (np.arange(H)[:, None] + 0.5) * SLOPE[0] + 8.0
  x = (np.arange(W)[None, :] + 0.5) * SLOPE[1] + 8.0
  return np.stack(np.broadcast_arrays(y, x, np.full((H, W), 128.0)), -1)


RAMP_SIZE = 64  # small: half an output pixel is then >= 0.9 levels of the ramps.
RAMP_HOST = augment.AugmentConfig(image_size=RAMP_SIZE, scale=(0.25, 1.0))
RAMP_CASES = {
    'crop': (_config(), 0),
    'flip': (_config(hflip=1.0), 0),
    'rotate': (_config(**_forced('Rotate')), 1),
    'shear_x': (_config(**_forced('ShearX')), 1),
    'translate_y': (_config(**_forced('TranslateYRel')), 1),
    'three_ops': (_config(hflip=0.5, randaug_num_ops=3, randaug_prob=1.0,
                          randaug_ops=GEOMETRIC_OPS), 3),
}


@pytest.mark.parametrize('name', sorted(RAMP_CASES))
def test_ramp_positions_are_subpixel_exact(name):
  cfg, warps = RAMP_CASES[name]
  size = RAMP_SIZE
  buf = io.BytesIO()
  Image.fromarray(np.round(ramp()).astype(np.uint8)).save(buf, format='PNG')
  out = train_examples(buf.getvalue(), [(1, i) for i in range(8)], RAMP_HOST, cfg)
  errors = []
  for image, affine, box in zip(out['image'], out['label_affine'], out['crop_box']):
    rgb = _rgb(image)
    q = _source_points(affine, size)
    margin = _margin(affine, size, warps, jpeg=False) + 0.5
    box = box * np.array([H, W, H, W])
    valid = ((q[..., 0] > box[0] + margin) & (q[..., 0] < box[2] - margin) &
             (q[..., 1] > box[1] + margin) & (q[..., 1] < box[3] - margin) &
             (np.abs(rgb[..., 2] - 128) < 1.0))
    err = (rgb[..., :2] - (q * SLOPE + 8.0))[valid]
    # Rounding (source, resize) and PIL's truncation after each warp (-0.5 on average).
    assert np.abs(err + 0.5 * warps).max(initial=0) < 1.5 + 0.5 * warps, (name, np.abs(err).max())
    errors.append(err)
  # Three strong warps can push most of one image out of frame; the eight together still
  # cover a good part of theirs.
  checked = sum(len(e) for e in errors)
  assert checked > 0.1 * len(errors) * size * size, (name, [len(e) for e in errors])
  bias = np.concatenate(errors).mean(0)
  # A half-pixel slip would show as a bias of >= 0.9 levels. Rounding is unbiased, but each
  # warp's truncation costs between 0 and 1 level depending on the values' fractions (0 for a
  # channel the op does not interpolate), so with warps the window widens by 0.5 per warp; the
  # warp itself is checked to 2e-3 on float images in tests/test_device_augment.py.
  assert np.all(np.abs(bias + 0.5 * warps) < 0.3 + 0.5 * warps), (name, bias)


def test_eval_ramp_positions_are_subpixel_exact():
  buf = io.BytesIO()
  Image.fromarray(np.round(ramp()).astype(np.uint8)).save(buf, format='PNG')
  for size, crop_pct in ((RAMP_SIZE, 0.875), (40, 1.0), (150, 0.9)):
    out = augment.eval_preprocess(tf.constant(buf.getvalue()), size, crop_pct)
    image, affine = out['image'].numpy(), out['label_affine'].numpy()
    q = _source_points(affine, size)
    margin = _margin(affine, size, 0, jpeg=False) + 0.5
    valid = ((q[..., 0] > margin) & (q[..., 0] < H - margin) & (q[..., 1] > margin) &
             (q[..., 1] < W - margin))
    err = (_rgb(image)[..., :2] - (q * SLOPE + 8.0))[valid]
    assert valid.mean() > 0.3 and np.abs(err).max() < 1.5, (size, np.abs(err).max())
    assert np.all(np.abs(err.mean(0)) < 0.3), (size, err.mean(0))
