"""`DeviceAugmentConfig`: what the accelerator half of the train augmentation does.

The host decodes, random-resized-crops and resizes; everything after the resize (flip,
RandAugment, normalisation, random erasing) runs inside the jitted step with these settings.
The defaults are the LV-ViT ImageNet recipe (SPEC section 6). The config is a frozen, hashable
dataclass, so it can be a static argument of `jax.jit`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Tuple

_FILE = 'lvvit_jax/augment/config.py'

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FILL = (124, 116, 104)  # timm `img_mean`: round(255 * ImageNet mean).
MAX_LEVEL = 10.0  # timm's magnitude scale is 0..10.

# timm `_RAND_INCREASING_TRANSFORMS`; the same names as benchmarks/pil_augment.py.
RAND_INCREASING_OPS = (
    'AutoContrast', 'Equalize', 'Invert', 'Rotate', 'PosterizeIncreasing',
    'SolarizeIncreasing', 'SolarizeAdd', 'ColorIncreasing', 'ContrastIncreasing',
    'BrightnessIncreasing', 'SharpnessIncreasing', 'ShearX', 'ShearY', 'TranslateXRel',
    'TranslateYRel',
)
GEOMETRIC_OPS = ('Rotate', 'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel')


def check_ops(ops) -> Tuple[str, ...]:
  """Returns `ops` as a tuple; raises ValueError naming the fix if it is empty or unknown."""
  ops = tuple(ops)
  unknown = [op for op in ops if op not in RAND_INCREASING_OPS]
  if unknown or not ops:
    raise ValueError(
        f'{_FILE}: unknown or empty RandAugment op list {ops!r} (unknown: {unknown}); use '
        f'names from RAND_INCREASING_OPS = {RAND_INCREASING_OPS}.')
  return ops


@dataclasses.dataclass(frozen=True)
class DeviceAugmentConfig:
  """Train augmentation after the host's crop and resize (SPEC section 6 defaults).

  Attributes:
    hflip: probability of a horizontal flip.
    randaug_num_ops: RandAugment ops per image (2; LV-ViT-L uses 3); 0 disables RandAugment.
    randaug_magnitude: RandAugment magnitude on timm's 0..10 scale.
    randaug_mstd: std of the per-op magnitude noise (0: fixed; inf: uniform in [0, magnitude]).
    randaug_prob: probability that each drawn op is applied.
    randaug_ops: the op pool (timm's 15 "increasing" ops; a subset forces ops in tests).
    erase_prob: random-erasing probability (timm mode 'pixel', one box); 0 disables it.
    mean: per-channel mean for normalisation, on the [0, 1] scale.
    std: per-channel std for normalisation, on the [0, 1] scale.
    fill: RGB colour (0..255) that geometric ops give to points outside the image.
  """
  hflip: float = 0.5
  randaug_num_ops: int = 2
  randaug_magnitude: float = 9.0
  randaug_mstd: float = 0.5
  randaug_prob: float = 0.5
  randaug_ops: Tuple[str, ...] = RAND_INCREASING_OPS
  erase_prob: float = 0.25
  mean: Tuple[float, float, float] = IMAGENET_MEAN
  std: Tuple[float, float, float] = IMAGENET_STD
  fill: Tuple[int, int, int] = FILL

  def __post_init__(self):
    where = f'DeviceAugmentConfig ({_FILE})'
    # Lists would make the config unhashable (it is a static jit argument): store tuples.
    for name in ('randaug_ops', 'mean', 'std', 'fill'):
      object.__setattr__(self, name, tuple(getattr(self, name)))
    for name in ('hflip', 'randaug_prob', 'erase_prob'):
      value = getattr(self, name)
      if not 0.0 <= value <= 1.0:
        raise ValueError(f'{where}: {name}={value}; set a probability in [0, 1].')
    if int(self.randaug_num_ops) != self.randaug_num_ops or self.randaug_num_ops < 0:
      raise ValueError(f'{where}: randaug_num_ops={self.randaug_num_ops}; set an int >= 0 '
                       '(2 in the recipe, 3 for LV-ViT-L, 0 disables RandAugment).')
    if not 0.0 <= self.randaug_magnitude <= MAX_LEVEL:
      raise ValueError(f'{where}: randaug_magnitude={self.randaug_magnitude}; set a value in '
                       f'[0, {MAX_LEVEL}] (timm scale; the recipe uses 9).')
    if math.isnan(self.randaug_mstd) or self.randaug_mstd < 0:
      raise ValueError(f'{where}: randaug_mstd={self.randaug_mstd}; set a value >= 0 '
                       '(0.5 in the recipe; inf draws uniformly from [0, magnitude]).')
    if self.randaug_num_ops:
      try:
        check_ops(self.randaug_ops)
      except ValueError as e:
        raise ValueError(f'{where}: randaug_ops: {e}') from None
    if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
      raise ValueError(f'{where}: mean={self.mean}, std={self.std}; give 3 values each, '
                       'std > 0, on the [0, 1] scale.')
    if len(self.fill) != 3 or not all(0 <= v <= 255 for v in self.fill):
      raise ValueError(f'{where}: fill={self.fill}; give 3 RGB values in [0, 255], e.g. '
                       f'{FILL} (the ImageNet mean).')
