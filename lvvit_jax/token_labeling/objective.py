"""The training objective of a batch: targets from the batch, MixToken (or CutMix), forward, loss.

`batch_targets` is the one place where the input meets the method: a batch with score maps
(`topk_logits`, `topk_idx`, `map_box`, `label_affine`) gets token-labeling targets, a batch
without them (or an example whose map is flagged missing, `has_map` False) gets the smoothed
label for the cls and every token. `training_loss` is the loss of one training step; the
trainer differentiates it and the benchmarks time it, so it is written only here.

Mixing: `mixtoken` False turns every mix off (the setting predates `mix`); with `mixtoken` True,
`mix` picks 'mixtoken' (SPEC section 4, the default), 'cutmix' (the paper's ablation: pixels and
targets mixed in a pixel box, cutmix.py) or 'none'.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp

from lvvit_jax.token_labeling.cutmix import cutmix_images
from lvvit_jax.token_labeling.cutmix import cutmix_targets
from lvvit_jax.token_labeling.cutmix import sample_cutmix_box
from lvvit_jax.token_labeling.loss import blend_ground_truth
from lvvit_jax.token_labeling.loss import soft_cross_entropy
from lvvit_jax.token_labeling.loss import token_label_loss
from lvvit_jax.token_labeling.mixtoken import Grid
from lvvit_jax.token_labeling.mixtoken import grid_shape
from lvvit_jax.token_labeling.mixtoken import mix_targets
from lvvit_jax.token_labeling.mixtoken import sample_mix_box
from lvvit_jax.token_labeling.online import crop_targets
from lvvit_jax.token_labeling.targets import label_targets
from lvvit_jax.token_labeling.targets import token_targets

_FILE = 'lvvit_jax/token_labeling/objective.py'
MAP_KEYS = ('topk_logits', 'topk_idx', 'map_box', 'label_affine')
MIXES = ('mixtoken', 'cutmix', 'none')


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
  """The method's knobs (SPEC sections 3-5).

  Attributes:
    cls_weight: weight of the cls term (1.0).
    dense_weight: weight of the token term (paper 0.5; the released script 1.0).
    smoothing: label smoothing s of every target (0.1).
    mixtoken: mix every step (SPEC: always on); False turns mixing off whatever `mix` says.
    mix: with `mixtoken` True, which mix: 'mixtoken' (SPEC section 4), 'cutmix' (a pixel box,
      targets mixed by area and token coverage) or 'none'.
    ground_truth_blend: the release's optional blend of the one-hot label into the cls target.
    samples: RoIAlign samples per token cell and axis when pooling score maps.
    target_method: 'scatter' or 'dense' pooling (`token_targets`).
  """
  cls_weight: float = 1.0
  dense_weight: float = 0.5
  smoothing: float = 0.1
  mixtoken: bool = True
  mix: str = 'mixtoken'
  ground_truth_blend: bool = False
  samples: int = 2
  target_method: str = 'scatter'

  def __post_init__(self):
    if self.mix not in MIXES:
      raise ValueError(f'{_FILE}: config.mix={self.mix!r} is not one of {MIXES}; set config.mix '
                       "to 'mixtoken' (the method), 'cutmix' (the ablation) or 'none' "
                       '(config.mixtoken=False also turns mixing off).')

  @property
  def mix_method(self) -> str:
    """The mix a step applies: `mix`, or 'none' when `mixtoken` is False."""
    return self.mix if self.mixtoken else 'none'


def batch_targets(batch: Mapping[str, jax.Array], *, grid: Grid, num_classes: int,
                  smoothing: float = 0.1, samples: int = 2,
                  method: str = 'scatter') -> Tuple[jax.Array, jax.Array]:
  """(cls_target (B, K), token_targets (B, gh, gw, K)) of a batch, float32.

  From the score maps when the batch has them (`token_targets`, through each example's
  `label_affine` and `map_box`), else from `label` (`label_targets`). Examples with
  `has_map` False (a label file was missing at import) fall back to their label.
  """
  if 'topk_logits' not in batch:
    return label_targets(batch['label'], grid=grid, num_classes=num_classes,
                         smoothing=smoothing)
  cls_t, tok_t = token_targets(*(batch[k] for k in MAP_KEYS), grid=grid,
                               num_classes=num_classes, smoothing=smoothing, samples=samples,
                               method=method)
  if 'has_map' in batch:
    plain_cls, plain_tok = label_targets(batch['label'], grid=grid, num_classes=num_classes,
                                         smoothing=smoothing)
    has = jnp.asarray(batch['has_map'], bool)
    cls_t = jnp.where(has[:, None], cls_t, plain_cls)
    tok_t = jnp.where(has[:, None, None, None], tok_t, plain_tok)
  return cls_t, tok_t


def training_loss(model: Any, params: Any, batch_stats: Any, batch: Mapping[str, jax.Array],
                  rng: jax.Array, cfg: ObjectiveConfig = ObjectiveConfig(),
                  teacher_logits: Optional[jax.Array] = None
                  ) -> Tuple[jax.Array, Tuple[Any, Dict[str, jax.Array]]]:
  """The loss of one training step and (new batch_stats, {'cls', 'dense'} parts).

  `batch['image']` is the (augmented, normalised) image batch; MixToken mixes the tokens in
  a box drawn from `rng` (one box per step, as the release), mixes the cls target by the
  box's area and leaves the token targets alone (the model un-mixes its aux outputs). CutMix
  (`cfg.mix_method == 'cutmix'`) draws a pixel box from the same key, mixes the images and
  then the targets (cls by area, tokens by coverage) after each example's were sampled through
  its own `label_affine`, and runs the model unmixed. Drop path draws from `rng` too; its bits
  depend only on the example's row in the global batch.

  `teacher_logits` (B, h, w, K), a teacher's classifier at every position of `batch['image']`
  (online token labeling, `online.crop_targets`), replace the targets of the score maps or
  labels; the ground-truth blend and the mixing apply to them as to the others.
  """
  config = model.config
  grid = config.grid
  num_classes = config.num_classes
  box_rng, drop_rng = jax.random.split(rng)
  if teacher_logits is not None:
    cls_t, tok_t = crop_targets(teacher_logits, grid=grid, smoothing=cfg.smoothing)
  else:
    cls_t, tok_t = batch_targets(batch, grid=grid, num_classes=num_classes,
                                 smoothing=cfg.smoothing, samples=cfg.samples,
                                 method=cfg.target_method)
  if cfg.ground_truth_blend:
    ground_truth, _ = label_targets(batch['label'], grid=grid, num_classes=num_classes,
                                    smoothing=cfg.smoothing)
    cls_t = blend_ground_truth(cls_t, ground_truth)  # Before mixing, as the release.
  images = batch['image']
  box: Optional[jax.Array] = None  # MixToken's token box, for the model.
  if cfg.mix_method == 'mixtoken':
    box = sample_mix_box(box_rng, grid)
    cls_t = mix_targets(cls_t, box, grid)
  elif cfg.mix_method == 'cutmix':
    image_size = images.shape[1:3]
    pixel_box = sample_cutmix_box(box_rng, image_size)
    images = cutmix_images(images, pixel_box)
    cls_t, tok_t = cutmix_targets(cls_t, tok_t, pixel_box, image_size, grid)
  (cls_logits, aux_logits), updates = model.apply(
      {'params': params, 'batch_stats': batch_stats}, images, train=True, mix_box=box,
      rngs={'dropout': drop_rng}, mutable=['batch_stats'])
  if aux_logits is None:  # A model without an aux head (the vit_s baseline).
    cls_loss = jnp.mean(soft_cross_entropy(cls_logits, cls_t))
    parts = {'cls': cls_loss, 'dense': jnp.zeros_like(cls_loss)}
    total = cfg.cls_weight * cls_loss
  else:
    gh, gw = grid_shape(grid)
    total, parts = token_label_loss(
        cls_logits, aux_logits, cls_t, tok_t.reshape(tok_t.shape[0], gh * gw, num_classes),
        cls_weight=cfg.cls_weight, dense_weight=cfg.dense_weight)
  return total, (updates.get('batch_stats', {}), parts)
