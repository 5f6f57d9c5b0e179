"""Test set-up: four virtual CPU devices, so sharding tests see a real mesh.

XLA reads the flag when the backend starts, so it is set before anything imports jax.
"""
import atexit
import os
import shutil
import tempfile

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=4')
# One persistent compilation cache per test session, shared with the processes tests start:
# the same programs (the trainer's init, step and eval at a given size) compile once.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='lvvit_jax_xla_')
  atexit.register(shutil.rmtree, os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')

import pytest  # noqa: E402

# Before any test module imports TensorFlow: lvvit_jax sets its TF CPU-kernel default (oneDNN
# off), as main.py runs get it; the host's resize rounds differently with and without oneDNN,
# and the bitwise-resume tests compare a run in this process with runs of main.py.
import lvvit_jax  # noqa: E402,F401


@pytest.fixture(scope='session')
def digits_data(tmp_path_factory):
  """The bundled digits (64 px canvas) written once: {'data_dir', 'train', 'validation'}."""
  from lvvit_jax.data import sources  # pylint: disable=g-import-not-at-top
  data_dir = str(tmp_path_factory.mktemp('digits_data'))
  return {'data_dir': data_dir,
          'train': sources.get_source('digits', 'train', data_dir),
          'validation': sources.get_source('digits', 'validation', data_dir)}
