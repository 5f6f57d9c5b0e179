"""Token-labeling targets from a teacher run on the student's own crop (online), inside the step.

The paper's targets come from stored score maps of the whole image (`targets.py`): each crop
pools the map cells it covers. Online, the teacher runs on the augmented image the student sees
and its classifier at every position (`dense_logits`, (B, h, w, K)) becomes the targets: the cls
target is the softmax of its logits averaged over positions (the teacher's own prediction for
the crop), each token's target the softmax of its logits resampled to the token grid. Both are
smoothed as the map targets are (`smooth_targets`). A target is then a function of the pixels
the student sees, nothing outside its crop.

Resampling to the token grid (gh, gw): none when the teacher's grid is the token grid; the mean
of each block when it is a whole multiple (the logits of the positions a token covers); else
bilinear (`jax.image.resize`).

A second view, for the ablation that separates the crop's context from its scale
(`config.online_teacher_view='in_place'`): `in_place_canvas` puts each crop back where it was
cut from, at the source image's scale, on a canvas of the crop's mean colour, and
`in_place_logits` pools the teacher's logits on that canvas over the crop as the stored maps
are pooled (`targets.pool_dense_logits`). The teacher then sees what the crop holds, as online,
at the scale a stored map sees it, with nothing of the image around it.
"""
from __future__ import annotations

from typing import Tuple

import jax
import jax.numpy as jnp

from lvvit_jax.augment import geometry
from lvvit_jax.token_labeling.mixtoken import Grid
from lvvit_jax.token_labeling.mixtoken import grid_shape
from lvvit_jax.token_labeling.targets import pool_dense_logits
from lvvit_jax.token_labeling.targets import smooth_targets

_FILE = 'lvvit_jax/token_labeling/online.py'


def logits_on_grid(dense_logits: jax.Array, grid: Grid) -> jax.Array:
  """(B, h, w, K) -> (B, gh, gw, K): as it is, block means, or bilinear (module doc)."""
  if dense_logits.ndim != 4:
    raise ValueError(f'{_FILE}: dense_logits must be (B, h, w, K), got {dense_logits.shape}; '
                     "pass the teacher's classifier at every position (`dense_logits`).")
  gh, gw = grid_shape(grid)
  b, h, w, k = dense_logits.shape
  if (h, w) == (gh, gw):
    return dense_logits
  if h % gh == 0 and w % gw == 0:
    blocks = dense_logits.reshape(b, gh, h // gh, gw, w // gw, k)
    return jnp.mean(blocks, axis=(2, 4))
  return jax.image.resize(dense_logits, (b, gh, gw, k), 'linear')


def crop_targets(dense_logits: jax.Array, *, grid: Grid,
                 smoothing: float = 0.1) -> Tuple[jax.Array, jax.Array]:
  """(cls_target (B, K), token_targets (B, gh, gw, K)), float32, from the teacher on the crop.

  Args:
    dense_logits: (B, h, w, K) the teacher's classifier at every position of the student's
      (augmented) images; its mean over positions is the teacher's prediction.
    grid: the student's token grid.
    smoothing: label smoothing s, the same function as the map and label targets use.
  """
  logits = jax.lax.stop_gradient(jnp.asarray(dense_logits, jnp.float32))
  cls = jax.nn.softmax(jnp.mean(logits, axis=(1, 2)), axis=-1)
  tokens = jax.nn.softmax(logits_on_grid(logits, grid), axis=-1)
  return smooth_targets(cls, smoothing), smooth_targets(tokens, smoothing)


def in_place_canvas(images: jax.Array, label_affine: jax.Array, size: int) -> jax.Array:
  """(B, size, size, C) canvases of the source images' frame with each crop where it was cut.

  Args:
    images: (B, H, W, C) the student's (augmented) crops.
    label_affine: (B, 2, 3) each crop's map from its normalised (y, x, 1) to the source's.
    size: the canvas side (the teacher's input size).

  The inverse of `label_affine` warps each crop onto its canvas (`augment.geometry.warp_affine`,
  bilinear); every pixel outside the crop is the crop's mean colour.
  """
  images = jnp.asarray(images, jnp.float32)
  b, h, w, _ = images.shape
  label_affine = jnp.asarray(label_affine, jnp.float32)
  if label_affine.shape != (b, 2, 3):
    raise ValueError(f'{_FILE}: label_affine must be ({b}, 2, 3), got {label_affine.shape}.')
  last_row = jnp.broadcast_to(jnp.float32([0.0, 0.0, 1.0]), (b, 1, 3))
  canvas_to_crop = jnp.linalg.inv(jnp.concatenate([label_affine, last_row], axis=1))
  # Normalised -> pixel coordinates: crop pixels out, canvas pixels in.
  matrix = canvas_to_crop * jnp.float32([h, w, 1.0])[:, None] / jnp.float32([size, size, 1.0])
  fill = jnp.mean(images, axis=(1, 2))
  return jax.vmap(lambda im, m, f: geometry.warp_affine(im, m, f, out_hw=(size, size)))(
      images, matrix, fill)


def in_place_logits(canvas_logits: jax.Array, label_affine: jax.Array) -> jax.Array:
  """The teacher's (B, h, w, K) logits on `in_place_canvas` pooled over each crop: (B, h, w, K)
  on the crop's own grid of the same size, as a stored map of the canvas is pooled."""
  b, h, w, _ = canvas_logits.shape
  whole = jnp.tile(jnp.float32([0.0, 0.0, 1.0, 1.0]), (b, 1))
  _, tokens = pool_dense_logits(canvas_logits, whole, label_affine, grid=(h, w))
  return tokens
