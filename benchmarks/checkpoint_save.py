"""Cost of an async train-state checkpoint: seconds the training loop blocks vs in the background.

    python -m benchmarks.checkpoint_save --model lvvit_s

Builds the trainer's TrainState for the model (params, BatchNorm statistics, AdamW moments,
EMA of both) on a data-parallel mesh of all devices, then saves it with the trainer's
`checkpoints.TrainCheckpoints` several times: `blocked` is the time `save()` takes (the loop
waits only while device arrays are copied to host memory and the step directory is set up),
`background` the rest until the step is committed on disk (`wait()`). Writes to a temporary
directory (or --dir) and removes it.
"""
import argparse
import os
import shutil
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.device import device_line
from lvvit_jax import checkpoints
from lvvit_jax import optim
from lvvit_jax import sharding
from lvvit_jax import train
from lvvit_jax.models import create_model


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--model', default='lvvit_s')
  p.add_argument('--img-size', type=int, default=224)
  p.add_argument('--num-classes', type=int, default=1000)
  p.add_argument('--saves', type=int, default=3)
  p.add_argument('--dir', default=None, help='where to write (default: a temporary folder)')
  args = p.parse_args()

  model = create_model(args.model, img_size=args.img_size, num_classes=args.num_classes)
  mesh = sharding.make_mesh()
  rng = jax.random.key(0)
  size = args.img_size
  params = jax.eval_shape(lambda r: model.init({'params': r}, jnp.zeros((1, size, size, 3))),
                          rng)['params']
  tx = optim.make_optimizer(params, optim.lr_schedule(1e-3, 1000, 10))
  abstract = jax.eval_shape(lambda r: train.init_train_state(model, tx, r), rng)
  shardings = train.state_shardings(abstract, mesh, 2**18)
  state = jax.jit(lambda r: train.init_train_state(model, tx, r), out_shardings=shardings)(rng)
  tree = {'state': state, 'rng': jax.random.key_data(rng)}
  jax.block_until_ready(tree)
  nbytes = sum(x.nbytes for x in jax.tree.leaves(tree))
  run = {'model': args.model, 'benchmark': True}

  base = args.dir or tempfile.mkdtemp(prefix='lvvit_ckpt_bench_')
  blocked, total = [], []
  try:
    ckpts = checkpoints.TrainCheckpoints(base, keep=2, keep_best=False)
    for i in range(args.saves):
      t0 = time.perf_counter()
      ckpts.save(i + 1, tree, {'streams': {'0': {'epoch': 0, 'index': i}}}, run)
      t1 = time.perf_counter()
      ckpts.wait()
      t2 = time.perf_counter()
      blocked.append(t1 - t0)
      total.append(t2 - t0)
    on_disk = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in
                  os.walk(os.path.join(ckpts.directory, str(args.saves))) for f in fs)
    ckpts.close()
  finally:
    if not args.dir:
      shutil.rmtree(base, ignore_errors=True)

  b, t = statistics.median(blocked), statistics.median(total)
  print(f'device: {device_line()} | {args.model}@{size} '
        f'{args.num_classes} classes | train state {nbytes / 2**20:.0f} MiB in memory, '
        f'{on_disk / 2**20:.0f} MiB on disk | median of {args.saves} saves')
  print(f'{"blocked in the loop (save)":34s} {b:8.3f} s')
  print(f'{"in the background (until commit)":34s} {t - b:8.3f} s')
  print(f'{"whole save":34s} {t:8.3f} s  ({nbytes / 2**20 / t:.0f} MiB/s)')
  print(f'all saves: blocked {np.round(blocked, 3).tolist()} s, whole {np.round(total, 3).tolist()} s')


if __name__ == '__main__':
  main()
