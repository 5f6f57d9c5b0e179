"""Image sources as lists of TFRecord shards: prepared TFDS datasets and image-folder shards.

The input pipeline reads serialized records straight from the shard files (images stay
encoded until the fused decode + crop), so that every image shard can be zipped with the
score-map shard made for it. Two kinds of source give the same `ImageSource`:

- a prepared TFDS image-classification dataset (`tfds:imagenet2012`, `tfds:imagenette`,
  `tfds:oxford_flowers102`, ...: whatever `tfds.builder(name, data_dir=...)` finds prepared as
  TFRecord shards; imagenet2012 is prepared from the user's manual download as usual);
- a directory written by `write_image_folder_shards` from an ImageFolder tree
  (`root/<class>/<file>.jpg`): TFRecord shards with the original file bytes, the label and the
  relative path as key, plus `dataset_info.json` (the format: `image_folder.py`); the bundled
  demo digits (`digits.py`, 'digits' or 'digits:<side>') are such a directory.

Every example has a *key* that labelgen stores next to its score map and the pipeline compares on
the fly: the `file_name` feature where the dataset has one (imagenet2012, oxford_flowers102,
image-folder shards), else TFDS's own id `<shard file name>__<position in shard>`.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, Optional, Sequence, Tuple

import tensorflow as tf

from lvvit_jax.data import digits
from lvvit_jax.data import image_folder

IMAGE_FOLDER_INFO = image_folder.INFO_FILE
IMAGE_FOLDER_FORMAT = image_folder.FORMAT
IMAGE_EXTENSIONS = image_folder.IMAGE_EXTENSIONS
# Correct classes kept per example of a multi-label feature (a static shape; ImageNet-ReaL's
# lists are much shorter, TFDS's mock data makes up to a few dozen).
MAX_LABELS = 32
# Features looked for, in order, when the key feature is 'auto'.
KEY_FEATURE_CANDIDATES = ('file_name', 'filename', 'image/filename', 'image/file_name')


@dataclasses.dataclass(frozen=True)
class ImageShard:
  """One TFRecord shard of encoded images."""
  path: str
  num_examples: int

  @property
  def name(self) -> str:
    return os.path.basename(self.path)


@dataclasses.dataclass(frozen=True)
class ImageSource:
  """A split of an image dataset, as its shards and how to parse their records.

  Attributes:
    name: dataset name (checked against the score-map manifest).
    version: dataset version ('' if none).
    split: split name.
    shards: the split's shards, in the dataset's order.
    num_classes: number of classes.
    image_feature: the feature holding the encoded image bytes.
    label_feature: the feature holding the int label (or, with `multi_label`, a list of them).
    key_feature: the feature holding the example's key, or None for TFDS-style ids.
  """
  name: str
  version: str
  split: str
  shards: Tuple[ImageShard, ...]
  num_classes: int
  image_feature: str = 'image'
  label_feature: str = 'label'
  key_feature: Optional[str] = 'file_name'
  multi_label: bool = False

  @property
  def num_examples(self) -> int:
    return sum(s.num_examples for s in self.shards)

  def parse(self, serialized: tf.Tensor, shard_name: tf.Tensor,
            position: tf.Tensor) -> Dict[str, tf.Tensor]:
    """Parses records (graph mode): {'encoded': string, 'label': int64, 'key': string}.

    `serialized` is one record (a scalar) or a vector of them, with `position` (and
    `shard_name`, or one for all) of the same shape; the outputs get the same leading axis.
    With `multi_label` (e.g. ImageNet-ReaL's `real_label`) also 'labels': int64 (MAX_LABELS,),
    the example's correct classes padded with -1; 'label' is the first (-1 when there is none).
    """
    label_spec = (tf.io.VarLenFeature(tf.int64) if self.multi_label
                  else tf.io.FixedLenFeature([], tf.int64))
    spec = {self.image_feature: tf.io.FixedLenFeature([], tf.string),
            self.label_feature: label_spec}
    if self.key_feature:
      spec[self.key_feature] = tf.io.FixedLenFeature([], tf.string)
    batched = serialized.shape.rank == 1
    ex = (tf.io.parse_example if batched else tf.io.parse_single_example)(serialized, spec)
    if self.key_feature:
      key = ex[self.key_feature]
    else:
      key = tf.strings.join([shard_name, '__', tf.strings.as_string(position)])
    out = {'encoded': ex[self.image_feature], 'label': ex[self.label_feature], 'key': key}
    if self.multi_label:
      labels = tf.sparse.to_dense(ex[self.label_feature], default_value=-1)[..., :MAX_LABELS]
      pad = [[0, 0]] * (labels.shape.rank - 1) + [[0, MAX_LABELS - tf.shape(labels)[-1]]]
      labels = tf.pad(labels, pad, constant_values=-1)
      labels = tf.ensure_shape(labels, labels.shape[:-1].concatenate([MAX_LABELS]))
      out.update(labels=labels, label=labels[..., 0])
    return out

  def shard_dataset(self, index: int) -> tf.data.Dataset:
    """The examples of shard `index` in file order, parsed (for labelgen and checks)."""
    shard = self.shards[index]
    ds = tf.data.TFRecordDataset(shard.path).enumerate()
    return ds.map(lambda i, r: self.parse(r, tf.constant(shard.name), i))


def tfds_source(name: str, split: str = 'train', data_dir: Optional[str] = None, *,
                image_feature: str = 'image', label_feature: str = 'label',
                key_feature: Optional[str] = 'auto') -> ImageSource:
  """An `ImageSource` over the TFRecord shards of a prepared TFDS dataset.

  Args:
    name: TFDS name, optionally with config and version ('imagenet2012:5.1.0').
    split: a whole split ('train', 'validation'); slices ('train[:10%]') are refused because
      score maps pair with whole shards.
    data_dir: TFDS data directory (TFDS's default when None).
    image_feature: feature with the image.
    label_feature: feature with the label (a ClassLabel).
    key_feature: feature used as the example key; 'auto' picks `file_name` (or a similar one) if
      the dataset has it, None uses TFDS ids (`<shard>__<position>`).

  Raises:
    ValueError: the dataset is not prepared, not TFRecord, the split or features are unknown.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (slow import)

  if '[' in split:
    raise ValueError(f'lvvit_jax/data/sources.py: split {split!r}: slices are not supported, because score-map shards pair '
                     'with whole image shards; use a whole split (e.g. "train").')
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # pylint: disable=broad-except  (TFDS raises many kinds)
    raise ValueError(f'lvvit_jax/data/sources.py: TFDS dataset {name!r} (data_dir={data_dir!r}) cannot be opened: {e}. '
                     'Check the name and data_dir.') from None
  info = builder.info
  if split not in info.splits:
    raise ValueError(f'lvvit_jax/data/sources.py: TFDS dataset {name!r} in {builder.data_dir} has no split {split!r} (it '
                     f'has {sorted(info.splits.keys())}); prepare it first '
                     f'(tfds build {name} --data_dir=...), or fix split.')
  file_format = str(getattr(info, 'file_format', 'tfrecord') or 'tfrecord').lower()
  if 'tfrecord' not in file_format:
    raise ValueError(f'lvvit_jax/data/sources.py: TFDS dataset {name!r} in {builder.data_dir} is stored as {file_format}; '
                     'the pipeline reads TFRecord shards: prepare it with '
                     '--file_format=tfrecord.')
  serialized = info.features.get_serialized_info()
  for what, feat in (('image_feature', image_feature), ('label_feature', label_feature)):
    if feat not in serialized:
      raise ValueError(f'lvvit_jax/data/sources.py: TFDS dataset {name!r} has no feature {feat!r} ({what}); its features '
                       f'are {sorted(serialized)}: pass {what}=...')
  if key_feature == 'auto':
    key_feature = next((f for f in KEY_FEATURE_CANDIDATES if f in serialized), None)
  elif key_feature is not None and key_feature not in serialized:
    raise ValueError(f'lvvit_jax/data/sources.py: TFDS dataset {name!r} has no feature {key_feature!r} (key_feature); its '
                     f'features are {sorted(serialized)}: pass key_feature=None for TFDS ids.')
  split_info = info.splits[split]
  shards = tuple(ImageShard(str(p), int(n))
                 for p, n in zip(split_info.filepaths, split_info.shard_lengths))
  for s in shards:
    if not tf.io.gfile.exists(s.path):
      raise ValueError(f'lvvit_jax/data/sources.py: TFDS shard {s.path} listed in {builder.data_dir}/dataset_info.json is '
                       'missing: the dataset was not fully prepared; prepare it again.')
  label = info.features[label_feature]
  multi_label = len(serialized[label_feature].shape) == 1   # A Sequence of ClassLabels.
  label = getattr(label, 'feature', label) if multi_label else label
  num_classes = int(getattr(label, 'num_classes', 0) or 0)
  return ImageSource(name=info.name, version=str(info.version), split=split, shards=shards,
                     num_classes=num_classes, image_feature=image_feature,
                     label_feature=label_feature, key_feature=key_feature,
                     multi_label=multi_label)


def write_image_folder_shards(root: str, out_dir: str, *, split: str = 'train',
                              name: Optional[str] = None, num_shards: Optional[int] = None,
                              examples_per_shard: int = 1024, seed: int = 0,
                              extensions: Sequence[str] = IMAGE_EXTENSIONS,
                              num_workers: int = 8) -> ImageSource:
  """Writes an ImageFolder tree (`root/<class>/<file>`) as TFRecord shards and returns its source.

  Class names are sorted and numbered from 0; the files are listed in sorted order and then
  permuted with `seed` (so a shard holds a mix of classes, as TFDS shards do), which makes the
  output a deterministic function of the tree. Each record has `image` (the file's bytes,
  untouched), `label` and `file_name` ('class/file', the key). `out_dir/dataset_info.json`
  records the classes and, per split, the shards and their counts; writing another split into
  the same `out_dir` adds it (the classes must agree). The format: `image_folder.py`.

  Args:
    root: the ImageFolder tree.
    out_dir: output directory (created).
    split: split name for the file names and `dataset_info.json`.
    name: dataset name (default: the basename of `root`'s parent for `.../name/train`, else of
      `root`).
    num_shards: number of shards (default: ceil(N / examples_per_shard)).
    examples_per_shard: used when num_shards is None.
    seed: permutation seed.
    extensions: file name endings taken as images (case-insensitive).
    num_workers: shards written in parallel.
  """
  image_folder.write_shards(root, out_dir, split=split, name=name, num_shards=num_shards,
                            examples_per_shard=examples_per_shard, seed=seed,
                            extensions=extensions, num_workers=num_workers)
  return image_folder_source(out_dir, split)


def image_folder_source(shards_dir: str, split: str = 'train') -> ImageSource:
  """The `ImageSource` of a directory written by `write_image_folder_shards`."""
  path = os.path.join(shards_dir, IMAGE_FOLDER_INFO)
  if not tf.io.gfile.exists(path):
    raise ValueError(f'lvvit_jax/data/sources.py: {path} does not exist: {shards_dir} was not written by '
                     'lvvit_jax.data.sources.write_image_folder_shards; write it first (or use '
                     'source="tfds:<name>" for a TFDS dataset).')
  info = image_folder.read_info(path)
  if split not in info['splits']:
    raise ValueError(f'lvvit_jax/data/sources.py: {path} has no split {split!r} (it has {sorted(info["splits"])}); write '
                     'it with write_image_folder_shards(..., split=...).')
  shards = tuple(ImageShard(os.path.join(shards_dir, s['file']), int(s['num_examples']))
                 for s in info['splits'][split]['shards'])
  for s in shards:
    if not tf.io.gfile.exists(s.path):
      raise ValueError(f'lvvit_jax/data/sources.py: image shard {s.path} listed in {path} is missing; write the split '
                       'again.')
  return ImageSource(name=info['name'], version=info.get('version', ''), split=split,
                     shards=shards, num_classes=len(info['class_names']),
                     key_feature='file_name')


def get_source(source: str, split: str = 'train', data_dir: Optional[str] = None,
               **tfds_kwargs: Any) -> ImageSource:
  """The one place a `source` string is resolved.

  'tfds:<name>' -> `tfds_source` (in `data_dir`); 'digits' or 'digits:<side>' -> the bundled
  demo digits (`digits.py`), written under `data_dir` on first use; anything else is a
  directory written by `write_image_folder_shards`.
  """
  if source.startswith('tfds:'):
    return tfds_source(source[len('tfds:'):], split, data_dir, **tfds_kwargs)
  if source == 'digits' or source.startswith('digits:'):
    if not data_dir:
      raise ValueError(f'lvvit_jax/data/sources.py: source {source!r} is written on first use '
                       'and needs a data_dir to hold it; set data_dir (config.data.data_dir).')
    return image_folder_source(digits.ensure(data_dir, digits.parse(source)), split)
  return image_folder_source(source, split)
