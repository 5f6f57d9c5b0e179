"""labelgen import (labelgen/import_maps.py) and the torch-free .pt reader (labelgen/pt_files.py).

Label files are written with `torch.save` in the published layout (float16 (2, 5, H, W), plane 1
the class indices as float16), one per image of a small image-folder source of non-square JPEG
and PNG images; the converted shards are read back through the real input pipeline.
"""
import io
import json
import os
import shutil
import sys
import zipfile

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf
import torch

from labelgen import __main__ as labelgen_main
from labelgen import import_maps
from labelgen import pt_files
from labelgen import show
from lvvit_jax.data import augment
from lvvit_jax.data import pipeline
from lvvit_jax.data import score_maps
from lvvit_jax.data import sources
from lvvit_jax.token_labeling import token_targets

CLASSES = ('cat', 'dog', 'eel')
# (height, width) per image; both aspects in both formats.
SIZES = {'a.jpg': (40, 64), 'b.png': (64, 40), 'c.jpg': (64, 40), 'd.png': (40, 64)}
SIZE, GRID = 64, 4
# torchvision Resize(576) + CenterCrop(576) of 40x64: 576x921 (921.6 truncated), left offset
# round(172.5) = 172 (half to even; floor(x + 0.5) would give 173).
CENTRE = {(40, 64): (0.0, 172 / 921, 1.0, 748 / 921), (64, 40): (172 / 921, 0.0, 748 / 921, 1.0)}


def _image(rng, hw, fmt):
  small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
  buf = io.BytesIO()
  Image.fromarray(small).resize((hw[1], hw[0]), Image.BILINEAR).save(buf, fmt)
  return buf.getvalue()


def _label_tensor(rng, grid=18, k=5, classes=len(CLASSES)):
  logits = rng.normal(0, 3, (k, grid, grid))
  idx = rng.integers(0, classes, (k, grid, grid))
  return torch.tensor(np.stack([logits, idx]), dtype=torch.float16)


def _write_labels(root, keys, grid=18, seed=1):
  """One torch.save'd (2, 5, grid, grid) file per key 'class/file.ext' -> root/class/file.pt."""
  rng = np.random.default_rng(seed)
  for key in keys:
    path = os.path.join(root, os.path.splitext(key)[0] + '.pt')
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(_label_tensor(rng, grid), path)


def _expected(labels_root, key):
  """(logits (h, w, k), idx (h, w, k)) straight from the .pt file, with torch."""
  t = torch.load(os.path.join(labels_root, os.path.splitext(key)[0] + '.pt'))
  return t[0].permute(1, 2, 0).numpy(), t[1].permute(1, 2, 0).float().round().numpy()


@pytest.fixture(scope='module')
def data(tmp_path_factory):
  base = tmp_path_factory.mktemp('labelgen')
  root = base / 'toy' / 'train'
  rng = np.random.default_rng(0)
  keys = []
  for c in CLASSES:
    os.makedirs(root / c)
    for name, hw in list(SIZES.items())[:2 + CLASSES.index(c) % 2 * 2]:
      (root / c / name).write_bytes(_image(rng, hw, 'JPEG' if name.endswith('jpg') else 'PNG'))
      keys.append(f'{c}/{name}')
  source = sources.write_image_folder_shards(str(root), str(base / 'shards'), num_shards=2,
                                             num_workers=1)
  labels = str(base / 'label_top5_train_nfnet')
  _write_labels(labels, keys)
  hw = {k: SIZES[k.split('/')[1]] for k in keys}
  return {'base': base, 'shards': str(base / 'shards'), 'labels': labels, 'source': source,
          'keys': keys, 'hw': hw}


def _import(data, out, log=None, **kw):
  return import_maps.import_labels(kw.pop('labels', data['labels']), data['shards'],
                                   str(data['base'] / out), log=log or io.StringIO(), **kw)


def _records(out):
  m = score_maps.read_manifest(out)
  return m, [score_maps.decode_example_np(r) for s in m.shards
             for r in tf.data.TFRecordDataset(os.path.join(out, s.file)).as_numpy_iterator()]


def _identity_cfg(data, out, ratio, **kw):
  aug = augment.AugmentConfig(image_size=SIZE, scale=(1.0, 1.0), ratio=(ratio, ratio))
  return pipeline.PipelineConfig(source=data['shards'], score_maps_dir=out, batch_size=2,
                                 image_size=SIZE, augment=aug, shuffle_buffer=1, cycle_length=2,
                                 num_parallel_calls=1, include_keys=True, num_epochs=1, **kw)


def _targets(logits, idx, box, affine):
  return token_targets(np.asarray(logits), np.asarray(idx), np.asarray(box, np.float32),
                       np.asarray(affine, np.float32), grid=GRID, num_classes=len(CLASSES))


def test_centre_box_is_torchvision_resize_and_centre_crop():
  assert import_maps.centre_box(40, 64, 576) == CENTRE[(40, 64)]
  assert import_maps.centre_box(64, 40, 576) == CENTRE[(64, 40)]
  assert import_maps.centre_box(576, 576, 576) == (0.0, 0.0, 1.0, 1.0)
  assert import_maps.centre_box(500, 375, 576) == (96 / 768, 0.0, 672 / 768, 1.0)
  assert import_maps.centre_box(333, 500, 576) == (0.0, 144 / 864, 1.0, 720 / 864)  # 864.86
  assert import_maps.centre_box(40, 64, 475) == (0.0, 142 / 760, 1.0, 617 / 760)    # 142.5
  assert import_maps.label_key('n01440764_10026.JPEG') == 'n01440764/n01440764_10026.pt'
  assert import_maps.label_key('cat/x.y.png') == 'cat/x.y.pt'
  with pytest.raises(import_maps.LabelImportError, match='names no label file'):
    import_maps.label_key('toy-train.tfrecord-00000-of-00002__3')


def test_import_round_trip_through_the_pipeline(data):
  log = io.StringIO()
  summary = _import(data, 'maps', log)
  out = str(data['base'] / 'maps')
  assert (summary.images, summary.shards_written, summary.missing, summary.extra) == (
      len(data['keys']), 2, [], [])
  assert 'shard 2/2' in log.getvalue() and 'bytes per image' in log.getvalue()
  manifest, records = _records(out)
  assert manifest.grid == (18, 18) and manifest.k == 5 and manifest.num_classes == 3
  assert manifest.teacher['model'] == 'nfnet_f6' and manifest.teacher['map_box'] == 'centre'
  # Same order and keys as the image shards; maps transposed, boxes exact.
  image_keys = [k.decode() for i in range(2) for k in
                data['source'].shard_dataset(i).map(lambda x: x['key']).as_numpy_iterator()]
  assert [r['key'] for r in records] == image_keys
  for r in records:
    logits, idx = _expected(data['labels'], r['key'])
    np.testing.assert_array_equal(r['topk_logits'], logits)
    np.testing.assert_array_equal(r['topk_idx'], idx)
    np.testing.assert_array_equal(r['map_box'], np.float32(CENTRE[data['hw'][r['key']]]))
    assert r['has_map'] and r['label'] == CLASSES.index(r['key'].split('/')[0])

  # Identity crops (scale 1 at each image's aspect) through the real pipeline: the targets
  # equal token_targets of the .pt tensors with the centre-square map_box.
  seen = set()
  for (h, w) in CENTRE:
    for batch in pipeline.make_train_iterator(_identity_cfg(data, out, w / h)):
      assert batch['has_map'].dtype == bool and batch['has_map'].all()
      cls, tok = _targets(batch['topk_logits'], batch['topk_idx'], batch['map_box'],
                          batch['label_affine'])
      for i, key in enumerate(k.decode() for k in batch['key']):
        if data['hw'][key] != (h, w):
          continue
        seen.add(key)
        np.testing.assert_allclose(batch['label_affine'][i], [[1, 0, 0], [0, 1, 0]], atol=1e-6)
        logits, idx = _expected(data['labels'], key)
        want_cls, want_tok = _targets(logits[None], idx[None], [CENTRE[(h, w)]],
                                      [[[1, 0, 0], [0, 1, 0]]])
        np.testing.assert_allclose(tok[i], want_tok[0], rtol=0, atol=1e-6)
        np.testing.assert_allclose(cls[i], want_cls[0], rtol=0, atol=1e-6)
        # The box matters: the full-image box gives other targets.
        _, full_tok = _targets(logits[None], idx[None], [(0, 0, 1, 1)], [[[1, 0, 0], [0, 1, 0]]])
        assert np.abs(np.asarray(full_tok[0]) - np.asarray(want_tok[0])).max() > 1e-3
  assert seen == set(data['keys'])


def test_zip_of_the_folder_gives_the_same_shards(data):
  folder = _import(data, 'maps_folder').manifest
  archive = str(data['base'] / 'label_top5_train_nfnet.zip')
  with zipfile.ZipFile(archive, 'w', zipfile.ZIP_DEFLATED) as z:
    for key in data['keys']:
      rel = os.path.splitext(key)[0] + '.pt'
      z.write(os.path.join(data['labels'], rel), f'label_top5_train_nfnet/{rel}')
  from_zip = _import(data, 'maps_zip', labels=archive).manifest
  assert [s.sha256 for s in from_zip.shards] == [s.sha256 for s in folder.shards]
  files = pt_files.open_label_files(archive)
  assert sorted(files.keys()) == sorted(os.path.splitext(k)[0] + '.pt' for k in data['keys'])
  assert files.describe('cat/a.pt') == f'{archive}:label_top5_train_nfnet/cat/a.pt'


def test_missing_and_extra_label_files(data, capsys):
  labels = str(data['base'] / 'labels_missing')
  shutil.copytree(data['labels'], labels)
  os.remove(os.path.join(labels, 'dog', 'b.pt'))
  torch.save(_label_tensor(np.random.default_rng(5)), os.path.join(labels, 'eel', 'ghost.pt'))
  out = str(data['base'] / 'maps_missing')
  with pytest.raises(import_maps.LabelImportError,
                     match=r'1 images have no label file .*: 1 \(dog/b.png\).*--allow-missing'):
    _import(data, 'maps_missing', labels=labels)
  # The shard without a missing image was finished and is listed; the other was not written.
  assert len(score_maps.read_manifest(out).shards) == 1

  log = io.StringIO()
  summary = _import(data, 'maps_missing', log, labels=labels, allow_missing=True)
  assert summary.missing == ['dog/b.png'] and summary.extra == ['eel/ghost.pt']
  assert (summary.shards_skipped, summary.shards_written) == (1, 1)   # the finished one is kept
  assert 'label files without an image: 1 (eel/ghost.pt)' in log.getvalue()
  _, records = _records(out)
  for r in records:
    assert r['has_map'] == (r['key'] != 'dog/b.png')
  blank = next(r for r in records if r['key'] == 'dog/b.png')
  assert not blank['topk_logits'].any() and not blank['topk_idx'].any()

  has_map = {}
  for batch in pipeline.make_train_iterator(_identity_cfg(data, out, 1.0)):
    has_map.update(zip((k.decode() for k in batch['key']), batch['has_map']))
  assert has_map == {k: k != 'dog/b.png' for k in data['keys']}

  # The CLI reports the same failure without --allow-missing, as an exit status.
  with pytest.raises(SystemExit) as exit_info:
    labelgen_main.main(['import', '--labels', labels, '--source', data['shards'],
                        '--out', str(data['base'] / 'maps_cli')])
  err = capsys.readouterr().err.splitlines()
  assert exit_info.value.code == 2 and 'dog/b.png' in err[-1]
  assert err[-1].startswith('python -m labelgen import: error: ')

  # Once the file exists, a rerun rewrites the shard that lacked it and keeps the other.
  shutil.copy(os.path.join(data['labels'], 'dog', 'b.pt'), os.path.join(labels, 'dog', 'b.pt'))
  summary = _import(data, 'maps_missing', labels=labels)
  assert (summary.shards_skipped, summary.shards_written, summary.missing) == (1, 1, [])
  assert all(r['has_map'] for r in _records(out)[1])


def test_rerun_keeps_finished_shards(data):
  out = str(data['base'] / 'maps_resume')
  first = _import(data, 'maps_resume').manifest
  manifest_json = json.load(open(os.path.join(out, score_maps.MANIFEST_NAME)))
  paths = [os.path.join(out, s.file) for s in first.shards]
  mtimes = [os.stat(p).st_mtime_ns for p in paths]

  again = _import(data, 'maps_resume')
  assert (again.shards_skipped, again.shards_written) == (2, 0)
  assert [os.stat(p).st_mtime_ns for p in paths] == mtimes
  assert json.load(open(os.path.join(out, score_maps.MANIFEST_NAME))) == manifest_json

  os.remove(paths[1])   # an interrupted run: only the lost shard is redone
  third = _import(data, 'maps_resume')
  assert (third.shards_skipped, third.shards_written) == (1, 1)
  assert os.stat(paths[0]).st_mtime_ns == mtimes[0]
  assert json.load(open(os.path.join(out, score_maps.MANIFEST_NAME))) == manifest_json

  full = _import(data, 'maps_resume', map_box='full')   # other settings: nothing is kept
  assert (full.shards_skipped, full.shards_written) == (0, 2)
  assert all(tuple(r['map_box']) == (0, 0, 1, 1) for r in _records(out)[1])


def test_relabel_format(data, capsys):
  labels = str(data['base'] / 'relabel')
  _write_labels(labels, data['keys'], grid=15, seed=7)
  out = str(data['base'] / 'maps_relabel')
  status = labelgen_main.main(['import', '--labels', labels, '--source', data['shards'],
                               '--out', out, '--format', 'relabel'])
  assert status == 0
  assert f'labelgen import: {len(data["keys"])} images' in capsys.readouterr().err
  manifest, records = _records(out)
  assert manifest.grid == (15, 15) and manifest.teacher['model'] == 'efficientnet_l2'
  for r in records:
    assert tuple(r['map_box']) == (0, 0, 1, 1)
    np.testing.assert_array_equal(r['topk_logits'], _expected(labels, r['key'])[0])
  centre = _import(data, 'maps_relabel_centre', labels=labels, fmt='relabel', map_box='centre')
  records = _records(str(data['base'] / 'maps_relabel_centre'))[1]
  boxes = {r['key']: tuple(r['map_box']) for r in records}
  assert centre.manifest.teacher['map_box'] == 'centre'
  assert boxes['cat/a.jpg'] == tuple(np.float32(import_maps.centre_box(40, 64, 475)))
  # NFNet-sized maps with the ReLabel ones fail, naming the file.
  torch.save(_label_tensor(np.random.default_rng(0)), os.path.join(labels, 'eel', 'a.pt'))
  with pytest.raises(import_maps.LabelImportError, match=r'eel/a.pt is \(2, 5, 18, 18\)'):
    _import(data, 'maps_relabel_mixed', labels=labels, fmt='relabel')


# ----------------------------------------------------------------------------------------------
# The .pt reader.


def _saved(obj, **kw):
  buf = io.BytesIO()
  torch.save(obj, buf, **kw)
  return buf.getvalue()


def _numpy(t):
  return t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()


def _assert_same(got, want):
  if isinstance(want, torch.Tensor):
    assert isinstance(got, np.ndarray) and got.shape == tuple(want.shape)
    assert got.dtype.itemsize == want.element_size()
    np.testing.assert_array_equal(got.astype(np.float32) if want.dtype == torch.bfloat16 else got,
                                  _numpy(want))
  elif isinstance(want, dict):
    assert got.keys() == want.keys()
    for k in want:
      _assert_same(got[k], want[k])
  else:
    assert type(got) is type(want) and len(got) == len(want)
    for g, w in zip(got, want):
      _assert_same(g, w)


def _tensors():
  g = torch.Generator().manual_seed(0)
  floats = {str(d): (torch.randn(3, 4, generator=g) * 5).to(d)
            for d in (torch.float16, torch.float32, torch.float64, torch.bfloat16)}
  ints = {d: torch.randint(-100, 100, (2, 3, 2), generator=g).to(d)
          for d in (torch.int64, torch.int32, torch.int16, torch.int8)}
  base = torch.randn(5, 6, generator=g)
  return {
      'floats': floats, 'ints': [ints[d] for d in ints],
      'uint8': torch.randint(0, 255, (7,), generator=g).to(torch.uint8),
      'bool': torch.randn(4, generator=g) > 0,
      'scalar': torch.tensor(2.5),
      'strided': base.t()[1:, ::2],             # non-contiguous, offset into its storage
      'views': (base[0], base[:, 1]),            # two views of one storage
      'map': torch.randn(2, 5, 18, 18, generator=g).half(),
  }


def test_reader_equals_torch_load():
  want = _tensors()
  data = _saved(want)
  _assert_same(pt_files.load(data, 'all.pt'), torch.load(io.BytesIO(data)))
  got = pt_files.load(data, 'all.pt')
  assert got['strided'].flags['C_CONTIGUOUS']
  assert got['floats']['torch.bfloat16'].dtype.name == 'bfloat16'

  # Big-endian files: the same storages byte-swapped, marked 'big'.
  src = zipfile.ZipFile(io.BytesIO(_saved({'h': want['map'], 'l': want['ints'][0]})))
  dtypes = {'0': np.float16, '1': np.int64}
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, 'w') as dst:
    for name in src.namelist():
      raw = src.read(name)
      if name.endswith('/byteorder'):
        raw = b'big'
      elif '/data/' in name:
        raw = np.frombuffer(raw, dtypes[name.rsplit('/', 1)[1]]).byteswap().tobytes()
      dst.writestr(name, raw)
  big = pt_files.load(buf.getvalue(), 'big.pt')
  np.testing.assert_array_equal(big['h'], want['map'].numpy())
  np.testing.assert_array_equal(big['l'], want['ints'][0].numpy())


class CustomObject:
  pass


class RunsACommand:

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f'touch {self.marker}',))


def test_reader_refuses_non_tensors(tmp_path):
  path = str(tmp_path / 'custom.pt')
  torch.save({'map': torch.zeros(2), 'obj': CustomObject()}, path)
  with pytest.raises(pt_files.PtFileError, match=r'custom.pt: refusing .*[ .]test_labelgen_import'
                     r'.CustomObject'):
    pt_files.load_file(path)

  marker = tmp_path / 'ran'
  path = str(tmp_path / 'command.pt')
  torch.save([torch.zeros(2), RunsACommand(marker)], path)
  with pytest.raises(pt_files.PtFileError, match=r'command.pt: refusing .*\.system'):
    pt_files.load_file(path)
  assert not marker.exists()

  # A label tree holding such a file fails the import, naming it.
  labels = tmp_path / 'labels' / 'cat'
  os.makedirs(labels)
  shutil.copy(path, labels / 'a.pt')
  files = pt_files.open_label_files(str(tmp_path / 'labels'))
  with pytest.raises(pt_files.PtFileError, match=r'labels/cat/a.pt: refusing'):
    files.load('cat/a.pt')


def test_legacy_format_falls_back_to_torch(monkeypatch):
  want = {'map': torch.randn(2, 5, 3, 3).half(), 'strided': torch.randn(4, 4).t()}
  legacy = _saved(want, _use_new_zipfile_serialization=False)
  assert legacy[:4] != b'PK\x03\x04'
  _assert_same(pt_files.load(legacy, 'old.pt'), want)
  monkeypatch.setitem(sys.modules, 'torch', None)   # torch not installed
  with pytest.raises(pt_files.PtFileError, match=r'old.pt: not a zip archive.*install torch'):
    pt_files.load(legacy, 'old.pt')


def test_label_file_with_the_wrong_content(tmp_path, data):
  labels = str(tmp_path / 'labels')
  _write_labels(labels, data['keys'])
  torch.save({'logits': torch.zeros(5, 18, 18)}, os.path.join(labels, 'cat', 'a.pt'))
  with pytest.raises(import_maps.LabelImportError, match=r'cat/a.pt holds dict, expected one '
                     r'tensor \(2, k, H, W\)'):
    import_maps.import_labels(labels, data['shards'], str(tmp_path / 'out'), log=io.StringIO())
  t = _label_tensor(np.random.default_rng(0))
  t[1, 0, 0, 0] = 7   # a class the source does not have
  torch.save(t, os.path.join(labels, 'cat', 'a.pt'))
  with pytest.raises(import_maps.LabelImportError, match=r'cat/a.pt: class indices span \[0, 7\] '
                     'but the source has 3 classes'):
    import_maps.import_labels(labels, data['shards'], str(tmp_path / 'out'), log=io.StringIO())


def test_first_shard_without_any_label_file_fails_fast(tmp_path, data):
  labels = str(tmp_path / 'labels')
  _write_labels(labels, ['zebra/z.jpg'])
  with pytest.raises(import_maps.LabelImportError, match=r'none of the \d images of the first '
                     r"shard .* needs '\w+/\w.pt'"):
    import_maps.import_labels(labels, data['shards'], str(tmp_path / 'out'), log=io.StringIO())


def test_tfds_imagenet_file_names(tmp_path):
  """A prepared TFDS imagenet2012 train split: file_name 'n..._k.JPEG' -> 'n.../n..._k.pt'."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  builder = tfds.builder('imagenet2012', data_dir=str(tmp_path / 'tfds'))
  info, features = builder.info, builder.info.features
  out = os.path.join(str(tmp_path / 'tfds'), 'imagenet2012', str(builder.version))
  os.makedirs(out)
  template = tfds.core.ShardedFileTemplate(data_dir=out, dataset_name='imagenet2012',
                                           split='train', filetype_suffix='tfrecord')
  info.set_splits(tfds.core.SplitDict([tfds.core.SplitInfo(
      name='train', shard_lengths=[2, 1], num_bytes=0, filename_template=template)]))
  rng = np.random.default_rng(0)
  names = [('n01440764_10026.JPEG', 0, (40, 64)), ('n01443537_2.JPEG', 1, (64, 40)),
           ('n01440764_7.JPEG', 0, (48, 48))]
  for s, chunk in enumerate((names[:2], names[2:])):
    path = os.path.join(out, f'imagenet2012-train.tfrecord-{s:05d}-of-00002')
    with tf.io.TFRecordWriter(path) as w:
      for name, label, hw in chunk:
        w.write(features.serialize_example(
            {'image': io.BytesIO(_image(rng, hw, 'JPEG')), 'label': label, 'file_name': name}))
  info.write_to_directory(out)
  labels = str(tmp_path / 'labels')
  rng = np.random.default_rng(3)
  for name, _, _ in names:
    wnid = name.split('_')[0]
    os.makedirs(os.path.join(labels, wnid), exist_ok=True)
    torch.save(_label_tensor(rng, classes=1000), os.path.join(labels, wnid, name[:-5] + '.pt'))
  summary = import_maps.import_labels(labels, 'tfds:imagenet2012', str(tmp_path / 'maps'),
                                      data_dir=str(tmp_path / 'tfds'), log=io.StringIO())
  assert summary.images == 3 and summary.extra == [] and summary.manifest.num_classes == 1000
  records = _records(str(tmp_path / 'maps'))[1]
  assert [r['key'] for r in records] == [n for n, _, _ in names]
  assert [tuple(r['map_box']) for r in records] == [
      tuple(np.float32(CENTRE[(40, 64)])), tuple(np.float32(CENTRE[(64, 40)])), (0, 0, 1, 1)]
  want = torch.load(os.path.join(labels, 'n01443537', 'n01443537_2.pt'))
  np.testing.assert_array_equal(records[1]['topk_idx'], want[1].permute(1, 2, 0).numpy())
  # `show` finds the example and names classes by the TFDS ClassLabel.
  example = show.read_example('tfds:imagenet2012', str(tmp_path / 'maps'), 1,
                              data_dir=str(tmp_path / 'tfds'))
  assert example.key == 'n01443537_2.JPEG' and example.class_names[1] == 'n01443537'
