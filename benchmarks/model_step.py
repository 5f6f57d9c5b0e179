"""Forward and forward+backward throughput of an LV-ViT model on whatever device JAX sees.

    python -m benchmarks.model_step --model lvvit_s --batch 64 --dtype bfloat16

Prints images/s and achieved TFLOP/s (FLOPs from XLA's cost analysis of the compiled
computation, 2 FLOPs per multiply-add). The training pass is the trainer's loss minus the
optimizer: `objective.training_loss` (label targets, a MixToken box, drop path on, BatchNorm in
training mode, the token-labeling loss) and the gradients of all parameters.
"""
import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from benchmarks.device import device_line
from lvvit_jax.token_labeling import objective
from lvvit_jax.models import create_model


def compiled_flops(compiled) -> float:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost.get('flops', 0.0)) if cost else 0.0


def time_fn(fn, args, steps: int, warmup: int) -> float:
  """Median wall time of `fn(*args)` in seconds, after warm-up, synchronised."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--model', default='lvvit_s')
  p.add_argument('--batch', type=int, default=8)
  p.add_argument('--img-size', type=int, default=224)
  p.add_argument('--dtype', default='bfloat16', choices=['float32', 'bfloat16'])
  p.add_argument('--num-classes', type=int, default=1000)
  p.add_argument('--steps', type=int, default=5)
  p.add_argument('--warmup', type=int, default=2)
  args = p.parse_args()

  model = create_model(args.model, img_size=args.img_size, num_classes=args.num_classes,
                       dtype=args.dtype)
  b, s, k = args.batch, args.img_size, args.num_classes
  key = jax.random.key(0)
  images = jax.random.normal(key, (b, s, s, 3), jnp.float32)
  variables = jax.jit(lambda x: model.init({'params': key}, x[:1]))(images)
  batch = {'image': images, 'label': jnp.arange(b, dtype=jnp.int32) % k}

  def forward(variables, images):
    return model.apply(variables, images)

  def train_grad(variables, batch, rng):
    return jax.grad(objective.training_loss, argnums=1, has_aux=True)(
        model, variables['params'], variables['batch_stats'], batch, rng)

  fwd = jax.jit(forward).lower(variables, images).compile()
  bwd = jax.jit(train_grad).lower(variables, batch, key).compile()
  results = {}
  for name, fn, fn_args in (('forward', fwd, (variables, images)),
                            ('forward+backward', bwd, (variables, batch, key))):
    t = time_fn(fn, fn_args, args.steps, args.warmup)
    flops = compiled_flops(fn)
    results[name] = (b / t, flops / t / 1e12, t)
  print(f'device: {device_line()} | model {args.model} '
        f'@{s} batch {b} dtype {args.dtype}')
  print(f'{"pass":<18} {"images/s":>10} {"TFLOP/s":>9} {"ms/step":>9}')
  for name, (ips, tflops, t) in results.items():
    print(f'{name:<18} {ips:>10.1f} {tflops:>9.3f} {t * 1e3:>9.1f}')


if __name__ == '__main__':
  main()
