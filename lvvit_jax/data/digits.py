"""The bundled demo dataset: scikit-learn's handwritten digits on a larger canvas.

The 1,797 8x8 digits ship inside scikit-learn, so nothing is downloaded. Each digit is scaled
to a random size and pasted at a random position of a noisy dark canvas (default 64x64), so a
random crop can miss it: the situation token labeling addresses. The images are written once
as an ImageFolder of PNGs (`<dir>/images/<split>/<digit>/<n>.png`, splits 'train' (80 %) and
'validation' (20 %)) and then as image-folder TFRecord shards (`image_folder.write_shards`),
so the demo runs through the same path as any dataset (`sources.get_source` resolves
'digits' with `ensure`; this module does not import `sources`). Everything is a deterministic
function of (canvas, seed); a finished directory is reused.

    source = sources.get_source('digits', 'train', data_dir='workdir/data')  # 'digits:96': 96 px
"""
from __future__ import annotations

import io
import json
import os
from typing import Tuple

import numpy as np
from PIL import Image

from lvvit_jax.data import image_folder

_FILE = 'lvvit_jax/data/digits.py'
SPLITS = ('train', 'validation')
DONE_FILE = 'digits.json'
NUM_SHARDS = {'train': 8, 'validation': 4}


def parse(source: str) -> int:
  """The canvas side of a 'digits' or 'digits:<side>' source string."""
  _, _, side = source.partition(':')
  try:
    canvas = int(side) if side else 64
  except ValueError:
    raise ValueError(f"{_FILE}: source {source!r}: write 'digits' or 'digits:<canvas side>', "
                     "e.g. 'digits:64'.") from None
  if canvas < 16:
    raise ValueError(f'{_FILE}: source {source!r}: the canvas must be at least 16 px.')
  return canvas


def render(digit: np.ndarray, canvas: int, rng: np.random.Generator) -> np.ndarray:
  """One 8x8 digit (values 0..16) scaled and placed on a noisy canvas: uint8 (canvas, canvas, 3)."""
  side = int(rng.integers(canvas // 4, canvas * 5 // 8 + 1))
  glyph = Image.fromarray((digit * (255.0 / 16.0)).astype(np.uint8)).resize(
      (side, side), Image.BILINEAR)
  y, x = (int(v) for v in rng.integers(0, canvas - side + 1, 2))
  background = rng.normal(40, 12, (canvas, canvas, 1)) + rng.normal(0, 6, (1, 1, 3))
  image = background
  tint = rng.uniform(0.75, 1.0, 3)
  alpha = np.asarray(glyph, np.float32)[..., None] / 255.0
  patch = image[y:y + side, x:x + side]
  image[y:y + side, x:x + side] = patch * (1 - alpha) + 255.0 * tint * alpha
  return np.clip(image, 0, 255).astype(np.uint8)


def write_images(root: str, canvas: int, seed: int = 0) -> Tuple[int, int]:
  """Writes `root/<split>/<digit>/<n>.png` for both splits; returns the split sizes."""
  from sklearn import datasets  # pylint: disable=g-import-not-at-top  (slow import)
  digits = datasets.load_digits()
  rng = np.random.default_rng(seed)
  order = rng.permutation(len(digits.target))
  n_train = int(0.8 * len(order))
  for split, ids in (('train', order[:n_train]), ('validation', order[n_train:])):
    for i in ids:
      label = int(digits.target[i])
      folder = os.path.join(root, split, str(label))
      os.makedirs(folder, exist_ok=True)
      buf = io.BytesIO()
      Image.fromarray(render(digits.images[i], canvas, rng)).save(buf, 'PNG')
      with open(os.path.join(folder, f'{i:04d}.png'), 'wb') as f:
        f.write(buf.getvalue())
  return n_train, len(order) - n_train


def ensure(data_dir: str, canvas: int = 64, seed: int = 0) -> str:
  """The shards directory of the digits dataset under `data_dir`, written on first use.

  Safe to call from several processes at once: every file is written under a temporary name
  and renamed, and the output is a deterministic function of (canvas, seed).
  """
  base = os.path.join(data_dir, f'digits{canvas}')
  shards = os.path.join(base, 'shards')
  done = os.path.join(base, DONE_FILE)
  if os.path.exists(done):
    return shards
  images = os.path.join(base, 'images')
  write_images(images, canvas, seed)
  for split in SPLITS:
    image_folder.write_shards(os.path.join(images, split), shards, split=split,
                              name=f'digits{canvas}', num_shards=NUM_SHARDS[split], seed=seed)
  tmp = f'{done}.{os.getpid()}.tmp'
  with open(tmp, 'w') as f:
    json.dump({'canvas': canvas, 'seed': seed}, f)
  os.replace(tmp, done)
  return shards
