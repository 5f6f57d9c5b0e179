"""CutMix on the device, for the paper's ablation "MixToken > CutMix" (SPEC sections 4 and 6).

CutMix pastes a box of pixels from another image; MixToken (mixtoken.py) swaps a box of tokens
after the stem and un-mixes the aux outputs. Here the box lives on the pixel grid and the images
themselves are mixed, so the token targets must be mixed too: a token that sees its partner's
pixels gets its partner's target.

The same law and the same partners as MixToken, reused from mixtoken.py: lambda ~ Beta(1, 1), a
box of sides int(H * sqrt(1 - lambda)) by int(W * sqrt(1 - lambda)) around a uniform centre,
clipped to the image (it can be empty); example 2i <-> 2i+1, so partners never leave a device's
shard. Boxes are (row0, col0, row1, col1) in pixels, half open, traced int32: a new box never
recompiles the step.

Targets:
  * cls: by the real (clipped) area, `lam = 1 - box_area / (H * W)`,
    `t = lam * t + (1 - lam) * t[partner]`;
  * token cell (i, j) covers pixels [i * H / gh, (i + 1) * H / gh) x [j * W / gw, (j + 1) * W / gw);
    with `c_ij` the fraction of that cell inside the box (exact, fractional when H / gh is not an
    integer or the box cuts the cell), `t_tok = (1 - c) * t_tok + c * t_tok[partner]`.
Mix the targets after `batch_targets`: each example's token targets are first sampled through its
own `label_affine`, so they describe its own pixels, and the mix moves them with the pixels.
"""
from __future__ import annotations

from typing import Tuple

import jax
import jax.numpy as jnp

from lvvit_jax.token_labeling.mixtoken import Grid
from lvvit_jax.token_labeling.mixtoken import grid_shape
from lvvit_jax.token_labeling.mixtoken import mix_targets
from lvvit_jax.token_labeling.mixtoken import mix_tokens
from lvvit_jax.token_labeling.mixtoken import sample_mix_box
from lvvit_jax.token_labeling.mixtoken import swap_partners

_FILE = 'lvvit_jax/token_labeling/cutmix.py'


def sample_cutmix_box(rng: jax.Array, image_size: Grid) -> jax.Array:
  """Samples a CutMix box: int32 (4,) = (row0, col0, row1, col1) in pixels, half open.

  MixToken's law (`sample_mix_box`) on the (H, W) pixel grid: lambda ~ Beta(1, 1), sides
  int(H * sqrt(1 - lambda)) by int(W * sqrt(1 - lambda)), centre uniform over the pixels,
  clipped to the image (it can be empty).
  """
  return sample_mix_box(rng, image_size)


def cutmix_images(images: jax.Array, box: jax.Array) -> jax.Array:
  """Inside `box` (pixels), each example takes its partner's pixels. images: (B, H, W, C)."""
  if images.ndim != 4:
    raise ValueError(f'{_FILE}: cutmix_images expects images (B, H, W, C), got shape '
                     f'{images.shape}; pass the NHWC batch as the model takes it.')
  return mix_tokens(images, box)  # The same masked swap, on the pixel grid.


def cell_coverage(box: jax.Array, image_size: Grid, grid: Grid) -> jax.Array:
  """(gh, gw) float32: the fraction of each token cell's area inside the pixel `box`.

  Cell (i, j) covers pixels [i * H / gh, (i + 1) * H / gh) x [j * W / gw, (j + 1) * W / gw). The
  overlap is computed in integer units of 1 / gh pixel (resp. 1 / gw), so it is exact and the
  only rounding is the final division. The box is clipped to the image; an inverted box is empty.
  """
  h, w = grid_shape(image_size)
  gh, gw = grid_shape(grid)
  box = jnp.asarray(box, jnp.int32)

  def axis_cover(lo, hi, size, cells):
    # Cell i spans [i * size, (i + 1) * size) and the box [lo * cells, hi * cells) in these units.
    lo = jnp.clip(lo, 0, size) * cells
    hi = jnp.clip(hi, 0, size) * cells
    edges = jnp.arange(cells, dtype=jnp.int32) * size
    overlap = jnp.minimum(hi, edges + size) - jnp.maximum(lo, edges)
    return jnp.maximum(overlap, 0).astype(jnp.float32) / float(size)

  return axis_cover(box[0], box[2], h, gh)[:, None] * axis_cover(box[1], box[3], w, gw)[None, :]


def cutmix_targets(cls_t: jax.Array, tok_t: jax.Array, box: jax.Array, image_size: Grid,
                   grid: Grid) -> Tuple[jax.Array, jax.Array]:
  """Mixes the targets of a CutMix batch: the cls by area, each token by its cell's coverage.

  Args:
    cls_t: (B, K) cls targets, each example's own (from `batch_targets`).
    tok_t: (B, gh, gw, K) token targets, each example's own.
    box: int32 (4,) = (row0, col0, row1, col1) in pixels, half open, as `cutmix_images` got.
    image_size: (H, W) of the images (or an int for square ones).
    grid: the token grid (gh, gw) (or an int).

  Returns:
    (cls (B, K), tokens (B, gh, gw, K)): `lam = 1 - area / (H * W)` with the clipped box area,
    `cls = lam * cls + (1 - lam) * cls[partner]`; `tok = (1 - c) * tok + c * tok[partner]` with
    c (gh, gw) from `cell_coverage`.
  """
  gh, gw = grid_shape(grid)
  if tok_t.ndim != 4 or tok_t.shape[1:3] != (gh, gw) or tok_t.shape[0] != cls_t.shape[0]:
    raise ValueError(f'{_FILE}: cutmix_targets expects tok_t (B, {gh}, {gw}, K) for grid '
                     f'{(gh, gw)} and cls_t (B, K), got {tok_t.shape} and {cls_t.shape}; pass '
                     'the model config.grid and the targets of `batch_targets` unflattened.')
  cls = mix_targets(cls_t, box, image_size)  # MixToken's area rule on the pixel grid.
  cover = cell_coverage(box, image_size, (gh, gw)).astype(tok_t.dtype)[None, :, :, None]
  tok = (1.0 - cover) * tok_t + cover * swap_partners(tok_t)
  return cls, tok
