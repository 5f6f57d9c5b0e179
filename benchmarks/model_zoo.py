"""Prints the model zoo table: parameters, GFLOPs per image and published top-1.

    python -m benchmarks.model_zoo

Parameters are counted with `jax.eval_shape` (no compile). GFLOPs come from XLA's cost
analysis of the compiled batch-1 inference forward (2 FLOPs per multiply-add); GMACs, the
unit the paper's "FLOPs" column uses, are half of that.
"""
import jax
import jax.numpy as jnp

from lvvit_jax.models import PUBLISHED_TOP1
from lvvit_jax.models import create_model

ROWS = [('lvvit_t', 224), ('lvvit_s', 224), ('lvvit_s', 384), ('lvvit_m', 224),
        ('lvvit_m', 384), ('lvvit_m', 448), ('lvvit_l', 288), ('lvvit_l', 448),
        ('lvvit_l', 512)]


def main():
  print('| variant | size | params | GFLOPs (XLA) | GMACs | published top-1 |')
  print('|---|---|---|---|---|---|')
  for name, size in ROWS:
    model = create_model(name, img_size=size)
    x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init({'params': jax.random.key(0)}, x), x)
    params = sum(p.size for p in jax.tree.leaves(variables['params']))
    cost = jax.jit(model.apply).lower(variables, x).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    gflops = cost['flops'] / 1e9
    top1 = PUBLISHED_TOP1.get((name, size), '')
    print(f'| {name} | {size} | {params:,} | {gflops:.1f} | {gflops / 2:.1f} | {top1} |')


if __name__ == '__main__':
  main()
