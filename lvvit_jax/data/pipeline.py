"""The tf.data input pipeline: image shards zipped with score-map shards, decoded, cropped, batched.

    it = pipeline.make_train_iterator(cfg)              # or (cfg, state=restored_state)
    batch = next(it)   # {'image' uint8, 'label', 'label_affine', 'aug_seed', 'topk_logits',
                       #  'topk_idx', 'map_box', 'has_map'}
    ckpt_extra = it.state()                             # {'epoch': .., 'index': .., ...}
    for batch in pipeline.make_eval_iterator(cfg): ...  # {'image' uint8, 'label', 'mask'}

The host decodes, random-resized-crops and resizes (`augment.train_preprocess`) and emits uint8
images with the crop's `label_affine` and a per-example `aug_seed`; the train step augments
them on the accelerator (`lvvit_jax.augment.augment_batch`: flip, RandAugment, normalisation,
erasing, composed into `label_affine`). Eval images are resized and centre-cropped to uint8
and normalised on the accelerator (`lvvit_jax.augment.normalize`).

The parts: `pairs.py` (shard pairs: image and score-map shards read and checked as one
stream), `corrupt.py` (the corrupt-image guard, arrival checks and reports), `augment.py` (the
per-image work); this module joins them into the train and eval datasets and iterators. Only
the decode runs a function per example: records are parsed and numbered per chunk and checked
per batch (tf.data's per-call cost exceeds that bookkeeping; `corrupt.py`).

**Order and resumption** (train). Process p of P reads shard pairs p, p+P, p+2P, ... (disjoint;
every example once per epoch across processes; global batch = per-process batch x P). Each
epoch is a deterministic function of (seed, process, epoch): the process's shard pairs in a
seeded permutation, interleaved `cycle_length` at a time, a shuffle buffer with a per-epoch seed;
the shuffled stream is then numbered 0, 1, 2, ... and example i of epoch e gets the augmentation
seed fold(seed, process, e, i), which also draws its `aug_seed`. The iterator's state is the
position after the last example it delivered, `{'epoch': e, 'index': i}`. Restoring rebuilds
epoch e's stream and skips its first i *serialized* records before anything is decoded (the
shuffle buffer re-reads raw records; no image is decoded twice), so the batches after a restart
equal those of an uninterrupted run, `aug_seed` included. The state is per process: a
multi-host trainer stores each process's.

**Evaluation**. Shards in order, resize + centre crop, the last partial batch padded with masked
examples; every process yields the same number of batches (`EvalIterator.num_batches`), so each
example is evaluated exactly once.

No JAX here: process index and count are passed in by the trainer, and labelgen can use this.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Dict, Iterator, Mapping, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from lvvit_jax.data import augment
from lvvit_jax.data import corrupt
from lvvit_jax.data import pairs as pairs_lib
from lvvit_jax.data import sources
from lvvit_jax.data.corrupt import CorruptImageError  # noqa: F401  (part of this module's API)

_FILE = 'lvvit_jax/data/pipeline.py'


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  """Everything the input pipeline needs (ml_collections-friendly: plain values).

  Attributes:
    source: 'tfds:<name>' (a prepared TFDS dataset), 'digits[:<side>]' (the bundled demo
      data) or a directory written by `sources.write_image_folder_shards`.
    split: split to read ('train', 'validation').
    data_dir: TFDS data directory (None: TFDS's default).
    score_maps_dir: directory of score-map shards + manifest.json (None: no token labels).
    batch_size: per-process batch size; global batch = batch_size * process_count.
    image_size: output side (train and eval).
    crop_pct: eval centre-crop fraction: resize the shorter side to int(size / crop_pct).
    augment: `augment.AugmentConfig`, the host's part of the train augmentation (None: its
      defaults at `image_size`); the rest runs on the accelerator.
    seed: data seed (order and augmentation).
    shuffle_buffer: examples (still encoded) in the shuffle buffer; <= 1 disables it.
    cycle_length: shard pairs read at once.
    num_parallel_calls: parallel reads / decodes (-1: tf.data AUTOTUNE).
    threadpool_size: tf.data private thread pool size (None: TF's default pool).
    prefetch: batches prefetched.
    autotune: tf.data's autotuning of parallelism and buffers. Its model thread sleeps up to a
      minute between passes and a finished iterator waits for its next wake-up (TF 2.21:
      0-60 s at the end of every run), so short runs turn it off; AUTOTUNE parallelism is then
      the thread pool's size for each op. The batches are the same either way (deterministic).
    process_index: this process (jax.process_index(), passed in by the trainer).
    process_count: number of processes (jax.process_count()).
    on_corrupt: 'skip' (count, warn, go on) or 'fail' (raise naming the image).
    max_corrupt_fraction: with 'skip', raise once more than 10 and more than this fraction of
      an epoch's examples so far are corrupt.
    num_epochs: train epochs in all, counted from 0 also when resuming (None: forever).
    verify_checksums: recompute every score-map shard's SHA-256 at start (reads all of them).
    include_keys: add the examples' keys (bytes) to batches as `key` (debugging, tests).
    image_feature: TFDS feature with the image.
    label_feature: TFDS feature with the label.
    key_feature: TFDS feature with the key ('auto': `file_name` if present, else TFDS ids).
  """
  source: str
  split: str = 'train'
  data_dir: Optional[str] = None
  score_maps_dir: Optional[str] = None
  batch_size: int = 128
  image_size: int = 224
  crop_pct: float = 0.9
  augment: Optional[augment.AugmentConfig] = None
  seed: int = 0
  shuffle_buffer: int = 10_000
  cycle_length: int = 16
  num_parallel_calls: int = -1
  threadpool_size: Optional[int] = None
  prefetch: int = 2
  autotune: bool = True
  process_index: int = 0
  process_count: int = 1
  on_corrupt: str = 'skip'
  max_corrupt_fraction: float = 0.01
  num_epochs: Optional[int] = None
  verify_checksums: bool = False
  include_keys: bool = False
  image_feature: str = 'image'
  label_feature: str = 'label'
  key_feature: Optional[str] = 'auto'


def _check_config(cfg: PipelineConfig) -> None:
  if cfg.on_corrupt not in ('skip', 'fail'):
    raise ValueError(f'{_FILE}: PipelineConfig.on_corrupt={cfg.on_corrupt!r}: use "skip" or '
                     '"fail".')
  if not 0 <= cfg.process_index < cfg.process_count:
    raise ValueError(f'{_FILE}: PipelineConfig.process_index={cfg.process_index} must lie in '
                     f'[0, process_count={cfg.process_count}).')
  if cfg.batch_size < 1:
    raise ValueError(f'{_FILE}: PipelineConfig.batch_size={cfg.batch_size} must be >= 1 (per '
                     'process).')


def _shard_pairs(cfg: PipelineConfig, with_maps: bool) -> pairs_lib.ShardPairs:
  tfds_features = {'image_feature': cfg.image_feature, 'label_feature': cfg.label_feature,
                   'key_feature': cfg.key_feature} if cfg.source.startswith('tfds:') else {}
  return pairs_lib.shard_pairs(
      cfg.source, cfg.split, cfg.data_dir, process_index=cfg.process_index,
      process_count=cfg.process_count, score_maps_dir=cfg.score_maps_dir if with_maps else None,
      verify_checksums=cfg.verify_checksums, tfds_features=tfds_features)


def _fold(seed: Sequence[int] | tf.Tensor, *data) -> tf.Tensor:
  seed = tf.cast(seed, tf.int64)
  for d in data:
    seed = tf.random.experimental.stateless_fold_in(seed, tf.cast(d, tf.int64))
  return seed


def dataset_options(cfg: PipelineConfig) -> tf.data.Options:
  """The pipeline's tf.data options: deterministic, one thread per op, cfg's thread pool and
  autotuning."""
  options = tf.data.Options()
  options.deterministic = True
  options.autotune.enabled = cfg.autotune
  options.threading.max_intra_op_parallelism = 1
  if cfg.threadpool_size:
    options.threading.private_threadpool_size = cfg.threadpool_size
  return options


# ------------------------------------------------------------------------------------------------
# Training.


def train_dataset(cfg: PipelineConfig, start_epoch: int = 0, start_index: int = 0,
                  corrupt_log: Optional[corrupt.CorruptLog] = None,
                  pairs: Optional[pairs_lib.ShardPairs] = None) -> tf.data.Dataset:
  """The batched train `tf.data.Dataset` of this process, from position (start_epoch, start_index).

  Batches hold `image` (B, S, S, 3) uint8 (resized crops), `label` (B,) int32, `label_affine`
  (B, 2, 3) float32 (the crops' maps), `aug_seed` (B, 2) uint32 (the device augmentation's
  seeds), with score maps `topk_logits` (B, h, w, k) float16, `topk_idx` (B, h, w, k) int32,
  `map_box` (B, 4), `has_map` (B,) bool (False: no map, use the plain label); `_epoch` and
  `_index` (B,) int64 (the examples' positions, for the iterator's state); `key` if
  `include_keys`. Use `make_train_iterator` unless you handle those yourself.
  """
  _check_config(cfg)
  aug_cfg = cfg.augment or augment.AugmentConfig(image_size=cfg.image_size)
  pairs = pairs or _shard_pairs(cfg, with_maps=True)
  mine = tf.constant(pairs.mine, tf.int64)
  n_mine = len(pairs.mine)
  epoch_length = pairs.num_mine
  parallel = cfg.num_parallel_calls
  base = _fold([cfg.seed, 0], cfg.process_index)
  order_seed, shuffle_seed, example_seed = (_fold(base, salt) for salt in (1, 2, 3))

  with_maps = pairs.map_paths is not None
  size = aug_cfg.image_size
  placeholder = {'image': tf.zeros([size, size, 3], tf.uint8), 'label_affine': tf.zeros([2, 3]),
                 'aug_seed': tf.zeros([2], tf.uint32)}

  def preprocess(x):
    seed = _fold(example_seed, x['epoch'], x['index'])
    out = augment.train_preprocess(x['encoded'], seed, aug_cfg)
    return {k: out[k] for k in ('image', 'label_affine', 'aug_seed')}

  def epoch_stream(epoch):
    keys = tf.random.stateless_uniform([n_mine], seed=_fold(order_seed, epoch))
    order = tf.gather(mine, tf.argsort(keys))
    ds = pairs_lib.read_pairs(pairs, cfg.cycle_length, parallel, order)
    if cfg.shuffle_buffer > 1:
      seed = tf.random.stateless_uniform([], _fold(shuffle_seed, epoch), minval=0,
                                         maxval=2**31 - 1, dtype=tf.int64)
      ds = ds.shuffle(cfg.shuffle_buffer, seed=seed, reshuffle_each_iteration=False)
    ds = corrupt.number(ds, pairs, epoch, epoch_length)
    # Resumption: skip what was consumed before the restart, before anything is decoded.
    ds = ds.skip(tf.where(epoch == start_epoch, tf.constant(start_index, tf.int64), 0))
    ds = corrupt.decode_guarded(ds, preprocess, placeholder, parallel)
    return ds.batch(cfg.batch_size)  # the epoch's last batch may be partial (and its marker)

  if cfg.num_epochs is None:
    epochs = tf.data.Dataset.counter(start_epoch)
  else:
    epochs = tf.data.Dataset.range(start_epoch, cfg.num_epochs)
  ds = epochs.flat_map(epoch_stream)

  keys = ['image', 'label_affine', 'aug_seed']
  if with_maps:
    keys += ['topk_logits', 'topk_idx', 'map_box', 'has_map']
  if cfg.include_keys:
    keys.append('key')

  def select(x):
    out = {k: x[k] for k in keys}
    out.update(label=tf.cast(x['label'], tf.int32), _epoch=x['epoch'], _index=x['index'])
    return out

  log = corrupt_log or corrupt.CorruptLog(cfg.max_corrupt_fraction, 'train')
  ds = corrupt.check_batches(ds, pairs, start_epoch, start_index, log, cfg.on_corrupt, select)
  ds = ds.rebatch(cfg.batch_size, drop_remainder=True)
  ds = ds.prefetch(cfg.prefetch)
  return ds.with_options(dataset_options(cfg))


class TrainIterator(corrupt.CorruptReport):
  """Python iterator of numpy train batches with a resumable `state()`.

  `state()` is the position after the last batch returned by `next`: store it with the
  checkpoint of the step that consumed that batch (a trainer that prefetches batches must keep
  the state that came with each batch), and pass it to `make_train_iterator` to resume.
  """

  def __init__(self, cfg: PipelineConfig, state: Optional[Mapping[str, int]] = None):
    _check_config(cfg)
    self.cfg = cfg
    state = dict(state or {})
    for k, want in (('seed', cfg.seed), ('process_count', cfg.process_count),
                    ('process_index', cfg.process_index)):
      if k in state and int(state[k]) != want:
        raise ValueError(f'{_FILE}: data state has {k}={state[k]} but PipelineConfig.{k}={want}: '
                         'the stored position belongs to another data order; restore with the '
                         'same seed and processes, or start the data from scratch (state=None).')
    self._epoch = int(state.get('epoch', 0))
    self._index = int(state.get('index', 0))
    pairs = _shard_pairs(cfg, with_maps=True)
    self.num_examples = pairs.num_mine
    if not 0 <= self._index <= self.num_examples or self._epoch < 0:
      raise ValueError(f'{_FILE}: data state {state} is outside this process\'s epoch of '
                       f'{self.num_examples} examples of {cfg.source}: it belongs to other data; '
                       'restore with the same data or start from scratch (state=None).')
    self._log = corrupt.CorruptLog(cfg.max_corrupt_fraction, 'train')
    self.dataset = train_dataset(cfg, self._epoch, self._index, self._log, pairs)
    self._it = iter(self.dataset)

  def state(self) -> Dict[str, int]:
    """{'epoch', 'index'} after the last returned batch, plus the seed and process layout."""
    return {'epoch': self._epoch, 'index': self._index, 'seed': self.cfg.seed,
            'process_index': self.cfg.process_index, 'process_count': self.cfg.process_count}

  def __iter__(self) -> 'TrainIterator':
    return self

  def __next__(self) -> Dict[str, np.ndarray]:
    try:
      batch = next(self._it)
    except StopIteration:
      self._log.report(self._epoch, self.num_examples)
      raise
    except tf.errors.OpError as e:
      corrupt.raise_translated(e)
    batch = {k: v.numpy() for k, v in batch.items()}
    epochs, indices = batch.pop('_epoch'), batch.pop('_index')
    epoch, index = int(epochs[-1]), int(indices[-1])
    for done in range(self._epoch, epoch):
      self._log.report(done, self.num_examples)
    self._epoch, self._index = epoch, index + 1
    return batch


def make_train_iterator(cfg: PipelineConfig,
                        state: Optional[Mapping[str, int]] = None) -> TrainIterator:
  """The train iterator of this process, from the start or from a stored `state()`."""
  return TrainIterator(cfg, state)


# ------------------------------------------------------------------------------------------------
# Evaluation.


def eval_dataset(cfg: PipelineConfig, corrupt_log: Optional[corrupt.CorruptLog] = None
                 ) -> Tuple[tf.data.Dataset, int, int]:
  """The batched eval dataset of this process, its number of batches and of real examples.

  Batches hold `image` (B, S, S, 3) uint8 (normalise on the device), `label` (B,) int32 and
  `mask` (B,) bool (False for the padding); with a multi-label source (ImageNet-ReaL) `labels`
  (B, MAX_LABELS) int32, the correct classes padded with -1; `key` if `include_keys`. Every
  process yields the same number of batches, ceil(max over processes of its examples / B). An
  image that cannot be decoded is reported and left out (the padding absorbs it).
  """
  _check_config(cfg)
  pairs = _shard_pairs(cfg, with_maps=False)
  shards = pairs.source.shards
  counts = [sum(s.num_examples for s in shards[p::cfg.process_count])
            for p in range(cfg.process_count)]  # every process's, for the common batch count
  num_batches = max(math.ceil(c / cfg.batch_size) for c in counts)
  mine = counts[cfg.process_index]
  parallel = cfg.num_parallel_calls
  size = cfg.image_size
  ds = pairs_lib.read_pairs(pairs, cfg.cycle_length, parallel, tf.constant(pairs.mine, tf.int64))
  ds = corrupt.number(ds, pairs, tf.constant(0, tf.int64), mine)

  def preprocess(x):
    out = augment.eval_preprocess(x['encoded'], size, cfg.crop_pct, normalize=False)
    return {'image': out['image']}

  placeholder = {'image': tf.zeros([size, size, 3], tf.uint8)}
  ds = corrupt.decode_guarded(ds, preprocess, placeholder, parallel).batch(cfg.batch_size)
  multi_label = pairs.source.multi_label

  def select(x):
    out = {'image': x['image'], 'label': tf.cast(x['label'], tf.int32),
           'mask': tf.ones_like(x['marker'])}
    if multi_label:  # Several correct classes (ImageNet-ReaL), padded with -1.
      out['labels'] = tf.cast(x['labels'], tf.int32)
    if cfg.include_keys:
      out['key'] = x['key']
    return out

  ds = corrupt.check_batches(ds, pairs, 0, 0, corrupt_log or corrupt.CorruptLog(math.inf, 'eval'),
                             cfg.on_corrupt, select)
  pad = {'image': tf.zeros([size, size, 3], tf.uint8), 'label': tf.constant(0, tf.int32),
         'mask': tf.constant(False)}
  if multi_label:
    pad['labels'] = tf.fill([sources.MAX_LABELS], -1)
  if cfg.include_keys:
    pad['key'] = tf.constant('')
  # Padding to the same number of full batches on every process; it also stands in for
  # examples that could not be decoded.
  pad = tf.data.Dataset.from_tensors(pad).repeat().batch(cfg.batch_size)
  ds = ds.concatenate(pad).rebatch(cfg.batch_size).take(num_batches).prefetch(cfg.prefetch)
  return ds.with_options(dataset_options(cfg)), num_batches, mine


class EvalIterator(corrupt.CorruptReport):
  """Re-iterable eval batches (numpy), the same number on every process.

  Attributes:
    num_batches: batches per pass (equal on every process).
    num_examples: real examples of this process (the rest is masked padding).
  """

  def __init__(self, cfg: PipelineConfig):
    self.cfg = cfg
    self._log = corrupt.CorruptLog(math.inf, 'eval')
    self.dataset, self.num_batches, self.num_examples = eval_dataset(cfg, self._log)

  def __len__(self) -> int:
    return self.num_batches

  def __iter__(self) -> Iterator[Dict[str, np.ndarray]]:
    self._log.keys.pop(0, None)
    self._log.counts.pop(0, None)
    it = iter(self.dataset)
    while True:
      try:
        batch = next(it)
      except StopIteration:
        break
      except tf.errors.OpError as e:
        corrupt.raise_translated(e)
      yield {k: v.numpy() for k, v in batch.items()}
    self._log.report(0, self.num_examples)


def make_eval_iterator(cfg: PipelineConfig) -> EvalIterator:
  """The eval batches of this process (iterate once per evaluation)."""
  return EvalIterator(cfg)
