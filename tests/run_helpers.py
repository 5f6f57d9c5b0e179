"""Helpers for tests that run the trainer: configs with overrides, synthetic score maps."""
import importlib
import os
from typing import Any

import ml_collections
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(spec: str, **overrides: Any) -> ml_collections.ConfigDict:
  """`configs/<name>.py[:arg]` with dotted overrides: load_config('lvvit.py:variant=t',
  **{'data.data_dir': d, 'total_steps': 8})."""
  name, _, arg = spec.partition(':')
  module = importlib.import_module('configs.' + name[:-len('.py')])
  config = module.get_config(arg)
  for key, value in overrides.items():
    *parents, leaf = key.split('.')
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def write_label_maps(source, out_dir: str, grid=(4, 4), k: int = 3, num_classes: int = 10,
                     seed: int = 0, dataset: str = None, split: str = None) -> str:
  """Score maps for every example of `source` whose top-1 everywhere is its label."""
  from lvvit_jax.data import score_maps  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  infos = []
  for i, shard in enumerate(source.shards):
    with score_maps.ShardWriter(out_dir, shard.path) as w:
      for ex in source.shard_dataset(i).as_numpy_iterator():
        label = int(ex['label'])
        others = [c for c in range(num_classes) if c != label]
        idx = np.zeros(grid + (k,), np.int16)
        idx[..., 0] = label
        idx[..., 1:] = rng.choice(others, size=grid + (k - 1,))
        logits = np.sort(rng.normal(0, 1, grid + (k,)), axis=-1)[..., ::-1] + np.arange(k)[::-1]
        w.write(ex['key'], logits.astype(np.float16), idx, label)
    infos.append(w.info)
  score_maps.write_manifest(out_dir, score_maps.Manifest(
      dataset=dataset or source.name, version=source.version, split=split or source.split,
      grid=tuple(grid), k=k, num_classes=num_classes, teacher={'model': 'synthetic'},
      shards=tuple(infos)))
  return out_dir


def write_mock_tfds(data_dir: str, name: str, split: str, shard_lengths=(4, 3, 3),
                    edit=None):
  """Examples of `tfds.testing.mock_data` for `name`, stored as a prepared TFDS dataset.

  `edit(i, example) -> example` may change them before they are written. Returns the
  examples (images as encoded bytes) in shard order.
  """
  import io  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  with tfds.testing.mock_data(num_examples=sum(shard_lengths)):
    builder = tfds.builder(name)
    examples = list(builder.as_dataset(
        split=split, decoders={'image': tfds.decode.SkipDecoding()}).as_numpy_iterator())
  if edit is not None:
    examples = [edit(i, e) for i, e in enumerate(examples)]
  info = builder.info
  out = os.path.join(data_dir, name, str(builder.version))
  os.makedirs(out)
  template = tfds.core.ShardedFileTemplate(data_dir=out, dataset_name=name, split=split,
                                           filetype_suffix='tfrecord')
  info.set_splits(tfds.core.SplitDict([tfds.core.SplitInfo(
      name=split, shard_lengths=list(shard_lengths), num_bytes=0, filename_template=template)]))

  def encodable(example):
    out = dict(example)
    out['image'] = io.BytesIO(example['image'])
    for k, v in out.items():
      if isinstance(v, bytes):
        out[k] = v.decode()
    return out

  start = 0
  for s, n in enumerate(shard_lengths):
    path = os.path.join(out, f'{name}-{split}.tfrecord-{s:05d}-of-{len(shard_lengths):05d}')
    with tf.io.TFRecordWriter(path) as w:
      for e in examples[start:start + n]:
        w.write(info.features.serialize_example(encodable(e)))
    start += n
  info.write_to_directory(out)
  return examples
