"""MixToken (SPEC section 4) as pure functions on the token grid.

A box `(row0, col0, row1, col1)` on the token grid (rows are y, columns x; half open) is
sampled once per step. Inside the box every example takes the tokens of its *partner*; after
the aux head the same swap is applied again, which undoes it, so token targets are never mixed.
Only the cls target is mixed, by the real (clipped) box area.

Partner: neighbouring pairs, example 2i <-> 2i+1 (an odd last example is its own partner). This
is a fixed involution that stays inside any shard of the batch whose size is even, so under data
parallel sharding MixToken causes no cross-device traffic (the release pairs i with B-1-i in the
per-GPU batch; any fixed involution within a device's shard is equivalent). The swap is written as
a reshape to (B/2, 2, ...) and a flip of the pair axis, which XLA partitions locally.

Boxes are traced int32 arrays: a new box never recompiles the step.
"""
from __future__ import annotations

from typing import Sequence, Tuple, Union

import jax
import jax.numpy as jnp

Grid = Union[int, Sequence[int]]


def grid_shape(grid: Grid) -> Tuple[int, int]:
  """Returns (gh, gw) from an int or a pair."""
  if isinstance(grid, int):
    return grid, grid
  gh, gw = grid
  return int(gh), int(gw)


def swap_partners(x: jax.Array) -> jax.Array:
  """Returns x with every example replaced by its partner along axis 0 (2i <-> 2i+1)."""
  b = x.shape[0]
  even = b - (b % 2)
  pairs = x[:even].reshape((even // 2, 2) + x.shape[1:])
  swapped = jnp.flip(pairs, axis=1).reshape((even,) + x.shape[1:])
  if even == b:
    return swapped
  return jnp.concatenate([swapped, x[even:]], axis=0)


def box_mask(box: jax.Array, grid: Grid) -> jax.Array:
  """Boolean (gh, gw) mask of the cells inside `box` = (row0, col0, row1, col1), half open."""
  gh, gw = grid_shape(grid)
  box = jnp.asarray(box, jnp.int32)
  rows = jnp.arange(gh)[:, None]
  cols = jnp.arange(gw)[None, :]
  return (rows >= box[0]) & (rows < box[2]) & (cols >= box[1]) & (cols < box[3])


def box_area(box: jax.Array, grid: Grid) -> jax.Array:
  """Number of grid cells inside the box after clipping to the grid (float32)."""
  return jnp.sum(box_mask(box, grid)).astype(jnp.float32)


def sample_mix_box(key: jax.Array, grid: Grid) -> jax.Array:
  """Samples a MixToken box: int32 (4,) = (row0, col0, row1, col1) on the token grid.

  lambda ~ Beta(1, 1); the box has sides int(gh * sqrt(1 - lambda)) by int(gw * sqrt(1 - lambda))
  around a centre drawn uniformly on the grid, and is clipped to the grid, so it can be smaller
  than its nominal size or empty. (The release's rand_bbox uses cut // 2 on both sides of the
  centre, so odd sides lose a cell; here the nominal side is kept exactly.)
  """
  gh, gw = grid_shape(grid)
  k_lam, k_row, k_col = jax.random.split(key, 3)
  lam = jax.random.beta(k_lam, 1.0, 1.0)
  cut = jnp.sqrt(1.0 - lam)
  cut_h = jnp.floor(gh * cut).astype(jnp.int32)
  cut_w = jnp.floor(gw * cut).astype(jnp.int32)
  cy = jax.random.randint(k_row, (), 0, gh)
  cx = jax.random.randint(k_col, (), 0, gw)
  row0 = cy - cut_h // 2
  col0 = cx - cut_w // 2
  row0, row1 = jnp.clip(row0, 0, gh), jnp.clip(row0 + cut_h, 0, gh)
  col0, col1 = jnp.clip(col0, 0, gw), jnp.clip(col0 + cut_w, 0, gw)
  return jnp.stack([row0, col0, row1, col1]).astype(jnp.int32)


def mix_tokens(tokens: jax.Array, box: jax.Array) -> jax.Array:
  """Inside `box`, each example takes its partner's tokens. tokens: (B, gh, gw, D)."""
  if tokens.ndim != 4:
    raise ValueError(
        f'lvvit_jax/token_labeling/mixtoken.py: mix_tokens expects tokens (B, gh, gw, D), got '
        f'shape {tokens.shape}; reshape flat (B, N, D) tokens to the grid first.')
  mask = box_mask(box, tokens.shape[1:3])[None, :, :, None]
  return jnp.where(mask, swap_partners(tokens), tokens)


def unmix_tokens(tokens: jax.Array, box: jax.Array) -> jax.Array:
  """Undoes `mix_tokens` with the same box (the swap is an involution)."""
  return mix_tokens(tokens, box)


def mix_targets(cls_target: jax.Array, box: jax.Array, grid: Grid) -> jax.Array:
  """Mixes the cls target by the clipped box area: lam = 1 - area / N.

  `t = lam * t + (1 - lam) * t[partner]`. Token targets are never mixed (the aux outputs are
  un-mixed instead).
  """
  gh, gw = grid_shape(grid)
  lam = 1.0 - box_area(box, grid) / float(gh * gw)
  lam = lam.astype(cls_target.dtype)
  return lam * cls_target + (1.0 - lam) * swap_partners(cls_target)
