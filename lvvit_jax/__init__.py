"""lvvit_jax: LV-ViT vision transformers trained with token labeling, in JAX/Flax.

The core (models, token labeling, training step) imports without TensorFlow; only
`lvvit_jax.data` (the tf.data input pipeline) and `labelgen` need it.
"""
import os

# TensorFlow (the host's decode, crop and resize in tf.data, and clu's writers) reads this when
# it is first imported. Its oneDNN CPU kernels make the input pipeline slower, not faster, on
# the small per-image ops it runs: 1.3x fewer train images per CPU-second with one thread, 1.4x
# with two, 1.5x for eval (`python -m benchmarks.input_pipeline`). Set it to 1 to override.
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')


# XLA:CPU (jaxlib 0.10) hands convolutions, dots and elementwise fusions to YNNPACK by default;
# its kernel gradient of a convolution is pathological (3x3, 64 -> 64 at 32x32, batch 64: 1.5 s,
# where Eigen's takes 0.07 s) and its dots are slower here too. With the fusion list empty XLA
# uses its own emitters and Eigen: the demo-size LV-ViT's train step (64-channel stem) runs 3-4x
# faster (`benchmarks/results/train_step_cpu.txt`). JAX reads XLA_FLAGS when it first creates a
# backend, so this acts when lvvit_jax is imported first (every entry point does). It applies
# to the jaxlib versions it was measured on (unknown flags abort XLA); a XLA_FLAGS that already
# sets it, or LVVIT_JAX_XLA_DEFAULTS=0, leaves XLA's default. Accelerators ignore it.
YNN_FLAG = '--xla_cpu_experimental_ynn_fusion_type='


def _cpu_xla_flags() -> None:
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  flags = os.environ.get('XLA_FLAGS', '')
  if os.environ.get('LVVIT_JAX_XLA_DEFAULTS', '1') == '0' or YNN_FLAG.strip('=-') in flags:
    return
  try:
    version = tuple(int(v) for v in metadata.version('jaxlib').split('.')[:2])
  except (metadata.PackageNotFoundError, ValueError):
    return
  if version == (0, 10):
    os.environ['XLA_FLAGS'] = f'{flags} {YNN_FLAG}'.strip()


_cpu_xla_flags()

__version__ = '0.1.0'
