"""The training objective of a batch: targets from the batch, MixToken, forward, loss.

`batch_targets` is the one place where the input meets the method: a batch with score maps
(`topk_logits`, `topk_idx`, `map_box`, `label_affine`) gets token-labeling targets, a batch
without them (or an example whose map is flagged missing, `has_map` False) gets the smoothed
label for the cls and every token. `training_loss` is the loss of one training step; the
trainer differentiates it and the benchmarks time it, so it is written only here.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp

from lvvit_jax.token_labeling.loss import blend_ground_truth
from lvvit_jax.token_labeling.loss import soft_cross_entropy
from lvvit_jax.token_labeling.loss import token_label_loss
from lvvit_jax.token_labeling.mixtoken import Grid
from lvvit_jax.token_labeling.mixtoken import grid_shape
from lvvit_jax.token_labeling.mixtoken import mix_targets
from lvvit_jax.token_labeling.mixtoken import sample_mix_box
from lvvit_jax.token_labeling.targets import label_targets
from lvvit_jax.token_labeling.targets import token_targets

MAP_KEYS = ('topk_logits', 'topk_idx', 'map_box', 'label_affine')


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
  """The method's knobs (SPEC sections 3-5).

  Attributes:
    cls_weight: weight of the cls term (1.0).
    dense_weight: weight of the token term (paper 0.5; the released script 1.0).
    smoothing: label smoothing s of every target (0.1).
    mixtoken: sample a MixToken box every step (SPEC: always on).
    ground_truth_blend: the release's optional blend of the one-hot label into the cls target.
    samples: RoIAlign samples per token cell and axis when pooling score maps.
    target_method: 'scatter' or 'dense' pooling (`token_targets`).
  """
  cls_weight: float = 1.0
  dense_weight: float = 0.5
  smoothing: float = 0.1
  mixtoken: bool = True
  ground_truth_blend: bool = False
  samples: int = 2
  target_method: str = 'scatter'


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
                  rng: jax.Array, cfg: ObjectiveConfig = ObjectiveConfig()
                  ) -> Tuple[jax.Array, Tuple[Any, Dict[str, jax.Array]]]:
  """The loss of one training step and (new batch_stats, {'cls', 'dense'} parts).

  `batch['image']` is the (augmented, normalised) image batch; MixToken mixes the tokens in
  a box drawn from `rng` (one box per step, as the release), mixes the cls target by the
  box's area and leaves the token targets alone (the model un-mixes its aux outputs). Drop
  path draws from `rng` too; its bits depend only on the example's row in the global batch.
  """
  config = model.config
  grid = config.grid
  num_classes = config.num_classes
  box_rng, drop_rng = jax.random.split(rng)
  cls_t, tok_t = batch_targets(batch, grid=grid, num_classes=num_classes,
                               smoothing=cfg.smoothing, samples=cfg.samples,
                               method=cfg.target_method)
  if cfg.ground_truth_blend:
    ground_truth, _ = label_targets(batch['label'], grid=grid, num_classes=num_classes,
                                    smoothing=cfg.smoothing)
    cls_t = blend_ground_truth(cls_t, ground_truth)  # Before mixing, as the release.
  box: Optional[jax.Array] = None
  if cfg.mixtoken:
    box = sample_mix_box(box_rng, grid)
    cls_t = mix_targets(cls_t, box, grid)
  (cls_logits, aux_logits), updates = model.apply(
      {'params': params, 'batch_stats': batch_stats}, batch['image'], train=True, mix_box=box,
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
