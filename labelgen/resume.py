"""Resuming a labelgen run: which shards of an earlier run to keep, and the running manifest.

Both labelgen writers (`import_maps.py`, `generate.py`) write one score-map shard per image
shard and make a rerun cheap the same way:
- `previous_shards` reads the manifest an earlier run left in a directory, if it was made with
  the same settings (dataset, split, grid, k, classes and the `teacher` description);
- `is_finished` keeps a shard of it only if its file is there with the manifest's SHA-256 and
  example count (ShardWriter writes to a temporary name and renames, so a shard file that
  exists is complete; the hash catches one rewritten by another run since);
- `FinishedShards` rewrites `manifest.json` after every shard, so an interrupted run leaves a
  manifest listing exactly the shards it finished (the input pipeline reports the others as
  "labelgen did not finish").
"""
from __future__ import annotations

import dataclasses
import os
from typing import Dict, List, Optional, TextIO

import tensorflow as tf

from lvvit_jax.data import score_maps


def same_settings(a: score_maps.Manifest, b: score_maps.Manifest) -> bool:
  """True when two manifests describe maps of the same data made the same way (shards aside)."""
  def settings(m):
    return (m.dataset, m.version, m.split, tuple(m.grid), m.k, m.num_classes, dict(m.teacher))
  return settings(a) == settings(b)


def previous_shards(directory: str, want: score_maps.Manifest, log: TextIO, what: str
                    ) -> Dict[str, score_maps.ShardInfo]:
  """Shards of an earlier run listed in `directory/manifest.json`, by image shard.

  Empty when there is no manifest, it cannot be read, or it was made with other settings than
  `want` (the last two are reported on `log`, prefixed with `what`, e.g. 'labelgen import').
  """
  if not tf.io.gfile.exists(os.path.join(directory, score_maps.MANIFEST_NAME)):
    return {}
  try:
    old = score_maps.read_manifest(directory)
  except score_maps.ScoreMapError as e:
    print(f'{what}: ignoring the unreadable manifest in {directory} ({e}); rewriting every '
          'shard.', file=log)
    return {}
  if not same_settings(old, want):
    print(f'{what}: {directory}/{score_maps.MANIFEST_NAME} was made for other data or '
          'settings; rewriting every shard.', file=log)
    return {}
  return {s.image_shard: s for s in old.shards}


def is_finished(out: str, info: Optional[score_maps.ShardInfo], num_examples: int) -> bool:
  """True if `info` names a finished shard in `out` for an image shard of `num_examples`.

  Finished: its example count is the image shard's, and the file exists with the SHA-256 that
  `info` records (reads the file once).
  """
  if info is None or info.num_examples != num_examples:
    return False
  path = os.path.join(out, info.file)
  return tf.io.gfile.exists(path) and score_maps.file_sha256(path) == info.sha256


class FinishedShards:
  """The shards finished so far, in image-shard order, as `directory/manifest.json`.

  `add` appends one and rewrites the manifest (atomically, `score_maps.write_manifest`), so the
  directory always lists what is done. File names in it are those of the `ShardInfo`s (relative
  to the directory the shards are in, which may differ from `directory`).
  """

  def __init__(self, directory: str, want: score_maps.Manifest):
    self.directory = directory
    self.want = want
    self.infos: List[score_maps.ShardInfo] = []

  @property
  def manifest(self) -> score_maps.Manifest:
    """`want` with the shards finished so far."""
    return dataclasses.replace(self.want, shards=tuple(self.infos))

  def add(self, info: score_maps.ShardInfo) -> None:
    """Records a finished shard and rewrites the manifest."""
    self.infos.append(info)
    self.write()

  def write(self) -> None:
    """(Re)writes the manifest of the shards finished so far."""
    tf.io.gfile.makedirs(self.directory)
    score_maps.write_manifest(self.directory, self.manifest)
