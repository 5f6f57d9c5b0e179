"""Input-pipeline throughput on the CPU: images/s per core, train (with score maps) and eval.

    python benchmarks/input_pipeline.py                      # 256 images, prints a table
    python benchmarks/input_pipeline.py --out benchmarks/results/input_pipeline_cpu.txt

Generates an ImageFolder of JPEGs of ImageNet-like size (500x375 and 375x500, quality 90,
textured so that they compress like photos, ~90 KB each), writes it as TFRecord shards
(`sources.write_image_folder_shards`) with synthetic 18x18x5 score maps (`score_maps`), then
times:

- `train`: `pipeline.make_train_iterator`, the full recipe (fused decode + random-resized crop,
  resize, flip, RandAugment m9-mstd0.5 x2, erasing, normalisation, label affine) joined with
  the score maps, batched;
- `train_preprocess alone`: the same augmentation mapped over in-memory bytes, without
  shards, score maps, shuffling or checks (the cost of the plumbing is the difference);
- `eval`: `pipeline.make_eval_iterator` (decode, bicubic resize, centre crop, normalise);
- `pil train`: `benchmarks/pil_augment.py`, the same augmentation with PIL + NumPy as the
  original PyTorch loader runs it in each worker (file read included), one process.

tf.data runs twice: with one thread for the work (a private thread pool of 1, every stage
sequential; prefetching and the consumer still take a little of another core) and with all
cores (AUTOTUNE). Two figures per row: wall-clock images/s, and images per CPU-second of the
whole process, which is the per-core throughput (and less sensitive to other load on the
machine than wall time).
The first batch (tracing the graphs, filling the shuffle buffer) is not timed; each figure is
the best of `--repeats` runs of `--timed` images.
"""
import argparse
import dataclasses
import io
import os
import platform
import shutil
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import pil_augment  # pylint: disable=g-import-not-at-top,wrong-import-position
import tensorflow as tf  # pylint: disable=g-import-not-at-top,wrong-import-position

from lvvit_jax.data import augment  # pylint: disable=g-import-not-at-top,wrong-import-position
from lvvit_jax.data import pipeline  # pylint: disable=g-import-not-at-top,wrong-import-position
from lvvit_jax.data import score_maps  # pylint: disable=g-import-not-at-top,wrong-import-position
from lvvit_jax.data import sources  # pylint: disable=g-import-not-at-top,wrong-import-position


def photo_like(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
  """Smooth colour fields plus fine texture: compresses like a photo at quality 90."""
  coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
  base = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), np.float32)
  mid = rng.normal(0, 1, (h // 8, w // 8, 3)).astype(np.float32)
  mid = np.asarray(Image.fromarray(((mid * 40) + 128).clip(0, 255).astype(np.uint8))
                   .resize((w, h), Image.BILINEAR), np.float32) - 128
  fine = rng.normal(0, 14, (h, w, 3))
  return (base + mid + fine).clip(0, 255).astype(np.uint8)


def make_jpegs(root: str, num_images: int, num_classes: int = 8, seed: int = 0) -> float:
  """Writes num_images JPEGs into root/<class>/; returns their mean size in KB."""
  rng = np.random.default_rng(seed)
  sizes = []
  for i in range(num_images):
    h, w = (375, 500) if i % 4 else (500, 375)
    d = os.path.join(root, f'class{i % num_classes:02d}')
    os.makedirs(d, exist_ok=True)
    buf = io.BytesIO()
    Image.fromarray(photo_like(rng, h, w)).save(buf, 'JPEG', quality=90)
    with open(os.path.join(d, f'img{i:05d}.jpg'), 'wb') as f:
      f.write(buf.getvalue())
    sizes.append(len(buf.getvalue()))
  return float(np.mean(sizes)) / 1024


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
    best = max(best, rate)
  return best


def augment_only(files, cfg: pipeline.PipelineConfig) -> tf.data.Dataset:
  """`augment.train_preprocess` alone over in-memory bytes: the cost without the plumbing."""
  encoded = []
  for path in files:
    with open(path, 'rb') as f:
      encoded.append(f.read())
  aug_cfg = cfg.augment

  def fn(i, e):
    return augment.train_preprocess(e, tf.stack([i, i]), aug_cfg)['image']
  ds = tf.data.Dataset.from_tensor_slices(encoded).repeat().enumerate()
  par = None if cfg.num_parallel_calls == 1 else cfg.num_parallel_calls
  ds = ds.map(fn, num_parallel_calls=par).batch(cfg.batch_size)
  options = tf.data.Options()
  options.threading.private_threadpool_size = cfg.threadpool_size
  options.threading.max_intra_op_parallelism = 1
  return ds.prefetch(2).with_options(options)


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
    best = max(best, (n / (time.perf_counter() - wall0), n / (time.process_time() - cpu0)))
  return best


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--num-images', type=int, default=256, help='images generated')
  p.add_argument('--timed', type=int, default=384, help='images timed per measurement')
  p.add_argument('--image-size', type=int, default=224)
  p.add_argument('--batch', type=int, default=32)
  p.add_argument('--repeats', type=int, default=2, help='timed runs; the best is reported')
  p.add_argument('--out', default=None, help='also write the table to this file')
  args = p.parse_args()

  cores = os.cpu_count() or 1
  tmp = tempfile.mkdtemp(prefix='lvvit_input_bench_')
  try:
    root, shards, maps = (os.path.join(tmp, n) for n in ('images/train', 'shards', 'maps'))
    kb = make_jpegs(root, args.num_images)
    source = sources.write_image_folder_shards(root, shards, num_shards=8)
    write_score_maps(source, maps)
    files = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(root) for f in fs)

    base = pipeline.PipelineConfig(
        source=shards, score_maps_dir=maps, batch_size=args.batch, image_size=args.image_size,
        augment=augment.AugmentConfig(image_size=args.image_size), crop_pct=0.9,
        shuffle_buffer=1024, cycle_length=8)
    rows = []
    for threads in (1, cores):
      cfg = dataclasses.replace(base, threadpool_size=threads,
                                num_parallel_calls=threads if threads == 1 else -1)
      wall, cpu = time_batches(pipeline.make_train_iterator(cfg), args.timed, args.batch,
                               args.repeats)
      rows.append(('train + score maps (tf.data)', threads, wall, cpu))
      if threads == 1:
        wall, cpu = time_batches(augment_only(files, cfg), args.timed, args.batch, args.repeats)
        rows.append(('  train_preprocess alone (tf.data)', threads, wall, cpu))
      ev = pipeline.make_eval_iterator(dataclasses.replace(cfg, score_maps_dir=None))
      wall, cpu = time_batches(_cycle(ev), args.timed, args.batch, args.repeats)
      rows.append(('eval (tf.data)', threads, wall, cpu))
    wall, cpu = time_pil(files, args.timed, args.image_size, args.repeats)
    rows.append(('train, PIL + NumPy (pil_augment)', 1, wall, cpu))
  finally:
    shutil.rmtree(tmp, ignore_errors=True)

  lines = [f'device: cpu {platform.processor() or platform.machine()} x{cores} | '
           f'tensorflow {tf.__version__} | {args.num_images} JPEGs ~500x375 q90, mean '
           f'{kb:.0f} KB | output {args.image_size}px, batch {args.batch}',
           f'{"pipeline":36s} {"threads":>7s} {"images/s":>9s} {"images/CPU-s (per core)":>24s}']
  for name, threads, wall, cpu in rows:
    lines.append(f'{name:36s} {threads:7d} {wall:9.1f} {cpu:24.1f}')
  text = '\n'.join(lines)
  print(text)
  if args.out:
    with open(args.out, 'w') as f:
      f.write(text + '\n')


def _cycle(eval_iterator):
  while True:
    yield from eval_iterator


if __name__ == '__main__':
  main()
