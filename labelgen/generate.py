r"""`python -m labelgen generate`: a teacher run densely over a dataset -> score-map shards.

    python -m labelgen generate --teacher CKPT --source tfds:imagenet2012 \
        --data-dir ~/tensorflow_datasets --out maps/lvvit_m_384 [--size 384] [--crop centre]
    python -m labelgen generate --teacher ckpt/nfnet_f6 --source tfds:imagenet2012 \
        --out maps/nfnet_f6 --size 576 --crop centre      # the paper's 18x18 top-5 maps
    python main.py --config configs/labelgen.py --workdir W --config.teacher=CKPT \
        --config.out=DIR                                      # the same, as a main.py mode

Teacher (`labelgen/teacher.py`): any zoo model, from a converted checkpoint, a trainer workdir
or one of its step folders (`--no-ema`: a trainer's raw weights), at its img_size or `--size`.
Its map is the model's `dense_logits` on its `config.grid`: LV-ViT's aux head on the patch
tokens (size / 16 a side), `vit_s`'s class head on them, an NFNet's classifier at every
position of its last feature map (size / 32 a side: 18x18 at 576). `--stitch N` makes the map
N times finer per axis: the teacher runs on N x N copies of each image shifted by fractions of
its stride and the maps interleave (shift and stitch; e.g. 16x16 from a stride-8 teacher at 64).

Input (`labelgen/inputs.py`): every image of `--source`/`--split` in shard order. `--crop
resize` (default): the whole image resized to the square input, `map_box` [0, 0, 1, 1];
`--crop centre`: the shorter side resized, centre cropped, `map_box` the covered region.

Output (`labelgen/shards.py`): one score-map shard per image shard, same order and keys
(top-`--k` float16 logits, int16 indices), and `manifest.json` whose `teacher` names the
checkpoint, model, size, crop, dtype, ema and the weights' SHA-256. Undecodable images get
`has_map` = 0 (more than 10 and 1 % of those seen fail the run). The summary gives the
teacher's top-1 (dense logits averaged over positions), images/s and bytes per image.

Devices: data parallel over this process's devices, bfloat16 on accelerators (`--dtype auto`;
float32 on CPU); `--batch` is per process, a multiple of its device count. Multi-process runs
(`--coordinator-address`, `--num-processes`, `--process-id`, or a SLURM / TPU-pod environment)
split the shards and merge their manifests; a rerun keeps every finished shard made with the
same settings and teacher (`labelgen/multihost.py`). Errors are one line on stderr, exit
status 2 (`--verbose`: the traceback).
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import sys
import time
from typing import Any, List, Optional, TextIO

import jax
import tensorflow as tf

from labelgen import inputs
from labelgen import multihost
from labelgen import settings
from labelgen import shards
from labelgen import teacher as teacher_lib
# Re-exported: the settings and the error that callers of `generate` use.
from labelgen.settings import CROPS
from labelgen.settings import DTYPES
from labelgen.settings import GenerateError
from labelgen.settings import resolve_dtype  # noqa: F401
from lvvit_jax import cli
from lvvit_jax import sharding
from lvvit_jax.data import score_maps

_FILE = 'labelgen/generate.py'
_WHAT = 'labelgen generate'
_PROG = 'python -m labelgen generate'


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

  def gather(self) -> None:
    """Sums the counts of every process (the slowest process's teacher_seconds)."""
    names = ('images_computed', 'shards_written', 'shards_kept', 'top1_correct', 'top1_count')
    for name, total in zip(names, multihost.sum_over_processes(
        [getattr(self, n) for n in names])):
      setattr(self, name, total)
    self.teacher_seconds = multihost.max_over_processes(self.teacher_seconds)

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


def _progress_bar(total: int):
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(total=total, desc=_WHAT, unit='img', file=sys.stderr, mininterval=1.0,
              dynamic_ncols=True)


def generate(teacher: str, source: str, out: str, *, split: str = 'train',
             data_dir: Optional[str] = None, size: Optional[int] = None, crop: str = 'resize',
             k: int = 5, batch_size: int = 64, dtype: str = 'auto', ema: bool = True,
             stitch: int = 1, num_parallel_calls: int = -1, log: Optional[TextIO] = None,
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
    stitch: maps `stitch` times finer per axis, from the teacher run on shifted copies of each
      image (shift and stitch, labelgen/teacher.py; `stitch`^2 forward passes).
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
  settings.check_crop(crop)
  dtype = settings.resolve_dtype(dtype)
  devices = jax.local_devices()
  settings.check_batch_size(batch_size, len(devices))
  model_teacher = teacher_lib.load_teacher(teacher, size=size, ema=ema, dtype=dtype,
                                           stitch=stitch)
  num_classes = model_teacher.num_classes
  settings.check_classes(teacher, num_classes, k)
  src = multihost.open_source(source, split, data_dir)
  settings.check_label_set(teacher, num_classes, source, split, src.num_classes)
  want = score_maps.Manifest(
      dataset=src.name, version=src.version, split=split, grid=model_teacher.grid, k=k,
      num_classes=num_classes, teacher=dict(model_teacher.description, crop=crop), shards=())

  # This process's shards: the finished ones of an earlier run are kept, the rest computed.
  process, processes = jax.process_index(), jax.process_count()
  tf.io.gfile.makedirs(out)
  mine = list(range(process, len(src.shards), processes))
  kept = multihost.previous_run(out, want, src, mine, log)
  todo = [i for i in mine if kept[i] is None]
  finished = multihost.finished_shards(out, want)

  # The teacher on this process's devices, one batch ahead of the writer.
  mesh = sharding.make_mesh(-1, 1, devices=devices)
  variables, step = teacher_lib.device_step(model_teacher, k, mesh)
  batches = inputs.host_batches(src, todo, inputs.preprocess_fn(model_teacher.size, crop, dtype),
                                batch_size, num_parallel_calls)
  groups = itertools.groupby(teacher_lib.teacher_outputs(step, variables, mesh, batches),
                             key=lambda item: item[0])

  # The shards in order: kept as they are, or written from the teacher's outputs.
  summary = GenerateSummary()
  blank = shards.blank_map(model_teacher.grid, k)
  bar = None
  if progress and process == 0 and todo:
    bar = _progress_bar(sum(src.shards[i].num_examples for i in todo))
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
        rows = shards.ShardRows(writer, src, i, blank, summary.undecodable,
                                summary.images_computed)
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
      summary.top1_correct += rows.top1_correct
      summary.top1_count += rows.top1_count
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

  manifest = multihost.write_run_manifest(out, want, src, finished)
  summary.gather()
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
                  dtype=config.dtype, ema=config.ema, stitch=config.stitch,
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
  parser.add_argument('--stitch', type=int, default=1,
                      help='maps N times finer per axis: the teacher on N x N copies shifted by '
                      'fractions of its stride, interleaved (shift and stitch; N^2 passes)')
  parser.add_argument('--workers', type=int, default=-1,
                      help='decoding threads (default: tf.data AUTOTUNE)')
  parser.add_argument('--no-progress', dest='progress', action='store_false',
                      help='no progress bar')
  parser.add_argument('--coordinator-address', default=None,
                      help='multi-process: HOST:PORT of process 0 (with the next two)')
  parser.add_argument('--num-processes', type=int, default=None)
  parser.add_argument('--process-id', type=int, default=None)
  parser.add_argument('--verbose', action='store_true',
                      help='on an error, show its traceback instead of one line')


def run(args: argparse.Namespace) -> int:
  """Runs the sub-command on parsed arguments; returns 0.

  A bad setting or a missing or foreign file is one line on stderr and `SystemExit(2)`
  (`cli.user_errors`; the traceback with --verbose).
  """
  with cli.user_errors(_PROG, args.verbose):
    # CPU processes need gloo for the cross-process barriers; accelerators ignore it.
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    sharding.maybe_initialize_distributed(args.coordinator_address, args.num_processes,
                                          args.process_id)
    generate(args.teacher, args.source, args.out, split=args.split, data_dir=args.data_dir,
             size=args.size, crop=args.crop, k=args.k, batch_size=args.batch,
             dtype=args.dtype, ema=args.ema, stitch=args.stitch,
             num_parallel_calls=args.workers,
             progress=args.progress)
  return 0
