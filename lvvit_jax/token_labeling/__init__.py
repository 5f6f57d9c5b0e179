"""Token labeling (SPEC sections 2-5) as pure JAX functions that run inside the jitted step.

`training_loss` (objective.py) joins them: targets from the batch, MixToken, forward, loss.
CutMix (cutmix.py) is the paper's ablation: the same box law and partners on the pixel grid.
Online targets (online.py) come from a teacher run on the student's crop instead of stored maps.

No TensorFlow and no host work here: the input pipeline hands over the untouched top-k score map
and one affine per example; targets, MixToken and the loss are built on the accelerator.
"""
from lvvit_jax.token_labeling.cutmix import cell_coverage
from lvvit_jax.token_labeling.cutmix import cutmix_images
from lvvit_jax.token_labeling.cutmix import cutmix_targets
from lvvit_jax.token_labeling.cutmix import sample_cutmix_box
from lvvit_jax.token_labeling.loss import blend_ground_truth
from lvvit_jax.token_labeling.loss import soft_cross_entropy
from lvvit_jax.token_labeling.loss import token_label_loss
from lvvit_jax.token_labeling.mixtoken import box_area
from lvvit_jax.token_labeling.mixtoken import box_mask
from lvvit_jax.token_labeling.mixtoken import mix_targets
from lvvit_jax.token_labeling.mixtoken import mix_tokens
from lvvit_jax.token_labeling.mixtoken import sample_mix_box
from lvvit_jax.token_labeling.mixtoken import swap_partners
from lvvit_jax.token_labeling.mixtoken import unmix_tokens
from lvvit_jax.token_labeling.online import crop_targets
from lvvit_jax.token_labeling.online import in_place_canvas
from lvvit_jax.token_labeling.online import in_place_logits
from lvvit_jax.token_labeling.online import logits_on_grid
from lvvit_jax.token_labeling.targets import label_targets
from lvvit_jax.token_labeling.targets import pool_dense_logits
from lvvit_jax.token_labeling.targets import pool_topk_logits
from lvvit_jax.token_labeling.targets import smooth_targets
from lvvit_jax.token_labeling.targets import token_targets
from lvvit_jax.token_labeling.objective import ObjectiveConfig
from lvvit_jax.token_labeling.objective import batch_targets
from lvvit_jax.token_labeling.objective import training_loss
