"""The LV-ViT train augmentation the way the original PyTorch loader runs it: PIL and NumPy.

A reference for the input-pipeline benchmark (and for the op-parity tests): open the file with
PIL, random-resized crop, resize (bilinear or bicubic), horizontal flip, RandAugment
`rand-m9-mstd0.5-inc1` with PIL ops, to float, normalise, random erasing with NumPy. The same
recipe as `lvvit_jax.data.augment.train_preprocess`, in timm's order, without label geometry.
No TensorFlow or torch import, so it can run in plain worker processes.

    aug = PilTrainAugment(image_size=224, seed=0)
    image = aug(open('n01440764/x.JPEG', 'rb').read())  # float32 (224, 224, 3), normalised
"""
from __future__ import annotations

import io
import math
import random
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

MAX_LEVEL = 10.0
FILL = (124, 116, 104)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RAND_INCREASING_OPS = (
    'AutoContrast', 'Equalize', 'Invert', 'Rotate', 'PosterizeIncreasing',
    'SolarizeIncreasing', 'SolarizeAdd', 'ColorIncreasing', 'ContrastIncreasing',
    'BrightnessIncreasing', 'SharpnessIncreasing', 'ShearX', 'ShearY', 'TranslateXRel',
    'TranslateYRel',
)
_INTERPOLATIONS = {'bilinear': Image.BILINEAR, 'bicubic': Image.BICUBIC}


# PIL ops, one argument each (timm's `auto_augment.py` semantics).

def _affine(img: Image.Image, matrix, fill, resample) -> Image.Image:
  return img.transform(img.size, Image.AFFINE, matrix, resample=resample, fillcolor=fill)


def rotate(img, degrees, fill=FILL, resample=Image.BILINEAR):
  return img.rotate(degrees, resample=resample, fillcolor=fill)


def shear_x(img, factor, fill=FILL, resample=Image.BILINEAR):
  return _affine(img, (1, factor, 0, 0, 1, 0), fill, resample)


def shear_y(img, factor, fill=FILL, resample=Image.BILINEAR):
  return _affine(img, (1, 0, 0, factor, 1, 0), fill, resample)


def translate_x_rel(img, pct, fill=FILL, resample=Image.BILINEAR):
  return _affine(img, (1, 0, pct * img.size[0], 0, 1, 0), fill, resample)


def translate_y_rel(img, pct, fill=FILL, resample=Image.BILINEAR):
  return _affine(img, (1, 0, 0, 0, 1, pct * img.size[1]), fill, resample)


def posterize(img, bits):
  """Keeps the `bits` high bits; 0 bits gives black (older PIL; Pillow >= 10 refuses 0)."""
  if bits >= 8:
    return img
  mask = ~(2**(8 - int(bits)) - 1) & 0xFF
  return img.point([i & mask for i in range(256)] * len(img.getbands()))


def solarize_add(img, addition, threshold=128):
  lut = [min(255, i + addition) if i < threshold else i for i in range(256)]
  return img.point(lut * len(img.getbands()))


PHOTOMETRIC: Dict[str, Callable] = {
    'AutoContrast': ImageOps.autocontrast,
    'Equalize': ImageOps.equalize,
    'Invert': ImageOps.invert,
    'Posterize': posterize,
    'Solarize': ImageOps.solarize,
    'SolarizeAdd': solarize_add,
    'Color': lambda img, f: ImageEnhance.Color(img).enhance(f),
    'Contrast': lambda img, f: ImageEnhance.Contrast(img).enhance(f),
    'Brightness': lambda img, f: ImageEnhance.Brightness(img).enhance(f),
    'Sharpness': lambda img, f: ImageEnhance.Sharpness(img).enhance(f),
}
GEOMETRIC: Dict[str, Callable] = {
    'Rotate': rotate, 'ShearX': shear_x, 'ShearY': shear_y,
    'TranslateXRel': translate_x_rel, 'TranslateYRel': translate_y_rel,
}


def level_args(name: str, level: float, negate: bool) -> Tuple[str, tuple]:
  """timm's level_to_arg for the "increasing" ops: (base op name, its arguments)."""
  sign = -1.0 if negate else 1.0
  frac = level / MAX_LEVEL
  if name in ('AutoContrast', 'Equalize', 'Invert'):
    return name, ()
  if name == 'Rotate':
    return name, (sign * frac * 30.0,)
  if name == 'PosterizeIncreasing':
    return 'Posterize', (4 - int(frac * 4),)
  if name == 'SolarizeIncreasing':
    return 'Solarize', (256 - min(256, int(frac * 256)),)
  if name == 'SolarizeAdd':
    return name, (min(128, int(frac * 110)),)
  if name.endswith('Increasing'):  # Color, Contrast, Brightness, Sharpness.
    return name[:-len('Increasing')], (max(0.1, 1.0 + sign * frac * 0.9),)
  if name in ('ShearX', 'ShearY'):
    return name, (sign * frac * 0.3,)
  if name in ('TranslateXRel', 'TranslateYRel'):
    return name, (sign * frac * 0.45,)
  raise ValueError(f'benchmarks/pil_augment.py: unknown op {name!r}; '
                   f'use one of {RAND_INCREASING_OPS}.')


def apply_op(img: Image.Image, name: str, level: float, negate: bool = False,
             fill=FILL, resample=Image.BILINEAR) -> Image.Image:
  """Applies a named RandAugment op at magnitude `level` (0..10)."""
  base, args = level_args(name, level, negate)
  if base in GEOMETRIC:
    return GEOMETRIC[base](img, *args, fill=fill, resample=resample)
  return PHOTOMETRIC[base](img, *args)


class PilTrainAugment:
  """Callable: encoded image bytes -> float32 (S, S, 3) normalised training image."""

  def __init__(self, image_size: int = 224, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
               hflip: float = 0.5, interpolations: Sequence[str] = ('bilinear', 'bicubic'),
               randaug_num_ops: int = 2, randaug_magnitude: float = 9.0,
               randaug_mstd: float = 0.5, randaug_prob: float = 0.5,
               randaug_ops: Sequence[str] = RAND_INCREASING_OPS, erase_prob: float = 0.25,
               mean=IMAGENET_MEAN, std=IMAGENET_STD, seed: Optional[int] = None):
    self.size = int(image_size)
    self.scale, self.ratio, self.hflip = scale, ratio, hflip
    self.interpolations = [_INTERPOLATIONS[m] for m in interpolations]
    self.num_ops, self.magnitude, self.mstd = randaug_num_ops, randaug_magnitude, randaug_mstd
    self.prob, self.ops, self.erase_prob = randaug_prob, tuple(randaug_ops), erase_prob
    self.mean = np.asarray(mean, np.float32)
    self.std = np.asarray(std, np.float32)
    self.fill = tuple(min(255, round(255 * m)) for m in mean)
    self.random = random.Random(seed)
    self.np_random = np.random.default_rng(seed)

  @classmethod
  def from_config(cls, cfg, seed: Optional[int] = None) -> 'PilTrainAugment':
    """Builds from an `AugmentConfig` (or anything with the same attributes)."""
    names = ('image_size', 'scale', 'ratio', 'hflip', 'interpolations', 'randaug_num_ops',
             'randaug_magnitude', 'randaug_mstd', 'randaug_prob', 'randaug_ops', 'erase_prob',
             'mean', 'std')
    return cls(**{n: getattr(cfg, n) for n in names if hasattr(cfg, n)}, seed=seed)

  def crop_box(self, width: int, height: int) -> Tuple[int, int, int, int]:
    """timm RandomResizedCropAndInterpolation.get_params: (top, left, h, w)."""
    area = width * height
    for _ in range(10):
      target_area = self.random.uniform(*self.scale) * area
      aspect = math.exp(self.random.uniform(math.log(self.ratio[0]), math.log(self.ratio[1])))
      w = int(round(math.sqrt(target_area * aspect)))
      h = int(round(math.sqrt(target_area / aspect)))
      if 0 < w <= width and 0 < h <= height:
        return self.random.randint(0, height - h), self.random.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < min(self.ratio):
      w, h = width, int(round(width / min(self.ratio)))
    elif in_ratio > max(self.ratio):
      h, w = height, int(round(height * max(self.ratio)))
    else:
      w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w

  def randaugment(self, img: Image.Image) -> Image.Image:
    for name in self.random.choices(self.ops, k=self.num_ops):
      if self.random.random() > self.prob:
        continue
      level = self.magnitude
      if self.mstd == float('inf'):
        level = self.random.uniform(0, level)
      elif self.mstd > 0:
        level = self.random.gauss(level, self.mstd)
      level = max(0.0, min(level, MAX_LEVEL))
      img = apply_op(img, name, level, negate=self.random.random() > 0.5, fill=self.fill,
                     resample=self.random.choice((Image.BILINEAR, Image.BICUBIC)))
    return img

  def erase(self, x: np.ndarray) -> np.ndarray:
    """timm RandomErasing(mode='pixel', max_count=1) on a normalised (H, W, C) array."""
    if self.random.random() > self.erase_prob:
      return x
    height, width, channels = x.shape
    for _ in range(10):
      target_area = self.random.uniform(0.02, 1 / 3) * height * width
      aspect = math.exp(self.random.uniform(math.log(0.3), math.log(1 / 0.3)))
      h = int(round(math.sqrt(target_area * aspect)))
      w = int(round(math.sqrt(target_area / aspect)))
      if w < width and h < height:
        top = self.random.randint(0, height - h)
        left = self.random.randint(0, width - w)
        x[top:top + h, left:left + w] = self.np_random.standard_normal((h, w, channels))
        break
    return x

  def __call__(self, encoded: bytes) -> np.ndarray:
    img = Image.open(io.BytesIO(encoded)).convert('RGB')
    top, left, h, w = self.crop_box(*img.size)
    img = img.crop((left, top, left + w, top + h))
    img = img.resize((self.size, self.size), self.random.choice(self.interpolations))
    if self.random.random() < self.hflip:
      img = img.transpose(Image.FLIP_LEFT_RIGHT)
    if self.num_ops:
      img = self.randaugment(img)
    x = (np.asarray(img, np.float32) / 255.0 - self.mean) / self.std
    return self.erase(x) if self.erase_prob > 0 else x
