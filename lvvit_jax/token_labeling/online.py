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
"""
from __future__ import annotations

from typing import Tuple

import jax
import jax.numpy as jnp

from lvvit_jax.token_labeling.mixtoken import Grid
from lvvit_jax.token_labeling.mixtoken import grid_shape
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
