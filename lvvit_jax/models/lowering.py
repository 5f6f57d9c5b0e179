"""Which lowering the models' CPU-specific pieces use: `lowering()`.

Three pieces of the models have a CPU lowering that computes the same function as the plain
Flax or jax.nn op up to the order of float32 sums, and measured faster on XLA:CPU: the stem's
BatchNorm + ReLU (`batch_norm.py`), the transformer blocks' dense layers (`dense.py`) and their
attention (`attention.py`). All follow this one switch: on by default on the CPU backend, never
on accelerators (they keep XLA's native ops), and off everywhere with `LVVIT_JAX_CPU_LOWERING=0`
(the tests compare both).
"""
import os

import jax

_FILE = 'lvvit_jax/models/lowering.py'
ENV = 'LVVIT_JAX_CPU_LOWERING'


def lowering() -> str:
  """'matmul' on the CPU backend (unless LVVIT_JAX_CPU_LOWERING=0), else 'native'."""
  value = os.environ.get(ENV, '1')
  if value not in ('0', '1'):
    raise ValueError(f'{_FILE}: {ENV}={value!r}; use 1 (the default: the CPU lowering on the CPU '
                     'backend) or 0 (XLA\'s native ops everywhere).')
  return 'matmul' if value == '1' and jax.default_backend() == 'cpu' else 'native'
