"""labelgen generate (labelgen/generate.py): a teacher's dense top-k maps as score-map shards.

Tiny random LV-ViTs (one with an aux head, one without, like `vit_s`) saved as converted
checkpoints run over the bundled digits and over a small image folder of non-square JPEG and
PNG images (one of them undecodable). The stored maps are compared with the teacher's logits
computed directly (the head's weights applied in NumPy to `features`) on the same preprocessed
images; the shards are read back by the real input pipeline. A random `nfnet_demo` teacher
(no tokens: its classifier at every position) goes through the same path.
"""
import io
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from configs import labelgen as labelgen_config
from labelgen import __main__ as labelgen_main
from labelgen import generate
from labelgen import import_maps
from labelgen import teacher as teacher_lib
from lvvit_jax import checkpoints
from lvvit_jax.data import augment
from lvvit_jax.data import pipeline
from lvvit_jax.data import score_maps
from lvvit_jax.data import sources
from lvvit_jax.models import create_model

SIZE, GRID, K, CLASSES = 32, 4, 5, 10
TINY = dict(img_size=SIZE, num_classes=CLASSES, depth=1, patch_size=8, dim=48, num_heads=2,
            mlp_hidden=96, stem_channels=16)
# The image folder: (height, width) by key; classes c0..c9 (most of them empty).
FOLDER = {'c0/a.jpg': (40, 64), 'c0/b.png': (64, 40), 'c1/c.jpg': (48, 30),
          'c2/d.png': (33, 50), 'c2/e.jpg': (64, 64)}
BROKEN = 'c1/broken.jpg'
FULL = (0.0, 0.0, 1.0, 1.0)


def _save_teacher(path, seed, **overrides):
  cfg = dict(TINY, **overrides)
  model = create_model('lvvit_t', **cfg)
  variables = model.init({'params': jax.random.key(seed)}, jnp.zeros((1, SIZE, SIZE, 3)))
  checkpoints.save_variables(path, jax.tree.map(np.asarray, variables), 'lvvit_t', cfg)
  return path


@pytest.fixture(scope='module')
def teachers(tmp_path_factory):
  base = tmp_path_factory.mktemp('teachers')
  return {'aux': _save_teacher(str(base / 'aux'), 0),
          'other': _save_teacher(str(base / 'other'), 1),
          'no_aux': _save_teacher(str(base / 'no_aux'), 2, aux_head=False, conv_stem=False)}


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  """Image-folder shards of FOLDER's images plus an undecodable one, in 2 shards."""
  base = tmp_path_factory.mktemp('generate_folder')
  root = base / 'toy' / 'train'
  rng = np.random.default_rng(0)
  for c in range(CLASSES):
    os.makedirs(root / f'c{c}')
  for key, (h, w) in FOLDER.items():
    small = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    Image.fromarray(small).resize((w, h), Image.BICUBIC).save(
        root / key, 'JPEG' if key.endswith('.jpg') else 'PNG')
  (root / BROKEN).write_bytes(b'\xff\xd8 truncated, not a JPEG')
  shards = str(base / 'shards')
  sources.write_image_folder_shards(str(root), shards, num_shards=2, num_workers=1)
  return shards


def _examples(src):
  return [{'key': x['key'].decode(), 'label': int(x['label']), 'encoded': x['encoded']}
          for i in range(len(src.shards)) for x in src.shard_dataset(i).as_numpy_iterator()]


def _preprocessed(encoded, crop, size=SIZE):
  """The teacher's input, straight from the library's eval ops."""
  if crop == 'centre':
    return augment.eval_preprocess(encoded, size, 1.0)['image'].numpy()
  image = augment.resize(augment.decode_rgb(encoded), (size, size), 'bicubic')
  return augment.normalize(image).numpy()


def _direct_logits(checkpoint, images):
  """(B, N, K): the aux head (else the class head) on each patch token, applied in NumPy."""
  variables, described = checkpoints.load_model_variables(checkpoint)
  model = create_model(described['model'], **described['model_config'])
  tokens = np.asarray(model.apply(variables, jnp.asarray(images), method='features'))[:, 1:]
  head = variables['params']['aux_head' if model.config.aux_head else 'head']
  return tokens.astype(np.float64) @ head['kernel'] + head['bias']


def _records(out):
  m = score_maps.read_manifest(out)
  return m, [score_maps.decode_example_np(r) for s in m.shards
             for r in tf.data.TFRecordDataset(os.path.join(out, s.file)).as_numpy_iterator()]


def _assert_topk(record, logits, grid=(GRID, GRID)):
  """The record's (h, w, k) map is jax.lax.top_k of the (N, K) logits, up to float16."""
  want_values, want_idx = jax.lax.top_k(jnp.asarray(logits, jnp.float32), K)
  values = record['topk_logits'].reshape(-1, K).astype(np.float32)
  idx = record['topk_idx'].reshape(-1, K).astype(np.int64)
  assert record['topk_logits'].shape == tuple(grid) + (K,) and record['has_map']
  np.testing.assert_allclose(values, want_values, rtol=1e-3, atol=1e-5)
  # The classes themselves, in order (a near-tie may swap two, so compare their logits too).
  np.testing.assert_allclose(np.take_along_axis(logits, idx, -1), want_values, rtol=0, atol=1e-5)
  assert (idx == np.asarray(want_idx)).mean() >= 0.99


def test_digits_maps_pair_with_the_image_shards_and_feed_the_pipeline(digits_data, teachers,
                                                                      tmp_path):
  src = digits_data['validation']
  out = str(tmp_path / 'maps')
  log = io.StringIO()
  summary = generate.generate(teachers['aux'], 'digits', out, split='validation',
                              data_dir=digits_data['data_dir'], batch_size=8, log=log,
                              progress=False)
  manifest, records = _records(out)
  assert (manifest.grid, manifest.k, manifest.num_classes) == ((GRID, GRID), K, CLASSES)
  t = manifest.teacher
  assert (t['checkpoint'], t['model'], t['size'], t['crop'], t['dtype'], t['ema']) == (
      teachers['aux'], 'lvvit_t', SIZE, 'resize', 'float32', True)
  assert len(t['weights_sha256']) == 64
  assert [s.image_shard for s in manifest.shards] == [s.name for s in src.shards]
  score_maps.pair_shards(out, manifest, [(s.path, s.num_examples) for s in src.shards])
  score_maps.verify_checksums(out, manifest)
  examples = _examples(src)
  assert [(r['key'], r['label']) for r in records] == [(e['key'], e['label']) for e in examples]
  assert all(tuple(r['map_box']) == FULL for r in records)
  assert (summary.images, summary.shards_written, summary.undecodable) == (len(examples), 4, [])
  assert summary.bytes == sum(os.path.getsize(os.path.join(out, s.file)) for s in manifest.shards)

  # Every map is the top-k of the teacher's aux logits on that image; top-1 from the
  # position-averaged logits.
  logits = _direct_logits(teachers['aux'], np.stack([_preprocessed(e['encoded'], 'resize')
                                                     for e in examples]))
  for record, image_logits in zip(records, logits):
    _assert_topk(record, image_logits)
  hits = int((logits.mean(axis=1).argmax(-1) == [e['label'] for e in examples]).sum())
  assert (summary.top1_correct, summary.top1_count) == (hits, len(examples))
  assert f'teacher top-1 {hits / len(examples):.4f} over {len(examples)} images' in log.getvalue()
  assert 'images/s' in log.getvalue() and 'bytes per image' in log.getvalue()

  # The trainer's input pipeline reads them, paired by key (it checks keys and labels itself).
  cfg = pipeline.PipelineConfig(
      source='digits', split='validation', data_dir=digits_data['data_dir'],
      score_maps_dir=out, batch_size=8, image_size=SIZE,
      augment=augment.AugmentConfig(image_size=SIZE), shuffle_buffer=1,
      cycle_length=2, num_parallel_calls=1, include_keys=True, num_epochs=1,
      verify_checksums=True)
  by_key = {r['key']: r for r in records}
  seen = set()
  for batch in pipeline.make_train_iterator(cfg):
    for key, map_logits, map_idx in zip(batch['key'], batch['topk_logits'], batch['topk_idx']):
      key = key.decode()
      seen.add(key)
      np.testing.assert_array_equal(np.asarray(map_logits, np.float32),
                                    by_key[key]['topk_logits'].astype(np.float32))
      np.testing.assert_array_equal(map_idx, by_key[key]['topk_idx'])
  assert seen == set(by_key)


def test_both_crops_match_the_teacher_and_record_the_covered_region(folder, teachers, tmp_path,
                                                                    capsys):
  examples = _examples(sources.get_source(folder))
  good = [e for e in examples if e['key'] != BROKEN]
  for crop in generate.CROPS:
    out = str(tmp_path / crop)
    if crop == 'centre':  # through the command line
      status = labelgen_main.main(['generate', '--teacher', teachers['aux'], '--source', folder,
                                   '--out', out, '--crop', 'centre', '--batch', '4',
                                   '--no-progress'])
      assert status == 0
      err = capsys.readouterr().err
      assert 'teacher top-1' in err
      assert f'1 undecodable images written without a map: {BROKEN}' in err
    else:
      summary = generate.generate(teachers['aux'], folder, out, batch_size=4, log=io.StringIO(),
                                  progress=False)
      assert summary.undecodable == [BROKEN] and summary.top1_count == len(good)
    manifest, records = _records(out)
    assert manifest.teacher['crop'] == crop
    assert [(r['key'], r['label']) for r in records] == [(e['key'], e['label']) for e in examples]
    logits = _direct_logits(teachers['aux'],
                            np.stack([_preprocessed(e['encoded'], crop) for e in good]))
    logits = dict(zip((e['key'] for e in good), logits))
    for r in records:
      if r['key'] == BROKEN:   # kept in place, without a map
        assert not r['has_map'] and not r['topk_logits'].any() and not r['topk_idx'].any()
        continue
      _assert_topk(r, logits[r['key']])
      h, w = FOLDER[r['key']]
      # Resize + centre crop covers torchvision's Resize(size) + CenterCrop(size) region.
      want = import_maps.centre_box(h, w, SIZE) if crop == 'centre' else FULL
      np.testing.assert_allclose(r['map_box'], want, rtol=0, atol=2e-7)
      assert (tuple(r['map_box']) == FULL) == (crop == 'resize' or h == w)


def test_a_model_without_aux_head_gets_its_class_head_at_every_token(folder, teachers,
                                                                     tmp_path):
  out = str(tmp_path / 'maps')
  summary = generate.generate(teachers['no_aux'], folder, out, crop='centre', batch_size=4,
                              log=io.StringIO(), progress=False)
  manifest, records = _records(out)
  assert manifest.grid == (GRID, GRID)
  good = [e for e in _examples(sources.get_source(folder)) if e['key'] != BROKEN]
  logits = _direct_logits(teachers['no_aux'],
                          np.stack([_preprocessed(e['encoded'], 'centre') for e in good]))
  by_key = {r['key']: r for r in records}
  for e, image_logits in zip(good, logits):
    _assert_topk(by_key[e['key']], image_logits)
  hits = int((logits.mean(axis=1).argmax(-1) == [e['label'] for e in good]).sum())
  assert (summary.top1_correct, summary.top1_count) == (hits, len(good))


def test_rerun_keeps_finished_shards_and_redoes_them_for_another_teacher(digits_data, teachers,
                                                                         tmp_path):
  out = str(tmp_path / 'maps')
  kw = dict(split='validation', data_dir=digits_data['data_dir'], batch_size=8, progress=False)

  def run(teacher='aux', **more):
    return generate.generate(teachers[teacher], 'digits', out, log=io.StringIO(), **kw, **more)

  first = run()
  manifest_path = os.path.join(out, score_maps.MANIFEST_NAME)
  manifest_json = json.load(open(manifest_path))
  paths = [os.path.join(out, s.file) for s in first.manifest.shards]
  mtimes = [os.stat(p).st_mtime_ns for p in paths]

  again = run()   # nothing to do: no shard is written
  assert (again.shards_kept, again.shards_written, again.images_computed) == (4, 0, 0)
  assert again.top1 is None and again.images == first.images
  assert [os.stat(p).st_mtime_ns for p in paths] == mtimes
  assert json.load(open(manifest_path)) == manifest_json

  os.remove(paths[2])   # an interrupted run: only the lost shard is redone, identically
  third = run()
  assert (third.shards_kept, third.shards_written, third.images_computed) == (3, 1, 90)
  assert [os.stat(p).st_mtime_ns for i, p in enumerate(paths) if i != 2] == (
      mtimes[:2] + mtimes[3:])
  assert json.load(open(manifest_path)) == manifest_json

  bigger = run(size=48)   # another input size: every shard is redone, on a 6x6 grid
  assert (bigger.shards_kept, bigger.shards_written) == (0, 4)
  manifest, records = _records(out)
  assert manifest.grid == (6, 6) and manifest.teacher['checkpoint_size'] == SIZE
  assert all(r['topk_logits'].shape == (6, 6, K) for r in records)

  run()   # back to the first settings, then another teacher: everything is redone again
  other = run('other')
  assert (other.shards_kept, other.shards_written) == (0, 4)
  assert score_maps.read_manifest(out).teacher['checkpoint'] == teachers['other']


def test_config_mode_and_clear_errors(digits_data, teachers, tmp_path, capsys):
  config = labelgen_config.get_config('runlocal')
  assert config.mode == 'labelgen'
  with config.unlocked():
    config.teacher = teachers['aux']
    config.data.data_dir = digits_data['data_dir']
    config.batch_size = 8
  workdir = str(tmp_path / 'work')
  summary = generate.generate_from_config(config, workdir)
  written = score_maps.read_manifest(os.path.join(workdir, 'score_maps'))
  assert written == summary.manifest and written.split == 'validation'
  assert summary.images == digits_data['validation'].num_examples

  kw = dict(split='validation', data_dir=digits_data['data_dir'], log=io.StringIO(),
            progress=False)
  out = str(tmp_path / 'bad')
  with pytest.raises(generate.GenerateError, match='--batch 6 must be a positive multiple of '
                     'the 4 local devices'):
    generate.generate(teachers['aux'], 'digits', out, batch_size=6, **kw)
  with pytest.raises(generate.GenerateError, match=r'--k 11 must lie in \[1, 10\]'):
    generate.generate(teachers['aux'], 'digits', out, k=11, batch_size=8, **kw)
  with pytest.raises(generate.GenerateError, match='--size 36 does not fit the teacher lvvit_t'
                     '.* img_size 36 is not a multiple of the patch size 8; use e.g. '
                     'img_size=32'):
    generate.generate(teachers['aux'], 'digits', out, size=36, batch_size=8, **kw)
  seven = _save_teacher(str(tmp_path / 'seven'), 3, num_classes=7)
  capsys.readouterr()
  with pytest.raises(SystemExit) as exit_info:
    labelgen_main.main(['generate', '--teacher', seven, '--source', 'digits', '--split',
                        'validation', '--data-dir', digits_data['data_dir'], '--out', out,
                        '--batch', '8', '--no-progress'])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert 'has 7 classes but digits (validation) has 10' in err and len(err.splitlines()) == 1
  assert not os.path.exists(os.path.join(out, score_maps.MANIFEST_NAME))


def test_a_bad_teacher_path_is_one_line_and_exit_status_2(tmp_path):
  missing = str(tmp_path / 'no_such_checkpoint')
  out = subprocess.run(
      [sys.executable, '-m', 'labelgen', 'generate', '--teacher', missing, '--source', 'digits',
       '--data-dir', str(tmp_path / 'data'), '--out', str(tmp_path / 'maps'), '--no-progress'],
      capture_output=True, text=True, timeout=300,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2'))
  assert out.returncode == 2, out.stderr[-2000:]
  errors = [line for line in out.stderr.splitlines() if 'error' in line.lower()]
  assert errors == [line for line in out.stderr.splitlines() if line.strip()][-1:], out.stderr
  assert errors[0].startswith('python -m labelgen generate: error: ') and missing in errors[0]
  assert 'Traceback' not in out.stderr and not os.path.exists(tmp_path / 'data')


def test_an_nfnet_teacher_writes_its_classifier_at_every_position(digits_data, tmp_path):
  """A random `nfnet_demo` at 64 px: maps of its `config.grid` that the pipeline reads."""
  model = create_model('nfnet_demo', img_size=64, num_classes=CLASSES)
  # Random values of the right shapes (compiling the model's own init costs a minute on CPU).
  shapes = jax.eval_shape(lambda: model.init({'params': jax.random.key(0)},
                                             jnp.zeros((1, 64, 64, 3))))
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda s: rng.normal(0, 0.3, s.shape).astype(s.dtype), shapes)
  teacher = checkpoints.save_variables(str(tmp_path / 'nfnet'), variables, 'nfnet_demo',
                                       {'num_classes': CLASSES, 'img_size': 64})
  out = str(tmp_path / 'maps')
  summary = generate.generate(teacher, 'digits:64', out, split='validation',
                              data_dir=digits_data['data_dir'], crop='centre', batch_size=8,
                              log=io.StringIO(), progress=False)
  manifest, records = _records(out)
  grid = model.config.grid
  assert manifest.grid == grid == (8, 8) and manifest.k == K
  t = manifest.teacher
  assert (t['model'], t['size'], t['crop'], t['dtype']) == ('nfnet_demo', 64, 'centre', 'float32')
  examples = _examples(digits_data['validation'])
  assert [r['key'] for r in records] == [e['key'] for e in examples]
  assert summary.undecodable == [] and all(tuple(r['map_box']) == FULL for r in records)

  # Each map is the top-k of `dense_logits` on the same preprocessed image (a few dozen here).
  some = range(0, len(examples), 10)
  images = np.stack([_preprocessed(examples[i]['encoded'], 'centre', 64) for i in some])
  dense = np.asarray(jax.jit(lambda v, x: model.apply(v, x, method='dense_logits'))(
      variables, jnp.asarray(images)))
  assert dense.shape == (len(some),) + grid + (CLASSES,)
  for i, image_logits in zip(some, dense):
    _assert_topk(records[i], image_logits.reshape(-1, CLASSES), grid)

  cfg = pipeline.PipelineConfig(
      source='digits:64', split='validation', data_dir=digits_data['data_dir'],
      score_maps_dir=out, batch_size=8, image_size=64,
      augment=augment.AugmentConfig(image_size=64), shuffle_buffer=1, cycle_length=2,
      num_parallel_calls=1, include_keys=True, num_epochs=1)
  by_key = {r['key']: r for r in records}
  batch = next(iter(pipeline.make_train_iterator(cfg)))
  assert batch['topk_logits'].shape == (8,) + grid + (K,)
  for key, map_idx in zip(batch['key'], batch['topk_idx']):
    np.testing.assert_array_equal(map_idx, by_key[key.decode()]['topk_idx'])


def test_stitch_shifts_put_cells_on_a_finer_grid():
  """Shift and stitch: fine cell m of a stride-s map is centred at (m + 1/2) s / n."""
  class Pool:  # A stand-in teacher of stride 8: its 'dense logits' are 8x8 means of channel 0.
    config = type('Config', (), {'img_size': SIZE, 'grid': (GRID, GRID)})

    @staticmethod
    def apply(variables, images, method):
      assert method == 'dense_logits'
      b = images.shape[0]
      return images[..., :1].reshape(b, GRID, 8, GRID, 8, 1).mean(axis=(2, 4))

  assert teacher_lib.stitch_shifts(Pool, 2) == ((-2, 2), (-2, 2))
  assert teacher_lib.stitch_shifts(Pool, 4) == ((-3, -1, 1, 3),) * 2
  assert teacher_lib.stitch_shifts(Pool, 1) == ((0,), (0,))
  for bad in (3, 0):
    with pytest.raises(generate.GenerateError, match='--stitch'):
      teacher_lib.stitch_shifts(Pool, bad)

  centre = np.broadcast_to((np.arange(SIZE) + 0.5)[:, None], (SIZE, SIZE))
  by_row = np.repeat(centre[None, :, :, None], 3, -1).astype(np.float32)  # a pixel: its row
  by_col = by_row.transpose(0, 2, 1, 3).copy()                             # ... its column
  for n in (1, 2, 4):
    rows = np.asarray(teacher_lib.stitched_dense_logits(Pool, None, jnp.asarray(by_row), n))
    cols = np.asarray(teacher_lib.stitched_dense_logits(Pool, None, jnp.asarray(by_col), n))
    assert rows.shape == (1, GRID * n, GRID * n, 1)
    want = (np.arange(GRID * n) + 0.5) * 8 / n
    inner = slice(n, GRID * n - n)  # border cells see repeated edge pixels
    np.testing.assert_allclose(rows[0, inner, :, 0], np.broadcast_to(want[inner, None],
                                                                     (GRID * n - 2 * n, GRID * n)))
    np.testing.assert_allclose(cols[0, :, inner, 0], np.broadcast_to(want[None, inner],
                                                                     (GRID * n, GRID * n - 2 * n)))


def test_stitched_maps_are_the_teacher_on_shifted_copies(folder, teachers, tmp_path):
  """--stitch 2: a 2x finer map whose cell (2i + a, 2j + c) is token (i, j) of the teacher on
  the image moved by (shifts[a], shifts[c]) pixels, edges repeated; the manifest records it."""
  out = str(tmp_path / 'maps')
  generate.generate(teachers['aux'], folder, out, crop='resize', batch_size=4, stitch=2,
                    log=io.StringIO(), progress=False)
  manifest, records = _records(out)
  assert manifest.grid == (2 * GRID, 2 * GRID) and manifest.teacher['stitch'] == 2
  good = [e for e in _examples(sources.get_source(folder)) if e['key'] != BROKEN]
  images = np.stack([_preprocessed(e['encoded'], 'resize') for e in good])
  padded = np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)), mode='edge')
  fine = np.zeros((len(good), 2 * GRID, 2 * GRID, CLASSES))
  for a, dy in enumerate((-2, 2)):
    for c, dx in enumerate((-2, 2)):
      moved = padded[:, 2 + dy:2 + dy + SIZE, 2 + dx:2 + dx + SIZE]
      fine[:, a::2, c::2] = _direct_logits(teachers['aux'], moved).reshape(
          len(good), GRID, GRID, CLASSES)
  by_key = {r['key']: r for r in records}
  for e, image_logits in zip(good, fine):
    _assert_topk(by_key[e['key']], image_logits.reshape(-1, CLASSES), (2 * GRID, 2 * GRID))
  with pytest.raises(generate.GenerateError, match='--stitch 3'):
    generate.generate(teachers['aux'], folder, str(tmp_path / 'bad'), stitch=3,
                      log=io.StringIO(), progress=False)
  assert not os.path.exists(tmp_path / 'bad')
