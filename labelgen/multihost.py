"""Several processes writing one `labelgen generate` output, and a rerun resuming it.

Process p of P takes image shards p, p+P, ... and writes their score-map shards itself. Its
list of finished shards goes to its own partial manifest,
`OUT/processes/process-<p>/manifest.json` (rewritten after every shard; file names relative to
OUT). Barriers (`multihost_utils.sync_global_devices`) order the rest: every process reads what
an earlier run left (`previous_run`), then process 0 moves an earlier `OUT/manifest.json` to
`OUT/processes/previous/` (still read by a later rerun), so no stale manifest is visible while
shards are rewritten; once every process has written its shards, process 0 merges the partial
manifests of processes 0..P-1 into `OUT/manifest.json` (image-shard order; a shard missing from
all of them is an error) and removes `OUT/processes/`; then every process reads and returns
that manifest (`write_run_manifest`). A single process writes `OUT/manifest.json` directly after
every shard. Counts are summed over processes with `sum_over_processes`.

Resume (`labelgen/resume.py`, shared with `labelgen import`): a rerun keeps every shard listed
in `OUT/manifest.json` or a partial manifest whose file still has the recorded SHA-256 and
example count and whose settings and teacher (weights hash included) are this run's.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Dict, List, Optional, Sequence, TextIO

import jax
import numpy as np
import tensorflow as tf

from labelgen import resume
from labelgen.settings import GenerateError
from lvvit_jax.data import score_maps
from lvvit_jax.data import sources

_FILE = 'labelgen/multihost.py'
_WHAT = 'labelgen generate'
PROCESSES_DIR = 'processes'     # OUT/processes/process-<p>/manifest.json: multi-process progress


def barrier(name: str) -> None:
  """Waits for every process (nothing to wait for with one)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def partial_dir(out: str, process: int) -> str:
  """Where process `process` keeps its partial manifest."""
  return os.path.join(out, PROCESSES_DIR, f'process-{process:05d}')


def open_source(source: str, split: str, data_dir: Optional[str]) -> sources.ImageSource:
  """`sources.get_source`; process 0 first, so built-in data is written once."""
  if jax.process_index() == 0:
    src = sources.get_source(source, split, data_dir)
  barrier(f'{_WHAT}: source ready')
  if jax.process_index() != 0:
    src = sources.get_source(source, split, data_dir)
  return src


def _candidates(out: str, want: score_maps.Manifest, log: TextIO
                ) -> Dict[str, List[score_maps.ShardInfo]]:
  """Finished shards an earlier run may have left: OUT/manifest.json and partial manifests."""
  dirs = [out]
  partial = os.path.join(out, PROCESSES_DIR)
  if tf.io.gfile.isdir(partial):
    dirs += [os.path.join(partial, d.rstrip('/')) for d in sorted(tf.io.gfile.listdir(partial))]
  found: Dict[str, List[score_maps.ShardInfo]] = {}
  for d in dirs:
    for name, info in resume.previous_shards(d, want, log, _WHAT).items():
      found.setdefault(name, []).append(info)
  return found


def previous_run(out: str, want: score_maps.Manifest, src: sources.ImageSource,
                 mine: Sequence[int], log: TextIO) -> Dict[int, Optional[score_maps.ShardInfo]]:
  """For each of this process's shards, the finished shard of an earlier run to keep, or None.

  Every process reads before any manifest moves; then process 0 (multi-process runs) moves an
  earlier OUT/manifest.json to OUT/processes/previous/ (still read by a later rerun), so no
  stale manifest is visible while shards are rewritten.
  """
  candidates = _candidates(out, want, log)
  kept = {}
  for i in mine:
    shard = src.shards[i]
    kept[i] = next((c for c in candidates.get(shard.name, [])
                    if resume.is_finished(out, c, shard.num_examples)), None)
  barrier(f'{_WHAT}: previous run read')
  manifest = os.path.join(out, score_maps.MANIFEST_NAME)
  if jax.process_count() > 1 and jax.process_index() == 0 and tf.io.gfile.exists(manifest):
    previous = os.path.join(out, PROCESSES_DIR, 'previous')
    tf.io.gfile.makedirs(previous)
    tf.io.gfile.rename(manifest, os.path.join(previous, score_maps.MANIFEST_NAME),
                       overwrite=True)
  return kept


def finished_shards(out: str, want: score_maps.Manifest) -> resume.FinishedShards:
  """This process's running manifest: OUT/ alone, else its partial manifest directory."""
  if jax.process_count() == 1:
    return resume.FinishedShards(out, want)
  return resume.FinishedShards(partial_dir(out, jax.process_index()), want)


def _merge_partials(out: str, want: score_maps.Manifest, src: sources.ImageSource
                    ) -> score_maps.Manifest:
  """Process 0, multi-process: the partial manifests of this run as one manifest."""
  by_shard = {}
  for p in range(jax.process_count()):
    part = score_maps.read_manifest(partial_dir(out, p))
    by_shard.update({s.image_shard: s for s in part.shards})
  missing = [s.name for s in src.shards if s.name not in by_shard]
  if missing:
    raise GenerateError(f'{_FILE}: the processes finished without shards {missing[:10]} in '
                        f'their manifests under {out}/{PROCESSES_DIR}; rerun (finished shards '
                        'are kept).')
  return dataclasses.replace(want, shards=tuple(by_shard[s.name] for s in src.shards))


def write_run_manifest(out: str, want: score_maps.Manifest, src: sources.ImageSource,
                       finished: resume.FinishedShards) -> score_maps.Manifest:
  """OUT/manifest.json of the whole run; OUT/processes/ removed once it is written.

  One process: its own list. Several: after every process has written its shards and its
  partial manifest, process 0 merges them; every process returns the merged manifest.
  """
  if jax.process_count() == 1:
    manifest = finished.manifest
    score_maps.write_manifest(out, manifest)
  else:
    finished.write()
    barrier(f'{_WHAT}: shards written')
    if jax.process_index() == 0:
      score_maps.write_manifest(out, _merge_partials(out, want, src))
    barrier(f'{_WHAT}: manifest written')
    manifest = score_maps.read_manifest(out)
  if jax.process_index() == 0 and tf.io.gfile.isdir(os.path.join(out, PROCESSES_DIR)):
    tf.io.gfile.rmtree(os.path.join(out, PROCESSES_DIR))
  return manifest


def sum_over_processes(counts: Sequence[int]) -> List[int]:
  """Each count summed over every process (the counts themselves with one process)."""
  if jax.process_count() == 1:
    return [int(c) for c in counts]
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  gathered = np.asarray(multihost_utils.process_allgather(np.asarray(counts, np.int64)))
  return [int(c) for c in gathered.reshape(-1, len(counts)).sum(0)]


def max_over_processes(value: float) -> float:
  """The largest `value` of any process (the value itself with one process)."""
  if jax.process_count() == 1:
    return float(value)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  gathered = np.asarray(multihost_utils.process_allgather(np.array([value], np.float64)))
  return float(gathered.max())
