"""lvvit_jax: LV-ViT vision transformers trained with token labeling, in JAX/Flax.

The core (models, token labeling, training step) imports without TensorFlow; only
`lvvit_jax.data` (the tf.data input pipeline) and `labelgen` need it.
"""
__version__ = '0.1.0'
