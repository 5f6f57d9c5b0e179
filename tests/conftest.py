"""Test set-up: four virtual CPU devices, so sharding tests see a real mesh.

XLA reads the flag when the backend starts, so it is set before anything imports jax.
"""
import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=4')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')

import pytest  # noqa: E402


@pytest.fixture(scope='session')
def digits_data(tmp_path_factory):
  """The bundled digits (64 px canvas) written once: {'data_dir', 'train', 'validation'}."""
  from lvvit_jax.data import sources  # pylint: disable=g-import-not-at-top
  data_dir = str(tmp_path_factory.mktemp('digits_data'))
  return {'data_dir': data_dir,
          'train': sources.get_source('digits', 'train', data_dir),
          'validation': sources.get_source('digits', 'validation', data_dir)}
