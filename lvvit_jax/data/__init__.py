"""The tf.data input pipeline (needs TensorFlow; the rest of lvvit_jax does not).

`augment` holds the train/eval image processing (with the `label_affine` geometry for token
labels), `randaugment` the RandAugment ops. Import the submodules directly; this package stays
import-light.
"""
