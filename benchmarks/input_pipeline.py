"""Input throughput on the CPU (host train path vs the PIL loader), and device augmentation's cost.

    python -m benchmarks.input_pipeline                      # prints the table
    python -m benchmarks.input_pipeline --out benchmarks/results/input_pipeline_cpu.txt

Images: crops of the two photos `sklearn.datasets.load_sample_images()` ships (640x427), about
500x375 (a quarter of them turned to 375x500), saved as JPEG quality 90: real photo content,
ImageNet's typical size. They are written as TFRecord shards
(`sources.write_image_folder_shards`) with synthetic 18x18x5 score maps (`score_maps`).

Host rows (images per CPU-second of the whole process is the per-core figure; it is less
sensitive than wall time to other load on the machine):
- `train host path`: `pipeline.make_train_iterator` with score maps: read and pair the shards,
  fused decode + random-resized crop, the default resize to uint8 (`resize='area'`: the area
  filter where the crop shrinks), the crop's `label_affine`, `aug_seed`, shuffled and batched:
  everything the host does for training; again with `AugmentConfig(resize='pil')` (PIL's
  filters to one grey level, as the PyTorch loader) and `resize='plain'` (TensorFlow's plain
  kernels: aliased when shrinking);
- `PIL reference`: `benchmarks/pil_augment.py`, the full augmentation (decode, random-resized
  crop, resize, flip, RandAugment m9-mstd0.5 x2, to float, normalisation, erasing) with PIL +
  NumPy as the original PyTorch loader runs it in each worker (file read included);
- `decode only`: the same shards read and decoded whole (tf.io.decode_jpeg), nothing else: the
  ceiling of any train path that decodes every image;
- `bare`: read, fused decode + crop, `area_resize`, batch, without score maps, shuffling or the
  position bookkeeping of resume and corrupt-image checks: the floor of a tf.data train path;
- `eval`: `pipeline.make_eval_iterator` (decode, PIL-exact bicubic resize of the centre crop).
tf.data runs with one thread (a private thread pool of 1, every stage sequential; prefetching
and the consumer still take a little of another core), then with all cores (AUTOTUNE). The
first batch (tracing, filling the shuffle buffer) is not timed; each figure is the best of
`--repeats` runs of `--timed` images. The budget line says how much host time per image the 2x
target leaves besides decoding (decode-only row), which no train path can avoid.

Resize quality: PSNR of each resize mode against PIL's Lanczos resize of the same crops (the
benchmark's photos, the train crop boxes, those that shrink), the figure behind the choice of
`AugmentConfig.resize`.

Device rows: `lvvit_jax.augment.augment_batch` (flip, RandAugment, normalisation, erasing, the
affine) jitted at `--device-batch` x 224, against the trainer's real update step
(`train.make_update_step` + `jit_update_step`: token targets from 18x18x5 maps, MixToken,
forward, backward, AdamW, EMA) of lvvit_s on float images without augmentation, timed at
`--step-batch` and scaled linearly to `--device-batch` (the step's cost is linear in the batch on
a CPU; a batch-128 lvvit_s step would take minutes here). Their ratio is the share of the
training step the augmentation adds. On an accelerator, run the same on it.
"""
import argparse
import dataclasses
import io
import os
import shutil
import tempfile
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

# pylint: disable=g-import-not-at-top,wrong-import-position
import lvvit_jax  # noqa: F401  (before TensorFlow: its CPU-kernel default, as in training)
import numpy as np
from PIL import Image
import tensorflow as tf

from benchmarks import pil_augment
from benchmarks.device import cpu_name
from benchmarks.device import device_line
from lvvit_jax.data import augment
from lvvit_jax.data import pairs
from lvvit_jax.data import pipeline
from lvvit_jax.data import resize as resize_lib
from lvvit_jax.data import score_maps
from lvvit_jax.data import sources


def photo_crops(num_images: int, seed: int = 0, size=(375, 500), quality: int = 90):
  """`num_images` JPEG bytes: random crops of sklearn's sample photos (every 4th portrait)."""
  from sklearn.datasets import load_sample_images  # the photos ship with scikit-learn
  photos = load_sample_images().images
  rng = np.random.default_rng(seed)
  out = []
  for i in range(num_images):
    photo = photos[i % len(photos)]
    h, w = min(size[0], photo.shape[0]), min(size[1], photo.shape[1])
    y = rng.integers(0, photo.shape[0] - h + 1)
    x = rng.integers(0, photo.shape[1] - w + 1)
    crop = photo[y:y + h, x:x + w]
    if rng.random() < 0.5:
      crop = crop[:, ::-1]
    if i % 4 == 3:
      crop = np.rot90(crop)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(crop)).save(buf, 'JPEG', quality=quality)
    out.append(buf.getvalue())
  return out


def write_image_folder(root: str, encoded, num_classes: int = 8):
  for i, data in enumerate(encoded):
    folder = os.path.join(root, f'class{i % num_classes:02d}')
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f'img{i:05d}.jpg'), 'wb') as f:
      f.write(data)


def write_score_maps(source: sources.ImageSource, out_dir: str, grid=(18, 18), k: int = 5):
  rng = np.random.default_rng(0)
  infos = []
  for i, shard in enumerate(source.shards):
    with score_maps.ShardWriter(out_dir, shard.path) as w:
      for ex in source.shard_dataset(i).as_numpy_iterator():
        logits = rng.normal(0, 3, grid + (k,)).astype(np.float16)
        idx = rng.integers(0, 1000, grid + (k,)).astype(np.int16)
        w.write(ex['key'], logits, idx, int(ex['label']))
    infos.append(w.info)
  score_maps.write_manifest(out_dir, score_maps.Manifest(
      dataset=source.name, version=source.version, split=source.split, grid=grid, k=k,
      num_classes=1000, teacher={'model': 'synthetic'}, shards=tuple(infos)))


def time_batches(batches, num_images: int, batch: int, repeats: int):
  """Best (images/s wall, images per CPU-second) of `repeats` runs, after the first batch."""
  it = iter(batches)
  next(it)
  best = (0.0, 0.0)
  for _ in range(repeats):
    n, wall0, cpu0 = 0, time.perf_counter(), time.process_time()
    while n < num_images:
      next(it)
      n += batch
    rate = (n / (time.perf_counter() - wall0), n / (time.process_time() - cpu0))
    best = max(best, rate, key=lambda r: r[1])
  return best


def _map_records(source: sources.ImageSource, cfg: pipeline.PipelineConfig,
                 fn) -> tf.data.Dataset:
  """The shards' records, repeated and numbered, `fn(index, record)` mapped, batched, with the
  pipeline's threading."""
  ds = tf.data.TFRecordDataset([s.path for s in source.shards]).repeat().enumerate()
  ds = ds.map(fn, num_parallel_calls=pairs.parallel_calls(cfg.num_parallel_calls))
  ds = ds.batch(cfg.batch_size).prefetch(cfg.prefetch)
  return ds.with_options(pipeline.dataset_options(cfg))


def decode_only(source: sources.ImageSource, cfg: pipeline.PipelineConfig) -> tf.data.Dataset:
  """The shards read, parsed and decoded whole; a corner pixel of each is batched, so that
  nothing but reading and decoding is timed."""
  def decode(_, record):
    return tf.io.decode_jpeg(source.parse(record, '', 0)['encoded'], channels=3)[0, 0]
  return _map_records(source, cfg, decode)


def bare_train(source: sources.ImageSource, cfg: pipeline.PipelineConfig) -> tf.data.Dataset:
  """The least a train path does: the shards read and parsed, fused decode + random-resized
  crop, `area_resize`, batched; no score maps, shuffling or position bookkeeping (resume,
  corrupt-image checks). Its rate bounds what tf.data can reach here with a fast resize."""
  size = (cfg.image_size, cfg.image_size)

  def prepare(index, record):
    crop = augment.decode_and_random_crop(source.parse(record, '', 0)['encoded'],
                                          tf.stack([index, index]))[0]
    return resize_lib.area_resize(crop, size)
  return _map_records(source, cfg, prepare)


def time_pil(files, num_images: int, image_size: int, repeats: int):
  """Best (images/s, images per CPU-second) of the PIL loop, file reads included."""
  aug = pil_augment.PilTrainAugment(image_size=image_size, seed=0)
  for path in files[:4]:  # warm-up
    with open(path, 'rb') as f:
      aug(f.read())
  best = (0.0, 0.0)
  for _ in range(repeats):
    n, wall0, cpu0 = 0, time.perf_counter(), time.process_time()
    while n < num_images:
      with open(files[n % len(files)], 'rb') as f:
        aug(f.read())
      n += 1
    rate = (n / (time.perf_counter() - wall0), n / (time.process_time() - cpu0))
    best = max(best, rate, key=lambda r: r[1])
  return best


def _cycle(eval_iterator):
  while True:
    yield from eval_iterator


def host_rows(args, cores: int):
  """(rows, notes) of the host measurements; rows are (name, threads, images/s, per CPU-s)."""
  tmp = tempfile.mkdtemp(prefix='lvvit_input_bench_')
  try:
    root, shards, maps = (os.path.join(tmp, n) for n in ('images/train', 'shards', 'maps'))
    encoded = photo_crops(args.num_images)
    write_image_folder(root, encoded)
    source = sources.write_image_folder_shards(root, shards, num_shards=8)
    write_score_maps(source, maps)
    files = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(root) for f in fs)
    base = pipeline.PipelineConfig(
        source=shards, score_maps_dir=maps, batch_size=args.batch, image_size=args.image_size,
        crop_pct=0.9, shuffle_buffer=1024, cycle_length=8)
    timed = lambda batches: time_batches(batches, args.timed, args.batch, args.repeats)  # noqa
    rows = {}
    for threads in (1, cores):
      cfg = dataclasses.replace(base, threadpool_size=threads,
                                num_parallel_calls=threads if threads == 1 else -1)
      rows['train', threads] = timed(pipeline.make_train_iterator(cfg))
      if threads == 1:
        for mode in ('pil', 'plain'):
          aug = augment.AugmentConfig(image_size=args.image_size, resize=mode)
          rows[mode, 1] = timed(pipeline.make_train_iterator(
              dataclasses.replace(cfg, augment=aug)))
        rows['ref', 1] = time_pil(files, args.timed, args.image_size, args.repeats)
        rows['decode', 1] = timed(decode_only(source, cfg))
        rows['bare', 1] = timed(bare_train(source, cfg))
      ev = pipeline.make_eval_iterator(dataclasses.replace(cfg, score_maps_dir=None))
      rows['eval', threads] = timed(_cycle(ev))
    kb = float(np.mean([len(e) for e in encoded])) / 1024
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return rows, kb, resize_quality(encoded[:args.quality_images], args.image_size)


def resize_quality(encoded, image_size: int):
  """{mode name: mean PSNR (dB) against PIL's Lanczos} over the train crops that shrink."""
  size = (image_size, image_size)
  modes = {
      'pil bilinear': lambda c: resize_lib.resize_uint8(c, size, 'bilinear'),
      'pil bicubic': lambda c: resize_lib.resize_uint8(c, size, 'bicubic'),
      'area': lambda c: resize_lib.area_resize(c, size),
      'plain bilinear': lambda c: resize_lib.resize_uint8(c, size, 'bilinear', antialias=False),
      'plain bicubic': lambda c: resize_lib.resize_uint8(c, size, 'bicubic', antialias=False)}
  psnr = {name: [] for name in modes}
  for i, data in enumerate(encoded):
    crop = augment.decode_and_random_crop(tf.constant(data), tf.constant([i, 0], tf.int64))[0]
    if min(crop.shape[:2]) <= image_size:
      continue
    ref = np.asarray(Image.fromarray(crop.numpy()).resize(size, Image.LANCZOS), np.float64)
    for name, fn in modes.items():
      mse = np.mean((fn(crop).numpy() - ref) ** 2)
      psnr[name].append(10 * np.log10(255**2 / mse))
  return {name: (float(np.mean(v)), len(v)) for name, v in psnr.items()}


def device_rows(args):
  """(augment_batch seconds at device_batch, update-step seconds at step_batch) on JAX's device."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from benchmarks.model_step import time_fn  # pylint: disable=g-import-not-at-top
  from configs import lvvit as lvvit_config  # pylint: disable=g-import-not-at-top
  from lvvit_jax import augment as device_augment  # pylint: disable=g-import-not-at-top
  from lvvit_jax import sharding  # pylint: disable=g-import-not-at-top
  from lvvit_jax import train  # pylint: disable=g-import-not-at-top

  config = lvvit_config.get_config(f'variant={args.model[len("lvvit_"):]}')
  config.img_size = args.image_size
  rng = np.random.default_rng(0)
  size, b = args.image_size, args.device_batch
  mesh = sharding.make_mesh()
  aug = jax.jit(device_augment.augment_batch, static_argnames=('cfg', 'dtype'))
  cfg = train.device_augment_config(config)
  images = rng.integers(0, 256, (b, size, size, 3)).astype(np.uint8)
  seeds = rng.integers(0, 2**32, (b, 2), dtype=np.uint64).astype(np.uint32)
  affines = np.tile(np.float32([[1, 0, 0], [0, 1, 0]]), (b, 1, 1))
  dev_args = [sharding.host_to_global({'x': x}, mesh)['x'] for x in (images, seeds, affines)]
  t_aug = time_fn(lambda *a: aug(*a, cfg=cfg), dev_args, args.steps, 1)

  model = train.build_model(config)
  schedule, _ = train.make_schedule(config, 1000)
  key = jax.random.key(0)
  params = jax.eval_shape(lambda r: model.init({'params': r}, jnp.zeros((1, size, size, 3))),
                          key)['params']
  tx = train.make_optimizer(config, params, schedule)
  abstract = jax.eval_shape(lambda r: train.init_train_state(model, tx, r), key)
  shardings = train.state_shardings(abstract, mesh, config.mesh.fsdp_min_size)
  state = jax.jit(lambda r: train.init_train_state(model, tx, r), out_shardings=shardings)(key)
  step = train.jit_update_step(train.make_update_step(
      model, tx, schedule, train.objective_config(config), ema_decay=config.ema_decay),
      shardings, mesh)
  sb = args.step_batch
  batch = sharding.host_to_global({
      'image': rng.normal(size=(sb, size, size, 3)).astype(np.float32),
      'label': rng.integers(0, config.num_classes, sb).astype(np.int32),
      'label_affine': affines[:1].repeat(sb, 0),
      'topk_logits': rng.normal(0, 3, (sb, 18, 18, 5)).astype(np.float16),
      'topk_idx': rng.integers(0, config.num_classes, (sb, 18, 18, 5)).astype(np.int32),
      'map_box': np.tile(np.float32([0, 0, 1, 1]), (sb, 1))}, mesh)
  holder = {'state': state}

  def run():
    holder['state'], metrics = step(holder['state'], batch, key)
    return metrics

  t_step = time_fn(run, (), args.steps, 1)
  return t_aug, t_step, device_line(), config.model


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--num-images', type=int, default=256, help='images generated')
  p.add_argument('--timed', type=int, default=768, help='images timed per measurement')
  p.add_argument('--image-size', type=int, default=224)
  p.add_argument('--batch', type=int, default=32, help='host batch')
  p.add_argument('--repeats', type=int, default=3, help='timed runs; the best is reported')
  p.add_argument('--quality-images', type=int, default=64, help='images of the PSNR figures')
  p.add_argument('--model', default='lvvit_s', help='the model whose train step is the yardstick')
  p.add_argument('--device-batch', type=int, default=128, help='batch of the device rows')
  p.add_argument('--step-batch', type=int, default=8,
                 help='batch the update step is timed at (scaled to --device-batch)')
  p.add_argument('--steps', type=int, default=3, help='timed device runs (median)')
  p.add_argument('--out', default=None, help='also write the table to this file')
  args = p.parse_args()

  cores = os.cpu_count() or 1
  rows, kb, quality = host_rows(args, cores)
  t_aug, t_step, device, model = device_rows(args)

  ratio = lambda a, b: rows[a][1] / rows[b][1]  # noqa: E731  per CPU-second
  lines = [
      f'host: {cpu_name()} | tensorflow '
      f'{tf.__version__} | {args.num_images} JPEGs: crops of sklearn sample photos, ~500x375 '
      f'q90, mean {kb:.0f} KB | output {args.image_size}px, batch {args.batch}',
      f'{"host (tf.data unless PIL)":44s} {"threads":>7s} {"images/s":>9s} '
      f'{"images/CPU-s (per core)":>24s}']
  names = {'train': 'train host path + score maps', 'ref': 'train, PIL reference (full aug.)',
           'pil': "  the same, resize='pil' (PIL-exact)",
           'plain': "  the same, resize='plain' (aliases)",
           'decode': 'decode only, same files (ceiling)', 'eval': 'eval (resize, centre crop)',
           'bare': 'bare: decode + crop + area resize, no maps'}
  order = ('train', 'pil', 'plain', 'ref', 'decode', 'bare', 'eval')
  for (name, threads), (wall, cpu) in sorted(rows.items(),
                                             key=lambda r: (r[0][1], order.index(r[0][0]))):
    lines.append(f'{names[name]:44s} {threads:7d} {wall:9.1f} {cpu:24.1f}')
  ms = lambda name: 1e3 / rows[name, 1][1]  # noqa: E731  CPU-ms per image, one thread
  lines += [
      f'train host path / PIL reference, per CPU-second, one thread: '
      f'{ratio(("train", 1), ("ref", 1)):.2f}x (target >= 2x); resize=\'pil\': '
      f'{ratio(("pil", 1), ("ref", 1)):.2f}x; resize=\'plain\': '
      f'{ratio(("plain", 1), ("ref", 1)):.2f}x',
      f'train host path / decode only, per CPU-second, one thread: '
      f'{ratio(("train", 1), ("decode", 1)):.2f}',
      f'budget: PIL reference {ms("ref"):.2f} CPU-ms per image, decode only {ms("decode"):.2f}; '
      f'2x leaves {ms("ref") / 2 - ms("decode"):.2f} ms per image besides decoding, the train '
      f'path spends {ms("train") - ms("decode"):.2f} (pil {ms("pil") - ms("decode"):.2f}, '
      f'plain {ms("plain") - ms("decode"):.2f}, bare {ms("bare") - ms("decode"):.2f})',
      'resize quality, PSNR against PIL\'s Lanczos over the shrinking train crops of the first '
      f'{args.quality_images} images (n={next(iter(quality.values()))[1]}): ' + ', '.join(
          f'{name} {db:.1f} dB' for name, (db, _) in quality.items()),
      f'device: {device} | {model} @{args.image_size}',
      f'augment_batch (flip, RandAugment, normalise, erase), batch {args.device_batch}: '
      f'{t_aug * 1e3:.0f} ms',
      f'{model} update step, batch {args.step_batch}: {t_step * 1e3:.0f} ms; scaled linearly '
      f'to batch {args.device_batch}: {t_step * args.device_batch / args.step_batch * 1e3:.0f} ms',
      f'device augmentation = {100 * t_aug / (t_step * args.device_batch / args.step_batch):.2f}% '
      f'of the {model} training step at batch {args.device_batch} (target <= 3%)']
  text = '\n'.join(lines)
  print(text)
  if args.out:
    with open(args.out, 'w') as f:
      f.write(text + '\n')


if __name__ == '__main__':
  main()
