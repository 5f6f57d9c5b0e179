"""RandAugment (timm `rand-m9-mstd0.5-inc1`) on one image in JAX, with its affine.

timm's semantics: `num_ops` rounds; each draws an op uniformly (with replacement) from the
pool, applies it with probability `prob`, at a magnitude drawn from N(magnitude, magnitude_std)
clipped to [0, 10] (std 0: fixed; std inf: uniform in [0, magnitude]), on a random side for
signed ops (negated when a uniform draw is > 0.5). The random streams are JAX's (threefry),
so the draws differ from timm's and from the TF pipeline's; their distributions do not.

One round costs one warp, not fifteen ops: with static shapes under vmap every branch would be
computed, so a round (`apply_round`) computes three candidates from its input image,
  1. one per-channel look-up table, the chosen table op's (the identity otherwise): AutoContrast,
     Equalize, Invert, Posterize, Solarize, SolarizeAdd, Contrast, Brightness;
  2. one blend with the chosen blend op's degenerate image (Color, Sharpness);
  3. one bilinear warp by the chosen geometric op's matrix (the identity otherwise),
and keeps the one that belongs to the chosen op (the input if the op is skipped). So a round
applies exactly one op to the current image, and rounds apply in order, as in timm. Statistics
a candidate needs (histogram, min/max, mean grey) are computed only when its op is in the pool,
and AutoContrast reads its min/max off Equalize's histogram when both are.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from lvvit_jax.augment import colour
from lvvit_jax.augment import geometry
from lvvit_jax.augment import ops as ops_lib
from lvvit_jax.augment.config import FILL
from lvvit_jax.augment.config import GEOMETRIC_OPS
from lvvit_jax.augment.config import MAX_LEVEL
from lvvit_jax.augment.config import RAND_INCREASING_OPS
from lvvit_jax.augment.config import check_ops

_FILE = 'lvvit_jax/augment/randaugment.py'


def _chosen(index: jax.Array, apply: jax.Array, ops: Tuple[str, ...], names) -> jax.Array:
  """True if the round applies an op of `names` (ops[index] in names and apply)."""
  positions = np.array([i for i, n in enumerate(ops) if n in names], np.int32)
  if not positions.size:
    return jnp.zeros((), bool)
  return apply & jnp.any(index == positions)


def apply_round(image: jax.Array, index, apply, level, negate, *,
                ops: Sequence[str] = RAND_INCREASING_OPS,
                fill: Sequence[float] = FILL) -> Tuple[jax.Array, jax.Array]:
  """One RandAugment round with its draws given: ops[index] at `level` if `apply`.

  Equal, pixel for pixel, to `ops.apply_op(image, ops[index], level, negate)` when `apply` and
  to the unchanged image otherwise, at the cost of one warp, one table look-up and one blend
  (module doc).

  Args:
    image: float32 (H, W, 3) holding integers in [0, 255].
    index: int32 scalar, position of the op in `ops`.
    apply: bool scalar, whether the op is applied.
    level: magnitude in [0, 10] (clipped).
    negate: bool scalar, the negative side of signed ops.
    ops: the op pool (static).
    fill: RGB fill for the geometric ops.

  Returns:
    (image, affine): the new image and the round's normalised output->input (3, 3) map.
  """
  ops = check_ops(ops)
  image = geometry.check_image(image, _FILE)
  h, w = image.shape[:2]
  index = jnp.asarray(index, jnp.int32)
  apply = jnp.asarray(apply, bool)
  negate = jnp.asarray(negate, bool)
  level = jnp.clip(jnp.asarray(level, jnp.float32), 0.0, MAX_LEVEL)
  chosen = lambda names: _chosen(index, apply, ops, names)
  # Every candidate reads the round's input (materialised), never another candidate: XLA fuses
  # producers into each read, so a smoothing tap or warp tap of a fused chain would recompute
  # it (9 or 4 times per pixel).
  out = image

  # Per-channel tables: the chosen op's table, the identity otherwise. Picking it by a one-hot
  # sum (a reduction) makes XLA compute the 768 entries once, not once per pixel in the gather.
  table_ops = [n for n in ops_lib.LUT_OPS if n in ops]
  if table_ops:
    stats = ops_lib.ImageStats(image, histogram_for_range='Equalize' in table_ops)
    luts = [colour.identity_lut()] + [ops_lib.LUT_FNS[n](stats, level, negate)
                                      for n in table_ops]
    picks = [~chosen(table_ops)] + [chosen([n]) for n in table_ops]
    pick = jnp.stack(picks).astype(jnp.float32)[:, None, None]
    out = colour.apply_lut(image, jnp.sum(pick * jnp.stack(luts), axis=0))

  # Blends with a degenerate image (Color: grayscale, Sharpness: smoothed).
  blend_ops = [n for n in ops_lib.BLEND_OPS if n in ops]
  if blend_ops:
    degenerate = image
    for name in blend_ops:
      degenerate = jnp.where(chosen([name]), ops_lib.DEGENERATE_FNS[name](image), degenerate)
    blended = colour.blend(degenerate, image, ops_lib.enhance_factor(level, negate))
    out = jnp.where(chosen(blend_ops), blended, out)

  # Geometry: one warp by the chosen op's matrix (the identity unless a geometric op applies).
  geometric = [n for n in GEOMETRIC_OPS if n in ops]
  matrix = jnp.eye(3, dtype=jnp.float32)
  if geometric:
    amount = ops_lib.signed(level / MAX_LEVEL, negate)
    matrix = ops_lib.geometric_level_matrix(
        {n: jnp.where(chosen([n]), amount, 0.0) for n in geometric}, h, w)
    out = jnp.where(chosen(geometric), geometry.pil_warp(image, matrix, fill), out)

  return out, geometry.pixel_to_normalized(matrix, (h, w), (h, w))


def draw_round(key: jax.Array, num_choices: int, magnitude: float = 9.0,
               magnitude_std: float = 0.5,
               prob: float = 0.5) -> Tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """The random draws of one round: (op index, apply, level, negate), timm's distributions."""
  k_op, k_apply, k_sign, k_level = jax.random.split(key, 4)
  index = jax.random.randint(k_op, (), 0, num_choices, dtype=jnp.int32)
  apply = jax.random.uniform(k_apply) < prob  # timm skips when random() > prob.
  negate = jax.random.uniform(k_sign) > 0.5
  if magnitude_std == float('inf'):
    level = jax.random.uniform(k_level, (), jnp.float32, 0.0, magnitude)
  elif magnitude_std > 0:
    level = magnitude + magnitude_std * jax.random.normal(k_level, (), jnp.float32)
  else:
    level = jnp.asarray(magnitude, jnp.float32)
  return index, apply, jnp.clip(level, 0.0, MAX_LEVEL), negate


def randaugment(image: jax.Array, key: jax.Array, *, num_ops: int = 2,
                magnitude: float = 9.0, magnitude_std: float = 0.5, prob: float = 0.5,
                ops: Sequence[str] = RAND_INCREASING_OPS,
                fill: Sequence[float] = FILL) -> Tuple[jax.Array, jax.Array]:
  """timm RandAugment (`rand-m{magnitude}-n{num_ops}-mstd{magnitude_std}-inc1`) with affine.

  Args:
    image: float32 (H, W, 3) holding integers in [0, 255].
    key: a typed PRNG key (`jax.random.key` / `wrap_key_data`); round k uses fold_in(key, k).
    num_ops: number of rounds (static).
    magnitude: mean magnitude on timm's 0..10 scale.
    magnitude_std: std of the per-round magnitude noise; 0 fixes it, inf draws uniformly
      from [0, magnitude].
    prob: probability that each drawn op is applied.
    ops: op names (a subset of RAND_INCREASING_OPS; tests force single ops with it).
    fill: RGB fill for the geometric ops.

  Returns:
    (image, affine): the augmented image (integers in [0, 255]) and the float32 (3, 3) map
    from its normalised coordinates to those of the input image.
  """
  ops = check_ops(ops)
  image = geometry.check_image(image, _FILE)

  def one_round(carry, k):
    image, affine = carry
    index, apply, level, negate = draw_round(jax.random.fold_in(key, k), len(ops), magnitude,
                                             magnitude_std, prob)
    image, round_affine = apply_round(image, index, apply, level, negate, ops=ops, fill=fill)
    return (image, geometry.compose(affine, round_affine)), None

  # A loop, not unrolled: each round's image is materialised (and compiled once).
  carry = (image, jnp.eye(3, dtype=jnp.float32))
  (image, affine), _ = jax.lax.scan(one_round, carry, jnp.arange(num_ops))
  return image, affine
