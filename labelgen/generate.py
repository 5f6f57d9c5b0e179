r"""`python -m labelgen generate`: a teacher run densely over a dataset -> score-map shards.

    python -m labelgen generate --teacher CKPT --source tfds:imagenet2012 \
        --data-dir ~/tensorflow_datasets --out maps/lvvit_m_384 [--size 384] [--crop centre]
    python main.py --config configs/labelgen.py --workdir W --config.teacher=CKPT \
        --config.out=DIR                                      # the same, as a main.py mode

Teacher: any model of this project, restored with `checkpoints.load_model_variables` (a
converted official checkpoint, a trainer workdir or one of its step folders; `--no-ema` takes a
trainer's raw weights instead of its EMA). It runs at the checkpoint's img_size, or at `--size`
with the position embedding resampled (`convert.adapt_variables`). Its dense logits are the
aux head applied to every patch token of `features`; a model without an aux head (the `vit_s`
baseline) gets its classifier `head` at every patch token instead (global pooling removed, as
the paper did with NFNet-F6). The map is the token grid (size / 16 at patch 16).

Input: every image of `--source`/`--split`, shard by shard in shard order, decoded by tf.data
(parallel map, prefetch). `--crop resize` (default): the whole image resized to the teacher's
square input (bicubic), `map_box` [0, 0, 1, 1]; `--crop centre`: the shorter side resized to
the input and centre cropped (`augment.eval_preprocess` with crop_pct 1.0), `map_box` the
covered region exactly (the images of output (0, 0) and (1, 1) under its `label_affine`).

Output: one score-map shard per image shard, same order and keys, written by
`score_maps.ShardWriter` (top-`--k` float16 logits and int16 indices per position), and
`manifest.json` whose `teacher` records the checkpoint, model, size, crop, dtype, ema and the
SHA-256 of the weights. An image that cannot be decoded is written with `has_map` = 0 and a
zero map (training drops it, as the input pipeline drops undecodable images); more than 10
such images and more than 1 % of the images seen fails the run. The summary at the end gives
the teacher's top-1 against the dataset labels, from the spatially averaged map logits
(the full logits averaged over positions, then argmax), images/s and bytes per image.

Devices: data parallel over this process's devices (`sharding.make_mesh(-1, 1,
jax.local_devices())`); the forward pass and top-k are one jitted function with explicit
shardings, bfloat16 on accelerators by default (`--dtype auto`: float32 on CPU, as the
trainer). `--batch` is per process, a multiple of the local device count; the last batch of a
shard is padded to it and the padding dropped. The device runs one batch ahead of the writer.

Multi-process (`--coordinator-address ... --num-processes P --process-id p`, or found from a
SLURM / TPU-pod environment; main.py's flags likewise): process p takes image shards p, p+P,
... and writes their score-map shards itself. Its list of finished shards goes to its own
partial manifest, `OUT/processes/process-<p>/manifest.json` (rewritten after every shard; file
names relative to OUT). Barriers (`multihost_utils.sync_global_devices`) order the rest:
every process reads what an earlier run left, then process 0 moves an earlier
`OUT/manifest.json` to `OUT/processes/previous/` (still read by a later rerun), so no stale
manifest is visible while shards are rewritten; once every process has written its shards,
process 0 merges the partial manifests of processes 0..P-1 into `OUT/manifest.json`
(image-shard order; a shard missing from all of them is an error) and removes
`OUT/processes/`; then every process reads and returns that manifest. The summary's counts are
summed over processes (`process_allgather`). A single process writes `OUT/manifest.json`
directly after every shard.

Resume (`labelgen/resume.py`, shared with `labelgen import`): a rerun keeps every shard listed
in `OUT/manifest.json` or a partial manifest whose file still has the recorded SHA-256 and
example count and whose settings and teacher (weights hash included) are this run's; the
others are rewritten. Shards are written to a temporary name and renamed when complete.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import os
import sys
import time
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, TextIO, Tuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import tensorflow as tf

from labelgen import resume
from lvvit_jax import checkpoints
from lvvit_jax import sharding
from lvvit_jax.data import augment
from lvvit_jax.data import score_maps
from lvvit_jax.data import sources
from lvvit_jax.models import convert
from lvvit_jax.models import create_model

_FILE = 'labelgen/generate.py'
_WHAT = 'labelgen generate'
CROPS = ('resize', 'centre')
DTYPES = ('auto', 'float32', 'bfloat16')
PROCESSES_DIR = 'processes'     # OUT/processes/process-<p>/manifest.json: multi-process progress
_MAX_UNDECODABLE = 10           # fail beyond this many undecodable images ...
_MAX_UNDECODABLE_FRACTION = 0.01  # ... when they are also more than this fraction


class GenerateError(ValueError):
  """Settings that do not fit the teacher or the data, or data that cannot be read."""


def resolve_dtype(dtype: str) -> str:
  """'auto' -> float32 on CPU, bfloat16 on accelerators (the trainer's `compute_dtype`)."""
  if dtype not in DTYPES:
    raise GenerateError(f'{_FILE}: --dtype {dtype!r}: use one of {DTYPES}.')
  if dtype == 'auto':
    return 'float32' if jax.default_backend() == 'cpu' else 'bfloat16'
  return dtype


# ------------------------------------------------------------------------------------------------
# Teacher.


@dataclasses.dataclass(frozen=True)
class Teacher:
  """A restored teacher: the module, its variables (NumPy) and the manifest's description."""
  model: Any
  variables: Mapping[str, Any]
  description: Mapping[str, Any]

  @property
  def size(self) -> int:
    return self.model.config.img_size

  @property
  def grid(self) -> Tuple[int, int]:
    return self.model.config.grid

  @property
  def num_classes(self) -> int:
    return self.model.config.num_classes


def weights_sha256(variables: Mapping[str, Any]) -> str:
  """Hex SHA-256 of every variable's name, shape, dtype and bytes (in name order)."""
  h = hashlib.sha256()
  for path, value in sorted(flax.traverse_util.flatten_dict(dict(variables)).items()):
    value = np.ascontiguousarray(value)
    h.update(f'{"/".join(path)}:{value.shape}:{value.dtype};'.encode())
    h.update(value.tobytes())
  return h.hexdigest()


def load_teacher(checkpoint: str, *, size: Optional[int] = None, ema: bool = True,
                 dtype: str = 'float32') -> Teacher:
  """Restores a teacher from `checkpoint` at `size` (default: the size it was trained at).

  Args:
    checkpoint: a converted checkpoint, a trainer workdir or one of its step folders.
    size: input side; another than the checkpoint's resamples the position embedding.
    ema: for trainer checkpoints, the EMA weights (else the raw ones).
    dtype: compute dtype, 'float32' or 'bfloat16' (resolved, not 'auto').
  """
  variables, described = checkpoints.load_model_variables(checkpoint, ema=ema)
  fields = dict(described['model_config'])
  trained_size = int(fields['img_size'])
  fields['img_size'] = int(size or trained_size)
  patch = int(fields['patch_size'])
  if fields['img_size'] < patch or fields['img_size'] % patch:
    raise GenerateError(f'{_FILE}: --size {fields["img_size"]} is not a multiple of the '
                        f'teacher\'s patch size {patch}; use e.g. '
                        f'{max(patch, fields["img_size"] // patch * patch)}.')
  model = create_model(described['model'], dtype=dtype, **fields)
  s = model.config.img_size
  abstract = jax.eval_shape(lambda: model.init({'params': jax.random.key(0)},
                                               jnp.zeros((1, s, s, 3), jnp.float32)))
  target = {'params': abstract['params'], 'batch_stats': abstract.get('batch_stats', {})}
  fitted, dropped = convert.adapt_variables(variables, target, model.config.grid,
                                            source=checkpoint)
  if dropped:  # Cannot happen with the checkpoint's own class count; guards a broken one.
    raise GenerateError(f'{_FILE}: {checkpoint}: its heads do not fit its own description '
                        f'({dropped}); the checkpoint is inconsistent, rewrite it.')
  fitted = {'params': fitted['params'], 'batch_stats': fitted.get('batch_stats', {})}
  description = {
      'checkpoint': os.path.abspath(checkpoint), 'model': described['model'], 'size': s,
      'checkpoint_size': trained_size, 'dtype': dtype, 'ema': bool(ema),
      'head': 'aux_head' if model.config.aux_head else 'head',
      'weights_sha256': weights_sha256(variables)}
  return Teacher(model, fitted, description)


def _dense_logits(module: Any, images: jax.Array) -> jax.Array:
  """(B, N, K) float32: the aux head (or, without one, the class head) on every patch token."""
  tokens = module.features(images)[:, 1:]
  head = module.aux_head if module.config.aux_head else module.head
  return head(tokens).astype(jnp.float32)


def make_dense_topk(model: Any, k: int):
  """`(variables, images (B, S, S, 3)) -> {'topk_logits', 'topk_idx', 'pred'}` (unjitted).

  topk_logits float16 and topk_idx int16, both (B, h, w, k) on the token grid (row = y);
  pred int32 (B,): argmax of the per-position logits averaged over positions.
  """
  gh, gw = model.config.grid

  def dense_topk(variables, images):
    logits = model.apply(variables, images, method=_dense_logits)
    values, idx = jax.lax.top_k(logits, k)
    b = images.shape[0]
    return {'topk_logits': values.astype(jnp.float16).reshape(b, gh, gw, k),
            'topk_idx': idx.astype(jnp.int16).reshape(b, gh, gw, k),
            'pred': jnp.argmax(jnp.mean(logits, axis=1), axis=-1).astype(jnp.int32)}
  return dense_topk


# ------------------------------------------------------------------------------------------------
# Input.


def preprocess_fn(size: int, crop: str, dtype: str):
  """The tf.data map of one parsed record: {'image' (size, size, 3) in `dtype`, 'map_box', ...}.

  The image is normalised and cast to the compute dtype (the model casts its input to it
  first, so nothing is lost, and a bfloat16 batch is half the bytes to send).
  """
  if crop not in CROPS:
    raise GenerateError(f'{_FILE}: --crop {crop!r}: use one of {CROPS}.')
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


def _keys_and_labels(src: sources.ImageSource, index: int) -> List[Tuple[str, int]]:
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


# ------------------------------------------------------------------------------------------------
# The device loop.


def _host_batches(src: sources.ImageSource, todo: Sequence[int], preprocess, batch_size: int,
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


def _teacher_outputs(step, variables, mesh, batches) -> Iterator[Tuple[int, Dict, Dict]]:
  """(shard index, host rows, teacher outputs) per batch; the device runs one batch ahead."""
  def fetched(item):
    i, batch, n, out = item
    rows = {k: batch[k][:n] for k in ('key', 'label', 'map_box', 'position')}
    return i, rows, {k: np.asarray(v)[:n] for k, v in out.items()}

  pending = None
  for i, batch, n in batches:
    images = sharding.host_to_global({'image': batch['image']}, mesh)['image']
    out = step(variables, images)  # dispatched asynchronously
    if pending is not None:
      yield fetched(pending)
    pending = (i, batch, n, out)
  if pending is not None:
    yield fetched(pending)


# ------------------------------------------------------------------------------------------------
# Summary and the run.


@dataclasses.dataclass
class GenerateSummary:
  """What a run did (summed over processes); also printed at its end.

  Attributes:
    images: examples in the shards of the manifest (written + kept).
    images_computed: examples read in this run (written shards).
    shards_written, shards_kept: score-map shards written in this run / kept from an earlier one.
    top1_correct, top1_count: teacher hits and decodable images behind `top1`.
    undecodable: keys of images written without a map (this process's).
    bytes: bytes of the score-map shards of the manifest.
    seconds: the whole call; teacher_seconds: from the first batch read to the last written.
    steady_images_per_second: after the first batch (no compilation, pipeline filled).
    manifest: the manifest written.
  """
  images: int = 0
  images_computed: int = 0
  shards_written: int = 0
  shards_kept: int = 0
  top1_correct: int = 0
  top1_count: int = 0
  undecodable: List[str] = dataclasses.field(default_factory=list)
  bytes: int = 0
  seconds: float = 0.0
  teacher_seconds: float = 0.0
  steady_images_per_second: float = 0.0
  manifest: Optional[score_maps.Manifest] = None

  @property
  def top1(self) -> Optional[float]:
    """Teacher top-1 on the images run in this run (None when every shard was kept)."""
    return self.top1_correct / self.top1_count if self.top1_count else None

  @property
  def images_per_second(self) -> float:
    return self.images_computed / max(self.teacher_seconds, 1e-9)

  @property
  def bytes_per_image(self) -> float:
    return self.bytes / max(self.images, 1)

  def describe(self) -> str:
    """The end-of-run summary line."""
    top1 = (f'{self.top1:.4f} over {self.top1_count} images (map logits averaged over '
            'positions)' if self.top1 is not None else 'n/a (no image run)')
    line = (f'{_WHAT}: teacher top-1 {top1}; {self.images_per_second:.1f} images/s; '
            f'{self.bytes_per_image:.0f} bytes per image; {self.shards_written} shards written '
            f'+ {self.shards_kept} kept, {self.images} images, {self.seconds:.1f} s.')
    if self.undecodable:
      more = ', ...' if len(self.undecodable) > 10 else ''
      line += (f'\n  {len(self.undecodable)} undecodable images written without a map: '
               f'{", ".join(self.undecodable[:10])}{more}')
    return line


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def _partial_dir(out: str, process: int) -> str:
  return os.path.join(out, PROCESSES_DIR, f'process-{process:05d}')


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


class _ShardRows:
  """Writes one shard's records in file order, filling in the undecodable images."""

  def __init__(self, writer: score_maps.ShardWriter, src: sources.ImageSource, index: int,
               blank: Tuple[np.ndarray, np.ndarray], summary: GenerateSummary):
    self.writer, self.src, self.index, self.blank = writer, src, index, blank
    self.summary = summary
    self.next = 0
    self._keys: Optional[List[Tuple[str, int]]] = None

  def _fill_to(self, position: int) -> None:
    while self.next < position:
      if self._keys is None:
        self._keys = _keys_and_labels(self.src, self.index)
      key, label = self._keys[self.next]
      self.writer.write(key, *self.blank, label, score_maps.FULL_IMAGE_BOX, has_map=False)
      self.summary.undecodable.append(key)
      self.next += 1
    bad, seen = len(self.summary.undecodable), self.summary.images_computed + self.next
    if bad > _MAX_UNDECODABLE and bad > _MAX_UNDECODABLE_FRACTION * seen:
      raise GenerateError(
          f'{_FILE}: {bad} of the {seen} images read so far cannot be decoded (last: '
          f'{self.summary.undecodable[-1]} in {self.src.shards[self.index].path}): that is not a '
          'few damaged files; check --source, or decode one of them to see the error.')

  def add(self, rows: Mapping[str, np.ndarray], out: Mapping[str, np.ndarray]) -> None:
    for j, position in enumerate(rows['position']):
      self._fill_to(int(position))
      label = int(rows['label'][j])
      self.writer.write(rows['key'][j], out['topk_logits'][j], out['topk_idx'][j], label,
                        rows['map_box'][j])
      self.summary.top1_correct += int(out['pred'][j] == label)
      self.summary.top1_count += 1
      self.next += 1

  def finish(self) -> None:
    shard = self.src.shards[self.index]
    self._fill_to(shard.num_examples)
    if self.next != shard.num_examples:
      raise GenerateError(f'{_FILE}: image shard {shard.path} gave {self.next} images but its '
                          f'dataset description lists {shard.num_examples}; prepare the '
                          'dataset again.')


def _open_source(source: str, split: str, data_dir: Optional[str]) -> sources.ImageSource:
  """`sources.get_source`; process 0 first, so built-in data is written once."""
  if jax.process_index() == 0:
    src = sources.get_source(source, split, data_dir)
  _barrier('labelgen generate: source ready')
  if jax.process_index() != 0:
    src = sources.get_source(source, split, data_dir)
  return src


def _previous_run(out: str, want: score_maps.Manifest, src: sources.ImageSource,
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
  _barrier('labelgen generate: previous run read')
  manifest = os.path.join(out, score_maps.MANIFEST_NAME)
  if jax.process_count() > 1 and jax.process_index() == 0 and tf.io.gfile.exists(manifest):
    previous = os.path.join(out, PROCESSES_DIR, 'previous')
    tf.io.gfile.makedirs(previous)
    tf.io.gfile.rename(manifest, os.path.join(previous, score_maps.MANIFEST_NAME),
                       overwrite=True)
  return kept


def _merge_partials(out: str, want: score_maps.Manifest, src: sources.ImageSource
                    ) -> score_maps.Manifest:
  """Process 0, multi-process: the partial manifests of this run as one manifest."""
  by_shard = {}
  for p in range(jax.process_count()):
    part = score_maps.read_manifest(_partial_dir(out, p))
    by_shard.update({s.image_shard: s for s in part.shards})
  missing = [s.name for s in src.shards if s.name not in by_shard]
  if missing:
    raise GenerateError(f'{_FILE}: the processes finished without shards {missing[:10]} in '
                        f'their manifests under {out}/{PROCESSES_DIR}; rerun (finished shards '
                        'are kept).')
  return dataclasses.replace(want, shards=tuple(by_shard[s.name] for s in src.shards))


def _write_run_manifest(out: str, want: score_maps.Manifest, src: sources.ImageSource,
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
    _barrier('labelgen generate: shards written')
    if jax.process_index() == 0:
      score_maps.write_manifest(out, _merge_partials(out, want, src))
    _barrier('labelgen generate: manifest written')
    manifest = score_maps.read_manifest(out)
  if jax.process_index() == 0 and tf.io.gfile.isdir(os.path.join(out, PROCESSES_DIR)):
    tf.io.gfile.rmtree(os.path.join(out, PROCESSES_DIR))
  return manifest


def _gather_counts(summary: GenerateSummary) -> None:
  """Sums the counts of every process into `summary` (multi-process runs)."""
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  names = ('images_computed', 'shards_written', 'shards_kept', 'top1_correct', 'top1_count')
  counts = np.array([getattr(summary, n) for n in names], np.int64)
  seconds = np.array([summary.teacher_seconds], np.float64)
  counts = np.asarray(multihost_utils.process_allgather(counts)).reshape(-1, len(names))
  seconds = np.asarray(multihost_utils.process_allgather(seconds)).reshape(-1)
  for n, total in zip(names, counts.sum(0)):
    setattr(summary, n, int(total))
  summary.teacher_seconds = float(seconds.max())


def generate(teacher: str, source: str, out: str, *, split: str = 'train',
             data_dir: Optional[str] = None, size: Optional[int] = None, crop: str = 'resize',
             k: int = 5, batch_size: int = 64, dtype: str = 'auto', ema: bool = True,
             num_parallel_calls: int = -1, log: Optional[TextIO] = None,
             progress: bool = True) -> GenerateSummary:
  """Runs `teacher` densely over a split and writes its top-k score maps into `out`.

  Args:
    teacher: a converted checkpoint, a trainer workdir or one of its step folders.
    source: 'tfds:<name>', an image-folder shards directory or 'digits[:side]'.
    out: output directory (created): score-map shards + manifest.json.
    split: the source's split.
    data_dir: TFDS data directory (or where 'digits' is written).
    size: the teacher's input side (default: its checkpoint's).
    crop: 'resize' (whole image to the square input) or 'centre' (shorter side + centre crop).
    k: logits kept per position.
    batch_size: images per step of this process, a multiple of its device count.
    dtype: 'auto' (bfloat16 on accelerators, float32 on CPU), 'float32' or 'bfloat16'.
    ema: a trainer checkpoint's EMA weights (else the raw ones).
    num_parallel_calls: decoding threads (-1: tf.data's AUTOTUNE).
    log: per-shard lines and the summary (stderr when None).
    progress: show a progress bar (tqdm, stderr; process 0).

  Returns:
    The summary (also printed by process 0).

  Raises:
    GenerateError: settings that do not fit the teacher or the data, unreadable shards, or
      too many undecodable images (finished shards are kept for a rerun).
  """
  log = log or sys.stderr
  start = time.time()
  if crop not in CROPS:
    raise GenerateError(f'{_FILE}: --crop {crop!r}: use one of {CROPS}.')
  dtype = resolve_dtype(dtype)
  devices = jax.local_devices()
  if batch_size < 1 or batch_size % len(devices):
    raise GenerateError(f'{_FILE}: --batch {batch_size} must be a positive multiple of the '
                        f'{len(devices)} local devices; use e.g. '
                        f'{max(1, batch_size // len(devices)) * len(devices)}.')
  model_teacher = load_teacher(teacher, size=size, ema=ema, dtype=dtype)
  num_classes = model_teacher.num_classes
  if num_classes > np.iinfo(np.int16).max + 1:
    raise GenerateError(f'{_FILE}: the teacher {teacher} has {num_classes} classes; score maps '
                        'store class indices as int16 (at most 32768 classes).')
  if not 1 <= k <= num_classes:
    raise GenerateError(f'{_FILE}: --k {k} must lie in [1, {num_classes}] (the teacher has '
                        f'{num_classes} classes).')
  src = _open_source(source, split, data_dir)
  if src.num_classes and src.num_classes != num_classes:
    raise GenerateError(f'{_FILE}: the teacher {teacher} has {num_classes} classes but {source} '
                        f'({split}) has {src.num_classes}; training reads maps over the '
                        "dataset's classes: use a teacher trained on this label set.")
  want = score_maps.Manifest(
      dataset=src.name, version=src.version, split=split, grid=model_teacher.grid, k=k,
      num_classes=num_classes, teacher=dict(model_teacher.description, crop=crop), shards=())

  # This process's shards: the finished ones of an earlier run are kept, the rest computed.
  process, processes = jax.process_index(), jax.process_count()
  tf.io.gfile.makedirs(out)
  mine = list(range(process, len(src.shards), processes))
  kept = _previous_run(out, want, src, mine, log)
  todo = [i for i in mine if kept[i] is None]
  finished = resume.FinishedShards(out if processes == 1 else _partial_dir(out, process), want)

  # The teacher on this process's devices, one batch ahead of the writer.
  mesh = sharding.make_mesh(-1, 1, devices=devices)
  variables = jax.device_put(
      jax.tree.map(lambda v: np.asarray(v, np.float32), dict(model_teacher.variables)),
      sharding.replicated(mesh))
  step = jax.jit(make_dense_topk(model_teacher.model, k),
                 in_shardings=(sharding.replicated(mesh), sharding.batch_sharding(mesh)),
                 out_shardings=sharding.batch_sharding(mesh))
  batches = _host_batches(src, todo, preprocess_fn(model_teacher.size, crop, dtype),
                          batch_size, num_parallel_calls)
  groups = itertools.groupby(_teacher_outputs(step, variables, mesh, batches),
                             key=lambda item: item[0])

  # The shards in order: kept as they are, or written from the teacher's outputs.
  summary = GenerateSummary()
  blank = (np.zeros(model_teacher.grid + (k,), np.float16),
           np.zeros(model_teacher.grid + (k,), np.int16))
  bar = None
  if progress and process == 0 and todo:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm(total=sum(src.shards[i].num_examples for i in todo), desc=_WHAT, unit='img',
               file=sys.stderr, mininterval=1.0, dynamic_ncols=True)
  loop_start = time.time()
  first_done, first_images = None, 0
  group = next(groups, None)  # the first batch: compiles the step
  for n, i in enumerate(mine):
    shard = src.shards[i]
    info = kept[i]
    if info is not None:
      summary.shards_kept += 1
      status = 'kept'
    else:
      with score_maps.ShardWriter(out, shard.path) as writer:
        rows = _ShardRows(writer, src, i, blank, summary)
        if group is not None and group[0] == i:  # (no group: no image of it decoded)
          for _, batch_rows, outputs in group[1]:
            rows.add(batch_rows, outputs)
            if first_done is None:
              first_done, first_images = time.time(), summary.images_computed + rows.next
            if bar is not None:
              bar.update(len(batch_rows['position']))
          group = next(groups, None)
        rows.finish()
      info = writer.info
      summary.images_computed += shard.num_examples
      summary.shards_written += 1
      status = 'written'
    finished.add(info)
    message = (f'{_WHAT}: shard {n + 1}/{len(mine)} {shard.name}: {shard.num_examples} '
               f'images {status}')
    if bar is not None:
      bar.write(message, file=log)
    else:
      print(message, file=log, flush=True)
  if bar is not None:
    bar.close()
  summary.teacher_seconds = time.time() - loop_start
  if first_done is not None and summary.images_computed > first_images:
    summary.steady_images_per_second = (
        (summary.images_computed - first_images) / max(time.time() - first_done, 1e-9))

  manifest = _write_run_manifest(out, want, src, finished)
  _gather_counts(summary)
  summary.manifest = manifest
  summary.images = manifest.num_examples
  summary.bytes = sum(tf.io.gfile.stat(os.path.join(out, s.file)).length
                      for s in manifest.shards)
  summary.seconds = time.time() - start
  if process == 0:
    print(summary.describe(), file=log, flush=True)
  return summary


# ------------------------------------------------------------------------------------------------
# Entry points: main.py's mode 'labelgen' and the command line.


def generate_from_config(config: Any, workdir: str) -> GenerateSummary:
  """main.py's mode 'labelgen' (configs/labelgen.py): `generate` with the config's settings.

  The output defaults to WORKDIR/score_maps, and the bundled digits to WORKDIR/data.
  """
  if not config.teacher:
    raise GenerateError(f'{_FILE}: config.teacher is not set; pass --config.teacher=CKPT (a '
                        'converted checkpoint, a trainer workdir or one of its step folders).')
  source = config.data.source
  data_dir = config.data.data_dir
  if not data_dir and (source == 'digits' or source.startswith('digits:')):
    data_dir = os.path.join(workdir, 'data')
  return generate(config.teacher, source, config.out or os.path.join(workdir, 'score_maps'),
                  split=config.data.split, data_dir=data_dir, size=config.size,
                  crop=config.crop, k=config.k, batch_size=config.batch_size,
                  dtype=config.dtype, ema=config.ema,
                  num_parallel_calls=config.data.num_parallel_calls)


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """The `generate` sub-command's arguments."""
  parser.add_argument('--teacher', required=True,
                      help='converted checkpoint, trainer workdir or checkpoints/<step> folder')
  parser.add_argument('--source', required=True,
                      help='tfds:<name> (prepared TFDS dataset), a directory of image-folder '
                      'shards, or digits[:side]')
  parser.add_argument('--split', default='train')
  parser.add_argument('--data-dir', default=None, help='TFDS data directory (or for digits)')
  parser.add_argument('--out', required=True, help='output directory for the score-map shards')
  parser.add_argument('--size', type=int, default=None,
                      help="teacher input side (default: the checkpoint's img_size)")
  parser.add_argument('--crop', default='resize', choices=CROPS,
                      help='resize: whole image to the square input (map_box [0,0,1,1]); '
                      'centre: shorter side resized, centre crop (map_box its region)')
  parser.add_argument('--k', type=int, default=5, help='logits kept per position')
  parser.add_argument('--batch', type=int, default=64,
                      help='images per step of each process (multiple of its device count)')
  parser.add_argument('--dtype', default='auto', choices=DTYPES,
                      help='compute dtype; auto: bfloat16 on accelerators, float32 on CPU')
  parser.add_argument('--ema', default=True, action=argparse.BooleanOptionalAction,
                      help="trainer checkpoints: the EMA weights (default) or the raw ones")
  parser.add_argument('--workers', type=int, default=-1,
                      help='decoding threads (default: tf.data AUTOTUNE)')
  parser.add_argument('--no-progress', dest='progress', action='store_false',
                      help='no progress bar')
  parser.add_argument('--coordinator-address', default=None,
                      help='multi-process: HOST:PORT of process 0 (with the next two)')
  parser.add_argument('--num-processes', type=int, default=None)
  parser.add_argument('--process-id', type=int, default=None)


def run(args: argparse.Namespace) -> int:
  """Runs the sub-command on parsed arguments; returns the exit status."""
  try:
    # CPU processes need gloo for the cross-process barriers; accelerators ignore it.
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    sharding.maybe_initialize_distributed(args.coordinator_address, args.num_processes,
                                          args.process_id)
    generate(args.teacher, args.source, args.out, split=args.split, data_dir=args.data_dir,
             size=args.size, crop=args.crop, k=args.k, batch_size=args.batch,
             dtype=args.dtype, ema=args.ema, num_parallel_calls=args.workers,
             progress=args.progress)
  except (ValueError, FileNotFoundError) as e:  # GenerateError, ScoreMapError, bad checkpoints
    print(f'{_WHAT}: error: {e}', file=sys.stderr)
    return 1
  return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
  """`python -m labelgen generate ...` (argv without the sub-command)."""
  parser = argparse.ArgumentParser(prog='python -m labelgen generate', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  add_arguments(parser)
  return run(parser.parse_args(argv))
