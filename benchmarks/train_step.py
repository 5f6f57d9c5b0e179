"""Throughput and MFU of the trainer's full update step, next to PyTorch doing the same step.

    python -m benchmarks.train_step --model lvvit_s --batch 8            # CPU here
    python -m benchmarks.train_step --preset demo                        # the demo's model
    LVVIT_JAX_XLA_DEFAULTS=0 python -m benchmarks.train_step --preset demo   # XLA's defaults
    python -m benchmarks.train_step --model lvvit_s --batch 256 --dtype bfloat16 --no-torch

The JAX rows time `lvvit_jax.train`'s jitted update step (the one the trainer runs: device
augmentation of uint8 images, targets, MixToken, forward in the compute dtype, loss in float32,
backward, AdamW with the schedule, EMA) on synthetic data already on the devices:
- `plain labels`: no score maps (the smoothed label for the cls and every token);
- `token labels`: 18x18x5 score maps pooled through each example's `label_affine`;
- `token labels, no augmentation`: float images, the same work as the PyTorch row.
`--preset demo` is the model of `configs/demo.py` (LV-ViT-T's 64-channel stem and blocks at
64 px, patch 8, 4 blocks of dim 192, 10 classes, batch 64) with its recipe; `--stem-channels`
overrides the stem's width (32: the demo's until the tenth sitting) and `--dim` the blocks'
(128 until the eleventh: issue 17's figures are `--preset demo --dim 128`). The header prints
XLA_FLAGS: `import lvvit_jax` turns XLA:CPU's YNNPACK fusions off (`lvvit_jax/__init__.py`);
LVVIT_JAX_XLA_DEFAULTS=0 keeps XLA's defaults (the ratio to PyTorch before that change: the flag
is read once per process, so the two are separate runs).
MFU = FLOPs of the compiled step (XLA's cost analysis) / step time / the device's peak: the
datasheet dense peak of known accelerators (--peak-tflops overrides), on CPU the measured rate
of a large matmul in the same dtype. The PyTorch row is the independent LV-ViT of
tests/torch_lvvit.py doing forward (MixToken box), the token-labeling loss, backward and
torch.optim.AdamW on the same CPU; the ratio is JAX images/s over PyTorch's. Every row runs one
step per round, the rows alternating, `--steps` rounds after `--warmup`: the medians compare
the rows under the same machine load.
"""
import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.device import device_line
from benchmarks.model_step import compiled_flops
from benchmarks.model_step import time_fn
from configs import demo as demo_config
from configs import lvvit as lvvit_config
from lvvit_jax import models
from lvvit_jax import sharding
from lvvit_jax import train
from lvvit_jax.models import lowering

# Dense bf16 peaks (TFLOP/s) from the vendors' datasheets, by device_kind prefix.
PEAK_TFLOPS = {'NVIDIA H100': 989.0, 'NVIDIA H200': 989.0, 'NVIDIA A100': 312.0,
               'TPU v4': 275.0, 'TPU v5 lite': 197.0, 'TPU v5p': 459.0, 'TPU v6': 918.0}

# --preset: (config, batch); the demo is configs/demo.py's model and recipe.
PRESETS = {'demo': (lambda: demo_config.get_config('stage=baseline'), 64)}

# Model fields the PyTorch reference (tests/torch_lvvit.py) takes from config.model_overrides.
TORCH_FIELDS = ('dim', 'depth', 'num_heads', 'mlp_hidden', 'stem_channels', 'skip_lam',
                'patch_size')


def measured_matmul_tflops(dtype, n: int = 2048, steps: int = 5) -> float:
  """Achieved TFLOP/s of an n x n matmul: the CPU's practical peak."""
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x: x @ x)
  t = time_fn(f, (a,), steps, 2)
  return 2 * n ** 3 / t / 1e12


def peak_tflops(dtype, override):
  if override:
    return override, 'given'
  kind = jax.devices()[0].device_kind
  for prefix, peak in PEAK_TFLOPS.items():
    if kind.startswith(prefix):
      return peak, 'datasheet'
  return measured_matmul_tflops(dtype), 'measured matmul'


def synthetic_batch(b, size, num_classes, *, maps: bool, augment: bool, seed=0):
  rng = np.random.default_rng(seed)
  batch = {'label': rng.integers(0, num_classes, b).astype(np.int32),
           'label_affine': np.tile(np.float32([[1, 0, 0], [0, 1, 0]]), (b, 1, 1))}
  if augment:
    batch['image'] = rng.integers(0, 256, (b, size, size, 3)).astype(np.uint8)
    batch['aug_seed'] = rng.integers(0, 2**31, (b, 2)).astype(np.uint32)
  else:
    batch['image'] = rng.normal(size=(b, size, size, 3)).astype(np.float32)
  if maps:
    batch['topk_logits'] = rng.normal(0, 3, (b, 18, 18, 5)).astype(np.float16)
    batch['topk_idx'] = rng.integers(0, num_classes, (b, 18, 18, 5)).astype(np.int32)
    batch['map_box'] = np.tile(np.float32([0, 0, 1, 1]), (b, 1))
  return batch


# --variants id -> (row name, score maps, device augmentation).
VARIANTS = {'plain': ('plain labels', False, True), 'token': ('token labels', True, True),
            'token-noaug': ('token labels, no augmentation', True, False)}


def jax_rows(config, batch_size, variants=tuple(VARIANTS)):
  """[(row name, variant, one-step callable, FLOPs per step)], each step compiled."""
  model = train.build_model(config)
  mesh = sharding.make_mesh()
  sharding.check_global_batch(batch_size, mesh, jax.process_count(), setting='--batch')
  schedule, _ = train.make_schedule(config, 1000)
  rng = jax.random.key(0)
  size = config.img_size
  params = jax.eval_shape(lambda r: model.init({'params': r}, jnp.zeros((1, size, size, 3))),
                          rng)['params']
  tx = train.make_optimizer(config, params, schedule)
  abstract = jax.eval_shape(lambda r: train.init_train_state(model, tx, r), rng)
  shardings = train.state_shardings(abstract, mesh, config.mesh.fsdp_min_size)
  init = jax.jit(lambda r: train.init_train_state(model, tx, r), out_shardings=shardings)
  rows = []
  for variant in variants:
    name, maps, augment = VARIANTS[variant]
    batch = sharding.host_to_global(
        synthetic_batch(batch_size, size, config.num_classes, maps=maps, augment=augment), mesh)
    step = train.jit_update_step(train.make_update_step(
        model, tx, schedule, train.objective_config(config), ema_decay=config.ema_decay,
        augment=train.device_augment_config(config)), shardings, mesh)
    state = init(rng)
    compiled = step.lower(state, batch, rng).compile()
    holder = {'state': state}

    def run(compiled=compiled, holder=holder, batch=batch):
      holder['state'], metrics = compiled(holder['state'], batch, rng)
      return jax.block_until_ready(metrics)

    rows.append((name, variant, run, compiled_flops(compiled)))
  return rows


def torch_row(config, batch_size):
  """(row name, one-step callable, torch threads): PyTorch's forward, loss, backward, AdamW."""
  import torch  # pylint: disable=g-import-not-at-top
  from tests.torch_lvvit import TorchLVViT  # pylint: disable=g-import-not-at-top
  overrides = {k: v for k, v in dict(config.model_overrides).items() if k in TORCH_FIELDS}
  model = TorchLVViT.from_variant(config.model, img_size=config.img_size,
                                  num_classes=config.num_classes, **overrides)
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=config.weight_decay)
  g = model.grid
  rng = np.random.default_rng(0)
  x = torch.from_numpy(rng.normal(size=(batch_size, 3, config.img_size, config.img_size))
                       .astype(np.float32))
  k = config.num_classes
  t_cls = torch.softmax(torch.randn(batch_size, k), -1)
  t_tok = torch.softmax(torch.randn(batch_size, g * g, k), -1)
  box = (2, 3, min(g, 9), min(g, 11))
  dense_weight = config.dense_weight if config.dense_weight is not None else 0.5

  def step():
    opt.zero_grad(set_to_none=True)
    cls, aux = model(x, box)
    loss = (-(t_cls * torch.log_softmax(cls, -1)).sum(-1).mean()
            + dense_weight * -(t_tok * torch.log_softmax(aux, -1)).sum(-1).mean())
    loss.backward()
    opt.step()

  return 'PyTorch (tests/torch_lvvit.py), fwd+bwd+AdamW', step, torch.get_num_threads()


def alternate(steps_by_row, rounds: int, warmup: int):
  """{row: median seconds}: one step of every row per round, the rows taking turns."""
  for _ in range(warmup):
    for fn in steps_by_row.values():
      fn()
  times = {name: [] for name in steps_by_row}
  for _ in range(rounds):
    for name, fn in steps_by_row.items():
      t0 = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t0)
  return {name: statistics.median(t) for name, t in times.items()}


def make_config(args):
  """The config of --preset or --model, with the command line's sizes."""
  if args.preset:
    make, batch = PRESETS[args.preset]
    config = make()
    config.batch_size = args.batch or batch
    if args.dtype != 'auto':
      config.dtype = args.dtype
  else:
    config = lvvit_config.get_config(f'variant={args.model.split("_")[-1]}')
    config.img_size, config.num_classes, config.dtype = (args.img_size, args.num_classes,
                                                         args.dtype)
    config.batch_size = args.batch or 8
  if args.stem_channels:
    config.model_overrides.stem_channels = args.stem_channels
  if args.dim:  # The blocks' width, keeping the model's head width and MLP ratio.
    base = models.get_config(config.model, **config.model_overrides)
    head_width = base.dim // base.num_heads
    if args.dim % head_width:
      raise SystemExit(f'benchmarks/train_step.py: --dim {args.dim} is not a multiple of '
                       f'{config.model}\'s head width {head_width}; pick one that is.')
    config.model_overrides.update(dim=args.dim, num_heads=args.dim // head_width,
                                  mlp_hidden=args.dim * base.mlp_hidden // base.dim)
  return config


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--preset', choices=sorted(PRESETS), default=None,
                 help='a named model and batch (replaces --model, --img-size, --num-classes)')
  p.add_argument('--model', default='lvvit_s')
  p.add_argument('--batch', type=int, default=None, help='default: 8, or the preset\'s')
  p.add_argument('--img-size', type=int, default=224)
  p.add_argument('--num-classes', type=int, default=1000)
  p.add_argument('--stem-channels', type=int, default=None, help='default: the model\'s')
  p.add_argument('--dim', type=int, default=None,
                 help='the blocks\' width (heads of the same width, the same MLP ratio); '
                      'default: the model\'s')
  p.add_argument('--dtype', default='auto', choices=['auto', 'float32', 'bfloat16'])
  p.add_argument('--steps', type=int, default=3, help='timed rounds (medians)')
  p.add_argument('--warmup', type=int, default=1)
  p.add_argument('--peak-tflops', type=float, default=None)
  p.add_argument('--no-torch', action='store_true', help='skip the PyTorch row')
  p.add_argument('--variants', default=','.join(VARIANTS),
                 help=f'comma-separated JAX rows, of: {",".join(VARIANTS)}')
  args = p.parse_args()

  config = make_config(args)
  batch = config.batch_size
  dtype = train.compute_dtype(config)
  peak, how = peak_tflops(jnp.dtype(dtype), args.peak_tflops)
  variants = [v.strip() for v in args.variants.split(',') if v.strip()]
  unknown = sorted(set(variants) - set(VARIANTS))
  if unknown:
    p.error(f'--variants: unknown {unknown}; use some of {list(VARIANTS)}')
  rows = jax_rows(config, batch, variants)
  steps = {'JAX: ' + name: run for name, _, run, _ in rows}
  torch_name = None
  if not args.no_torch:
    torch_name, torch_step, threads = torch_row(config, batch)
    steps[torch_name] = torch_step
  t = alternate(steps, args.steps, args.warmup)

  stem = config.model_overrides.get('stem_channels', 'default')
  dim = config.model_overrides.get('dim', 'default')
  chunks = lowering.block_chunks(batch)   # LVVIT_JAX_CPU_BLOCK_CHUNKS
  parts = f' | the blocks in {chunks} batch parts' if chunks > 1 else ''
  print(f'device: {device_line()} | '
        f'{args.preset or args.model}@{config.img_size} batch {batch} stem {stem} dim {dim} | '
        f'compute {dtype} | peak {peak:.2f} TFLOP/s ({how}) | medians of {args.steps} '
        f'alternating rounds | XLA_FLAGS {os.environ.get("XLA_FLAGS") or "(none)"}{parts}')
  print(f'{"update step":48s} {"images/s":>9s} {"ms/step":>9s} {"TFLOP/step":>11s} {"MFU":>7s}')
  for name, _, _, flops in rows:
    s = t['JAX: ' + name]
    print(f'{"JAX: " + name:48s} {batch / s:9.2f} {s * 1e3:9.0f} {flops / 1e12:11.3f} '
          f'{100 * flops / s / 1e12 / peak:6.1f}%')
  if torch_name:
    s = t[torch_name]
    print(f'{torch_name:48s} {batch / s:9.2f} {s * 1e3:9.0f} {"":>11s} {"":>7s}  '
          f'({threads} threads)')
    what = {'token-noaug': 'the same work', 'token': 'full step, with device augmentation'}
    for name, variant, _, _ in rows:
      if variant in what:
        print(f'ratio JAX ({name}) / PyTorch ({what[variant]}): '
              f'{t[torch_name] / t["JAX: " + name]:.2f}x')


if __name__ == '__main__':
  main()
