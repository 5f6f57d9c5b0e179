r"""`python -m labelgen show`: one example's image with the token labels training derives for it.

    python -m labelgen show --source tfds:imagenet2012 --shards maps/nfnet_f6 --index 12 \
        --out labels.png [--augment --seed 3] [--image-size 224 --grid 14]

Example N (in the image source's shard order) is read with its score map and turned into a
batch of one the way training does it: `augment.train_preprocess` on the host for the crop, its
`label_affine` and `aug_seed`, `lvvit_jax.augment.augment_batch` for the rest (as the train step
does on the accelerator), `score_maps.parse_example` for the map, then `token_targets` (the
function the train step calls) on that batch. The picture is the network's input, unnormalised and upscaled,
with the token grid; each cell shows the top-1 class of its target (the class name when the
source has names) and its probability, and is tinted by class with the opacity of that
probability. The header names the example, its label and the cls token's target.

By default the view is the whole image resized to the input (an identity crop, no flip, no
RandAugment); `--augment` applies the training augmentation drawn from `--seed`, so the labels
follow the crop, flip and geometric RandAugment ops. An example imported without a map
(`has_map` = 0) shows the plain label that training uses for it.
"""
from __future__ import annotations

import argparse
import colorsys
import dataclasses
import json
import math
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image
from PIL import ImageDraw
from PIL import ImageFont
import tensorflow as tf

from labelgen import import_maps
from lvvit_jax import cli
from lvvit_jax import augment as device_augment
from lvvit_jax.data import augment
from lvvit_jax.data import score_maps
from lvvit_jax.data import sources
from lvvit_jax.token_labeling import label_targets
from lvvit_jax.token_labeling import token_targets

_FILE = 'labelgen/show.py'
_PROG = 'python -m labelgen show'
MIN_SIDE = 512   # the picture's side is the input size times the smallest integer reaching this
HEADER = 40      # pixels of text above the picture


@dataclasses.dataclass(frozen=True)
class Example:
  """One example of the image source and its score-map record.

  Attributes:
    index: position in the source's shard order.
    key: its key.
    label: its dataset label.
    encoded: the encoded image bytes.
    map_record: the serialized score-map record paired with it.
    manifest: the score maps' manifest.
    class_names: the source's class names, or None.
  """
  index: int
  key: str
  label: int
  encoded: bytes
  map_record: bytes
  manifest: score_maps.Manifest
  class_names: Optional[List[str]]


@dataclasses.dataclass(frozen=True)
class TokenLabels:
  """What the picture shows: the top-1 class and its probability per token and for cls.

  Attributes:
    classes: (gh, gw) int, top-1 class of each token's target.
    confidence: (gh, gw) float, its probability in the target.
    cls_class: top-1 class of the cls target.
    cls_confidence: its probability.
    from_map: False when the example has no map and the targets are the plain label's.
  """
  classes: np.ndarray
  confidence: np.ndarray
  cls_class: int
  cls_confidence: float
  from_map: bool


def class_names(source: str, src: sources.ImageSource,
                data_dir: Optional[str] = None) -> Optional[List[str]]:
  """The class names of `src` (resolved from `source`), or None (the picture shows numbers).

  TFDS: the label feature's ClassLabel names; image-folder shards: `class_names` of their
  `dataset_info.json`.
  """
  if source.startswith('tfds:'):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (slow import)
    label = tfds.builder(source[len('tfds:'):], data_dir=data_dir).info.features[src.label_feature]
    names = getattr(label, 'names', None)
    return list(names) if names else None
  path = os.path.join(os.path.dirname(src.shards[0].path), sources.IMAGE_FOLDER_INFO)
  if not tf.io.gfile.exists(path):
    return None
  with tf.io.gfile.GFile(path, 'r') as f:
    return list(json.loads(f.read()).get('class_names') or []) or None


def read_example(source: str, shards: str, index: int, *, split: str = 'train',
                 data_dir: Optional[str] = None) -> Example:
  """Example `index` of `source` and its record in the score-map directory `shards`."""
  src = sources.get_source(source, split, data_dir)
  manifest = score_maps.read_manifest(shards)
  paths = score_maps.pair_shards(shards, manifest,
                                 [(s.path, s.num_examples) for s in src.shards])
  if not 0 <= index < src.num_examples:
    raise ValueError(f'{_FILE}: --index {index}: {source} split {split!r} has '
                     f'{src.num_examples} examples; use 0 .. {src.num_examples - 1}.')
  shard, position = 0, index
  while position >= src.shards[shard].num_examples:
    position -= src.shards[shard].num_examples
    shard += 1
  image = next(src.shard_dataset(shard).skip(position).take(1).as_numpy_iterator())
  record = next(tf.data.TFRecordDataset(paths[shard]).skip(position).take(1)
                .as_numpy_iterator())
  key = image['key'].decode()
  map_key = score_maps.decode_example_np(record)['key']
  if map_key != key:
    raise score_maps.ScoreMapError(
        f'{_FILE}: example {position} of image shard {src.shards[shard].path} is {key!r} but '
        f'its score-map record in {paths[shard]} is {map_key!r}: the maps were made for other '
        'images; rerun labelgen on these.')
  return Example(index=index, key=key, label=int(image['label']), encoded=bytes(image['encoded']),
                 map_record=bytes(record), manifest=manifest,
                 class_names=class_names(source, src, data_dir))


@dataclasses.dataclass(frozen=True)
class View:
  """How the example is shown: the host's crop and resize, then the device's augmentation."""
  host: augment.AugmentConfig
  device: device_augment.DeviceAugmentConfig


def view_config(example: Example, image_size: int, augmented: bool) -> View:
  """The training recipe (`augmented`), or an identity crop of the whole image resized."""
  if augmented:
    return View(augment.AugmentConfig(image_size=image_size),
                device_augment.DeviceAugmentConfig())
  hw = import_maps.image_hw(example.encoded)
  if hw is None:
    raise ValueError(f'{_FILE}: the image of {example.key!r} cannot be read; training skips '
                     'it as corrupt.')
  ratio = hw[1] / hw[0]  # scale 1 at the image's own aspect: the crop is the whole image
  host = augment.AugmentConfig(image_size=image_size, scale=(1.0, 1.0), ratio=(ratio, ratio),
                               interpolations=('bicubic',))
  return View(host, device_augment.DeviceAugmentConfig(hflip=0.0, randaug_num_ops=0,
                                                       erase_prob=0.0))


def make_batch(example: Example, view: View, seed: int = 0) -> Dict[str, np.ndarray]:
  """A train batch of one example, with the train step's keys, through its functions.

  The host half (`augment.train_preprocess`, seed (seed, index)) and the device half
  (`augment_batch` from the example's `aug_seed`): the image is the normalised network input
  and `label_affine` the whole map from it to the source image.
  """
  preprocess = tf.function(lambda encoded, s: augment.train_preprocess(encoded, s, view.host))
  out = preprocess(tf.constant(example.encoded), tf.constant([seed, example.index], tf.int64))
  image, affine = device_augment.augment_batch(
      out['image'].numpy()[None], out['aug_seed'].numpy()[None],
      out['label_affine'].numpy()[None], view.device)
  m = example.manifest
  sm = score_maps.parse_example(tf.constant(example.map_record), m.grid, m.k)
  batch = {'label': tf.cast(example.label, tf.int32), 'topk_logits': sm['topk_logits'],
           'topk_idx': sm['topk_idx'], 'map_box': sm['map_box'], 'has_map': sm['has_map']}
  batch = {k: np.asarray(v)[None] for k, v in batch.items()}
  batch.update(image=np.asarray(image), label_affine=np.asarray(affine))
  return batch


def token_labels(batch: Dict[str, np.ndarray], *, grid: Tuple[int, int],
                 num_classes: int) -> TokenLabels:
  """The targets of the first example of `batch` (`token_targets`, or the plain label's)."""
  from_map = bool(batch['has_map'][0]) if 'has_map' in batch else True
  if from_map:
    cls, tokens = token_targets(batch['topk_logits'], batch['topk_idx'], batch['map_box'],
                                batch['label_affine'], grid=grid, num_classes=num_classes)
  else:
    cls, tokens = label_targets(batch['label'], grid=grid, num_classes=num_classes)
  cls, tokens = np.asarray(cls[0]), np.asarray(tokens[0])
  return TokenLabels(classes=tokens.argmax(-1), confidence=tokens.max(-1),
                     cls_class=int(cls.argmax()), cls_confidence=float(cls.max()),
                     from_map=from_map)


def _name(c: int, names: Optional[Sequence[str]]) -> str:
  return names[c] if names and 0 <= c < len(names) else str(c)


def _colour(c: int) -> Tuple[int, int, int]:
  r, g, b = colorsys.hsv_to_rgb((c * 0.618034) % 1.0, 0.8, 1.0)
  return int(255 * r), int(255 * g), int(255 * b)


def _fit(text: str, font: ImageFont.FreeTypeFont, width: float) -> str:
  while text and font.getlength(text) > width:
    text = text[:-1]
  return text


def picture_side(image_size: int, min_side: int = MIN_SIDE) -> int:
  """The side of the drawn input image: the smallest multiple of image_size >= min_side."""
  return image_size * max(1, math.ceil(min_side / image_size))


def render(image: np.ndarray, labels: TokenLabels, *, names: Optional[Sequence[str]],
           title: str, mean: Sequence[float] = device_augment.IMAGENET_MEAN,
           std: Sequence[float] = device_augment.IMAGENET_STD,
           min_side: int = MIN_SIDE) -> Image.Image:
  """Draws a normalised (S, S, 3) input image with its token labels; returns the RGB picture."""
  rgb = (np.asarray(image, np.float32) * np.asarray(std) + np.asarray(mean)) * 255.0
  rgb = np.clip(np.round(rgb), 0, 255).astype(np.uint8)
  side = picture_side(rgb.shape[0], min_side)
  picture = Image.fromarray(rgb).resize((side, side), Image.NEAREST).convert('RGBA')
  overlay = Image.new('RGBA', (side, side), (0, 0, 0, 0))
  draw = ImageDraw.Draw(overlay)
  gh, gw = labels.classes.shape
  cell = side / max(gh, gw)
  font = ImageFont.load_default(size=max(8, min(14, int(cell / 4))))
  for r in range(gh):
    for c in range(gw):
      y0, y1 = round(r * side / gh), round((r + 1) * side / gh)
      x0, x1 = round(c * side / gw), round((c + 1) * side / gw)
      cls, p = int(labels.classes[r, c]), float(labels.confidence[r, c])
      draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=_colour(cls) + (int(30 + 120 * p),),
                     outline=(255, 255, 255, 180))
      for line, text in enumerate((_name(cls, names), f'{p:.2f}')):
        text = _fit(text, font, x1 - x0 - 4)
        at = (x0 + 2, y0 + 2 + line * (font.size + 2))
        draw.text((at[0] + 1, at[1] + 1), text, font=font, fill=(0, 0, 0, 255))
        draw.text(at, text, font=font, fill=(255, 255, 255, 255))
  picture = Image.alpha_composite(picture, overlay).convert('RGB')
  canvas = Image.new('RGB', (side, side + HEADER), (255, 255, 255))
  canvas.paste(picture, (0, HEADER))
  header = ImageDraw.Draw(canvas)
  header_font = ImageFont.load_default(size=13)
  cls_text = (f'cls target: {_name(labels.cls_class, names)} {labels.cls_confidence:.2f}'
              + ('' if labels.from_map else ' (no map: plain label)'))
  for line, text in enumerate((title, cls_text)):
    header.text((4, 3 + 18 * line), _fit(text, header_font, side - 8), font=header_font,
                fill=(0, 0, 0))
  return canvas


def show(source: str, shards: str, index: int, out: str, *, split: str = 'train',
         data_dir: Optional[str] = None, image_size: int = 224,
         grid: Optional[Tuple[int, int]] = None, augmented: bool = False, seed: int = 0,
         min_side: int = MIN_SIDE) -> Image.Image:
  """Draws example `index` with its token labels into the PNG `out`; returns the picture."""
  grid = grid or (image_size // 16, image_size // 16)
  example = read_example(source, shards, index, split=split, data_dir=data_dir)
  view = view_config(example, image_size, augmented)
  batch = make_batch(example, view, seed)
  labels = token_labels(batch, grid=grid, num_classes=example.manifest.num_classes)
  what = f'augment seed {seed}' if augmented else 'whole image'
  title = (f'#{index} {example.key}  label {_name(example.label, example.class_names)}  '
           f'({what}, {image_size}px, grid {grid[0]}x{grid[1]})')
  picture = render(batch['image'][0], labels, names=example.class_names, title=title,
                   mean=view.device.mean, std=view.device.std, min_side=min_side)
  if os.path.dirname(out):
    os.makedirs(os.path.dirname(out), exist_ok=True)
  picture.save(out, format='PNG')
  return picture


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """The `show` sub-command's arguments."""
  parser.add_argument('--source', required=True,
                      help='tfds:<name> or a directory of image-folder shards')
  parser.add_argument('--shards', required=True, help='the score-map directory (manifest.json)')
  parser.add_argument('--split', default='train')
  parser.add_argument('--data-dir', default=None, help='TFDS data directory')
  parser.add_argument('--index', type=int, required=True,
                      help='example number in the source\'s shard order')
  parser.add_argument('--out', required=True, help='PNG to write')
  parser.add_argument('--image-size', type=int, default=224, help='network input side')
  parser.add_argument('--grid', type=int, default=None,
                      help='token grid side (default: image size / 16)')
  parser.add_argument('--augment', action='store_true',
                      help='apply the training augmentation (crop, flip, RandAugment, erasing)')
  parser.add_argument('--seed', type=int, default=0, help='augmentation seed')
  parser.add_argument('--min-side', type=int, default=MIN_SIDE,
                      help='upscale the picture to at least this many pixels')
  parser.add_argument('--verbose', action='store_true',
                      help='on an error, show its traceback instead of one line')


def run(args: argparse.Namespace) -> int:
  """Runs the sub-command on parsed arguments; returns 0.

  A bad setting or a missing or foreign file (ScoreMapError, a bad index or source) is one line
  on stderr and `SystemExit(2)` (the traceback with --verbose).
  """
  with cli.user_errors(_PROG, args.verbose):
    picture = show(args.source, args.shards, args.index, args.out, split=args.split,
                   data_dir=args.data_dir, image_size=args.image_size,
                   grid=(args.grid, args.grid) if args.grid else None,
                   augmented=args.augment, seed=args.seed, min_side=args.min_side)
  print(f'labelgen show: wrote {args.out} ({picture.width}x{picture.height})', file=sys.stderr)
  return 0
