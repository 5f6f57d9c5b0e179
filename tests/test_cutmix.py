"""CutMix (the paper's ablation): pixels, area and coverage weights, the box law, label geometry.

Facts a user relies on: inside the pixel box each example shows its partner's pixels (2i <-> 2i+1);
the cls target is mixed by the clipped box area and every token by the exact fraction of its cell
inside the box; the box follows MixToken's law on the pixel grid; and after `batch_targets` +
`cutmix_targets` every token target still describes the pixels that token sees.
"""
import dataclasses
import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lvvit_jax import token_labeling as tl
from lvvit_jax.models import create_model
from tests.test_token_targets import _crop_affine


def _images(b, h, w):
  """Pixel (y, x) of example e holds (e, y, x): every swap is visible."""
  e, y, x = np.meshgrid(np.arange(b), np.arange(h), np.arange(w), indexing='ij')
  return jnp.asarray(np.stack([e, y, x], -1), jnp.float32)


def _partner(b):
  return np.arange(b) ^ 1  # pairs (0, 1), (2, 3), ...


@functools.partial(jax.jit, static_argnames=('image_size', 'grid'))
def _cutmix(images, cls_t, tok_t, box, image_size, grid):
  """Mixed images, cls and token targets, and the coverage: one compile per shape."""
  cls_m, tok_m = tl.cutmix_targets(cls_t, tok_t, box, image_size, grid)
  return tl.cutmix_images(images, box), cls_m, tok_m, tl.cell_coverage(box, image_size, grid)


# (image (H, W), grid (gh, gw), box, coverage by hand). Rows are y, columns x; boxes half open.
_HALF_ROWS = np.zeros((8, 8))
_HALF_ROWS[0] = _HALF_ROWS[2] = 0.5   # rows 4..20 of 8 px cells: 4/8 of row 0, all of 1, 4/8 of 2
_HALF_ROWS[1] = 1.0
_CUT = _HALF_ROWS * np.array([0, 0.375] + [0] * 6)  # cols 10..13: 3/8 of cell column 1
_ALIGNED = np.zeros((8, 8))
_ALIGNED[2:5, 1:7] = 1.0              # rows 16..40, cols 8..56: whole cells
_THIRDS = np.zeros((6, 4))            # 64 px / 6 cells = 10 2/3 px; 48 px / 4 = 12 px
_THIRDS[0] = [0.5, 1.0, 0.5, 0.0]     # rows 0..16: all of row 0 ([0, 10.67)), half of row 1
_THIRDS[1] = [0.25, 0.5, 0.25, 0.0]   # cols 6..30: 6/12 of col 0, col 1, 6/12 of col 2
_CORNER = np.zeros((8, 8))
_CORNER[7, 7] = 0.5                   # rows 56..80, cols 60..90 clip to 8 x 4 px of cell (7, 7)

CASES = {
    'empty': ((64, 64), (8, 8), (20, 30, 20, 50), np.zeros((8, 8)), 0),
    'inverted': ((64, 64), (8, 8), (30, 30, 10, 50), np.zeros((8, 8)), 0),
    'full': ((64, 64), (8, 8), (0, 0, 64, 64), np.ones((8, 8)), 64 * 64),
    'aligned': ((64, 64), (8, 8), (16, 8, 40, 56), _ALIGNED, 24 * 48),
    'half_rows': ((64, 64), (8, 8), (4, 0, 20, 64), _HALF_ROWS, 16 * 64),
    'cut': ((64, 64), (8, 8), (4, 10, 20, 13), _CUT, 16 * 3),
    'thirds': ((64, 48), (6, 4), (0, 6, 16, 30), _THIRDS, 16 * 24),
    'clipped': ((64, 64), (8, 8), (56, 60, 80, 90), _CORNER, 8 * 4),
}


@pytest.mark.parametrize('name', sorted(CASES))
def test_pixels_area_and_coverage_are_exact(name):
  (h, w), grid, box, coverage, area = CASES[name]
  b, k = 6, 6
  box = jnp.asarray(box, jnp.int32)
  x = _images(b, h, w)
  # One-hot targets read the weights off: example e keeps 1 - weight, its partner gets weight.
  own = np.eye(b, k, dtype=np.float32)
  tok = np.broadcast_to(own[:, None, None, :], (b,) + grid + (k,))
  mixed, cls_m, tok_m, cover = map(np.asarray, _cutmix(x, own, tok, box, (h, w), grid))
  # Pixels stay in place; inside the clipped box they come from the partner, else from their own.
  np.testing.assert_array_equal(mixed[..., 1:], np.asarray(x)[..., 1:])
  r0, c0, r1, c1 = np.asarray(box)
  inside = np.zeros((h, w), bool)
  inside[max(r0, 0):max(r1, 0), max(c0, 0):max(c1, 0)] = True
  want_owner = np.where(inside, _partner(b)[:, None, None], np.arange(b)[:, None, None])
  np.testing.assert_array_equal(mixed[..., 0], want_owner)
  assert inside.sum() == area

  np.testing.assert_array_equal(cover, coverage)
  rows, partner = np.arange(b), _partner(b)
  lam = 1.0 - area / (h * w)
  np.testing.assert_allclose(cls_m[rows, rows], lam, rtol=0, atol=1e-7)
  np.testing.assert_allclose(cls_m[rows, partner], 1.0 - lam, rtol=0, atol=1e-7)
  for e in range(b):
    np.testing.assert_allclose(tok_m[e, ..., e], 1.0 - coverage, rtol=0, atol=1e-7)
    np.testing.assert_allclose(tok_m[e, ..., partner[e]], coverage, rtol=0, atol=1e-7)


def test_full_box_makes_every_example_its_partner_and_empty_box_changes_nothing():
  b, h, w, grid, k = 6, 64, 64, (8, 8), 6
  rng = np.random.default_rng(0)
  x = rng.normal(size=(b, h, w, 3)).astype(np.float32)
  cls = rng.dirichlet(np.ones(k), size=b).astype(np.float32)
  tok = rng.dirichlet(np.ones(k), size=(b,) + grid).astype(np.float32)
  partner = _partner(b)
  full = jnp.asarray((0, 0, h, w), jnp.int32)
  mixed, cls_m, tok_m, _ = _cutmix(x, cls, tok, full, (h, w), grid)
  np.testing.assert_array_equal(mixed, x[partner])
  np.testing.assert_array_equal(cls_m, cls[partner])
  np.testing.assert_array_equal(tok_m, tok[partner])
  empty = jnp.asarray((7, 9, 7, 40), jnp.int32)
  mixed, cls_m, tok_m, _ = _cutmix(x, cls, tok, empty, (h, w), grid)
  np.testing.assert_array_equal(mixed, x)
  np.testing.assert_array_equal(cls_m, cls)
  np.testing.assert_array_equal(tok_m, tok)


_coverage = jax.jit(tl.cell_coverage, static_argnums=(1, 2))


@pytest.mark.parametrize('image_size,grid', [((64, 64), (8, 8)), ((64, 48), (6, 5))])
def test_coverage_matches_a_subpixel_count_for_random_boxes(image_size, grid):
  """Reference: the pixel mask repeated gh (gw) times, so cell edges fall on sub-pixels."""
  h, w = image_size
  gh, gw = grid
  rng = np.random.default_rng(0)
  for _ in range(20):
    r = np.sort(rng.integers(0, h + 1, 2))
    c = np.sort(rng.integers(0, w + 1, 2))
    mask = np.zeros((h, w))
    mask[r[0]:r[1], c[0]:c[1]] = 1.0
    fine = np.repeat(np.repeat(mask, gh, axis=0), gw, axis=1)  # (h * gh, w * gw)
    want = fine.reshape(gh, h, gw, w).mean(axis=(1, 3))
    box = jnp.asarray((r[0], c[0], r[1], c[1]), jnp.int32)
    got = np.asarray(_coverage(box, image_size, grid))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    # The coverage-weighted cells add up to the mixed area, the cls target's weight.
    np.testing.assert_allclose(got.sum() * h * w / (gh * gw), mask.sum(), rtol=1e-6)


def test_sample_cutmix_box_follows_mixtokens_law_on_pixels_and_never_recompiles():
  h, w = 5, 9  # non-square, so swapped sides cannot pass; small, so empty boxes are common
  traces = []

  def draws(key):
    """The box and, from the same key, SPEC section 4's lambda and centre on the pixel grid."""
    k_lam, k_row, k_col = jax.random.split(key, 3)
    return (tl.sample_cutmix_box(key, (h, w)), jax.random.beta(k_lam, 1.0, 1.0),
            jax.random.randint(k_row, (), 0, h), jax.random.randint(k_col, (), 0, w))

  @jax.jit
  def sample(keys):
    traces.append(1)
    return jax.vmap(draws)(keys)

  keys = jax.random.split(jax.random.key(1), 400)
  halves = [jax.tree.map(np.asarray, sample(k)) for k in (keys[:200], keys[200:])]
  assert len(traces) == 1  # new keys (new boxes) reuse the compiled step
  boxes, lams, cys, cxs = (np.concatenate(parts) for parts in zip(*halves))
  assert boxes.dtype == np.int32 and boxes.shape == (400, 4)
  r0, c0, r1, c1 = boxes.T
  assert np.all((0 <= r0) & (r0 <= r1) & (r1 <= h) & (0 <= c0) & (c0 <= c1) & (c1 <= w))
  cut = np.sqrt(np.float32(1.0) - lams)  # float32, as traced
  side_h = (np.float32(h) * cut).astype(int)
  side_w = (np.float32(w) * cut).astype(int)
  np.testing.assert_array_equal(r0, np.maximum(cys - side_h // 2, 0))
  np.testing.assert_array_equal(r1, np.minimum(cys - side_h // 2 + side_h, h))
  np.testing.assert_array_equal(c0, np.maximum(cxs - side_w // 2, 0))
  np.testing.assert_array_equal(c1, np.minimum(cxs - side_w // 2 + side_w, w))
  areas = (r1 - r0) * (c1 - c0)
  clipped = (r1 - r0 < side_h) | (c1 - c0 < side_w)
  # Empty when lambda > 24/25 (side_h 0); clipped boxes and large ones occur too.
  assert (areas == 0).any() and clipped.any() and (areas > h * w // 2).any()


# ---------------------------------------------------------------------------------------------
# Geometry: token targets stay with their pixels through `label_affine`.

SIZE, GRID, MAP, K = 64, 8, 4, 16
CROPS = [((0.0, 0.0, 0.5, 0.5), False), ((0.25, 0.25, 0.75, 0.75), True),
         ((0.5, 0.0, 1.0, 1.0), False), ((0.0, 0.5, 1.0, 1.0), True)]


def _map_classes(e):
  """Class of map cell (r, c) of example e: every example's map differs from its partner's."""
  r, c = np.meshgrid(np.arange(MAP), np.arange(MAP), indexing='ij')
  return (MAP * r + c + 5 * e) % K


def _class_at(e, affine, y, x):
  """The class example e's map gives the output point (y, x) (normalised) through its affine."""
  src = affine @ np.stack([y, x, np.ones_like(y)])
  rows = np.clip((src[0] * MAP).astype(int), 0, MAP - 1)
  cols = np.clip((src[1] * MAP).astype(int), 0, MAP - 1)
  return _map_classes(e)[rows, cols]


def test_token_targets_follow_their_pixels_through_label_affine():
  """Crops and flips whose token cells each see one map cell; every image pixel shows the class
  of the map at its source point. After CutMix, a token's target must be the histogram of the
  classes its pixels show: the partner's map at the partner's pixels inside the box."""
  b = len(CROPS)
  affines = np.stack([_crop_affine(crop, flip) for crop, flip in CROPS])
  centres = (np.arange(SIZE) + 0.5) / SIZE
  y, x = (a.ravel() for a in np.meshgrid(centres, centres, indexing='ij'))
  pixel_class = np.stack([_class_at(e, affines[e], y, x).reshape(SIZE, SIZE) for e in range(b)])
  batch = {
      'image': jnp.asarray(pixel_class[..., None], jnp.float32),
      'label': jnp.zeros((b,), jnp.int32),
      # A confident teacher (logit 1000, k = 1): each own target is one-hot to float precision.
      'topk_logits': jnp.full((b, MAP, MAP, 1), 1000.0, jnp.float32),
      'topk_idx': jnp.asarray(np.stack([_map_classes(e) for e in range(b)])[..., None]),
      'map_box': jnp.tile(jnp.asarray([[0.0, 0.0, 1.0, 1.0]]), (b, 1)),
      'label_affine': jnp.asarray(affines),
  }
  box = jnp.asarray((12, 20, 44, 40), jnp.int32)  # whole cells and halves of cells

  @jax.jit
  def targets_then_cutmix(batch, box):
    cls_t, tok_t = tl.batch_targets(batch, grid=GRID, num_classes=K, smoothing=0.0)
    return tok_t, _cutmix(batch['image'], cls_t, tok_t, box, (SIZE, SIZE), (GRID, GRID))

  tok_t, (images, _, tok_m, cover) = jax.tree.map(np.asarray, targets_then_cutmix(batch, box))
  assert tok_t.max(-1).min() > 1.0 - 1e-6
  images = images[..., 0].astype(int)
  assert {0.0, 0.5, 1.0} <= set(np.unique(cover))

  p = SIZE // GRID
  cells = images.reshape(b, GRID, p, GRID, p).transpose(0, 1, 3, 2, 4).reshape(b, GRID, GRID, -1)
  shown = np.stack([np.bincount(v, minlength=K) / v.size for v in cells.reshape(-1, p * p)])
  np.testing.assert_allclose(tok_m, shown.reshape(b, GRID, GRID, K), atol=1e-5)
  # The same fact from the maps alone, at token centres: covered cells read the partner's map
  # through the partner's affine, uncovered cells their own.
  tc = (np.arange(GRID) + 0.5) / GRID
  ty, tx = (a.ravel() for a in np.meshgrid(tc, tc, indexing='ij'))
  argmax = tok_m.argmax(-1).reshape(b, -1)
  for e, q in zip(range(b), _partner(b)):
    own, theirs = _class_at(e, affines[e], ty, tx), _class_at(q, affines[q], ty, tx)
    full, none = cover.ravel() == 1.0, cover.ravel() == 0.0
    np.testing.assert_array_equal(argmax[e][full], theirs[full])
    np.testing.assert_array_equal(argmax[e][none], own[none])


# ---------------------------------------------------------------------------------------------
# The objective.


class _Recorder:
  """Records what `training_loss` feeds the model; answers with `model`, or zeros without one."""

  def __init__(self, model=None, grid=(8, 8), num_classes=10):
    self.model = model
    self.config = types.SimpleNamespace(grid=grid, num_classes=num_classes)
    if model is not None:
      self.config = model.config
    self.calls = []

  def apply(self, variables, images, **kwargs):
    self.calls.append((images, kwargs['mix_box']))
    if self.model is not None:
      return self.model.apply(variables, images, **kwargs)
    b, (gh, gw), k = images.shape[0], self.config.grid, self.config.num_classes
    return (jnp.zeros((b, k)), jnp.zeros((b, gh * gw, k))), {'batch_stats': {}}


def test_mix_method_is_mix_unless_mixtoken_is_off():
  assert tl.ObjectiveConfig().mix_method == 'mixtoken'  # the method's default
  for mix in ('mixtoken', 'cutmix', 'none'):
    assert tl.ObjectiveConfig(mix=mix).mix_method == mix
    assert tl.ObjectiveConfig(mixtoken=False, mix=mix).mix_method == 'none'


@pytest.mark.parametrize('mixtoken,mix,want', [(True, 'mixtoken', 'mixtoken'),
                                               (False, 'cutmix', 'none')])
def test_mixtoken_switch_and_mix_choose_what_the_model_sees(mixtoken, mix, want):
  """MixToken gives the model its box; off, the model sees the batch (cutmix: the next test)."""
  cfg = tl.ObjectiveConfig(mixtoken=mixtoken, mix=mix)
  model = _Recorder()
  images = _images(4, 64, 64)
  rng = jax.random.key(3)

  @jax.jit
  def seen_by_model(batch, rng):
    tl.training_loss(model, {}, {}, batch, rng, cfg)
    if want != 'mixtoken':
      return model.calls[-1], None
    # MixToken's box from the first half of the key (the same draw, shared by XLA).
    return model.calls[-1], tl.sample_mix_box(jax.random.split(rng)[0], (8, 8))

  (seen, mix_box), want_box = seen_by_model({'image': images, 'label': jnp.arange(4)}, rng)
  np.testing.assert_array_equal(seen, images)
  if want == 'mixtoken':
    np.testing.assert_array_equal(mix_box, want_box)
  else:
    assert mix_box is None


def _variables(model, images, seed=0):
  """Random variables of the right shapes without compiling `init` (its random initialisers
  cost ~10 s of compilation on CPU); the values only need to be finite."""
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name in ('scale', 'var'):
      return np.ones(leaf.shape, leaf.dtype)
    if name in ('bias', 'mean'):
      return np.zeros(leaf.shape, leaf.dtype)
    return (0.02 * rng.standard_normal(leaf.shape)).astype(leaf.dtype)

  shapes = jax.eval_shape(model.init, {'params': jax.random.key(seed)}, images)
  return jax.tree_util.tree_map_with_path(fill, shapes)


def test_training_loss_with_cutmix_runs_under_jit_on_a_demo_lvvit():
  """The step mixes the pixels in a box drawn from MixToken's key, runs the model unmixed
  (mix_box None) and gives a finite loss; a new box never recompiles."""
  model = _Recorder(create_model('lvvit_t', img_size=64, patch_size=8, depth=1, dim=64,
                                 num_heads=2, mlp_hidden=128, num_classes=10))
  b = 4
  rng = np.random.default_rng(0)
  images = rng.standard_normal((b, 64, 64, 3)).astype(np.float32)
  variables = _variables(model.model, images)
  batch = {
      'image': images,
      'label': np.arange(b) % 10,
      'topk_logits': (3.0 * rng.standard_normal((b, 4, 4, 3))).astype(np.float32),
      'topk_idx': rng.integers(0, 10, (b, 4, 4, 3)).astype(np.int32),
      'map_box': np.tile(np.asarray([[0.0, 0.0, 1.0, 1.0]], np.float32), (b, 1)),
      'label_affine': np.tile(np.asarray([[[1.0, 0, 0], [0, 1.0, 0]]], np.float32), (b, 1, 1)),
  }
  cfg = tl.ObjectiveConfig(mix='cutmix')
  traces = []

  @jax.jit
  def loss(params, batch_stats, batch, rng):
    traces.append(1)
    total, (_, parts) = tl.training_loss(model, params, batch_stats, batch, rng, cfg)
    # CutMix's pixel box from the first half of the key (the same draw, shared by XLA).
    return total, parts, model.calls[-1], tl.sample_cutmix_box(jax.random.split(rng)[0],
                                                               (64, 64))

  for seed in (1, 2):
    key = jax.random.key(seed)
    total, parts, (seen, mix_box), pixel_box = loss(variables['params'],
                                                    variables['batch_stats'], batch, key)
    assert np.isfinite(float(total)) and float(parts['dense']) > 0
    assert mix_box is None
    assert 0 < int(tl.box_area(pixel_box, (64, 64))) < 64 * 64  # these keys mix something
    np.testing.assert_array_equal(seen, tl.cutmix_images(images, pixel_box))
  assert len(traces) == 1  # a new box never recompiles the step


@pytest.mark.parametrize('bad', ['cut_mix', 'CutMix', ''])
def test_a_bad_mix_names_config_mix(bad):
  with pytest.raises(ValueError, match=r'objective\.py: config\.mix=.*mixtoken.*cutmix.*none'):
    tl.ObjectiveConfig(mix=bad)
  with pytest.raises(ValueError, match=r'config\.mix'):
    dataclasses.replace(tl.ObjectiveConfig(), mix=bad)
