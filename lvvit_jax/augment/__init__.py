"""Train augmentation on the accelerator: flip, RandAugment, normalisation, random erasing.

Pure JAX and NumPy (no TensorFlow): the host only decodes, random-resized-crops and resizes, and
emits uint8 images, the crop's `label_affine` and a per-example seed; `augment_batch` does the
rest inside the jitted train step, with exact label geometry (`label_affine` composed with the
flip and the geometric RandAugment ops) and PIL's colour semantics (SPEC sections 3 and 6).

  config.py       DeviceAugmentConfig (the recipe's defaults) and the op names
  geometry.py     PIL's bilinear AFFINE warp and the geometric ops, with their affines
  colour.py       PIL's colour ops as look-up tables and blends
  ops.py          the 15 ops by name with timm's level -> argument mapping
  randaugment.py  timm RandAugment, one warp + one table + one blend per round
  batch.py        augment_batch (per-example seeds, vmapped) and normalize

The submodule `randaugment` keeps its name here (its function is
`lvvit_jax.augment.randaugment.randaugment`).
"""
from lvvit_jax.augment.batch import augment_batch
from lvvit_jax.augment.batch import augment_example
from lvvit_jax.augment.batch import example_key
from lvvit_jax.augment.batch import normalize
from lvvit_jax.augment.batch import random_erasing
from lvvit_jax.augment.batch import random_flip
from lvvit_jax.augment.config import FILL
from lvvit_jax.augment.config import GEOMETRIC_OPS
from lvvit_jax.augment.config import IMAGENET_MEAN
from lvvit_jax.augment.config import IMAGENET_STD
from lvvit_jax.augment.config import RAND_INCREASING_OPS
from lvvit_jax.augment.config import DeviceAugmentConfig
from lvvit_jax.augment.geometry import geometric_matrix
from lvvit_jax.augment.geometry import pixel_to_normalized
from lvvit_jax.augment.geometry import warp_affine
from lvvit_jax.augment.ops import apply_op
from lvvit_jax.augment.randaugment import apply_round
