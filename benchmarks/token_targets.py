"""Cost of token-label targets plus MixToken next to the model's forward+backward step.

    python -m benchmarks.token_targets --batch 128 --map 18 --k 5 --grid 14 --model lvvit_s
    python -m benchmarks.token_targets --model-batch 8   # CPU: time the model at 8, scale to 128

Times (median of --steps runs after warm-up, synchronised) the jitted
`token_targets + sample_mix_box + mix_targets` on random 18x18x5 maps with random crops, flips
and rotations, for each pooling method, and the lvvit_s training forward+backward (the
trainer's `objective.training_loss` on plain labels and its gradients).
With --model-batch smaller than --batch the model time is scaled linearly to --batch, and the
output says so. Goal: targets + MixToken under 3% of the step.
"""
import argparse

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.device import device_line
from benchmarks.model_step import time_fn
from lvvit_jax import token_labeling as tl
from lvvit_jax.models import create_model
from lvvit_jax.token_labeling import objective


def random_maps(rng: np.random.Generator, b: int, size: int, k: int, num_classes: int):
  """Random fp16 top-k maps, map boxes and label affines (crop, flip, rotation up to 30 deg)."""
  logits = (rng.normal(size=(b, size, size, k)) * 3).astype(np.float16)
  idx = np.stack([rng.choice(num_classes, size=k, replace=False)
                  for _ in range(b * size * size)]).reshape(b, size, size, k).astype(np.int32)
  map_box = np.tile(np.float32([0, 0, 1, 1]), (b, 1))
  scale = np.sqrt(rng.uniform(0.08, 1.0, b))
  angle = np.deg2rad(rng.uniform(-30, 30, b))
  flip = np.where(rng.random(b) < 0.5, -1.0, 1.0)
  cos, sin = np.cos(angle) * scale, np.sin(angle) * scale
  affine = np.zeros((b, 2, 3), np.float32)
  affine[:, 0, 0], affine[:, 0, 1] = cos, -sin * flip
  affine[:, 1, 0], affine[:, 1, 1] = sin, cos * flip
  # Centre the output on a random source point.
  centre = rng.uniform(0.3, 0.7, (b, 2))
  affine[:, :, 2] = centre - 0.5 * (affine[:, :, 0] + affine[:, :, 1])
  return logits, idx, map_box, affine


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--batch', type=int, default=128)
  p.add_argument('--num-classes', type=int, default=1000)
  p.add_argument('--grid', type=int, default=14)
  p.add_argument('--map', type=int, default=18, help='score-map side (18 for NFNet-F6 at 576)')
  p.add_argument('--k', type=int, default=5)
  p.add_argument('--samples', type=int, default=2)
  p.add_argument('--model', default='lvvit_s')
  p.add_argument('--model-batch', type=int, default=None,
                 help='time the model at this batch and scale linearly to --batch')
  p.add_argument('--dtype', default=None, choices=['float32', 'bfloat16'],
                 help='model compute dtype (default: float32 on CPU, bfloat16 elsewhere)')
  p.add_argument('--steps', type=int, default=5)
  p.add_argument('--warmup', type=int, default=2)
  args = p.parse_args()

  backend = jax.default_backend()
  dtype = args.dtype or ('float32' if backend == 'cpu' else 'bfloat16')
  b, kc, g = args.batch, args.num_classes, args.grid
  rng = np.random.default_rng(0)
  maps = tuple(jnp.asarray(a) for a in random_maps(rng, b, args.map, args.k, kc))
  key = jax.random.key(0)

  rows = []
  per_example_mb = {}
  for method in tl.targets.METHODS:

    def labels(logits, idx, map_box, affine, key, method=method):
      cls_t, tok_t = tl.token_targets(logits, idx, map_box, affine, grid=g, num_classes=kc,
                                      samples=args.samples, method=method)
      box = tl.sample_mix_box(key, g)
      return tl.mix_targets(cls_t, box, g), tok_t, box

    compiled = jax.jit(labels).lower(*maps, key).compile()
    mem = compiled.memory_analysis()
    if mem is not None:
      per_example_mb[method] = (mem.temp_size_in_bytes / b / 2**20,
                                mem.output_size_in_bytes / b / 2**20)
    rows.append((f'targets[{method}] + MixToken',
                 time_fn(compiled, maps + (key,), args.steps, args.warmup)))

  mix_only = jax.jit(lambda t, key: tl.mix_targets(t, tl.sample_mix_box(key, g), g))
  cls_dummy = jax.nn.softmax(jax.random.normal(key, (b, kc)))
  rows.append(('MixToken alone (box + cls mix)',
               time_fn(mix_only, (cls_dummy, key), args.steps, args.warmup)))

  # The model's training forward+backward at --model-batch.
  mb = args.model_batch or b
  img_size = args.grid * 16  # The token grid of the targets is the model's (14 at 224).
  model = create_model(args.model, num_classes=kc, img_size=img_size, dtype=dtype)
  images = jax.random.normal(key, (mb, img_size, img_size, 3), jnp.float32)
  variables = jax.jit(lambda x: model.init({'params': key, 'dropout': key}, x[:1]))(images)
  batch = {'image': images, 'label': jnp.arange(mb, dtype=jnp.int32) % kc}

  @jax.jit
  def train_grad(variables, batch, rng):
    return jax.grad(objective.training_loss, argnums=1, has_aux=True)(
        model, variables['params'], variables['batch_stats'], batch, rng)

  step = time_fn(train_grad, (variables, batch, key), args.steps, args.warmup)
  scaled = step * b / mb

  print(f'device: {device_line()} | batch {b} | map {args.map}x{args.map}x{args.k} | K {kc} | '
        f'grid {g} | samples {args.samples} | model {args.model} ({dtype})')
  print(f'{"part":40s} {"ms":>10s} {"% of step":>10s}')
  for name, t in rows:
    print(f'{name:40s} {t * 1e3:10.1f} {100 * t / scaled:10.2f}')
  note = '' if mb == b else f' (timed at batch {mb}: {step * 1e3:.1f} ms, scaled x{b / mb:g})'
  print(f'{args.model + " forward+backward":40s} {scaled * 1e3:10.1f} {100.0:10.2f}{note}')
  for method, (temp, out) in per_example_mb.items():
    print(f'memory per example [{method}]: {out:.2f} MiB of outputs + {temp:.2f} MiB of '
          'temporaries (XLA memory analysis)')
  best = min(t for name, t in rows if name.startswith('targets[scatter]'))
  print(f'targets[scatter] + MixToken = {100 * best / scaled:.2f}% of the {args.model} step '
        '(goal: < 3%)')


if __name__ == '__main__':
  main()
