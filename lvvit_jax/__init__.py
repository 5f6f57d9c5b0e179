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

__version__ = '0.1.0'
