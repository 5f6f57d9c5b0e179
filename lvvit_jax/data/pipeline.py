"""The tf.data input pipeline: image shards zipped with score-map shards, augmented, batched.

    it = pipeline.make_train_iterator(cfg)              # or (cfg, state=restored_state)
    batch = next(it)   # {'image', 'label', 'label_affine', 'topk_logits', 'topk_idx', 'map_box'}
    ckpt_extra = it.state()                             # {'epoch': .., 'index': .., ...}
    for batch in pipeline.make_eval_iterator(cfg): ...  # {'image', 'label', 'mask'}

A dataset is a list of *shard pairs*: an image TFRecord shard (`sources.py`) and the score-map
shard made for it (`score_maps.py`) or none. The serialized records of both are read directly and
zipped as two streams; every pair of records is checked on the fly (same key, same label, map of
the manifest's shape) and a stream that ends early is caught by an end-of-shard sentinel, so a
misaligned pair fails with a `ScoreMapError` naming both shards and the example, never silently.

**Order and resumption** (train). Process p of P reads shard pairs p, p+P, p+2P, ... (disjoint;
every example once per epoch across processes; global batch = per-process batch x P). Each
epoch is a deterministic function of (seed, process, epoch): the process's shard pairs in a
seeded permutation, interleaved `cycle_length` at a time, a shuffle buffer with a per-epoch seed;
the shuffled stream is then numbered 0, 1, 2, ... and example i of epoch e gets the augmentation
seed fold(seed, process, e, i). The iterator's state is the position after the last example it
delivered, `{'epoch': e, 'index': i}`. Restoring rebuilds epoch e's stream and skips its first i
*serialized* records before anything is decoded (the shuffle buffer re-reads raw records; no
image is decoded or augmented twice), so the batches after a restart equal those of an
uninterrupted run. The state is per process: a multi-host trainer stores each process's.

**Corrupt images**. Decode + augmentation run in a parallel map followed by `ignore_errors`, so an
image that cannot be decoded is dropped instead of stopping the epoch. Nothing upstream of that
map can fail on purpose (pair checks are asserted after it), and every example carries its
stream position: a sequential scan after the map finds the positions that never arrived, and a
scan before it remembers the last few keys, so each dropped example is counted and named.
An end-of-epoch marker catches drops at the end of an epoch. In training a dropped example is
logged with its key and skipped (`on_corrupt='skip'`), or raises a `CorruptImageError` naming it
(`on_corrupt='fail'`); a report follows every epoch, and more than `max_corrupt_fraction`
corrupt examples in an epoch raises (that is a preprocessing bug, not bad files). In evaluation
it is reported and the padding takes its place. The guard costs two cheap sequential scans; a
per-example guard (a one-element dataset with `ignore_errors` around each call) was measured
at 1.5-2x the CPU per example with RandAugment's large graph, and was dropped.

**Evaluation**. Shards in order, resize + centre crop, the last partial batch padded with masked
examples; every process yields the same number of batches (`EvalIterator.num_batches`), so each
example is evaluated exactly once.

No JAX here: process index and count are passed in by the trainer, and labelgen can use this.
"""
from __future__ import annotations

import dataclasses
import math
import re
import threading
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

from absl import logging
import numpy as np
import tensorflow as tf

from lvvit_jax.data import augment
from lvvit_jax.data import score_maps
from lvvit_jax.data import sources

_END = '<end of shard>'
_END_OF_STREAM = '<end of epoch>'
_RECENT = 8  # keys remembered to name dropped examples
_MISMATCH = 'lvvit_jax score-map mismatch:'
_CORRUPT = 'lvvit_jax corrupt image:'
_TOO_MANY = 'lvvit_jax too many corrupt images:'


class CorruptImageError(ValueError):
  """An image that cannot be decoded (with on_corrupt='fail'), or too many of them."""


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  """Everything the input pipeline needs (ml_collections-friendly: plain values).

  Attributes:
    source: 'tfds:<name>' (a prepared TFDS dataset) or a directory written by
      `sources.write_image_folder_shards`.
    split: split to read ('train', 'validation').
    data_dir: TFDS data directory (None: TFDS's default).
    score_maps_dir: directory of score-map shards + manifest.json (None: no token labels).
    batch_size: per-process batch size; global batch = batch_size * process_count.
    image_size: output side (train and eval).
    crop_pct: eval centre-crop fraction: resize the shorter side to int(size / crop_pct).
    augment: `augment.AugmentConfig` for training (None: its defaults at `image_size`).
    seed: data seed (order and augmentation).
    shuffle_buffer: examples (still encoded) in the shuffle buffer; <= 1 disables it.
    cycle_length: shard pairs read at once.
    num_parallel_calls: parallel reads / decodes (-1: tf.data AUTOTUNE).
    threadpool_size: tf.data private thread pool size (None: TF's default pool).
    prefetch: batches prefetched.
    process_index: this process (jax.process_index(), passed in by the trainer).
    process_count: number of processes (jax.process_count()).
    on_corrupt: 'skip' (count, warn, go on) or 'fail' (raise naming the image).
    max_corrupt_fraction: with 'skip', raise once more than 10 and more than this fraction of
      an epoch's examples so far are corrupt.
    image_dtype: 'float32' or 'bfloat16' for the `image` batches.
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
  process_index: int = 0
  process_count: int = 1
  on_corrupt: str = 'skip'
  max_corrupt_fraction: float = 0.01
  image_dtype: str = 'float32'
  num_epochs: Optional[int] = None
  verify_checksums: bool = False
  include_keys: bool = False
  image_feature: str = 'image'
  label_feature: str = 'label'
  key_feature: Optional[str] = 'auto'


def _check_config(cfg: PipelineConfig) -> None:
  if cfg.on_corrupt not in ('skip', 'fail'):
    raise ValueError(f'lvvit_jax/data/pipeline.py: PipelineConfig.on_corrupt={cfg.on_corrupt!r}: use "skip" or "fail".')
  if cfg.image_dtype not in ('float32', 'bfloat16'):
    raise ValueError(f'lvvit_jax/data/pipeline.py: PipelineConfig.image_dtype={cfg.image_dtype!r}: use "float32" or '
                     '"bfloat16".')
  if not 0 <= cfg.process_index < cfg.process_count:
    raise ValueError(f'lvvit_jax/data/pipeline.py: PipelineConfig.process_index={cfg.process_index} must lie in '
                     f'[0, process_count={cfg.process_count}).')
  if cfg.batch_size < 1:
    raise ValueError(f'lvvit_jax/data/pipeline.py: PipelineConfig.batch_size={cfg.batch_size} must be >= 1 (per process).')


# ------------------------------------------------------------------------------------------------
# Shard pairs.


@dataclasses.dataclass(frozen=True)
class _Pairs:
  """The dataset's shard pairs (all processes) and this process's share."""
  source: sources.ImageSource
  map_paths: Optional[Tuple[str, ...]]
  manifest: Optional[score_maps.Manifest]
  mine: Tuple[int, ...]  # indices into source.shards read by this process, in order

  @property
  def num_mine(self) -> int:
    """Examples in this process's shards: the length of its epoch."""
    return sum(self.source.shards[i].num_examples for i in self.mine)


def _shard_pairs(cfg: PipelineConfig, with_maps: bool) -> _Pairs:
  tfds_features = {'image_feature': cfg.image_feature, 'label_feature': cfg.label_feature,
                   'key_feature': cfg.key_feature} if cfg.source.startswith('tfds:') else {}
  source = sources.get_source(cfg.source, cfg.split, cfg.data_dir, **tfds_features)
  n = len(source.shards)
  if n < cfg.process_count:
    raise ValueError(f'lvvit_jax/data/pipeline.py: {cfg.source} split {cfg.split!r} has {n} shards but there are '
                     f'{cfg.process_count} processes: each process needs at least one shard. '
                     'Rewrite the data with more shards '
                     '(sources.write_image_folder_shards(num_shards=...)).')
  mine = tuple(range(cfg.process_index, n, cfg.process_count))
  map_paths = manifest = None
  if with_maps and cfg.score_maps_dir:
    manifest = score_maps.read_manifest(cfg.score_maps_dir)
    mpath = f'{cfg.score_maps_dir}/{score_maps.MANIFEST_NAME}'
    if manifest.dataset != source.name or manifest.split != cfg.split:
      raise score_maps.ScoreMapError(
          f'{mpath} describes maps of {manifest.dataset!r} split {manifest.split!r}, but the '
          f'images are {source.name!r} split {cfg.split!r}; point score_maps_dir at the maps of '
          'these images.')
    if manifest.version and source.version and manifest.version != source.version:
      raise score_maps.ScoreMapError(
          f'{mpath} was made for {source.name} version {manifest.version}, the images are '
          f'version {source.version}; rerun labelgen on this version.')
    map_paths = tuple(score_maps.pair_shards(
        cfg.score_maps_dir, manifest, [(s.path, s.num_examples) for s in source.shards]))
    if cfg.verify_checksums:
      score_maps.verify_checksums(cfg.score_maps_dir, manifest)
  return _Pairs(source, map_paths, manifest, mine)


def _read_pairs(pairs: _Pairs, cycle_length: int, parallel: int,
                order: tf.Tensor) -> tf.data.Dataset:
  """Records of the shard pairs `order` (indices into source.shards), interleaved, parsed.

  Elements: encoded, label, key, shard (int32), position (int64 within the shard), marker
  (False), and with score maps topk_logits, topk_idx, map_box, map_key, map_label and pair_ok
  (key, label and map shape agree). A pair is checked here but asserted after decoding
  (`_check_arrivals`): an assertion upstream of the decode guard's `ignore_errors` would be
  swallowed.
  """
  source = pairs.source
  image_paths = tf.constant([s.path for s in source.shards])
  image_names = tf.constant([s.name for s in source.shards])
  map_paths = tf.constant(pairs.map_paths) if pairs.map_paths else None
  manifest = pairs.manifest

  def parse_image(rec, j, pos):
    return dict(source.parse(rec, image_names[j], pos), shard=tf.cast(j, tf.int32),
                position=pos, marker=tf.constant(False))

  def read_pair(j):
    images = tf.data.TFRecordDataset(image_paths[j])
    if map_paths is None:
      return images.enumerate().map(lambda pos, rec: parse_image(rec, j, pos))
    # End-of-shard sentinel records: a file that ends early meets the other's next record and
    # fails the pair check with '<end of shard>' as its key.
    end_image = _sentinel_image_record(source)
    end_map = score_maps.encode_example(_END, np.zeros(manifest.grid + (manifest.k,)),
                                        np.zeros(manifest.grid + (manifest.k,)), -1)
    images = images.concatenate(tf.data.Dataset.from_tensors(end_image)).enumerate()
    maps = tf.data.TFRecordDataset(map_paths[j]).concatenate(
        tf.data.Dataset.from_tensors(end_map))

    def join(image_pos_rec, map_rec):
      pos, rec = image_pos_rec
      img = parse_image(rec, j, pos)
      img['key'] = tf.where(tf.equal(rec, end_image), _END, img['key'])
      sm = score_maps.parse_example(map_rec, manifest.grid, manifest.k)
      ok = (img['key'] == sm['key']) & (img['label'] == sm['label']) & sm['shape_ok']
      return dict(img, topk_logits=sm['topk_logits'], topk_idx=sm['topk_idx'],
                  map_box=sm['map_box'], has_map=sm['has_map'], map_key=sm['key'],
                  map_label=sm['label'], pair_ok=ok)

    joined = tf.data.Dataset.zip((images, maps)).map(join)
    return joined.filter(lambda x: (x['key'] != _END) | (x['map_key'] != _END))

  n = int(order.shape[0])
  cycle = max(1, min(cycle_length, n))
  calls = _parallel(min(parallel, cycle) if parallel > 0 else parallel)
  return tf.data.Dataset.from_tensor_slices(order).interleave(
      read_pair, cycle_length=cycle, block_length=1, num_parallel_calls=calls,
      deterministic=True if calls else None)


def _sentinel_image_record(source: sources.ImageSource) -> bytes:
  """A parseable image record appended to each image shard to mark its end (key `_END`)."""
  feature = {source.image_feature: tf.train.Feature(bytes_list=tf.train.BytesList(value=[b''])),
             source.label_feature: tf.train.Feature(int64_list=tf.train.Int64List(value=[-1]))}
  if source.key_feature:
    feature[source.key_feature] = tf.train.Feature(
        bytes_list=tf.train.BytesList(value=[_END.encode()]))
  return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def _parallel(n: int) -> Optional[int]:
  """num_parallel_calls for tf.data: None (run in the caller's thread) for 1, AUTOTUNE for -1."""
  return None if n == 1 else n


def _fold(seed: Sequence[int] | tf.Tensor, *data) -> tf.Tensor:
  seed = tf.cast(seed, tf.int64)
  for d in data:
    seed = tf.random.experimental.stateless_fold_in(seed, tf.cast(d, tf.int64))
  return seed


def _number(ds: tf.data.Dataset, epoch: tf.Tensor, length: int) -> tf.data.Dataset:
  """Numbers a pass over the data and appends its end marker.

  Adds `epoch`, `index` (0, 1, 2, ... in stream order) and `recent` (the keys of the _RECENT
  elements before, which name examples dropped later), and appends a marker element at index
  `length` (the number of records the pass must have), so that drops at the end are counted too.
  """
  marker = {k: tf.zeros(v.shape, v.dtype) for k, v in ds.element_spec.items()}
  marker.update(key=tf.constant(_END_OF_STREAM), position=tf.constant(length, tf.int64),
                marker=tf.constant(True))
  if 'pair_ok' in marker:
    marker['pair_ok'] = tf.constant(True)
  ds = ds.concatenate(tf.data.Dataset.from_tensors(marker))

  def step(state, x):
    count, ring = state
    index = tf.where(x['marker'], x['position'], count)
    out = dict(x, epoch=epoch, index=index, recent=ring)
    return (count + 1, tf.concat([ring[1:], [x['key']]], 0)), out

  return ds.scan((tf.constant(0, tf.int64), tf.fill([_RECENT], '')), step)


def _decode_guarded(ds: tf.data.Dataset, fn: Callable[[Dict[str, tf.Tensor]], Dict[str, tf.Tensor]],
                    placeholder: Dict[str, tf.Tensor], parallel: int) -> tf.data.Dataset:
  """Maps `fn` (decode + augment) in parallel; an example whose decode fails is dropped.

  Errors are dropped by `ignore_errors`, which would also drop errors from upstream stages: there
  the pipeline only reads and parses records (pair checks are asserted downstream), so a record
  that cannot be read is dropped like an undecodable image, and `_check_arrivals` counts both.
  Markers and mismatched pairs skip `fn` (they get `placeholder`), so they always arrive.
  """
  def apply(x):
    skip = x['marker']
    if 'pair_ok' in x:
      skip = skip | tf.logical_not(x['pair_ok'])
    out = tf.cond(skip, lambda: dict(placeholder), lambda: fn(x))
    out = dict(x, **out)
    del out['encoded']
    return out
  return ds.map(apply, num_parallel_calls=_parallel(parallel)).ignore_errors(log_warning=True)


def _check_arrivals(ds: tf.data.Dataset, pairs: _Pairs, start_epoch: int,
                    start_index: int) -> tf.data.Dataset:
  """After decoding: asserts every image/score-map pair, and adds `missing`.

  `missing` is the number of positions before an element that never arrived (dropped by the
  decode guard). A mismatched pair fails here, naming both shards and the example.
  """
  image_paths = tf.constant([s.path for s in pairs.source.shards])
  map_paths = tf.constant(pairs.map_paths) if pairs.map_paths else None
  shape = pairs.manifest.grid + (pairs.manifest.k,) if pairs.manifest else None

  def step(state, x):
    epoch, next_index = state
    expected = tf.where(x['epoch'] == epoch, next_index, 0)
    out = dict(x, missing=x['index'] - expected)
    if map_paths is not None:
      assertion = tf.debugging.Assert(x['pair_ok'], [
          _MISMATCH, 'image shard', image_paths[x['shard']], 'example', x['position'], 'key',
          x['key'], 'label', x['label'], 'vs score-map shard', map_paths[x['shard']], 'key',
          x['map_key'], 'label', x['map_label'], f'(maps must be {shape}; key {_END} means '
          'that file ended early) -- the score maps were not made for these image shards (or '
          'one is corrupt); rerun labelgen on them or fix score_maps_dir.'], summarize=8)
      with tf.control_dependencies([assertion]):
        out['missing'] = tf.identity(out['missing'])
    return (x['epoch'], x['index'] + 1), out

  init = (tf.constant(start_epoch, tf.int64), tf.constant(start_index, tf.int64))
  return ds.scan(init, step)


def _handle_missing(ds: tf.data.Dataset, log: '_CorruptLog', on_corrupt: str) -> tf.data.Dataset:
  """Reports (or, with on_corrupt='fail', raises on) missing examples; drops the markers."""
  def missing_keys(x):
    m = tf.minimum(x['missing'], _RECENT)
    return tf.strings.reduce_join(x['recent'][_RECENT - m:], separator=', ')

  if on_corrupt == 'fail':
    def check(x):
      assertion = tf.debugging.Assert(x['missing'] == 0, [
          _CORRUPT, missing_keys(x), '(epoch', x['epoch'], 'examples', x['index'] - x['missing'],
          'to', x['index'] - 1, 'of this process) cannot be read or decoded; remove or replace '
          "the files, or use on_corrupt='skip'."], summarize=_RECENT)
      with tf.control_dependencies([assertion]):
        return dict(x, marker=tf.identity(x['marker']))
    ds = ds.map(check)
    return ds.filter(lambda x: tf.logical_not(x['marker']))

  def keep(x):
    def report():
      return tf.reshape(tf.py_function(
          log, [x['recent'], x['missing'], x['epoch'], x['index']], Tout=tf.bool), [])
    logged = tf.cond(x['missing'] > 0, report, lambda: tf.constant(True))
    return tf.logical_and(logged, tf.logical_not(x['marker']))
  return ds.filter(keep)


def _options(cfg: PipelineConfig) -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  options.threading.max_intra_op_parallelism = 1
  if cfg.threadpool_size:
    options.threading.private_threadpool_size = cfg.threadpool_size
  return options


class _CorruptLog:
  """Counts and reports corrupt examples per epoch (called from tf.data on the error path only)."""

  def __init__(self, max_fraction: float, what: str):
    self._max_fraction = max_fraction
    self._what = what
    self._lock = threading.Lock()
    self.keys: Dict[int, List[str]] = {}
    self.counts: Dict[int, int] = {}

  def __call__(self, recent, missing, epoch, index) -> np.bool_:
    missing, epoch, index = int(missing), int(epoch), int(index)
    named = [k.decode('utf-8', 'replace') for k in recent.numpy()[_RECENT - min(missing, _RECENT):]]
    with self._lock:
      self.keys.setdefault(epoch, []).extend(named)
      count = self.counts[epoch] = self.counts.get(epoch, 0) + missing
    logging.warning('%s: %d example(s) cannot be read or decoded, skipped: %s (epoch %d, %d '
                    'so far).', self._what, missing, ', '.join(named), epoch, count)
    if count > 10 and count > self._max_fraction * max(index, 1):
      raise CorruptImageError(
          f'{_TOO_MANY} {count} of the first {index} examples of epoch {epoch} failed to decode '
          f'(last: {named[-1]}), more than max_corrupt_fraction={self._max_fraction}: this is '
          "a preprocessing bug or unreadable data, not a few bad files; rerun with "
          "on_corrupt='fail' to see the error.")
    return np.bool_(True)

  def report(self, epoch: int, num_examples: Optional[int] = None) -> None:
    keys = self.keys.get(epoch, [])
    if keys:
      logging.warning('%s epoch %d: %d corrupt examples skipped: %s%s', self._what, epoch,
                      self.counts[epoch], ', '.join(keys[:20]), ' ...' if len(keys) > 20 else '')
    else:
      logging.info('%s epoch %d: no corrupt images%s.', self._what, epoch,
                   f' in {num_examples} examples' if num_examples is not None else '')


def _raise_translated(e: tf.errors.OpError) -> None:
  """Re-raises the pipeline's own assertion failures as clear Python errors."""
  msg = e.message if hasattr(e, 'message') else str(e)
  for marker, cls in ((_MISMATCH, score_maps.ScoreMapError), (_CORRUPT, CorruptImageError),
                      (_TOO_MANY, CorruptImageError)):
    at = msg.find(marker)
    if at >= 0:
      text = msg[at:].split('\n')[0]
      text = re.sub(r'\s*\[\[\{\{node.*$', '', text)
      text = re.sub(r'\]\s*\[', ' ', text).replace('[', '').replace(']', '').strip()
      text = text.replace("\\'", "'")
      raise cls(text) from None
  if isinstance(e, tf.errors.DataLossError):
    raise IOError(f'lvvit_jax/data/pipeline.py: a TFRecord shard is truncated or corrupt ({msg.splitlines()[0]}); check the '
                  'score maps with lvvit_jax.data.score_maps.verify_checksums(score_maps_dir) '
                  'and re-prepare the image shards if it is one of them.') from None
  raise e


# ------------------------------------------------------------------------------------------------
# Training.


def train_dataset(cfg: PipelineConfig, start_epoch: int = 0, start_index: int = 0,
                  corrupt_log: Optional[_CorruptLog] = None,
                  pairs: Optional[_Pairs] = None) -> tf.data.Dataset:
  """The batched train `tf.data.Dataset` of this process, from position (start_epoch, start_index).

  Batches hold `image` (B, S, S, 3), `label` (B,) int32, `label_affine` (B, 2, 3) float32, with
  score maps `topk_logits` (B, h, w, k) float16, `topk_idx` (B, h, w, k) int32, `map_box`
  (B, 4), `has_map` (B,) bool (False: no map, use the plain label); `_epoch` and `_index` (B,)
  int64 (the examples' positions, for the iterator's state); `key` if `include_keys`. Use
  `make_train_iterator` unless you handle those yourself.
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

  def epoch_stream(epoch):
    keys = tf.random.stateless_uniform([n_mine], seed=_fold(order_seed, epoch))
    order = tf.gather(mine, tf.argsort(keys))
    ds = _read_pairs(pairs, cfg.cycle_length, parallel, order)
    if cfg.shuffle_buffer > 1:
      seed = tf.random.stateless_uniform([], _fold(shuffle_seed, epoch), minval=0,
                                         maxval=2**31 - 1, dtype=tf.int64)
      ds = ds.shuffle(cfg.shuffle_buffer, seed=seed, reshuffle_each_iteration=False)
    ds = _number(ds, epoch, epoch_length)
    # Resumption: skip what was consumed before the restart, still as encoded records.
    return ds.skip(tf.where(epoch == start_epoch, tf.constant(start_index, tf.int64), 0))

  if cfg.num_epochs is None:
    epochs = tf.data.Dataset.counter(start_epoch)
  else:
    epochs = tf.data.Dataset.range(start_epoch, cfg.num_epochs)
  ds = epochs.flat_map(epoch_stream)

  def preprocess(x):
    seed = _fold(example_seed, x['epoch'], x['index'])
    out = augment.train_preprocess(x['encoded'], seed, aug_cfg)
    return {'image': out['image'], 'label_affine': out['label_affine']}

  size = aug_cfg.image_size
  placeholder = {'image': tf.zeros([size, size, 3]), 'label_affine': tf.zeros([2, 3])}
  ds = _decode_guarded(ds, preprocess, placeholder, parallel)
  ds = _check_arrivals(ds, pairs, start_epoch, start_index)
  log = corrupt_log or _CorruptLog(cfg.max_corrupt_fraction, 'train')
  ds = _handle_missing(ds, log, cfg.on_corrupt)

  image_dtype = tf.bfloat16 if cfg.image_dtype == 'bfloat16' else tf.float32
  with_maps = pairs.map_paths is not None

  def select(x):
    out = {'image': tf.cast(x['image'], image_dtype), 'label': tf.cast(x['label'], tf.int32),
           'label_affine': x['label_affine'], '_epoch': x['epoch'], '_index': x['index']}
    if with_maps:
      out.update(topk_logits=x['topk_logits'], topk_idx=x['topk_idx'], map_box=x['map_box'],
                 has_map=x['has_map'])
    if cfg.include_keys:
      out['key'] = x['key']
    return out

  ds = ds.map(select)
  ds = ds.batch(cfg.batch_size, drop_remainder=True)
  ds = ds.prefetch(cfg.prefetch)
  return ds.with_options(_options(cfg))


class _CorruptReport:
  """Corrupt-image counts of an iterator, per epoch (evaluation reports its last pass as 0)."""
  _log: '_CorruptLog'

  @property
  def corrupt_keys(self) -> Dict[int, List[str]]:
    """Keys of the corrupt images left out, per epoch (up to 8 per run of them)."""
    return self._log.keys

  @property
  def corrupt_counts(self) -> Dict[int, int]:
    """Number of corrupt images left out, per epoch."""
    return self._log.counts


class TrainIterator(_CorruptReport):
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
        raise ValueError(f'lvvit_jax/data/pipeline.py: data state has {k}={state[k]} but PipelineConfig.{k}={want}: the '
                         'stored position belongs to another data order; restore with the same '
                         'seed and processes, or start the data from scratch (state=None).')
    self._epoch = int(state.get('epoch', 0))
    self._index = int(state.get('index', 0))
    pairs = _shard_pairs(cfg, with_maps=True)
    self.num_examples = pairs.num_mine
    if not 0 <= self._index <= self.num_examples or self._epoch < 0:
      raise ValueError(f'lvvit_jax/data/pipeline.py: data state {state} is outside this process\'s epoch of '
                       f'{self.num_examples} examples of {cfg.source}: it belongs to other data; '
                       'restore with the same data or start from scratch (state=None).')
    self._log = _CorruptLog(cfg.max_corrupt_fraction, 'train')
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
      _raise_translated(e)
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


def eval_dataset(cfg: PipelineConfig,
                 corrupt_log: Optional[_CorruptLog] = None) -> Tuple[tf.data.Dataset, int, int]:
  """The batched eval dataset of this process, its number of batches and of real examples.

  Batches hold `image` (B, S, S, 3), `label` (B,) int32 and `mask` (B,) bool (False for the
  padding); with a multi-label source (ImageNet-ReaL) `labels` (B, MAX_LABELS) int32, the
  correct classes padded with -1; `key` if `include_keys`. Every process yields the same number of batches,
  ceil(max over processes of its examples / B). An image that cannot be decoded is reported and
  left out (the padding absorbs it).
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
  ds = _read_pairs(pairs, cfg.cycle_length, parallel, tf.constant(pairs.mine, tf.int64))
  ds = _number(ds, tf.constant(0, tf.int64), mine)

  def preprocess(x):
    return {'image': augment.eval_preprocess(x['encoded'], size, cfg.crop_pct)['image']}

  ds = _decode_guarded(ds, preprocess, {'image': tf.zeros([size, size, 3])}, parallel)
  ds = _check_arrivals(ds, pairs, 0, 0)
  ds = _handle_missing(ds, corrupt_log or _CorruptLog(math.inf, 'eval'), cfg.on_corrupt)
  image_dtype = tf.bfloat16 if cfg.image_dtype == 'bfloat16' else tf.float32

  multi_label = pairs.source.multi_label

  def select(x):
    out = {'image': tf.cast(x['image'], image_dtype), 'label': tf.cast(x['label'], tf.int32),
           'mask': tf.constant(True)}
    if multi_label:  # Several correct classes (ImageNet-ReaL), padded with -1.
      out['labels'] = tf.cast(x['labels'], tf.int32)
    if cfg.include_keys:
      out['key'] = x['key']
    return out

  ds = ds.map(select)
  pad = {'image': tf.zeros([size, size, 3], image_dtype), 'label': tf.constant(0, tf.int32),
         'mask': tf.constant(False)}
  if multi_label:
    pad['labels'] = tf.fill([sources.MAX_LABELS], -1)
  if cfg.include_keys:
    pad['key'] = tf.constant('')
  # Padding to the same number of full batches on every process; it also stands in for
  # examples that could not be decoded.
  ds = ds.concatenate(tf.data.Dataset.from_tensors(pad).repeat())
  ds = ds.take(num_batches * cfg.batch_size).batch(cfg.batch_size).prefetch(cfg.prefetch)
  return ds.with_options(_options(cfg)), num_batches, mine


class EvalIterator(_CorruptReport):
  """Re-iterable eval batches (numpy), the same number on every process.

  Attributes:
    num_batches: batches per pass (equal on every process).
    num_examples: real examples of this process (the rest is masked padding).
  """

  def __init__(self, cfg: PipelineConfig):
    self.cfg = cfg
    self._log = _CorruptLog(math.inf, 'eval')
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
        _raise_translated(e)
      yield {k: v.numpy() for k, v in batch.items()}
    self._log.report(0, self.num_examples)


def make_eval_iterator(cfg: PipelineConfig) -> EvalIterator:
  """The eval batches of this process (iterate once per evaluation)."""
  return EvalIterator(cfg)
