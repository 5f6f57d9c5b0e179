"""The corrupt-image guard: undecodable images are dropped, counted, named and reported.

Decoding runs in a parallel map followed by `ignore_errors` (`decode_guarded`), so an image
that cannot be decoded is dropped instead of stopping the epoch. Nothing upstream of that map
can fail on purpose (pair checks are asserted after it), and every example carries its stream
position (`number`): a sequential scan after the map (`check_arrivals`) finds the positions
that never arrived, and the scan before it remembers the last few keys, so each dropped example
is counted and named. An end-of-epoch marker catches drops at the end of an epoch.

In training a dropped example is logged with its key and skipped (on_corrupt='skip'), or
raises a `CorruptImageError` naming it (on_corrupt='fail'); a report follows every epoch
(`CorruptLog`), and more than `max_corrupt_fraction` corrupt examples in an epoch raises (that
is a preprocessing bug, not bad files). In evaluation it is reported and the padding takes its
place. The guard costs two cheap sequential scans; a per-example guard (a one-element dataset
with `ignore_errors` around each call) was measured at 1.5-2x the CPU per example and dropped.

`raise_translated` turns the pipeline's graph assertions (these and the score-map pair check)
into clear Python errors.
"""
from __future__ import annotations

import re
import threading
from typing import Callable, Dict, List, Optional

from absl import logging
import numpy as np
import tensorflow as tf

from lvvit_jax.data import pairs as pairs_lib
from lvvit_jax.data import score_maps

END_OF_STREAM = '<end of epoch>'
RECENT = 8  # keys remembered to name dropped examples
_MISMATCH = 'lvvit_jax score-map mismatch:'
_CORRUPT = 'lvvit_jax corrupt image:'
_TOO_MANY = 'lvvit_jax too many corrupt images:'


class CorruptImageError(ValueError):
  """An image that cannot be decoded (with on_corrupt='fail'), or too many of them."""


def number(ds: tf.data.Dataset, epoch: tf.Tensor, length: int) -> tf.data.Dataset:
  """Numbers a pass over the data and appends its end marker.

  Adds `epoch`, `index` (0, 1, 2, ... in stream order) and `recent` (the keys of the RECENT
  elements before, which name examples dropped later), and appends a marker element at index
  `length` (the number of records the pass must have), so that drops at the end are counted too.
  """
  marker = {k: tf.zeros(v.shape, v.dtype) for k, v in ds.element_spec.items()}
  marker.update(key=tf.constant(END_OF_STREAM), position=tf.constant(length, tf.int64),
                marker=tf.constant(True))
  if 'pair_ok' in marker:
    marker['pair_ok'] = tf.constant(True)
  ds = ds.concatenate(tf.data.Dataset.from_tensors(marker))

  def step(state, x):
    count, ring = state
    index = tf.where(x['marker'], x['position'], count)
    out = dict(x, epoch=epoch, index=index, recent=ring)
    return (count + 1, tf.concat([ring[1:], [x['key']]], 0)), out

  return ds.scan((tf.constant(0, tf.int64), tf.fill([RECENT], '')), step)


def decode_guarded(ds: tf.data.Dataset,
                   fn: Callable[[Dict[str, tf.Tensor]], Dict[str, tf.Tensor]],
                   placeholder: Dict[str, tf.Tensor], parallel: int) -> tf.data.Dataset:
  """Maps `fn` (decode + crop) in parallel; an example whose decode fails is dropped.

  Errors are dropped by `ignore_errors`, which would also drop errors from upstream stages: there
  the pipeline only reads and parses records (pair checks are asserted downstream), so a record
  that cannot be read is dropped like an undecodable image, and `check_arrivals` counts both.
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
  calls = pairs_lib.parallel_calls(parallel)
  return ds.map(apply, num_parallel_calls=calls).ignore_errors(log_warning=True)


def check_arrivals(ds: tf.data.Dataset, pairs: pairs_lib.ShardPairs, start_epoch: int,
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
          x['map_key'], 'label', x['map_label'], f'(maps must be {shape}; key {pairs_lib.END} '
          'means that file ended early) -- the score maps were not made for these image shards '
          '(or one is corrupt); rerun labelgen on them or fix score_maps_dir.'], summarize=8)
      with tf.control_dependencies([assertion]):
        out['missing'] = tf.identity(out['missing'])
    return (x['epoch'], x['index'] + 1), out

  init = (tf.constant(start_epoch, tf.int64), tf.constant(start_index, tf.int64))
  return ds.scan(init, step)


def handle_missing(ds: tf.data.Dataset, log: 'CorruptLog', on_corrupt: str) -> tf.data.Dataset:
  """Reports (or, with on_corrupt='fail', raises on) missing examples; drops the markers."""
  def missing_keys(x):
    m = tf.minimum(x['missing'], RECENT)
    return tf.strings.reduce_join(x['recent'][RECENT - m:], separator=', ')

  if on_corrupt == 'fail':
    def check(x):
      assertion = tf.debugging.Assert(x['missing'] == 0, [
          _CORRUPT, missing_keys(x), '(epoch', x['epoch'], 'examples', x['index'] - x['missing'],
          'to', x['index'] - 1, 'of this process) cannot be read or decoded; remove or replace '
          "the files, or use on_corrupt='skip'."], summarize=RECENT)
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


class CorruptLog:
  """Counts and reports corrupt examples per epoch (called from tf.data on the error path only)."""

  def __init__(self, max_fraction: float, what: str):
    self._max_fraction = max_fraction
    self._what = what
    self._lock = threading.Lock()
    self.keys: Dict[int, List[str]] = {}
    self.counts: Dict[int, int] = {}

  def __call__(self, recent, missing, epoch, index) -> np.bool_:
    missing, epoch, index = int(missing), int(epoch), int(index)
    named = [k.decode('utf-8', 'replace') for k in recent.numpy()[RECENT - min(missing, RECENT):]]
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


class CorruptReport:
  """Corrupt-image counts of an iterator, per epoch (evaluation reports its last pass as 0)."""
  _log: CorruptLog

  @property
  def corrupt_keys(self) -> Dict[int, List[str]]:
    """Keys of the corrupt images left out, per epoch (up to 8 per run of them)."""
    return self._log.keys

  @property
  def corrupt_counts(self) -> Dict[int, int]:
    """Number of corrupt images left out, per epoch."""
    return self._log.counts


def raise_translated(e: tf.errors.OpError) -> None:
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
    raise IOError(f'lvvit_jax/data/pipeline.py: a TFRecord shard is truncated or corrupt '
                  f'({msg.splitlines()[0]}); check the score maps with '
                  'lvvit_jax.data.score_maps.verify_checksums(score_maps_dir) and re-prepare '
                  'the image shards if it is one of them.') from None
  raise e
