"""Prints the model zoo table: parameters, GFLOPs per image and published top-1.

    python -m benchmarks.model_zoo                          # every row
    python -m benchmarks.model_zoo nfnet_f0 nfnet_demo      # the rows of these models

Parameters are counted with `jax.eval_shape` (no compile). GFLOPs come from XLA's cost
analysis of the batch-1 inference forward (2 FLOPs per multiply-add); GMACs, the unit the
papers' "FLOPs" columns use, are half of that. LV-ViT rows analyse the compiled computation;
NFNet rows (marked *) the lowered one, before XLA's optimisations: compiling F1..F6 at their
test sizes takes minutes on a CPU, and on F0 the two differ by 0.2 %. NFNet FLOPs include
the weight standardisation of every conv, which a deployed model would fold into the kernels.
"""
import sys
from typing import Sequence

import jax
import jax.numpy as jnp

from lvvit_jax.models import PUBLISHED_TOP1
from lvvit_jax.models import create_model

ROWS = [('lvvit_t', 224), ('lvvit_s', 224), ('lvvit_s', 384), ('lvvit_m', 224),
        ('lvvit_m', 384), ('lvvit_m', 448), ('lvvit_l', 288), ('lvvit_l', 448),
        ('lvvit_l', 512),
        # NFNets at their test sizes (`nfnets/base.py`), and the CPU demo variant.
        ('nfnet_f0', 256), ('nfnet_f1', 320), ('nfnet_f2', 352), ('nfnet_f3', 416),
        ('nfnet_f4', 512), ('nfnet_f5', 544), ('nfnet_f6', 576), ('nfnet_f7', 608),
        ('nfnet_demo', 64)]
LOWERED_ONLY = ('nfnet_',)  # Rows whose FLOPs come from the lowered, uncompiled forward.


def main(argv: Sequence[str] = ()) -> None:
  names = set(argv)
  unknown = names - {n for n, _ in ROWS}
  if unknown:
    raise SystemExit(f'benchmarks/model_zoo.py: unknown model(s) {sorted(unknown)}; choose '
                     f'from {sorted({n for n, _ in ROWS})} or give none for every row.')
  print('| variant | size | params | GFLOPs (XLA) | GMACs | published top-1 |')
  print('|---|---|---|---|---|---|')
  for name, size in ROWS:
    if names and name not in names:
      continue
    model = create_model(name, img_size=size)
    x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init({'params': jax.random.key(0)}, x), x)
    params = sum(p.size for p in jax.tree.leaves(variables['params']))
    lowered = jax.jit(model.apply).lower(variables, x)
    lowered_only = name.startswith(LOWERED_ONLY)
    cost = lowered.cost_analysis() if lowered_only else lowered.compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    gflops = cost['flops'] / 1e9
    digits, mark = (1 if gflops >= 1 else 3), ('*' if lowered_only else '')
    top1 = PUBLISHED_TOP1.get((name, size), '')
    print(f'| {name} | {size} | {params:,} | {gflops:.{digits}f}{mark} | '
          f'{gflops / 2:.{digits}f}{mark} | {top1} |', flush=True)
  print('\n* FLOPs of the lowered forward (before XLA optimisation, not compiled); the rest '
        'compiled.')


if __name__ == '__main__':
  main(sys.argv[1:])
