"""Score-map generation throughput (`labelgen generate`) on whatever device JAX sees.

    python -m benchmarks.labelgen --model lvvit_m --size 384 --batch 16 --images 64   # real size
    python -m benchmarks.labelgen --model nfnet_f0 --size 256 --batch 16 --images 64
    python -m benchmarks.labelgen --model nfnet_f6 --size 576 --crop centre   # the paper's maps
    python -m benchmarks.labelgen --model lvvit_t --size 64 --images 16 --batch 4
    python -m benchmarks.labelgen --model nfnet_demo --size 64 --images 32 --batch 8  # CPU

A random-init teacher of any zoo model (`--model`, through the model contract: its dense
logits on `config.grid`), saved as a converted variables checkpoint, labels a folder of generated
JPEGs (crops of scikit-learn's two sample photos resized to 500x375 or 375x500, quality 90)
written as image-folder shards. Prints the device, then images/s of
- `teacher step`: the jitted forward + top-k alone, on a batch already on the devices
  (median of --steps after one warm-up step);
- `labelgen generate`: the whole command (tf.data decode and resize, teacher, shard writing),
  after its first batch (compilation and pipeline start excluded; so --images should be several
  times --batch);
and the bytes per image of the score-map shards written.
"""
import argparse
import io
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from benchmarks.device import device_line
from labelgen import generate
from labelgen import settings
from labelgen import teacher as teacher_lib
from lvvit_jax import checkpoints
from lvvit_jax import sharding
from lvvit_jax.data import sources
from lvvit_jax.models import create_model
# pylint: enable=g-import-not-at-top,wrong-import-position


def make_jpegs(root: str, num_images: int, num_classes: int, seed: int = 0) -> float:
  """Writes crops of the sklearn sample photos as JPEGs into root/<class>/; mean size in KB.

  Every class gets a folder (most stay empty), so the source has the teacher's class count.
  """
  from sklearn.datasets import load_sample_images  # pylint: disable=g-import-not-at-top
  photos = load_sample_images().images
  rng = np.random.default_rng(seed)
  for c in range(num_classes):
    os.makedirs(os.path.join(root, f'class{c:04d}'), exist_ok=True)
  sizes = []
  for i in range(num_images):
    photo = photos[i % len(photos)]
    h, w = (375, 500) if i % 4 else (500, 375)
    # A random 4:3 (or 3:4) region, 60-100 % of the largest that fits, resized to h x w.
    fit = min(photo.shape[0] / h, photo.shape[1] / w)
    ch, cw = (int(round(n * fit * rng.uniform(0.6, 1.0))) for n in (h, w))
    y = int(rng.integers(0, photo.shape[0] - ch + 1))
    x = int(rng.integers(0, photo.shape[1] - cw + 1))
    image = Image.fromarray(photo[y:y + ch, x:x + cw]).resize((w, h), Image.BICUBIC)
    buf = io.BytesIO()
    image.save(buf, 'JPEG', quality=90)
    with open(os.path.join(root, f'class{i % num_classes:04d}', f'img{i:05d}.jpg'), 'wb') as f:
      f.write(buf.getvalue())
    sizes.append(len(buf.getvalue()))
  return float(np.mean(sizes)) / 1024


def save_random_teacher(path: str, model_name: str, size: int, num_classes: int) -> str:
  model = create_model(model_name, img_size=size, num_classes=num_classes)
  variables = jax.jit(lambda: model.init({'params': jax.random.key(0)},
                                         jnp.zeros((1, size, size, 3))))()
  return checkpoints.save_variables(path, jax.tree.map(np.asarray, variables), model_name,
                                    {'img_size': size, 'num_classes': num_classes})


def time_teacher_step(checkpoint: str, batch: int, k: int, dtype: str, steps: int) -> float:
  """Images/s of the jitted forward + top-k on a device-resident batch (median of `steps`)."""
  teacher = teacher_lib.load_teacher(checkpoint, dtype=dtype)
  mesh = sharding.make_mesh(-1, 1, devices=jax.local_devices())
  variables, step = teacher_lib.device_step(teacher, k, mesh)
  images = jax.device_put(
      jnp.asarray(np.random.default_rng(0).normal(size=(batch, teacher.size, teacher.size, 3)),
                  jnp.bfloat16 if dtype == 'bfloat16' else jnp.float32),
      sharding.batch_sharding(mesh))
  jax.block_until_ready(step(variables, images))
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    jax.block_until_ready(step(variables, images))
    times.append(time.perf_counter() - t0)
  return batch / statistics.median(times)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--model', default='lvvit_m')
  p.add_argument('--size', type=int, default=384)
  p.add_argument('--batch', type=int, default=16)
  p.add_argument('--images', type=int, default=64)
  p.add_argument('--num-classes', type=int, default=1000)
  p.add_argument('--k', type=int, default=5)
  p.add_argument('--crop', default='resize', choices=settings.CROPS)
  p.add_argument('--dtype', default='auto', choices=settings.DTYPES)
  p.add_argument('--steps', type=int, default=5)
  args = p.parse_args()

  dtype = settings.resolve_dtype(args.dtype)
  if args.images < 3 * args.batch:
    print(f'note: --images {args.images} gives fewer than 3 batches of {args.batch}; the '
          'end-to-end figure (after the first batch) is then rough.', file=sys.stderr)
  with tempfile.TemporaryDirectory() as tmp:
    kb = make_jpegs(os.path.join(tmp, 'photos', 'train'), args.images, args.num_classes)
    shards = os.path.join(tmp, 'shards')
    sources.write_image_folder_shards(os.path.join(tmp, 'photos', 'train'), shards,
                                      num_shards=max(1, args.images // 16))
    checkpoint = save_random_teacher(os.path.join(tmp, 'teacher'), args.model, args.size,
                                     args.num_classes)
    step_rate = time_teacher_step(checkpoint, args.batch, args.k, dtype, args.steps)
    summary = generate.generate(checkpoint, shards, os.path.join(tmp, 'maps'), crop=args.crop,
                                k=args.k, batch_size=args.batch, dtype=dtype, progress=False,
                                log=sys.stderr)
  grid = summary.manifest.grid
  print(f'device: {device_line(local=True)} | teacher '
        f'{args.model}@{args.size} (random init, {args.num_classes} classes) dtype {dtype} | '
        f'batch {args.batch} | {args.images} JPEGs ~500x375 q90 (mean {kb:.0f} KB), '
        f'crop {args.crop}')
  print(f'teacher step (forward + top-k)     {step_rate:10.1f} images/s')
  print(f'labelgen generate (end to end)     {summary.steady_images_per_second:10.1f} images/s '
        f'(after the first batch; {summary.images_per_second:.1f} with it)')
  print(f'score maps {grid[0]}x{grid[1]} x top-{args.k}    {summary.bytes_per_image:10.0f} bytes '
        'per image')


if __name__ == '__main__':
  main()
