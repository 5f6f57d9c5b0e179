"""Writing one score-map shard of `labelgen generate` from the teacher's outputs.

One score-map shard per image shard, same order and keys, written by `score_maps.ShardWriter`
(top-k float16 logits and int16 indices per position; a temporary name renamed when complete).
An image that cannot be decoded is written in its place with `has_map` = 0 and a zero map
(training drops it, as the input pipeline drops undecodable images); more than 10 such images
that are also more than 1 % of the images seen fail the run.
"""
from __future__ import annotations

from typing import List, Mapping, Optional, Tuple

import numpy as np

from labelgen.inputs import keys_and_labels
from labelgen.settings import GenerateError
from lvvit_jax.data import score_maps
from lvvit_jax.data import sources

_FILE = 'labelgen/shards.py'
MAX_UNDECODABLE = 10             # fail beyond this many undecodable images ...
MAX_UNDECODABLE_FRACTION = 0.01  # ... when they are also more than this fraction


def blank_map(grid: Tuple[int, int], k: int) -> Tuple[np.ndarray, np.ndarray]:
  """The zero (logits, indices) written for an image without a map."""
  return np.zeros(tuple(grid) + (k,), np.float16), np.zeros(tuple(grid) + (k,), np.int16)


class ShardRows:
  """Writes one shard's records in file order, filling in the undecodable images.

  Attributes:
    next: records written so far.
    top1_correct, top1_count: the teacher's hits and the images with a map, in this shard.
  """

  def __init__(self, writer: score_maps.ShardWriter, src: sources.ImageSource, index: int,
               blank: Tuple[np.ndarray, np.ndarray], undecodable: List[str],
               images_before: int):
    """`undecodable`: the run's list of undecodable keys (appended to); `images_before`: the
    images of the shards finished before this one (for the undecodable fraction)."""
    self.writer, self.src, self.index, self.blank = writer, src, index, blank
    self.undecodable, self.images_before = undecodable, images_before
    self.next = 0
    self.top1_correct = 0
    self.top1_count = 0
    self._keys: Optional[List[Tuple[str, int]]] = None

  def _fill_to(self, position: int) -> None:
    while self.next < position:
      if self._keys is None:
        self._keys = keys_and_labels(self.src, self.index)
      key, label = self._keys[self.next]
      self.writer.write(key, *self.blank, label, score_maps.FULL_IMAGE_BOX, has_map=False)
      self.undecodable.append(key)
      self.next += 1
    bad, seen = len(self.undecodable), self.images_before + self.next
    if bad > MAX_UNDECODABLE and bad > MAX_UNDECODABLE_FRACTION * seen:
      raise GenerateError(
          f'{_FILE}: {bad} of the {seen} images read so far cannot be decoded (last: '
          f'{self.undecodable[-1]} in {self.src.shards[self.index].path}): that is not a '
          'few damaged files; check --source, or decode one of them to see the error.')

  def add(self, rows: Mapping[str, np.ndarray], out: Mapping[str, np.ndarray]) -> None:
    """Writes one batch: `rows` from the host batch, `out` the teacher's outputs for it."""
    for j, position in enumerate(rows['position']):
      self._fill_to(int(position))
      label = int(rows['label'][j])
      self.writer.write(rows['key'][j], out['topk_logits'][j], out['topk_idx'][j], label,
                        rows['map_box'][j])
      self.top1_correct += int(out['pred'][j] == label)
      self.top1_count += 1
      self.next += 1

  def finish(self) -> None:
    """Fills in the undecodable images at the end and checks the record count."""
    shard = self.src.shards[self.index]
    self._fill_to(shard.num_examples)
    if self.next != shard.num_examples:
      raise GenerateError(f'{_FILE}: image shard {shard.path} gave {self.next} images but its '
                          f'dataset description lists {shard.num_examples}; prepare the '
                          'dataset again.')
