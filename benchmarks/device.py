"""The device every benchmark names in its first line: the accelerator, or which CPU.

On the CPU backend JAX's device kind is just 'cpu', yet the same step runs 3-5x faster on one
2-core VM than on another, and JAX's ratio to PyTorch moves with it (0.71x on an Intel Xeon,
0.95x on a first-generation AMD EPYC: benchmarks/results/train_step_cpu.txt). So the line says
which CPU, how many cores this process may use and its widest vector instructions.
"""
from __future__ import annotations

import os
import platform

CPUINFO = '/proc/cpuinfo'
# Widest first: the first of these in the CPU's flags is the one named.
_VECTOR_FLAGS = (('avx512f', 'AVX-512'), ('avx2', 'AVX2'), ('avx', 'AVX'), ('sse4_2', 'SSE4.2'),
                 ('asimd', 'NEON'))


def cpu_name(cpuinfo: str = CPUINFO) -> str:
  """'AMD EPYC, 2 cores, AVX2': the model name and flags of /proc/cpuinfo (the platform's
  processor string where there is no such file) and the cores this process may run on."""
  model, flags = '', set()
  try:
    with open(cpuinfo) as f:
      for line in f:
        key, _, value = line.partition(':')
        key = key.strip()
        if key == 'model name' and not model:
          model = value.strip()
        elif key in ('flags', 'Features') and not flags:
          flags = set(value.split())
  except OSError:
    pass
  model = model or platform.processor() or platform.machine() or 'unknown CPU'
  cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
  parts = [model, f'{cores} cores']
  parts += [name for flag, name in _VECTOR_FLAGS if flag in flags][:1]
  return ', '.join(parts)


def device_line(local: bool = False) -> str:
  """'cpu cpu x1 (AMD EPYC, 2 cores, AVX2)' or 'gpu NVIDIA H100 80GB HBM3 x8': platform, device
  kind and count (this process's devices with `local`, else all), and on CPU which CPU. (JAX is
  imported here, so that the host rows of benchmarks.input_pipeline name the CPU without it.)"""
  import jax  # pylint: disable=g-import-not-at-top
  dev = jax.devices()[0]
  count = jax.local_device_count() if local else jax.device_count()
  line = f'{dev.platform} {dev.device_kind} x{count}'
  return f'{line} ({cpu_name()})' if dev.platform == 'cpu' else line
