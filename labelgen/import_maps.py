r"""`python -m labelgen import`: published top-k label maps (.pt files) -> aligned score-map shards.

    python -m labelgen import --labels label_top5_train_nfnet.zip \
        --source tfds:imagenet2012 --data-dir ~/tensorflow_datasets --out maps/nfnet_f6

The authors' NFNet-F6 maps (`label_top5_train_nfnet`) are one file `<wnid>/<stem>.pt` per
training image, a float16 tensor (2, 5, H, W): plane 0 the top-5 logits, plane 1 their class
indices (as float16); 18x18, made from the image resized on its shorter side to 576 and centre
cropped to 576 (torchvision `Resize(576)`, `CenterCrop(576)`). The ReLabel maps
(`--format relabel`) have the same layout, 15x15, from the whole image resized to the teacher's
input. Each image shard of the source gets one score-map shard (`lvvit_jax/data/score_maps.py`),
same order and keys, with the map transposed to (H, W, 5) float16 logits and int16 indices and
`map_box` the region of the image the map covers, computed from each image's size (read from the
encoded header): torchvision's rounding for `--map-box centre`, [0, 0, 1, 1] for `full`.

Images are matched to label files by key: a TFDS `imagenet2012` file name
'n01440764_10026.JPEG' -> 'n01440764/n01440764_10026.pt'; an image-folder key
'class/file.jpg' -> 'class/file.pt'. An image without a label file fails the run (the count and
the first names are listed) unless `--allow-missing`: then it is written with an all-zero map and
`has_map` = 0, and training uses its plain label. Label files without an image are reported.

Resumable (`labelgen/resume.py`): the manifest is rewritten after every shard (an unfinished
directory lists only the finished shards, which the input pipeline reports as "labelgen did not
finish"), and a rerun keeps every shard whose file still has the SHA-256 in the manifest, made
with the same settings.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import io
import itertools
import os
import re
import sys
import time
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, TextIO, Tuple

import numpy as np
from PIL import Image
import tensorflow as tf

from labelgen import pt_files
from labelgen import resume
from lvvit_jax import cli
from lvvit_jax.data import score_maps
from lvvit_jax.data import sources

_FILE = 'labelgen/import_maps.py'
_PROG = 'python -m labelgen import'
MAP_BOXES = ('centre', 'full')
_WNID_FILE = re.compile(r'^(n\d{8})_')
_CHUNK = 256  # examples read and converted at a time (bounds the images held in memory)
_LIST = 10    # names listed in messages


class LabelImportError(ValueError):
  """Label files that do not fit the images (missing, misshapen, other classes)."""


@dataclasses.dataclass(frozen=True)
class MapFormat:
  """A family of published maps.

  Attributes:
    name: the `--format` value.
    grid: the side of its maps (a message hint when the files differ, not a requirement).
    input_size: the teacher's input side, the crop size of `--map-box centre`.
    default_box: 'centre' (resize shorter side + centre crop) or 'full' (whole image resized).
    teacher: the manifest's `teacher` entry.
  """
  name: str
  grid: int
  input_size: int
  default_box: str
  teacher: Mapping[str, Any]


FORMATS: Dict[str, MapFormat] = {
    'nfnet': MapFormat('nfnet', 18, 576, 'centre', {
        'model': 'nfnet_f6', 'source': 'label_top5_train_nfnet', 'input': 576,
        'crop': 'resize_shorter_centre_crop'}),
    'relabel': MapFormat('relabel', 15, 475, 'full', {
        'model': 'efficientnet_l2', 'source': 'relabel_imagenet', 'input': 475,
        'crop': 'resize_full'}),
}


def centre_box(height: int, width: int, size: int) -> Tuple[float, float, float, float]:
  """The region torchvision's `Resize(size)` then `CenterCrop(size)` keeps, normalised.

  Resize: the shorter side becomes `size`, the longer `int(size * long / short)` (truncated);
  CenterCrop: offset `int(round((n - size) / 2))` (Python rounding, half to even). A resize maps
  normalised coordinates onto themselves, so the crop is (top, left, top + size, left + size)
  over the resized (new_h, new_w).

  Returns:
    (y0, x0, y1, x1) in normalised coordinates of the original image.
  """
  if height < 1 or width < 1:
    raise ValueError(f'{_FILE}: image size {height}x{width} must be positive.')
  short, long_side = min(height, width), max(height, width)
  new_long = int(size * long_side / short)
  new_h, new_w = (size, new_long) if height <= width else (new_long, size)
  top = int(round((new_h - size) / 2.0))
  left = int(round((new_w - size) / 2.0))
  return (top / new_h, left / new_w, (top + size) / new_h, (left + size) / new_w)


def image_hw(encoded: bytes) -> Optional[Tuple[int, int]]:
  """(height, width) from an encoded image's header, or None if it cannot be read.

  JPEGs through `tf.io.extract_jpeg_shape` (no decode), other formats through PIL's header
  parser (`Image.open` reads no pixels until asked).
  """
  if encoded[:2] == b'\xff\xd8':
    try:
      shape = tf.io.extract_jpeg_shape(encoded).numpy()
      return int(shape[0]), int(shape[1])
    except tf.errors.OpError:
      pass  # a damaged JPEG: PIL may still read its header
  try:
    with Image.open(io.BytesIO(encoded)) as image:
      width, height = image.size
    return int(height), int(width)
  except Exception:  # pylint: disable=broad-except  (PIL raises many kinds)
    return None


def label_key(image_key: str) -> str:
  """The label file of an image key, '<dir>/<stem>.pt'.

  'class/file.jpg' -> 'class/file.pt' (image-folder shards);
  'n01440764_10026.JPEG' -> 'n01440764/n01440764_10026.pt' (TFDS imagenet2012 file names).
  """
  stem = os.path.splitext(image_key)[0]
  parts = stem.split('/')
  if len(parts) >= 2:
    return '/'.join(parts[-2:]) + '.pt'
  m = _WNID_FILE.match(stem)
  if m:
    return f'{m.group(1)}/{stem}.pt'
  raise LabelImportError(
      f'{_FILE}: image key {image_key!r} names no label file: keys must be "class/file.ext" '
      '(image-folder shards) or ImageNet file names "<wnid>_<n>.JPEG" (TFDS imagenet2012, '
      'key feature file_name); use a source whose examples carry such file names.')


@dataclasses.dataclass
class ImportSummary:
  """What an import did (also printed at its end)."""
  images: int = 0
  shards_written: int = 0
  shards_skipped: int = 0
  missing: List[str] = dataclasses.field(default_factory=list)
  extra: List[str] = dataclasses.field(default_factory=list)
  unreadable: List[str] = dataclasses.field(default_factory=list)
  bytes: int = 0
  seconds: float = 0.0
  manifest: Optional[score_maps.Manifest] = None

  @property
  def bytes_per_image(self) -> float:
    return self.bytes / max(self.images, 1)

  def describe(self) -> str:
    """The end-of-run summary lines."""
    lines = [f'labelgen import: {self.images} images in {self.shards_written} shards written '
             f'+ {self.shards_skipped} kept from an earlier run, {self.seconds:.1f} s; '
             f'{self.bytes_per_image:.0f} bytes per image.',
             f'  images without a label file: {_listing(self.missing)}',
             f'  label files without an image: {_listing(self.extra)}']
    if self.unreadable:
      lines.append('  images whose size could not be read (written with map_box [0, 0, 1, 1]; '
                   f'training drops undecodable images): {_listing(self.unreadable)}')
    return '\n'.join(lines)


def _listing(names: Sequence[str]) -> str:
  if not names:
    return '0'
  more = ', ...' if len(names) > _LIST else ''
  return f'{len(names)} ({", ".join(names[:_LIST])}{more})'


@dataclasses.dataclass
class _Converted:
  key: str
  label: int
  label_key: str
  logits: Optional[np.ndarray] = None   # None: no label file
  idx: Optional[np.ndarray] = None
  box: Tuple[float, ...] = score_maps.FULL_IMAGE_BOX
  size_unknown: bool = False


class _Converter:
  """Turns (key, label, encoded image) into the score-map record's fields."""

  def __init__(self, labels: pt_files.LabelFiles, fmt: MapFormat, box_mode: str,
               shape: Tuple[int, ...], num_classes: int):
    self.labels = labels
    self.fmt = fmt
    self.box_mode = box_mode
    self.shape = shape
    self.num_classes = num_classes

  def read_map(self, key: str) -> Tuple[np.ndarray, np.ndarray]:
    """(logits (H, W, k) float16, indices (H, W, k) int16) of label file `key`."""
    where = self.labels.describe(key)
    array = self.labels.load(key)
    if not isinstance(array, np.ndarray) or array.ndim != 4 or array.shape[0] != 2:
      got = array.shape if isinstance(array, np.ndarray) else type(array).__name__
      raise LabelImportError(f'{_FILE}: {where} holds {got}, expected one tensor (2, k, H, W): '
                             'plane 0 the top-k logits, plane 1 their class indices.')
    if self.shape and array.shape != self.shape:
      raise LabelImportError(
          f'{_FILE}: {where} is {array.shape} but other label files are {self.shape}: one '
          f'import takes maps of one size (--format {self.fmt.name} expects '
          f'{self.fmt.grid}x{self.fmt.grid}); keep the NFNet and ReLabel maps apart.')
    logits = np.ascontiguousarray(array[0].transpose(1, 2, 0)).astype(np.float16)
    idx = np.rint(array[1].astype(np.float32).transpose(1, 2, 0))
    if not np.isfinite(logits).all():
      raise LabelImportError(f'{_FILE}: {where}: its logits are not all finite; the file is '
                             'corrupt.')
    if idx.min() < 0 or (self.num_classes and idx.max() >= self.num_classes):
      raise LabelImportError(
          f'{_FILE}: {where}: class indices span [{idx.min():.0f}, {idx.max():.0f}] but the '
          f'source has {self.num_classes} classes: the maps are for another label set (the '
          'published maps index ImageNet-1k classes in the sorted-wnid order).')
    return logits, idx.astype(np.int16)

  def __call__(self, example: Mapping[str, Any]) -> _Converted:
    key = example['key'].decode()
    out = _Converted(key=key, label=int(example['label']), label_key=label_key(key))
    if out.label_key not in self.labels:
      return out
    out.logits, out.idx = self.read_map(out.label_key)
    if self.box_mode == 'centre':
      hw = image_hw(example['encoded'])
      if hw is None:
        out.size_unknown = True
      else:
        out.box = centre_box(hw[0], hw[1], self.fmt.input_size)
    return out


def _chunks(it: Iterator[Any], n: int) -> Iterator[List[Any]]:
  while True:
    chunk = list(itertools.islice(it, n))
    if not chunk:
      return
    yield chunk


def _keep_previous(out: str, info: Optional[score_maps.ShardInfo], shard: sources.ImageShard,
                   labels: pt_files.LabelFiles, allow_missing: bool
                   ) -> Optional[List[Tuple[str, bool]]]:
  """The (key, has_map) of a finished shard that can be kept as it is, else None.

  Kept: `resume.is_finished` (the file's SHA-256 is the manifest's, its count the image
  shard's), and each image it has no map for still has no label file (and --allow-missing is
  given).
  """
  if not resume.is_finished(out, info, shard.num_examples):
    return None
  path = os.path.join(out, info.file)
  records = [score_maps.decode_example_np(r)
             for r in tf.data.TFRecordDataset(path).as_numpy_iterator()]
  if len(records) != shard.num_examples:
    return None
  for r in records:
    if not r['has_map'] and (not allow_missing or label_key(r['key']) in labels):
      return None
  return [(r['key'], r['has_map']) for r in records]


def import_labels(labels: str, source: str, out: str, *, split: str = 'train',
                  data_dir: Optional[str] = None, fmt: str = 'nfnet',
                  map_box: Optional[str] = None, allow_missing: bool = False, workers: int = 8,
                  log: Optional[TextIO] = None) -> ImportSummary:
  """Converts a tree of published label files into score-map shards aligned with `source`.

  Args:
    labels: folder of `<dir>/<stem>.pt` files, or a zip archive of it.
    source: 'tfds:<name>' or a directory of image-folder shards (`sources.get_source`).
    out: output directory (created): score-map shards + manifest.json.
    split: the source's split.
    data_dir: TFDS data directory.
    fmt: a key of `FORMATS` ('nfnet' or 'relabel').
    map_box: 'centre' or 'full'; None for the format's default.
    allow_missing: write images without a label file with `has_map` = 0 instead of failing.
    workers: threads reading label files and image headers.
    log: progress and summary stream (stderr when None).

  Returns:
    The summary (also printed).

  Raises:
    LabelImportError: images without a label file (without `allow_missing`; the finished
      shards are kept for a rerun), or label files that do not fit (shape, classes).
    pt_files.PtFileError: a label file that is not tensors.
  """
  log = log or sys.stderr
  if fmt not in FORMATS:
    raise ValueError(f'{_FILE}: --format {fmt!r}: use one of {sorted(FORMATS)}.')
  form = FORMATS[fmt]
  box_mode = map_box or form.default_box
  if box_mode not in MAP_BOXES:
    raise ValueError(f'{_FILE}: --map-box {box_mode!r}: use one of {MAP_BOXES}.')
  start = time.time()
  src = sources.get_source(source, split, data_dir)
  files = pt_files.open_label_files(labels)
  first = next(iter(files.keys()))
  probe = _Converter(files, form, box_mode, (), src.num_classes).read_map(first)[0]
  grid, k = probe.shape[:2], probe.shape[2]
  if grid != (form.grid, form.grid):
    print(f'labelgen import: note: {files.describe(first)} is {grid[0]}x{grid[1]}, '
          f'--format {form.name} maps are {form.grid}x{form.grid}; is --format right?', file=log)
  convert = _Converter(files, form, box_mode, (2, k) + grid, src.num_classes)
  want = score_maps.Manifest(
      dataset=src.name, version=src.version, split=split, grid=grid, k=k,
      num_classes=src.num_classes, teacher=dict(form.teacher, format=form.name, map_box=box_mode),
      shards=())
  previous = resume.previous_shards(out, want, log, 'labelgen import')
  tf.io.gfile.makedirs(out)

  summary = ImportSummary()
  used = set()
  finished = resume.FinishedShards(out, want)
  converted_images = 0
  blank = (np.zeros(grid + (k,), np.float16), np.zeros(grid + (k,), np.int16))
  with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
    for i, shard in enumerate(src.shards):
      kept = _keep_previous(out, previous.get(shard.name), shard, files, allow_missing)
      if kept is not None:
        info = previous[shard.name]
        for key, has_map in kept:
          if has_map:
            used.add(label_key(key))
          else:
            summary.missing.append(key)
        summary.shards_skipped += 1
        status = 'kept'
      else:
        examples = src.shard_dataset(i).as_numpy_iterator()
        results = [r for chunk in _chunks(examples, _CHUNK) for r in pool.map(convert, chunk)]
        converted_images += len(results)
        missing = [r.key for r in results if r.logits is None]
        summary.missing.extend(missing)
        used.update(r.label_key for r in results if r.logits is not None)
        summary.unreadable.extend(r.key for r in results if r.size_unknown)
        if missing and not allow_missing:
          if len(missing) == len(results) and not finished.infos:
            raise LabelImportError(
                f'{_FILE}: none of the {len(results)} images of the first shard {shard.path} '
                f'has a label file in {labels} (e.g. {results[0].key!r} needs '
                f'{results[0].label_key!r}): is --labels the right folder, and --source the '
                'right dataset?')
          status = f'not written: {len(missing)} images without a label file'
          info = None
        else:
          with score_maps.ShardWriter(out, shard.path) as writer:
            for r in results:
              if r.logits is None:
                writer.write(r.key, *blank, r.label, score_maps.FULL_IMAGE_BOX, has_map=False)
              else:
                writer.write(r.key, r.logits, r.idx, r.label, r.box)
          info = writer.info
          summary.shards_written += 1
          status = 'written'
      if info is not None:
        finished.add(info)
        summary.images += info.num_examples
        summary.bytes += tf.io.gfile.stat(os.path.join(out, info.file)).length
      rate = converted_images / max(time.time() - start, 1e-9)
      print(f'labelgen import: shard {i + 1}/{len(src.shards)} {shard.name}: '
            f'{shard.num_examples} images {status}; {rate:.0f} images/s', file=log, flush=True)

  summary.extra = sorted(set(files.keys()) - used)
  files.close()
  summary.seconds = time.time() - start
  summary.manifest = finished.manifest
  score_maps.write_manifest(out, summary.manifest)
  print(summary.describe(), file=log, flush=True)
  if summary.missing and not allow_missing:
    raise LabelImportError(
        f'{_FILE}: {len(summary.missing)} images have no label file in {labels}: '
        f'{_listing(summary.missing)}. Their shards were not written. Add the files, or pass '
        '--allow-missing to write them without a map (training then uses their plain label).')
  return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """The `import` sub-command's arguments."""
  parser.add_argument('--labels', required=True,
                      help='folder of <wnid>/<stem>.pt label files, or a .zip of it')
  parser.add_argument('--source', required=True,
                      help='tfds:imagenet2012 (a prepared TFDS dataset) or a directory of '
                      'image-folder shards')
  parser.add_argument('--data-dir', default=None, help='TFDS data directory')
  parser.add_argument('--split', default='train')
  parser.add_argument('--out', required=True, help='output directory for the score-map shards')
  parser.add_argument('--format', default='nfnet', choices=sorted(FORMATS),
                      help='nfnet: 18x18 NFNet-F6 maps of the 576 centre crop (default); '
                      'relabel: 15x15 ReLabel maps of the whole image')
  parser.add_argument('--map-box', default=None, choices=MAP_BOXES,
                      help='region the maps cover: centre (Resize + CenterCrop of the teacher '
                      'input) or full (whole image); default: the format\'s')
  parser.add_argument('--allow-missing', action='store_true',
                      help='write images without a label file with has_map=0 (plain label)')
  parser.add_argument('--workers', type=int, default=8, help='threads reading label files')
  parser.add_argument('--verbose', action='store_true',
                      help='on an error, show its traceback instead of one line')


def run(args: argparse.Namespace) -> int:
  """Runs the sub-command on parsed arguments; returns 0.

  A bad setting, a missing or foreign file or a refused pickle (LabelImportError, PtFileError,
  ScoreMapError, ...) is one line on stderr and `SystemExit(2)` (the traceback with --verbose).
  """
  with cli.user_errors(_PROG, args.verbose):
    import_labels(args.labels, args.source, args.out, split=args.split, data_dir=args.data_dir,
                  fmt=args.format, map_box=args.map_box, allow_missing=args.allow_missing,
                  workers=args.workers)
  return 0
