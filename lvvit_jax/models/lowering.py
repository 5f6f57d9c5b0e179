"""Which lowering the models' CPU-specific pieces use: `lowering()`.

Four pieces of the models have a CPU lowering that computes the same function as the plain
Flax or jax.nn op up to the order of float32 sums, and measured faster on XLA:CPU: the stem's
BatchNorm + ReLU (`batch_norm.py`), the transformer blocks' dense layers (`dense.py`), their
attention (`attention.py`), and, when asked for, the blocks run over the batch in independent
parts (`block_chunks`, used by `lvvit.py`). All follow this one switch: on by default on the CPU
backend, never on accelerators (they keep XLA's native ops), and off everywhere with
`LVVIT_JAX_CPU_LOWERING=0` (the tests compare both).
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


# The transformer blocks can run over the batch in independent parts on the CPU lowering. Many
# of the blocks' ops (attention's batched products of 65 x 32 matrices, LayerNorm's and softmax's
# reductions) run on one thread in XLA:CPU; two independent chains of them let its thunk
# executor keep two cores busy. The demo student's step: 473 -> 444 ms (1.07x), lvvit_s at 224
# px, batch 8: 1553 -> 1509 ms (1.03x); four parts gave no more than two
# (benchmarks/results/train_step_cpu.txt). Off unless LVVIT_JAX_CPU_BLOCK_CHUNKS says how many:
# the parameters' gradients are then sums over the parts, which round differently, and a run
# that rounds differently is another draw (the demo's figures were measured without it). A
# number given, not the core count, so that a run's rounding does not depend on the machine.
CHUNKS_ENV = 'LVVIT_JAX_CPU_BLOCK_CHUNKS'


def block_chunks(batch: int) -> int:
  """Independent batch parts for the transformer blocks: LVVIT_JAX_CPU_BLOCK_CHUNKS (default 1)
  on the CPU lowering when it divides `batch`, else 1."""
  value = os.environ.get(CHUNKS_ENV, '1')
  if not value.isdigit() or int(value) < 1:
    raise ValueError(f'{_FILE}: {CHUNKS_ENV}={value!r}; use a whole number of parts, 1 (the '
                     'default: the whole batch at once) or 2 (two cores).')
  chunks = int(value)
  if chunks > 1 and lowering() == 'matmul' and batch % chunks == 0:
    return chunks
  return 1
