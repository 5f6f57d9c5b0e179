"""The input of `labelgen generate`: image shards decoded, preprocessed and batched by tf.data.

Every image of the source, shard by shard in file order (parallel map, prefetch).
`--crop resize`: the whole image resized to the teacher's square input (bicubic), `map_box`
[0, 0, 1, 1]; `--crop centre`: the shorter side resized to the input and centre cropped
(`augment.eval_preprocess` with crop_pct 1.0), `map_box` the covered region exactly (the images
of output (0, 0) and (1, 1) under its `label_affine`). An undecodable image is dropped from the
stream (its `position` is missing; the writer fills it in from `keys_and_labels`).
"""
from __future__ import annotations

from typing import Dict, Iterator, List, Sequence, Tuple

import numpy as np
import tensorflow as tf

from labelgen.settings import GenerateError
from labelgen.settings import check_crop
from lvvit_jax.data import augment
from lvvit_jax.data import score_maps
from lvvit_jax.data import sources

_FILE = 'labelgen/inputs.py'


def preprocess_fn(size: int, crop: str, dtype: str):
  """The tf.data map of one parsed record: {'image' (size, size, 3) in `dtype`, 'map_box', ...}.

  The image is normalised and cast to the compute dtype (the model casts its input to it
  first, so nothing is lost, and a bfloat16 batch is half the bytes to send).
  """
  check_crop(crop)
  tf_dtype = tf.bfloat16 if dtype == 'bfloat16' else tf.float32

  @tf.autograph.experimental.do_not_convert
  def preprocess(x: Dict[str, tf.Tensor]) -> Dict[str, tf.Tensor]:
    if crop == 'centre':
      out = augment.eval_preprocess(x['encoded'], size, 1.0)
      image, a = out['image'], out['label_affine']
      # (y, x) -> A @ (y, x, 1): the covered region runs from the image of (0, 0) to that of (1, 1).
      box = tf.stack([a[0, 2], a[1, 2], a[0, 0] + a[0, 2], a[1, 1] + a[1, 2]])
    else:
      image = augment.normalize(augment.resize(augment.decode_rgb(x['encoded']), (size, size),
                                               'bicubic'))
      box = tf.constant(score_maps.FULL_IMAGE_BOX, tf.float32)
    return {'image': tf.ensure_shape(tf.cast(image, tf_dtype), (size, size, 3)), 'map_box': box,
            'label': x['label'], 'key': x['key'], 'position': x['position']}
  return preprocess


def shard_batches(src: sources.ImageSource, index: int, preprocess, batch_size: int,
                  num_parallel_calls: int = -1) -> tf.data.Dataset:
  """Image shard `index` preprocessed and batched, in file order (last batch partial).

  Undecodable images are dropped (`ignore_errors`); their `position` is missing from the
  stream, and the writer fills it in.
  """
  parallel = tf.data.AUTOTUNE if num_parallel_calls < 0 else max(1, num_parallel_calls)
  ds = src.shard_dataset(index).enumerate().map(lambda i, x: dict(x, position=i))
  ds = ds.map(preprocess, num_parallel_calls=parallel, deterministic=True).ignore_errors()
  return ds.batch(batch_size).prefetch(2)


def host_batches(src: sources.ImageSource, todo: Sequence[int], preprocess, batch_size: int,
                 num_parallel_calls: int) -> Iterator[Tuple[int, Dict[str, np.ndarray], int]]:
  """(shard index, batch with images padded to batch_size, real examples) over `todo`."""
  for i in todo:
    for batch in shard_batches(src, i, preprocess, batch_size,
                               num_parallel_calls).as_numpy_iterator():
      n = len(batch['position'])
      if n < batch_size:  # static shapes: pad with zero images, dropped after the step
        image = batch['image']
        batch['image'] = np.concatenate(
            [image, np.zeros((batch_size - n,) + image.shape[1:], image.dtype)])
      yield i, batch, n


def keys_and_labels(src: sources.ImageSource, index: int) -> List[Tuple[str, int]]:
  """(key, label) of every record of a shard, without decoding images."""
  shard = src.shards[index]
  try:
    rows = [(k.decode(), int(l)) for k, l in src.shard_dataset(index).map(
        lambda x: (x['key'], x['label'])).as_numpy_iterator()]
  except tf.errors.OpError as e:
    raise GenerateError(f'{_FILE}: image shard {shard.path} cannot be read '
                        f'({str(e).splitlines()[0]}); it is truncated or corrupt: prepare or '
                        'download the dataset again.') from None
  if len(rows) != shard.num_examples:
    raise GenerateError(f'{_FILE}: image shard {shard.path} holds {len(rows)} records but its '
                        f'dataset description lists {shard.num_examples}; prepare the dataset '
                        'again.')
  return rows
