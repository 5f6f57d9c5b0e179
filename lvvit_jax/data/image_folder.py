"""ImageFolder trees (`root/<class>/<file>.jpg`) written as TFRecord shards: the on-disk format.

The shards hold the original file bytes, the label and the relative path as key;
`dataset_info.json` beside them records the classes and, per split, the shard files and their
counts. `sources.image_folder_source` reads such a directory as an `ImageSource` (and
`sources.write_image_folder_shards` writes one and returns it); the bundled digits
(`digits.py`) are written through `write_shards` here, which needs nothing of `sources`.
"""
from __future__ import annotations

import concurrent.futures
import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

from absl import logging
import numpy as np
import tensorflow as tf

_FILE = 'lvvit_jax/data/image_folder.py'
INFO_FILE = 'dataset_info.json'
FORMAT = 'lvvit_jax.image_folder_shards'
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')


def _image_folder_files(root: str, extensions: Sequence[str]) -> Tuple[List[str], List[str]]:
  """Sorted class names and sorted relative file paths ('class/file') of an ImageFolder tree."""
  if not tf.io.gfile.isdir(root):
    raise ValueError(f'{_FILE}: image folder {root} does not exist or is not a directory.')
  classes = sorted(d for d in tf.io.gfile.listdir(root)
                   if tf.io.gfile.isdir(os.path.join(root, d)))
  classes = [c.rstrip('/') for c in classes]
  if not classes:
    raise ValueError(f'{_FILE}: image folder {root} has no class subdirectories; expected '
                     'root/<class>/<image>.jpg.')
  files = []
  for c in classes:
    names = sorted(n for n in tf.io.gfile.listdir(os.path.join(root, c))
                   if n.lower().endswith(tuple(extensions)))
    files.extend(f'{c}/{n}' for n in names)
  if not files:
    raise ValueError(f'{_FILE}: image folder {root} has no files ending in {tuple(extensions)}.')
  return classes, files


def _example(encoded: bytes, label: int, key: str) -> bytes:
  feature = {
      'image': tf.train.Feature(bytes_list=tf.train.BytesList(value=[encoded])),
      'label': tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
      'file_name': tf.train.Feature(bytes_list=tf.train.BytesList(value=[key.encode()])),
  }
  return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def shard_name(name: str, split: str, index: int, num_shards: int) -> str:
  """TFDS-style shard file name: '<name>-<split>.tfrecord-00003-of-00016'."""
  return f'{name}-{split}.tfrecord-{index:05d}-of-{num_shards:05d}'


def read_info(path: str) -> Dict[str, Any]:
  """The parsed `dataset_info.json` at `path`; refuses a file of another format."""
  with tf.io.gfile.GFile(path, 'r') as f:
    info = json.loads(f.read())
  if info.get('format') != FORMAT:
    raise ValueError(f'{_FILE}: {path} is not an image-folder shards description (format '
                     f'{info.get("format")!r}); write it with '
                     'sources.write_image_folder_shards.')
  return info


def write_shards(root: str, out_dir: str, *, split: str = 'train', name: Optional[str] = None,
                 num_shards: Optional[int] = None, examples_per_shard: int = 1024,
                 seed: int = 0, extensions: Sequence[str] = IMAGE_EXTENSIONS,
                 num_workers: int = 8) -> List[Tuple[str, int]]:
  """Writes an ImageFolder tree as TFRecord shards; returns (file name, examples) per shard.

  The arguments and the output are those of `sources.write_image_folder_shards` (which
  documents them and returns the written split as an `ImageSource`).
  """
  classes, files = _image_folder_files(root, extensions)
  if name is None:
    base = os.path.basename(os.path.normpath(root))
    parent = os.path.basename(os.path.dirname(os.path.normpath(root)))
    name = parent if base in ('train', 'val', 'validation', 'test') and parent else base
  label_of = {c: i for i, c in enumerate(classes)}
  order = np.random.default_rng(seed).permutation(len(files))
  files = [files[i] for i in order]
  n = len(files)
  if num_shards is None:
    num_shards = max(1, -(-n // examples_per_shard))
  if not 1 <= num_shards <= n:
    raise ValueError(f'{_FILE}: num_shards={num_shards} must lie in [1, {n}] for the {n} images '
                     f'in {root}.')
  tf.io.gfile.makedirs(out_dir)
  bounds = np.linspace(0, n, num_shards + 1).round().astype(int)

  def write_shard(i: int) -> Tuple[str, int]:
    file = shard_name(name, split, i, num_shards)
    path = os.path.join(out_dir, file)
    with tf.io.TFRecordWriter(path + '.incomplete') as w:
      for rel in files[bounds[i]:bounds[i + 1]]:
        with tf.io.gfile.GFile(os.path.join(root, rel), 'rb') as f:
          w.write(_example(f.read(), label_of[rel.split('/')[0]], rel))
    tf.io.gfile.rename(path + '.incomplete', path, overwrite=True)
    return file, int(bounds[i + 1] - bounds[i])

  with concurrent.futures.ThreadPoolExecutor(max(1, num_workers)) as pool:
    shards = list(pool.map(write_shard, range(num_shards)))

  info_path = os.path.join(out_dir, INFO_FILE)
  info: Dict[str, Any] = {'format': FORMAT, 'format_version': 1, 'name': name,
                          'version': '', 'class_names': classes, 'splits': {}}
  if tf.io.gfile.exists(info_path):
    old = read_info(info_path)
    if old['class_names'] != classes:
      raise ValueError(f'{_FILE}: {info_path} lists other classes than {root}; write each '
                       'dataset into its own out_dir.')
    info['splits'] = old['splits']
  info['splits'][split] = {'shards': [{'file': f, 'num_examples': c} for f, c in shards],
                           'root': root}
  with tf.io.gfile.GFile(info_path, 'w') as f:
    f.write(json.dumps(info, indent=1) + '\n')
  logging.info('Wrote %d images of %d classes from %s into %d shards in %s.', n, len(classes),
               root, num_shards, out_dir)
  return shards
