"""The settings of `labelgen generate` that are checked before anything runs, and its error.

Every part of the command (`teacher.py`, `inputs.py`, `shards.py`, `multihost.py`,
`generate.py`) raises `GenerateError` for a setting that does not fit the teacher or the data,
or for data that cannot be read; its message names the setting or file and the fix, and at the
command line it is one line on stderr with exit status 2 (`lvvit_jax/cli.py`).
"""
from __future__ import annotations

import jax
import numpy as np

_FILE = 'labelgen/settings.py'
CROPS = ('resize', 'centre')
DTYPES = ('auto', 'float32', 'bfloat16')


class GenerateError(ValueError):
  """Settings that do not fit the teacher or the data, or data that cannot be read."""


def resolve_dtype(dtype: str) -> str:
  """'auto' -> float32 on CPU, bfloat16 on accelerators (the trainer's `compute_dtype`)."""
  if dtype not in DTYPES:
    raise GenerateError(f'{_FILE}: --dtype {dtype!r}: use one of {DTYPES}.')
  if dtype == 'auto':
    return 'float32' if jax.default_backend() == 'cpu' else 'bfloat16'
  return dtype


def check_crop(crop: str) -> None:
  """--crop is one of CROPS."""
  if crop not in CROPS:
    raise GenerateError(f'{_FILE}: --crop {crop!r}: use one of {CROPS}.')


def check_batch_size(batch_size: int, num_devices: int) -> None:
  """--batch is a positive multiple of this process's device count."""
  if batch_size < 1 or batch_size % num_devices:
    raise GenerateError(f'{_FILE}: --batch {batch_size} must be a positive multiple of the '
                        f'{num_devices} local devices; use e.g. '
                        f'{max(1, batch_size // num_devices) * num_devices}.')


def check_classes(teacher: str, num_classes: int, k: int) -> None:
  """The teacher's class count fits int16 indices and --k lies in [1, num_classes]."""
  if num_classes > np.iinfo(np.int16).max + 1:
    raise GenerateError(f'{_FILE}: the teacher {teacher} has {num_classes} classes; score maps '
                        'store class indices as int16 (at most 32768 classes).')
  if not 1 <= k <= num_classes:
    raise GenerateError(f'{_FILE}: --k {k} must lie in [1, {num_classes}] (the teacher has '
                        f'{num_classes} classes).')


def check_label_set(teacher: str, num_classes: int, source: str, split: str,
                    source_classes: int) -> None:
  """The teacher predicts the dataset's classes (when the source knows its class count)."""
  if source_classes and source_classes != num_classes:
    raise GenerateError(f'{_FILE}: the teacher {teacher} has {num_classes} classes but {source} '
                        f'({split}) has {source_classes}; training reads maps over the '
                        "dataset's classes: use a teacher trained on this label set.")
