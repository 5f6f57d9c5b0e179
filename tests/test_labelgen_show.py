"""`python -m labelgen show` (labelgen/show.py): the labels it draws are the training targets."""
import io
import os

import numpy as np
from PIL import Image
import pytest
import torch

from labelgen import __main__ as labelgen_main
from labelgen import import_maps
from labelgen import show
from lvvit_jax.data import sources
from lvvit_jax.token_labeling import token_targets

CLASSES = ('cat', 'dog')
# key -> (height, width); the maps are NFNet-style 18x18 of the 576 centre square.
IMAGES = {'cat/a.jpg': (40, 64), 'cat/b.png': (64, 40), 'dog/c.jpg': (64, 40),
          'dog/d.png': (48, 48)}
CENTRE = {(40, 64): (0.0, 172 / 921, 1.0, 748 / 921), (64, 40): (172 / 921, 0.0, 748 / 921, 1.0),
          (48, 48): (0.0, 0.0, 1.0, 1.0)}
SIZE, GRID = 64, (4, 4)
IDENTITY = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]


@pytest.fixture(scope='module')
def data(tmp_path_factory):
  base = tmp_path_factory.mktemp('show')
  rng = np.random.default_rng(0)
  for key, (h, w) in IMAGES.items():
    path = base / 'toy' / 'train' / key
    os.makedirs(path.parent, exist_ok=True)
    # Left half dark, right half bright: a flip or crop is visible in the image.
    pixels = np.zeros((h, w, 3), np.uint8)
    pixels[:, w // 2:] = 200
    pixels += rng.integers(0, 40, (h, w, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, 'JPEG' if key.endswith('jpg') else 'PNG')
    label = base / 'labels' / (os.path.splitext(key)[0] + '.pt')
    os.makedirs(label.parent, exist_ok=True)
    # Logits that vary over the map, so that the classes drawn depend on the geometry.
    logits = rng.normal(0, 3, (5, 18, 18)) + np.linspace(-4, 4, 18)[None, None, :]
    idx = rng.integers(0, len(CLASSES), (5, 18, 18))
    torch.save(torch.tensor(np.stack([logits, idx]), dtype=torch.float16), label)
  source = sources.write_image_folder_shards(str(base / 'toy' / 'train'), str(base / 'shards'),
                                             num_shards=2, num_workers=1)
  import_maps.import_labels(str(base / 'labels'), str(base / 'shards'), str(base / 'maps'),
                            log=io.StringIO())
  order = [k.decode() for i in range(2)
           for k in source.shard_dataset(i).map(lambda x: x['key']).as_numpy_iterator()]
  return {'base': base, 'shards': str(base / 'shards'), 'maps': str(base / 'maps'),
          'labels': str(base / 'labels'), 'order': order}


def _direct_targets(data, key, affine):
  """token_targets of the .pt tensors themselves (torch.load), with the centre-square box."""
  t = torch.load(os.path.join(data['labels'], os.path.splitext(key)[0] + '.pt'))
  logits = t[0].permute(1, 2, 0).numpy()[None]
  idx = t[1].permute(1, 2, 0).float().numpy()[None]
  box = np.asarray([CENTRE[IMAGES[key]]], np.float32)
  return token_targets(logits, idx, box, np.asarray(affine, np.float32)[None], grid=GRID,
                       num_classes=len(CLASSES))


def _labels(data, index, augmented, seed=0):
  example = show.read_example(data['shards'], data['maps'], index)
  batch = show.make_batch(example, show.view_config(example, SIZE, augmented), seed)
  return example, batch, show.token_labels(batch, grid=GRID, num_classes=len(CLASSES))


def test_drawn_labels_are_the_training_targets(data):
  for index, key in enumerate(data['order']):
    example, batch, labels = _labels(data, index, augmented=False)
    assert example.key == key and example.class_names == list(CLASSES)
    np.testing.assert_allclose(batch['label_affine'][0], IDENTITY, atol=1e-6)  # whole image
    cls, tok = _direct_targets(data, key, IDENTITY)
    np.testing.assert_array_equal(labels.classes, np.argmax(tok[0], -1))
    np.testing.assert_allclose(labels.confidence, np.max(tok[0], -1), atol=1e-6)
    assert labels.cls_class == int(np.argmax(cls[0])) and labels.from_map

  # With the training augmentation, the labels follow the crop/flip/rotation of that draw.
  index = data['order'].index('cat/a.jpg')
  _, batch, labels = _labels(data, index, augmented=True, seed=5)
  affine = batch['label_affine'][0]
  assert np.abs(affine - IDENTITY).max() > 0.05
  cls, tok = _direct_targets(data, 'cat/a.jpg', affine)
  np.testing.assert_array_equal(labels.classes, np.argmax(tok[0], -1))
  np.testing.assert_allclose(labels.confidence, np.max(tok[0], -1), atol=1e-6)


def test_show_writes_a_png(data, tmp_path, capsys):
  out = str(tmp_path / 'eval.png')
  picture = show.show(data['shards'], data['maps'], 1, out, image_size=SIZE, grid=GRID)
  side = show.picture_side(SIZE)
  assert side == 512 and picture.size == (side, side + show.HEADER)
  with Image.open(out) as png:
    assert png.format == 'PNG' and png.size == (side, side + show.HEADER)

  status = labelgen_main.main(['show', '--source', data['shards'], '--shards', data['maps'],
                               '--index', '2', '--out', str(tmp_path / 'aug.png'),
                               '--image-size', str(SIZE), '--augment', '--seed', '3'])
  assert status == 0
  with Image.open(tmp_path / 'aug.png') as png:
    assert png.size == (side, side + show.HEADER)

  capsys.readouterr()
  with pytest.raises(SystemExit) as exit_info:
    labelgen_main.main(['show', '--source', data['shards'], '--shards', data['maps'],
                        '--index', '4', '--out', str(tmp_path / 'none.png')])
  err = capsys.readouterr().err
  assert exit_info.value.code == 2 and '--index 4' in err and len(err.splitlines()) == 1


def test_example_without_a_map_shows_its_plain_label(data):
  labels = str(data['base'] / 'labels_missing')
  os.makedirs(os.path.join(labels, 'cat'))
  os.makedirs(os.path.join(labels, 'dog'))
  for key in IMAGES:
    if key != 'dog/c.jpg':
      src = os.path.join(data['labels'], os.path.splitext(key)[0] + '.pt')
      os.link(src, os.path.join(labels, os.path.splitext(key)[0] + '.pt'))
  maps = str(data['base'] / 'maps_missing')
  import_maps.import_labels(labels, data['shards'], maps, allow_missing=True, log=io.StringIO())
  example = show.read_example(data['shards'], maps, data['order'].index('dog/c.jpg'))
  batch = show.make_batch(example, show.view_config(example, SIZE, False))
  labels = show.token_labels(batch, grid=GRID, num_classes=len(CLASSES))
  assert not labels.from_map and labels.cls_class == CLASSES.index('dog')
  assert (labels.classes == CLASSES.index('dog')).all()
