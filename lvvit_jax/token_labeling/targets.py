"""Dense token-labeling targets from stored top-k score maps (SPEC sections 2 and 3).

The input pipeline hands over, per example, the untouched top-k map of the teacher, the region of
the source image it covers (`map_box`) and one affine from output-image coordinates to
source-image coordinates (crop, flip and the geometric RandAugment ops composed). Everything
below runs inside the jitted train step: static shapes, no Python loop over the batch.

Coordinates (shared with the input pipeline):
  * normalised coordinates are continuous, 0 = top/left edge of the first pixel and 1 = the
    bottom/right edge of the last; pixel (or map cell) j of n has its centre at (j + 0.5) / n;
  * rows are y and columns x everywhere: points are (y, x), boxes (y0, x0, y1, x1);
  * token cell r of gh covers output rows [r / gh, (r + 1) / gh]; with `samples` = s per axis its
    samples sit at (r + (i + 0.5) / s) / gh, i = 0..s-1 (RoIAlign with aligned=True);
  * an output point (y, x) maps to the source point `label_affine @ (y, x, 1)`; a source point maps
    to the map by u = (y_src - y0) / (y1 - y0) (map_box), then to the map-pixel coordinate
    u * h - 0.5, clamped to [0, h - 1] for bilinear interpolation, so a footprint outside the map
    reads the edge value.

Semantics (the release's, with its swapped box fixed and `map_box` honoured): densify the top-k
logits (other classes get logit 0), average the bilinearly sampled logits over each token cell's
samples (the cls target over all samples of the crop), softmax, then smooth.

Smoothing: `t = (p * (1 - s + s / K) + s / K) / (1 + s / K)`. The release stops before the
division, so its targets sum to 1 + s / K; here they are renormalised to sum to exactly 1 (a
factor 1.0001 at K = 1000, s = 0.1). The plain-label path (`label_targets`) applies the same
function to the one-hot label.
"""
from __future__ import annotations

from typing import Tuple

import jax
import jax.numpy as jnp

from lvvit_jax.token_labeling.mixtoken import Grid
from lvvit_jax.token_labeling.mixtoken import grid_shape

_FILE = 'lvvit_jax/token_labeling/targets.py'
METHODS = ('scatter', 'dense')


def smooth_targets(probs: jax.Array, smoothing: float) -> jax.Array:
  """Release smoothing `p * (1 - s + s/K) + s/K`, renormalised to sum to 1 (see module doc)."""
  k = probs.shape[-1]
  s = float(smoothing)
  return (probs * (1.0 - s + s / k) + s / k) / (1.0 + s / k)


def label_targets(labels: jax.Array, *, grid: Grid, num_classes: int,
                  smoothing: float = 0.1) -> Tuple[jax.Array, jax.Array]:
  """Targets without a score map: the smoothed one-hot label for the cls and every token.

  Args:
    labels: (B,) integer class labels.
    grid: token grid, an int or (gh, gw).
    num_classes: K.
    smoothing: label smoothing s, the same function as `token_targets` uses.

  Returns:
    cls_target (B, K) and token_targets (B, gh, gw, K), float32.
  """
  gh, gw = grid_shape(grid)
  labels = jnp.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f'{_FILE}: label_targets expects labels of shape (B,), got {labels.shape}; '
                     'pass one integer class per example.')
  cls = smooth_targets(jax.nn.one_hot(labels, num_classes, dtype=jnp.float32), smoothing)
  tok = jnp.broadcast_to(cls[:, None, None, :], (cls.shape[0], gh, gw, num_classes))
  return cls, tok


def _check_inputs(topk_logits, topk_idx, map_box, label_affine, gh, gw, samples, method):
  if topk_logits.ndim != 4:
    raise ValueError(
        f'{_FILE}: topk_logits must be (B, h, w, k), got shape {topk_logits.shape}; stored '
        'maps of shape (2, k, h, w) hold logits in plane 0 and class indices in plane 1: '
        'transpose each plane to (h, w, k) and stack the batch.')
  if topk_idx.shape != topk_logits.shape:
    raise ValueError(f'{_FILE}: topk_idx has shape {topk_idx.shape} but topk_logits has '
                     f'{topk_logits.shape}; both must be (B, h, w, k).')
  b = topk_logits.shape[0]
  if map_box.shape != (b, 4):
    raise ValueError(f'{_FILE}: map_box must be ({b}, 4) = (y0, x0, y1, x1) per example, got '
                     f'{map_box.shape}; use [0, 0, 1, 1] when the map covers the whole image.')
  if label_affine.shape != (b, 2, 3):
    raise ValueError(f'{_FILE}: label_affine must be ({b}, 2, 3), got {label_affine.shape}; '
                     'it maps an output point (y, x, 1) to the source point (y, x).')
  if gh < 1 or gw < 1 or samples < 1:
    raise ValueError(f'{_FILE}: grid {(gh, gw)} and samples {samples} must be positive.')
  if method not in METHODS:
    raise ValueError(f'{_FILE}: method {method!r} is not one of {METHODS}.')


def map_sample_coords(map_box: jax.Array, label_affine: jax.Array, *, grid: Grid, samples: int,
                      map_size: Tuple[int, int]) -> Tuple[jax.Array, jax.Array]:
  """Map-pixel coordinates (py, px), each (B, gh*s, gw*s), of every token-cell sample.

  Clamped to [0, h - 1] x [0, w - 1], so bilinear interpolation at them reads the edge value
  outside the map. Row gh_i * s + i of the result is sample i of token row gh_i (likewise columns).
  """
  gh, gw = grid_shape(grid)
  h, w = map_size
  s = samples
  offsets = (jnp.arange(s, dtype=jnp.float32) + 0.5) / s
  yo = ((jnp.arange(gh, dtype=jnp.float32)[:, None] + offsets) / gh).reshape(-1)[:, None]
  xo = ((jnp.arange(gw, dtype=jnp.float32)[:, None] + offsets) / gw).reshape(-1)[None, :]
  a = label_affine.astype(jnp.float32)[..., None, None]  # (B, 2, 3, 1, 1)
  y_src = a[:, 0, 0] * yo + a[:, 0, 1] * xo + a[:, 0, 2]
  x_src = a[:, 1, 0] * yo + a[:, 1, 1] * xo + a[:, 1, 2]
  mb = map_box.astype(jnp.float32)[..., None, None]  # (B, 4, 1, 1)
  py = (y_src - mb[:, 0]) / (mb[:, 2] - mb[:, 0]) * h - 0.5
  px = (x_src - mb[:, 1]) / (mb[:, 3] - mb[:, 1]) * w - 0.5
  return jnp.clip(py, 0.0, h - 1.0), jnp.clip(px, 0.0, w - 1.0)


def _cell_major(x: jax.Array, gh: int, gw: int, s: int) -> jax.Array:
  """(B, gh*s, gw*s, ...) -> (B, gh*gw, s*s, ...): the samples of each token cell together."""
  b, rest = x.shape[0], x.shape[3:]
  x = x.reshape((b, gh, s, gw, s) + rest)
  x = jnp.moveaxis(x, 3, 2)  # (B, gh, gw, s, s, ...)
  return x.reshape((b, gh * gw, s * s) + rest)


def _pool_scatter(logits, idx, py, px, gh, gw, s, num_classes):
  """Sparse path: each token cell scatter-adds its s*s*4*k (weight * logit) terms into K classes."""
  b, h, w, k = logits.shape
  y0 = jnp.floor(py).astype(jnp.int32)
  x0 = jnp.floor(px).astype(jnp.int32)
  ly, lx = py - y0, px - x0
  y1 = jnp.minimum(y0 + 1, h - 1)
  x1 = jnp.minimum(x0 + 1, w - 1)
  corners = jnp.stack([y0 * w + x0, y0 * w + x1, y1 * w + x0, y1 * w + x1], axis=-1)
  weights = jnp.stack([(1 - ly) * (1 - lx), (1 - ly) * lx, ly * (1 - lx), ly * lx], axis=-1)
  corners = _cell_major(corners, gh, gw, s).reshape(b, gh * gw, s * s * 4, 1)
  weights = _cell_major(weights, gh, gw, s).reshape(b, gh * gw, s * s * 4, 1) / (s * s)
  n = gh * gw
  values = jnp.take_along_axis(logits.reshape(b, 1, h * w, k), corners, axis=2) * weights
  classes = jnp.take_along_axis(idx.reshape(b, 1, h * w, k), corners, axis=2)

  def scatter_one(values, classes):  # (C, 4ss, k) each -> (C, K)
    rows = jnp.arange(n)[:, None]
    pooled = jnp.zeros((n, num_classes), jnp.float32)
    return pooled.at[rows, classes.reshape(n, -1)].add(values.reshape(n, -1), mode='drop')

  # vmap gives the scatter a batch dimension, which SPMD partitioning keeps on each device; an
  # explicit arange(B) index would make the partitioner all-reduce the whole result.
  return jax.vmap(scatter_one)(values, classes)


def _cell_weights(py, px, gh, gw, s, h, w):
  """(B, C, h*w): each token cell's RoIAlign weights over the map's pixels (they sum to 1)."""
  b = py.shape[0]
  # Bilinear weights with clamped coordinates are the tent function max(0, 1 - |p - j|).
  wy = jax.nn.relu(1.0 - jnp.abs(py[..., None] - jnp.arange(h, dtype=jnp.float32)))
  wx = jax.nn.relu(1.0 - jnp.abs(px[..., None] - jnp.arange(w, dtype=jnp.float32)))
  wy = _cell_major(wy, gh, gw, s)  # (B, C, ss, h)
  wx = _cell_major(wx, gh, gw, s)  # (B, C, ss, w)
  return jnp.einsum('bcsy,bcsx->bcyx', wy, wx).reshape(b, gh * gw, h * w) / (s * s)


def _pool_dense(logits, idx, py, px, gh, gw, s, num_classes):
  """Dense path: (C, h*w) bilinear weights times the densified (h*w, K) map; no scatter op."""
  b, h, w, k = logits.shape
  cell_w = _cell_weights(py, px, gh, gw, s, h, w)
  classes = jnp.arange(num_classes, dtype=idx.dtype)
  dense = jnp.zeros((b, h * w, num_classes), jnp.float32)
  flat_logits = logits.reshape(b, h * w, k)
  flat_idx = idx.reshape(b, h * w, k)
  for j in range(k):  # k is small and static; each term fuses into one pass over the map.
    dense = dense + jnp.where(flat_idx[..., j:j + 1] == classes, flat_logits[..., j:j + 1], 0.0)
  return jnp.einsum('bcm,bmk->bck', cell_w, dense)


def pool_topk_logits(topk_logits: jax.Array, topk_idx: jax.Array, map_box: jax.Array,
                     label_affine: jax.Array, *, grid: Grid, num_classes: int, samples: int = 2,
                     method: str = 'scatter') -> Tuple[jax.Array, jax.Array]:
  """Pooled teacher logits before softmax: cls (B, K) and tokens (B, gh, gw, K), float32.

  Token cell (r, c) gets the mean of the densified map's bilinear samples at its s*s sample
  points; the cls gets the mean over all token cells (RoIAlign of the whole crop to 1x1 with
  gh*s x gw*s samples). Arguments as for `token_targets`.
  """
  topk_logits = jnp.asarray(topk_logits)
  topk_idx = jnp.asarray(topk_idx)
  map_box = jnp.asarray(map_box)
  label_affine = jnp.asarray(label_affine)
  gh, gw = grid_shape(grid)
  _check_inputs(topk_logits, topk_idx, map_box, label_affine, gh, gw, samples, method)
  b, h, w, _ = topk_logits.shape
  logits = topk_logits.astype(jnp.float32)
  # Stored maps keep indices as fp16 (exact up to 2048); round, not truncate, any float input.
  if jnp.issubdtype(topk_idx.dtype, jnp.floating):
    topk_idx = jnp.round(topk_idx)
  idx = topk_idx.astype(jnp.int32)
  py, px = map_sample_coords(map_box, label_affine, grid=(gh, gw), samples=samples,
                             map_size=(h, w))
  pool = _pool_scatter if method == 'scatter' else _pool_dense
  tokens = pool(logits, idx, py, px, gh, gw, samples, num_classes)  # (B, C, K)
  cls = jnp.mean(tokens, axis=1)
  return cls, tokens.reshape(b, gh, gw, num_classes)


def pool_dense_logits(logits: jax.Array, map_box: jax.Array, label_affine: jax.Array, *,
                      grid: Grid, samples: int = 2) -> Tuple[jax.Array, jax.Array]:
  """`pool_topk_logits` for a map holding every class: (B, h, w, K) logits, e.g. a teacher's
  `dense_logits`, pooled the same way (cls (B, K), tokens (B, gh, gw, K)), with no top-k to
  densify: each token cell's bilinear weights times the map."""
  logits = jnp.asarray(logits, jnp.float32)
  b, h, w, k = logits.shape
  gh, gw = grid_shape(grid)
  map_box, label_affine = jnp.asarray(map_box), jnp.asarray(label_affine)
  _check_inputs(logits, logits, map_box, label_affine, gh, gw, samples, 'dense')
  py, px = map_sample_coords(map_box, label_affine, grid=(gh, gw), samples=samples,
                             map_size=(h, w))
  cell_w = _cell_weights(py, px, gh, gw, samples, h, w)
  tokens = jnp.einsum('bcm,bmk->bck', cell_w, logits.reshape(b, h * w, k))
  return jnp.mean(tokens, axis=1), tokens.reshape(b, gh, gw, k)


def token_targets(topk_logits: jax.Array, topk_idx: jax.Array, map_box: jax.Array,
                  label_affine: jax.Array, *, grid: Grid, num_classes: int,
                  smoothing: float = 0.1, samples: int = 2,
                  method: str = 'scatter') -> Tuple[jax.Array, jax.Array]:
  """Token-labeling targets from top-k score maps, inside the jitted step.

  Args:
    topk_logits: (B, h, w, k) float16/float32 teacher logits, the untouched stored map.
    topk_idx: (B, h, w, k) class indices of those logits (any int or float dtype); indices
      outside [0, K) contribute nothing.
    map_box: (B, 4) the source-image region the map covers, normalised (y0, x0, y1, x1).
    label_affine: (B, 2, 3) maps an output point (y, x, 1), normalised over the augmented image,
      to the normalised source-image point (y, x).
    grid: the token grid, an int or (gh, gw) (14 at 224, 24 at 384).
    num_classes: K.
    smoothing: s in `p * (1 - s + s/K) + s/K`, renormalised to sum to 1 (module doc).
    samples: samples per token cell along each axis (RoIAlign's sampling ratio).
    method: 'scatter' (default) or 'dense'; the same result to float rounding. 'scatter' adds
      each cell's s*s*4*k (weight * logit) terms straight into its K-vector; 'dense' builds the
      (h*w, K) map and multiplies by the (gh*gw, h*w) bilinear weights, with no scatter op (for
      backends where scatter is slow, e.g. TPU).

  Returns:
    cls_target (B, K) and token_targets (B, gh, gw, K), float32, each summing to 1 over K.

  Cost, for an 18x18x5 map, K = 1000, grid 14, samples 2, batch 128 on 2 CPU cores (XLA):
  'scatter' 0.13 s, 'dense' 0.35 s, densifying through a one-hot contraction instead 0.62 s;
  the softmax over the (B, 196, K) result takes about half of the 'scatter' time. Peak memory
  per example ('scatter', XLA's memory analysis): 0.75 MiB for the float32 results plus 0.84 MiB of
  temporaries, of which 0.75 MiB are the pooled logits (a result-sized buffer the softmax reads)
  and ~0.1 MiB the 196 x 80 gathered terms and their class indices: about twice the result
  itself, and no (h, w, K) map. 'dense' needs 2.2 MiB of temporaries (the 324 x 1000 map and
  the 196 x 324 weights on top).
  """
  cls, tokens = pool_topk_logits(topk_logits, topk_idx, map_box, label_affine, grid=grid,
                                 num_classes=num_classes, samples=samples, method=method)
  cls = smooth_targets(jax.nn.softmax(cls, axis=-1), smoothing)
  tokens = smooth_targets(jax.nn.softmax(tokens, axis=-1), smoothing)
  return cls, tokens
