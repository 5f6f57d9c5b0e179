"""The tf.data pipeline (lvvit_jax/data/pipeline.py, pairs.py, corrupt.py, sources.py) on data
the tests make, and the device augmentation of its batches.

Sources: a generated ImageFolder tree of real JPEG and PNG files written as shards, and a TFDS
dataset whose examples come from `tfds.testing.mock_data`, stored in TFDS's on-disk format (the
pipeline reads shard files, which mock_data alone does not create). Score maps are written per
image shard as labelgen does, with contents derived from each key so alignment is checkable.
"""
import dataclasses
import io
import os
import shutil
import zlib

import jax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from lvvit_jax import augment as device_augment
from lvvit_jax.data import augment
from lvvit_jax.data import pipeline
from lvvit_jax.data import score_maps
from lvvit_jax.data import sources

SIZE = 32
GRID, K = (2, 2), 3
CLASSES = ('cat', 'dog', 'eel')


def _image_bytes(rng, fmt):
  h, w = rng.integers(36, 72, 2)
  small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
  img = Image.fromarray(small).resize((int(w), int(h)), Image.BILINEAR)
  buf = io.BytesIO()
  img.save(buf, fmt, **({'quality': 90} if fmt == 'JPEG' else {}))
  return buf.getvalue()


def _make_folder(root, per_class=8, classes=CLASSES):
  rng = np.random.default_rng(0)
  for c in classes:
    os.makedirs(os.path.join(root, c), exist_ok=True)
    for i in range(per_class):
      fmt, ext = ('JPEG', 'jpg') if i % 2 == 0 else ('PNG', 'png')
      with open(os.path.join(root, c, f'{c}{i}.{ext}'), 'wb') as f:
        f.write(_image_bytes(rng, fmt))


def _expected_map(key):
  rng = np.random.default_rng(zlib.crc32(key if isinstance(key, bytes) else key.encode()))
  logits = rng.normal(0, 3, GRID + (K,)).astype(np.float16)
  idx = rng.integers(0, 100, GRID + (K,)).astype(np.int16)
  box = np.array([0.0, 0.125, 1.0, 0.875], np.float32)
  return logits, idx, box


def _write_maps(source, out_dir):
  """What labelgen does: one score-map shard per image shard, in the image shard's order."""
  infos = []
  for i, shard in enumerate(source.shards):
    with score_maps.ShardWriter(out_dir, shard.path) as w:
      for ex in source.shard_dataset(i).as_numpy_iterator():
        logits, idx, box = _expected_map(ex['key'])
        w.write(ex['key'], logits, idx, int(ex['label']), box)
    infos.append(w.info)
  manifest = score_maps.Manifest(
      dataset=source.name, version=source.version, split=source.split, grid=GRID, k=K,
      num_classes=source.num_classes, teacher={'model': 'synthetic'}, shards=tuple(infos))
  score_maps.write_manifest(out_dir, manifest)
  return manifest


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  """24 images (3 classes, JPEG and PNG) in 4 shards, with score maps."""
  base = tmp_path_factory.mktemp('folder')
  root, shards, maps = str(base / 'toy' / 'train'), str(base / 'shards'), str(base / 'maps')
  _make_folder(root)
  source = sources.write_image_folder_shards(root, shards, num_shards=4, num_workers=2)
  _write_maps(source, maps)
  return {'root': root, 'shards': shards, 'maps': maps, 'source': source, 'base': base}


FAST_AUGMENT = augment.AugmentConfig(image_size=SIZE)


def _cfg(folder, **kw):
  args = dict(source=folder['shards'], score_maps_dir=folder['maps'], batch_size=4,
              image_size=SIZE, augment=FAST_AUGMENT, seed=3,
              shuffle_buffer=8, cycle_length=2, num_parallel_calls=2, include_keys=True)
  args.update(kw)
  return pipeline.PipelineConfig(**args)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_batches_equal(xs, ys):
  assert len(xs) == len(ys)
  for x, y in zip(xs, ys):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_image_folder_shards(folder):
  src = folder['source']
  assert src.name == 'toy' and src.num_classes == 3 and src.num_examples == 24
  assert [s.num_examples for s in src.shards] == [6, 6, 6, 6]
  assert src.shards[0].name == 'toy-train.tfrecord-00000-of-00004'
  keys = [k.decode() for i in range(4)
          for k in src.shard_dataset(i).map(lambda x: x['key']).as_numpy_iterator()]
  assert sorted(keys) == sorted(f'{c}/{c}{i}.{"jpg" if i % 2 == 0 else "png"}'
                                for c in CLASSES for i in range(8))
  # Files are permuted across shards (a shard is not one class), deterministically.
  assert len({k.split('/')[0] for k in keys[:6]}) > 1
  again = sources.write_image_folder_shards(folder['root'], str(folder['base'] / 'again'),
                                            num_shards=4)
  for a, b in zip(src.shards, again.shards):
    assert open(a.path, 'rb').read() == open(b.path, 'rb').read()


def test_train_batches(folder):
  it = pipeline.make_train_iterator(_cfg(folder))
  for batch in _take(it, 3):
    assert set(batch) == {'image', 'label', 'label_affine', 'aug_seed', 'topk_logits',
                          'topk_idx', 'map_box', 'has_map', 'key'}
    assert batch['image'].shape == (4, SIZE, SIZE, 3) and batch['image'].dtype == np.uint8
    assert batch['image'].std() > 10   # real pixels, not the placeholder
    assert batch['label'].dtype == np.int32 and batch['label_affine'].shape == (4, 2, 3)
    assert batch['aug_seed'].shape == (4, 2) and batch['aug_seed'].dtype == np.uint32
    a = batch['label_affine']   # the crops' maps: axis aligned, inside the image
    assert np.all(a[:, 0, 1] == 0) and np.all(a[:, 1, 0] == 0)
    assert np.all(a[:, 0, 0] > 0) and np.all(a[:, 1, 1] > 0) and np.all(a[:, :, 2] >= 0)
    assert np.all(a[:, :, 0:2].sum(-1) + a[:, :, 2] <= 1 + 1e-6)
    assert batch['topk_logits'].shape == (4,) + GRID + (K,)
    assert batch['topk_logits'].dtype == np.float16 and batch['topk_idx'].dtype == np.int32
    for i, key in enumerate(batch['key']):
      key = key.decode()
      assert batch['label'][i] == CLASSES.index(key.split('/')[0])
      logits, idx, box = _expected_map(key)   # the map travelled with its own image
      np.testing.assert_array_equal(batch['topk_logits'][i], logits)
      np.testing.assert_array_equal(batch['topk_idx'][i], idx)
      np.testing.assert_array_equal(batch['map_box'][i], box)
  plain = next(pipeline.make_train_iterator(_cfg(folder, score_maps_dir=None)))
  assert set(plain) == {'image', 'label', 'label_affine', 'aug_seed', 'key'}


def test_deterministic_and_resumable(folder):
  cfg = _cfg(folder)
  full = _take(pipeline.make_train_iterator(cfg), 9)   # 6 batches per epoch: crosses epoch 1
  keys = [k for b in full for k in b['key']]
  assert sorted(keys[:24]) == sorted(set(keys[:24]))   # epoch 0: every example once
  assert keys[24:] != keys[:12]                         # epoch 1 is reshuffled
  seeds = np.concatenate([b['aug_seed'] for b in full])
  assert len({s.tobytes() for s in seeds}) == len(seeds)   # per example and per epoch

  it = pipeline.make_train_iterator(cfg)
  _assert_batches_equal(_take(it, 3), full[:3])        # same seed, same batches
  s3 = it.state()
  assert (s3['epoch'], s3['index']) == (0, 12)
  _take(it, 3)
  s6 = it.state()
  assert (s6['epoch'], s6['index']) == (0, 24)

  _assert_batches_equal(_take(pipeline.make_train_iterator(cfg, s3), 6), full[3:9])
  _assert_batches_equal(_take(pipeline.make_train_iterator(cfg, s6), 3), full[6:9])

  # Without tf.data's autotuner (short runs: configs/common.py runlocal, the demo) the batches
  # are the same.
  untuned = dataclasses.replace(cfg, autotune=False)
  assert not pipeline.dataset_options(untuned).autotune.enabled
  assert pipeline.dataset_options(cfg).autotune.enabled
  _assert_batches_equal(_take(pipeline.make_train_iterator(untuned), 9), full)

  other = next(pipeline.make_train_iterator(dataclasses.replace(cfg, seed=4)))
  assert not np.array_equal(other['image'], full[0]['image'])
  assert not np.array_equal(other['aug_seed'], full[0]['aug_seed'])
  with pytest.raises(ValueError, match='seed=3 but PipelineConfig.seed=4'):
    pipeline.make_train_iterator(dataclasses.replace(cfg, seed=4), s3)


def test_an_example_gets_the_same_device_augmentation_whatever_the_devices(folder):
  # The host's batches do not depend on the batch size: the same examples, crops and seeds.
  cfg = _cfg(folder, batch_size=8)
  whole = next(pipeline.make_train_iterator(cfg))
  halves = _take(pipeline.make_train_iterator(dataclasses.replace(cfg, batch_size=4)), 2)
  for k in whole:
    np.testing.assert_array_equal(whole[k], np.concatenate([h[k] for h in halves]), err_msg=k)
  # On the device the augmentation of an example depends only on it (image, crop map, seed):
  # one device, the batch split over 4 devices, or the example alone give the same result.
  augment_fn = jax.jit(device_augment.augment_batch, static_argnames=('cfg', 'dtype'))
  args = [whole[k] for k in ('image', 'aug_seed', 'label_affine')]
  one = jax.device_put(args, jax.devices()[0])
  ref = [np.asarray(x) for x in augment_fn(*one)]
  mesh = Mesh(np.array(jax.devices()[:4]), ('data',))
  sharded = jax.device_put(args, NamedSharding(mesh, P('data')))
  four = augment_fn(*sharded)
  assert len(four[0].sharding.device_set) == 4
  for r, x in zip(ref, four):
    np.testing.assert_array_equal(r, np.asarray(x))
  for i in (0, 5):
    alone = augment_fn(*[a[i:i + 1] for a in args])
    for r, x in zip(ref, alone):
      np.testing.assert_array_equal(r[i:i + 1], np.asarray(x))
  # And the augmentation really differs between examples (flip, RandAugment, erasing).
  assert not np.allclose(ref[1], whole['label_affine'])


def _failing_preprocess(encoded, seed, cfg):
  """A train_preprocess whose decode fails on every image."""
  del seed, cfg
  tf.debugging.assert_equal(tf.strings.length(encoded), -1)
  return {'image': tf.zeros([SIZE, SIZE, 3], tf.uint8), 'label_affine': tf.zeros([2, 3]),
          'aug_seed': tf.zeros([2], tf.uint32)}


def test_resume_skips_records_before_decoding(folder, monkeypatch):
  # With a preprocessing that fails on every image, the examples that are decoded are exactly
  # the ones counted as corrupt: resuming at index 20 of 24 decodes 4, at 24 none.
  monkeypatch.setattr(augment, 'train_preprocess', _failing_preprocess)
  cfg = _cfg(folder, num_epochs=1)
  for index, decoded in ((20, 4), (24, 0)):
    it = pipeline.make_train_iterator(cfg, {'epoch': 0, 'index': index})
    assert list(it) == []
    assert sum(it.corrupt_counts.values()) == decoded


def test_processes_disjoint_and_cover(folder):
  per_process = []
  for p in range(3):   # 4 shards over 3 processes: 2, 1, 1 shards
    cfg = _cfg(folder, score_maps_dir=None, batch_size=1, num_epochs=1, process_index=p,
               process_count=3, num_parallel_calls=1)   # also the sequential code path
    batches = list(pipeline.make_train_iterator(cfg))
    assert 'topk_logits' not in batches[0]
    per_process.append([k for b in batches for k in b['key']])
  assert [len(k) for k in per_process] == [12, 6, 6]
  every = [k for keys in per_process for k in keys]
  assert len(every) == len(set(every)) == 24
  with pytest.raises(ValueError, match='has 4 shards but there are 5 processes'):
    pipeline.make_train_iterator(_cfg(folder, process_index=0, process_count=5))


def test_eval_pads_and_counts_every_example_once(folder):
  seen, lengths = [], []
  for p in range(2):
    ev = pipeline.make_eval_iterator(_cfg(folder, batch_size=5, crop_pct=0.875, process_index=p,
                                          process_count=2))
    batches = list(ev)
    lengths.append((len(batches), ev.num_batches, ev.num_examples))
    for b in batches:
      assert set(b) == {'image', 'label', 'mask', 'key'}
      assert b['image'].shape == (5, SIZE, SIZE, 3) and b['image'].dtype == np.uint8
      assert b['mask'].dtype == bool
      for key, label, m in zip(b['key'], b['label'], b['mask']):
        if m:
          seen.append(key.decode())
          assert label == CLASSES.index(key.decode().split('/')[0])
    assert list(ev)[0]['key'].tolist() == batches[0]['key'].tolist()   # re-iterable
  assert lengths == [(3, 3, 12), (3, 3, 12)]   # 12 examples -> 2 full batches + 2 real of 5
  assert len(seen) == len(set(seen)) == 24


# ----------------------------------------------------------------------------------------------
# TFDS.


def _mock_tfds(data_dir, name='oxford_flowers102', shard_lengths=(4, 3, 3)):
  """Examples from tfds.testing.mock_data, stored as a prepared TFDS dataset in `data_dir`."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  with tfds.testing.mock_data(num_examples=sum(shard_lengths)):
    builder = tfds.builder(name)
    examples = list(builder.as_dataset(
        split='train', decoders={'image': tfds.decode.SkipDecoding()}).as_numpy_iterator())
  info, features = builder.info, builder.info.features
  out = os.path.join(data_dir, name, str(builder.version))
  os.makedirs(out)
  template = tfds.core.ShardedFileTemplate(data_dir=out, dataset_name=name, split='train',
                                           filetype_suffix='tfrecord')
  info.set_splits(tfds.core.SplitDict([tfds.core.SplitInfo(
      name='train', shard_lengths=list(shard_lengths), num_bytes=0,
      filename_template=template)]))
  start = 0
  for s, n in enumerate(shard_lengths):
    path = os.path.join(out, f'{name}-train.tfrecord-{s:05d}-of-{len(shard_lengths):05d}')
    with tf.io.TFRecordWriter(path) as w:
      for e in examples[start:start + n]:
        w.write(features.serialize_example(
            {'image': io.BytesIO(e['image']), 'label': e['label'],
             'file_name': e['file_name'].decode()}))
    start += n
  info.write_to_directory(out)
  return examples


def test_tfds_source_with_mock_data(tmp_path):
  data_dir = str(tmp_path / 'tfds')
  examples = _mock_tfds(data_dir)
  src = sources.tfds_source('oxford_flowers102', 'train', data_dir)
  assert src.key_feature == 'file_name' and src.num_classes == 102
  assert [s.num_examples for s in src.shards] == [4, 3, 3]
  maps = str(tmp_path / 'maps')
  _write_maps(src, maps)

  cfg = pipeline.PipelineConfig(
      source='tfds:oxford_flowers102', data_dir=data_dir, score_maps_dir=maps, batch_size=2,
      image_size=SIZE, augment=FAST_AUGMENT, shuffle_buffer=4, cycle_length=2,
      num_parallel_calls=2, include_keys=True, num_epochs=1)
  batches = list(pipeline.make_train_iterator(cfg))
  assert len(batches) == 5
  labels = {e['file_name']: e['label'] for e in examples}
  for b in batches:
    assert b['image'].shape == (2, SIZE, SIZE, 3) and b['image'].dtype == np.uint8
    for i, key in enumerate(b['key']):
      assert b['label'][i] == labels[key]
      np.testing.assert_array_equal(b['topk_logits'][i], _expected_map(key)[0])

  # Datasets without a file-name feature are keyed by TFDS ids, '<shard>__<position>'.
  ids = sources.tfds_source('oxford_flowers102', 'train', data_dir, key_feature=None)
  first = next(ids.shard_dataset(1).as_numpy_iterator())
  assert first['key'] == b'oxford_flowers102-train.tfrecord-00001-of-00003__0'
  ev = pipeline.make_eval_iterator(dataclasses.replace(cfg, batch_size=4, key_feature=None))
  keys = [k for b in ev for k, m in zip(b['key'], b['mask']) if m]
  assert sorted(keys) == sorted(f'oxford_flowers102-train.tfrecord-0000{s}-of-00003__{i}'.encode()
                                for s, n in enumerate((4, 3, 3)) for i in range(n))

  with pytest.raises(ValueError, match='slices are not supported'):
    sources.tfds_source('oxford_flowers102', 'train[:50%]', data_dir)
  with pytest.raises(ValueError, match="has no split 'test'"):
    sources.tfds_source('oxford_flowers102', 'test', data_dir)


# ----------------------------------------------------------------------------------------------
# Misaligned score maps.


def _copy_maps(folder, where):
  d = str(where / 'maps')
  shutil.copytree(folder['maps'], d)
  return d, score_maps.read_manifest(d)


def _rewrite_shard(d, manifest, i, records, count=None):
  """Rewrites score-map shard i with `records` (serialized), keeping or setting its count."""
  info = manifest.shards[i]
  with tf.io.TFRecordWriter(os.path.join(d, info.file)) as w:
    for r in records:
      w.write(r)
  shards = list(manifest.shards)
  shards[i] = dataclasses.replace(info, num_examples=count if count is not None else len(records),
                                  sha256=score_maps.file_sha256(os.path.join(d, info.file)))
  score_maps.write_manifest(d, dataclasses.replace(manifest, shards=tuple(shards)))


def _records(d, manifest, i):
  return list(tf.data.TFRecordDataset(os.path.join(d, manifest.shards[i].file))
              .as_numpy_iterator())


def _consume(cfg):
  for _ in pipeline.make_train_iterator(dataclasses.replace(cfg, num_epochs=1)):
    pass


def test_missing_or_miscounted_shards_fail_up_front(folder, tmp_path):
  d, m = _copy_maps(folder, tmp_path / 'missing')
  os.remove(os.path.join(d, m.shards[2].file))
  with pytest.raises(score_maps.ScoreMapError,
                     match=r'scoremaps-toy-train.tfrecord-00002-of-00004 .* is missing'):
    pipeline.make_train_iterator(_cfg(folder, score_maps_dir=d))

  d, m = _copy_maps(folder, tmp_path / 'count')
  _rewrite_shard(d, m, 1, _records(d, m, 1)[:5])
  with pytest.raises(score_maps.ScoreMapError, match=r'has 5 examples .* image shard .* has 6'):
    pipeline.make_train_iterator(_cfg(folder, score_maps_dir=d))

  d, m = _copy_maps(folder, tmp_path / 'other')
  score_maps.write_manifest(d, dataclasses.replace(m, dataset='imagenet2012'))
  with pytest.raises(score_maps.ScoreMapError, match="maps of 'imagenet2012'"):
    pipeline.make_train_iterator(_cfg(folder, score_maps_dir=d))

  d, m = _copy_maps(folder, tmp_path / 'checksum')
  with open(os.path.join(d, m.shards[0].file), 'ab') as f:
    f.write(b'\0')
  with pytest.raises(score_maps.ScoreMapError,
                     match='scoremaps-toy-train.tfrecord-00000-of-00004: SHA-256'):
    pipeline.make_train_iterator(_cfg(folder, score_maps_dir=d, verify_checksums=True))


def test_key_mismatch_names_shard_and_example(folder, tmp_path):
  d, m = _copy_maps(folder, tmp_path)
  recs = _records(d, m, 3)
  recs[2], recs[3] = recs[3], recs[2]
  _rewrite_shard(d, m, 3, recs)
  with pytest.raises(score_maps.ScoreMapError,
                     match=r'image shard \S*toy-train.tfrecord-00003-of-00004 example [23] key '
                     r'\S+ label \d vs score-map shard \S*scoremaps-toy-train.tfrecord-00003'):
    _consume(_cfg(folder, score_maps_dir=d))


def test_short_score_map_stream_is_caught_at_its_end(folder, tmp_path):
  d, m = _copy_maps(folder, tmp_path)
  _rewrite_shard(d, m, 0, _records(d, m, 0)[:5], count=6)   # the manifest claims 6
  with pytest.raises(score_maps.ScoreMapError, match=r'example 5 key .* key <end of shard>'):
    _consume(_cfg(folder, score_maps_dir=d))


# ----------------------------------------------------------------------------------------------
# Corrupt images.


@pytest.fixture(scope='module')
def corrupt(tmp_path_factory):
  base = tmp_path_factory.mktemp('corrupt')
  root = str(base / 'bad' / 'train')
  _make_folder(root, per_class=4, classes=('cat', 'dog'))
  good = open(os.path.join(root, 'cat', 'cat0.jpg'), 'rb').read()
  with open(os.path.join(root, 'cat', 'truncated.jpg'), 'wb') as f:
    f.write(good[:len(good) // 2])
  with open(os.path.join(root, 'dog', 'garbage.jpg'), 'wb') as f:
    f.write(np.random.default_rng(1).bytes(2000))
  sources.write_image_folder_shards(root, str(base / 'shards'), num_shards=2)
  return str(base / 'shards')


def test_corrupt_images_are_skipped_counted_or_fail(corrupt):
  cfg = pipeline.PipelineConfig(source=corrupt, batch_size=2, image_size=SIZE,
                                augment=FAST_AUGMENT, shuffle_buffer=4,
                                cycle_length=2, num_parallel_calls=2, include_keys=True,
                                num_epochs=2)
  it = pipeline.make_train_iterator(cfg)
  keys = [k.decode() for b in it for k in b['key']]
  assert len(keys) == 16 and not {'cat/truncated.jpg', 'dog/garbage.jpg'} & set(keys)
  assert {e: sorted(k) for e, k in it.corrupt_keys.items()} == {
      0: ['cat/truncated.jpg', 'dog/garbage.jpg'], 1: ['cat/truncated.jpg', 'dog/garbage.jpg']}

  with pytest.raises(pipeline.CorruptImageError,
                     match=r"corrupt image: .*(truncated|garbage)\.jpg .* on_corrupt='skip'"):
    list(pipeline.make_train_iterator(dataclasses.replace(cfg, on_corrupt='fail')))

  ev = pipeline.make_eval_iterator(dataclasses.replace(cfg, batch_size=4))
  batches = list(ev)
  assert len(batches) == ev.num_batches == 3   # ceil(10 / 4); 8 of the 10 are decodable
  evaluated = [k.decode() for b in batches for k, m in zip(b['key'], b['mask']) if m]
  assert len(evaluated) == 8 and set(evaluated) == set(keys)
  assert sorted(ev.corrupt_keys[0]) == ['cat/truncated.jpg', 'dog/garbage.jpg']


def test_too_many_failures_is_a_bug_not_bad_files(folder, monkeypatch):
  monkeypatch.setattr(augment, 'train_preprocess', _failing_preprocess)
  with pytest.raises(pipeline.CorruptImageError, match='more than max_corrupt_fraction'):
    next(pipeline.make_train_iterator(_cfg(folder, score_maps_dir=None)))
