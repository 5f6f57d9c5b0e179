"""labelgen: makes token-label score maps (SPEC section 2).

Runs a teacher densely over a dataset and writes its top-k score maps as TFRecord shards that
pair one-to-one with the image shards, in the format of `lvvit_jax/data/score_maps.py` (the one
module that reads and writes it). Needs TensorFlow; the training core does not.
"""
import lvvit_jax  # noqa: F401  (before TensorFlow: sets its CPU-kernel default, see there)
