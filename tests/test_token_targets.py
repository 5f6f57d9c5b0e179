"""Token targets from top-k maps: RoIAlign parity, geometry, smoothing, plain labels, transforms.

The reference is a brute-force NumPy RoIAlign (torchvision's aligned=True semantics) on the
densified map, so these tests pin the geometry convention the input pipeline relies on: rows are
y, columns x, `map_box` honoured, a flip is a reversed crop.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lvvit_jax import token_labeling as tl

K = 11  # classes
TOPK = 3
MAP_HW = (7, 5)  # non-square map, so a swapped y/x cannot pass
GRID = (4, 3)  # non-square grid likewise


def _random_maps(rng, b, h, w, k=TOPK, num_classes=K, scale=3.0):
  logits = (rng.normal(size=(b, h, w, k)) * scale).astype(np.float32)
  idx = np.argsort(rng.random((b, h, w, num_classes)), axis=-1)[..., :k].astype(np.int32)
  return logits, idx


def _densify(logits, idx, num_classes=K):
  """(h, w, k) top-k -> (h, w, K) with logit 0 outside the top-k."""
  h, w, k = logits.shape
  dense = np.zeros((h, w, num_classes), np.float64)
  for y in range(h):
    for x in range(w):
      for j in range(k):
        dense[y, x, idx[y, x, j]] = logits[y, x, j]
  return dense


def _bilinear(img, y, x, outside):
  """torchvision's roi_align bilinear_interpolate; outside='edge' clamps instead of zeroing."""
  h, w = img.shape[:2]
  if outside == 'zero' and (y < -1.0 or y > h or x < -1.0 or x > w):
    return np.zeros(img.shape[-1])
  y = min(max(y, 0.0), h - 1.0)
  x = min(max(x, 0.0), w - 1.0)
  y0, x0 = int(np.floor(y)), int(np.floor(x))
  y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
  ly, lx = y - y0, x - x0
  return ((1 - ly) * (1 - lx) * img[y0, x0] + (1 - ly) * lx * img[y0, x1] +
          ly * (1 - lx) * img[y1, x0] + ly * lx * img[y1, x1])


def _roi_align(img, box, out_hw, samples_hw, outside='zero'):
  """Brute-force RoIAlign, aligned=True; box (y0, x0, y1, x1) in map pixels (edges 0..h)."""
  ph, pw = out_hw
  sh, sw = samples_hw
  start_y, start_x = box[0] - 0.5, box[1] - 0.5
  bin_h, bin_w = (box[2] - box[0]) / ph, (box[3] - box[1]) / pw
  out = np.zeros((ph, pw, img.shape[-1]))
  for r in range(ph):
    for c in range(pw):
      acc = np.zeros(img.shape[-1])
      for iy in range(sh):
        for ix in range(sw):
          y = start_y + r * bin_h + (iy + 0.5) * bin_h / sh
          x = start_x + c * bin_w + (ix + 0.5) * bin_w / sw
          acc += _bilinear(img, y, x, outside)
      out[r, c] = acc / (sh * sw)
  return out


def _smooth_softmax(logits, smoothing):
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  k = p.shape[-1]
  return (p * (1 - smoothing + smoothing / k) + smoothing / k) / (1 + smoothing / k)


def _crop_affine(crop, flip=False):
  """Affine of a crop (y0, x0, y1, x1) of the source image, optionally flipped left-right."""
  y0, x0, y1, x1 = crop
  if flip:
    return np.array([[y1 - y0, 0, y0], [0, x0 - x1, x1]], np.float32)
  return np.array([[y1 - y0, 0, y0], [0, x1 - x0, x0]], np.float32)


def _reference(logits, idx, map_box, crop, grid, samples, outside='zero'):
  """(cls_logits (K,), token_logits (gh, gw, K)) for an axis-aligned crop, via RoIAlign."""
  h, w = logits.shape[:2]
  my0, mx0, my1, mx1 = map_box
  box = ((crop[0] - my0) / (my1 - my0) * h, (crop[1] - mx0) / (mx1 - mx0) * w,
         (crop[2] - my0) / (my1 - my0) * h, (crop[3] - mx0) / (mx1 - mx0) * w)
  dense = _densify(logits, idx)
  tokens = _roi_align(dense, box, grid, (samples, samples), outside)
  cls = _roi_align(dense, box, (1, 1), (grid[0] * samples, grid[1] * samples), outside)[0, 0]
  return cls, tokens


@functools.partial(jax.jit, static_argnames=('grid', 'samples', 'method', 'smoothing'))
def _targets(logits, idx, map_box, affine, grid=GRID, samples=2, method='scatter',
             smoothing=0.1):
  pooled = tl.pool_topk_logits(logits, idx, map_box, affine, grid=grid, num_classes=K,
                               samples=samples, method=method)
  targets = tl.token_targets(logits, idx, map_box, affine, grid=grid, num_classes=K,
                             smoothing=smoothing, samples=samples, method=method)
  return pooled, targets


def _check_against_roi_align(rng, crops, flips, map_boxes, samples=2, method='scatter',
                             outside='zero'):
  b = len(crops)
  logits, idx = _random_maps(rng, b, *MAP_HW)
  affine = np.stack([_crop_affine(c, f) for c, f in zip(crops, flips)])
  map_boxes = np.asarray(map_boxes, np.float32)
  (cls_l, tok_l), (cls_t, tok_t) = _targets(logits, idx, map_boxes, affine, samples=samples,
                                            method=method)
  for i in range(b):
    ref_cls, ref_tok = _reference(logits[i], idx[i], map_boxes[i], crops[i], GRID, samples,
                                  outside)
    if flips[i]:
      ref_tok = ref_tok[:, ::-1]
    np.testing.assert_allclose(tok_l[i], ref_tok, atol=1e-5, rtol=0)
    np.testing.assert_allclose(cls_l[i], ref_cls, atol=1e-5, rtol=0)
    np.testing.assert_allclose(tok_t[i], _smooth_softmax(ref_tok, 0.1), atol=1e-5, rtol=0)
    np.testing.assert_allclose(cls_t[i], _smooth_softmax(ref_cls, 0.1), atol=1e-5, rtol=0)


@pytest.mark.parametrize('method', ['scatter', 'dense'])
def test_matches_roi_align_for_axis_aligned_and_flipped_crops(method):
  rng = np.random.default_rng(0)
  crops, flips = [], []
  for i in range(6):
    y0, x0 = rng.uniform(0.0, 0.5, size=2)
    hh, ww = rng.uniform(0.15, 0.5, size=2)
    crops.append((y0, x0, y0 + hh, x0 + ww))
    flips.append(i % 2 == 1)
  crops.append((0.0, 0.0, 1.0, 1.0))  # the whole image, flipped: reads the map's edges
  flips.append(True)
  crops.append((0.0, 0.0, 1.0, 1.0))
  flips.append(False)
  _check_against_roi_align(rng, crops, flips, [(0, 0, 1, 1)] * len(crops), method=method)


def test_matches_roi_align_with_partial_map_box_and_sample_counts():
  rng = np.random.default_rng(1)
  map_box = (0.1, 0.2, 0.9, 0.7)  # e.g. the teacher saw a centre crop of a wide image
  crops = [(0.15, 0.25, 0.6, 0.5), (0.3, 0.3, 0.85, 0.65), (0.1, 0.2, 0.9, 0.7),
           (0.2, 0.22, 0.5, 0.4)]
  flips = [False, True, False, True]
  for samples in (1, 3):
    _check_against_roi_align(rng, crops, flips, [map_box] * 4, samples=samples)


def test_footprint_outside_the_map_reads_the_edge_value():
  rng = np.random.default_rng(2)
  crops = [(-0.4, -0.3, 1.3, 1.2), (0.5, 0.6, 1.8, 1.5)]
  _check_against_roi_align(rng, crops, [False, True], [(0, 0, 1, 1), (0.1, 0.0, 0.9, 1.0)],
                           outside='edge')


def test_identity_on_map_sized_grid_gives_per_cell_softmax():
  rng = np.random.default_rng(3)
  n = 6
  logits, idx = _random_maps(rng, 2, n, n)
  affine = np.stack([_crop_affine((0, 0, 1, 1))] * 2)
  map_box = np.tile(np.float32([0, 0, 1, 1]), (2, 1))
  _, (cls_t, tok_t) = _targets(logits, idx, map_box, affine, grid=(n, n), samples=1)
  for i in range(2):
    dense = _densify(logits[i], idx[i])
    np.testing.assert_allclose(tok_t[i], _smooth_softmax(dense, 0.1), atol=1e-6)
    np.testing.assert_allclose(cls_t[i], _smooth_softmax(dense.mean((0, 1)), 0.1), atol=1e-6)


@pytest.mark.parametrize('grid,samples', [((6, 6), 1), ((6, 6), 2), ((4, 4), 2)])
def test_rotation_by_90_degrees_rotates_the_targets(grid, samples):
  rng = np.random.default_rng(4)
  logits, idx = _random_maps(rng, 2, 6, 6)
  identity = _crop_affine((0, 0, 1, 1))
  # Output (y, x) -> source (x, 1 - y): the output is the source turned 90 degrees
  # anticlockwise, i.e. out[r, c] = src[c, n - 1 - r] = np.rot90(src)[r, c].
  rot = np.array([[0, 1, 0], [-1, 0, 1]], np.float32)
  affine = np.stack([identity, rot])
  map_box = np.tile(np.float32([0, 0, 1, 1]), (2, 1))
  both = np.concatenate([logits[:1]] * 2), np.concatenate([idx[:1]] * 2)
  _, (cls_t, tok_t) = _targets(*both, map_box, affine, grid=grid, samples=samples)
  np.testing.assert_allclose(tok_t[1], np.rot90(tok_t[0], axes=(0, 1)), atol=1e-6)
  np.testing.assert_allclose(cls_t[1], cls_t[0], atol=1e-6)
  assert not np.allclose(tok_t[1], tok_t[0], atol=1e-3)  # the map is not rotation invariant


def test_methods_agree_under_rotation_and_shear():
  rng = np.random.default_rng(5)
  b = 4
  logits, idx = _random_maps(rng, b, *MAP_HW)
  affine = rng.normal(size=(b, 2, 3)).astype(np.float32) * 0.3
  affine[:, 0, 0] += 0.7
  affine[:, 1, 1] += 0.7
  affine[:, :, 2] += 0.2
  map_box = np.tile(np.float32([0.05, 0.0, 0.95, 1.0]), (b, 1))
  scatter = _targets(logits, idx, map_box, affine, method='scatter')
  dense = _targets(logits, idx, map_box, affine, method='dense')
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), scatter, dense)


def test_smoothing_and_dtypes():
  rng = np.random.default_rng(6)
  b = 3
  logits, idx = _random_maps(rng, b, *MAP_HW)
  affine = np.stack([_crop_affine((0.1, 0.2, 0.7, 0.9))] * b)
  map_box = np.tile(np.float32([0, 0, 1, 1]), (b, 1))
  (cls_l, tok_l), (cls_t, tok_t) = _targets(logits, idx, map_box, affine)
  np.testing.assert_allclose(np.sum(tok_t, -1), 1.0, atol=1e-5)
  np.testing.assert_allclose(np.sum(cls_t, -1), 1.0, atol=1e-5)
  assert tok_t.dtype == jnp.float32 and tok_t.shape == (b,) + GRID + (K,)
  assert cls_t.shape == (b, K)
  _, (_, tok_raw) = _targets(logits, idx, map_box, affine, smoothing=0.0)
  np.testing.assert_allclose(tok_raw, jax.nn.softmax(tok_l, -1), atol=1e-6)
  # Stored maps are fp16, class indices included: the same result up to fp16 rounding.
  _, (cls_16, tok_16) = _targets(logits.astype(np.float16), idx.astype(np.float16), map_box,
                                 affine)
  logits_16 = logits.astype(np.float16).astype(np.float32)
  _, (_, tok_ref) = _targets(logits_16, idx, map_box, affine)
  np.testing.assert_allclose(tok_16, tok_ref, atol=1e-6)


def test_plain_labels_are_the_same_smoothing_as_a_confident_map():
  b = 3
  labels = np.array([0, 4, 10])
  cls, tok = tl.label_targets(labels, grid=GRID, num_classes=K, smoothing=0.1)
  assert cls.shape == (b, K) and tok.shape == (b,) + GRID + (K,)
  expected = _smooth_softmax(np.eye(K)[labels] * 1e4, 0.1)
  np.testing.assert_allclose(cls, expected, atol=1e-6)
  np.testing.assert_allclose(tok, np.broadcast_to(expected[:, None, None], tok.shape), atol=1e-6)
  # A map that is certain of the label everywhere gives the same targets.
  h, w = MAP_HW
  logits = np.full((b, h, w, TOPK), -50.0, np.float32)
  logits[..., 0] = 100.0
  idx = np.stack([(labels + j) % K for j in range(TOPK)], -1)[:, None, None, :]
  idx = np.broadcast_to(idx, (b, h, w, TOPK)).astype(np.int32)
  affine = np.stack([_crop_affine((0.2, 0.1, 0.8, 0.9), flip=True)] * b)
  map_box = np.tile(np.float32([0, 0, 1, 1]), (b, 1))
  _, (cls_m, tok_m) = _targets(logits, idx, map_box, affine)
  np.testing.assert_allclose(cls_m, cls, atol=1e-6)
  np.testing.assert_allclose(tok_m, tok, atol=1e-6)


def test_vmap_grad_and_no_retrace():
  rng = np.random.default_rng(7)
  m, b = 2, 2
  logits, idx = _random_maps(rng, m * b, *MAP_HW)
  crops = [(0.1, 0.1, 0.6, 0.7), (0.3, 0.0, 0.9, 0.5), (0.0, 0.2, 1.0, 1.0), (0.2, 0.2, 0.4, 0.5)]
  affine = np.stack([_crop_affine(c, i % 2 == 0) for i, c in enumerate(crops)])
  map_box = np.tile(np.float32([0, 0, 1, 1]), (m * b, 1))
  fn = functools.partial(tl.token_targets, grid=GRID, num_classes=K)
  flat = jax.jit(fn)(logits, idx, map_box, affine)
  split = lambda x: x.reshape((m, b) + x.shape[1:])
  vmapped = jax.jit(jax.vmap(fn))(split(logits), split(idx), split(map_box), split(affine))
  jax.tree.map(lambda a, v: np.testing.assert_allclose(split(a), v, atol=1e-6), flat, vmapped)

  def objective(lg):
    cls, tok = fn(lg, idx, map_box, affine)
    return jnp.sum(cls * jnp.arange(K)) + jnp.sum(tok[..., 3] ** 2)

  grad = jax.jit(jax.grad(objective))(logits)
  assert grad.shape == logits.shape and np.all(np.isfinite(grad)) and np.any(grad != 0)

  traces = []

  @jax.jit
  def traced(lg, aff):
    traces.append(1)
    return fn(lg, idx, map_box, aff)

  traced(logits, affine)
  traced(logits + 1, affine[::-1])  # new values, same shapes: no new trace
  assert len(traces) == 1


@pytest.mark.parametrize('method', ['scatter', 'dense'])
def test_batch_sharded_targets_stay_on_their_device(method):
  devices = jax.devices()
  # tests/conftest.py sets XLA_FLAGS=--xla_force_host_platform_device_count=4 before jax starts.
  assert len(devices) >= 4, 'needs 4 devices: run through pytest so tests/conftest.py applies'
  rng = np.random.default_rng(8)
  b = 8
  logits, idx = _random_maps(rng, b, *MAP_HW)
  affine = np.tile(np.float32([[0.5, 0.1, 0.2], [-0.1, 0.5, 0.3]]), (b, 1, 1))
  map_box = np.tile(np.float32([0, 0, 1, 1]), (b, 1))
  sharded = NamedSharding(Mesh(np.asarray(devices[:4]), ('data',)), P('data'))
  base = functools.partial(tl.token_targets, grid=GRID, num_classes=K, method=method)
  fn = jax.jit(base, in_shardings=(sharded,) * 4, out_shardings=(sharded, sharded))
  args = [jax.device_put(a, sharded) for a in (logits, idx, map_box, affine)]
  hlo = fn.lower(*args).compile().as_text().lower()
  for op in ('all-gather', 'all-to-all', 'collective-permute', 'all-reduce', 'reduce-scatter'):
    assert op not in hlo, f'token_targets moves data between devices: {op} in the HLO'
  want = jax.jit(base)(logits, idx, map_box, affine)
  jax.tree.map(lambda a, w: np.testing.assert_allclose(a, w, atol=1e-6), fn(*args), want)


def test_bad_shapes_name_the_file_and_the_fix():
  logits = np.zeros((2, 5, 5, 3), np.float32)
  idx = np.zeros((2, 5, 5, 3), np.int32)
  box = np.zeros((2, 4), np.float32)
  aff = np.zeros((2, 2, 3), np.float32)
  kw = dict(grid=4, num_classes=K)
  with pytest.raises(ValueError, match='targets.py.*transpose'):
    tl.token_targets(logits[0], idx[0], box, aff, **kw)
  with pytest.raises(ValueError, match='targets.py.*map_box'):
    tl.token_targets(logits, idx, box[:, :2], aff, **kw)
  with pytest.raises(ValueError, match='targets.py.*label_affine'):
    tl.token_targets(logits, idx, box, aff[:, :, :2], **kw)
  with pytest.raises(ValueError, match='targets.py.*method'):
    tl.token_targets(logits, idx, box, aff, method='fast', **kw)
