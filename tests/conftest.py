"""Test set-up: four virtual CPU devices, so sharding tests see a real mesh.

XLA reads the flag when the backend starts, so it is set before anything imports jax.
"""
import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=4')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')
