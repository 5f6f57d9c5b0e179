"""What a config makes: the model (train and eval size), the objective, schedule and optimizer.

The trainer (`lvvit_jax/train.py`) builds a run from these; benchmarks and tests build the
same pieces. Every model of the registry (`lvvit_jax.models`) works: the checks here pair the
config with the model before anything compiles.

Train and eval sizes: `config.img_size` is the training size; `config.eval_img_size` (default:
the same) is the size evaluation runs at. The eval model is the same architecture built at that
size and applied to the same variables: as they are for a fully convolutional model (an NFNet,
whose global mean pool takes any map), with the position embedding resampled to the eval grid
for a ViT (`at_eval_size`, bicubic, as the converter resamples a checkpoint's). A ViT trained on
random-resized crops sees objects larger than a full test image shows them, so evaluating it
larger can gain (Touvron et al. 2019, "Fixing the train-test resolution discrepancy"); the demo
does (configs/demo.py). Any other size-dependent parameter is refused (`check_eval_model`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import optax

from lvvit_jax import optim
from lvvit_jax.models import MODEL_CONFIGS
from lvvit_jax.models import create_model
from lvvit_jax.models import convert
from lvvit_jax.token_labeling import objective

_FILE = 'lvvit_jax/recipe.py'


def compute_dtype(config: ml_collections.ConfigDict) -> str:
  """config.dtype, with 'auto' = bfloat16 on accelerators and float32 on CPU."""
  if config.dtype == 'auto':
    return 'float32' if jax.default_backend() == 'cpu' else 'bfloat16'
  return config.dtype


def build_model(config: ml_collections.ConfigDict, dtype: Optional[str] = None,
                img_size: Optional[int] = None):
  """The configured model (config.model, img_size, num_classes, model_overrides), checked
  against the registry; `img_size` replaces config.img_size (the eval model)."""
  if config.model not in MODEL_CONFIGS:
    raise ValueError(f'{_FILE}: config.model={config.model!r} is not a model; choose one of '
                     f'{sorted(MODEL_CONFIGS)}.')
  overrides = dict(config.model_overrides)
  fields = {f.name for f in dataclasses.fields(MODEL_CONFIGS[config.model])}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(f'{_FILE}: config.model_overrides has {unknown}, which {config.model} does '
                     f'not have; remove them (its fields: {sorted(fields)}).')
  return create_model(config.model, dtype=dtype or compute_dtype(config),
                      num_classes=config.num_classes, img_size=img_size or config.img_size,
                      **overrides)


def eval_img_size(config: ml_collections.ConfigDict) -> int:
  """The size evaluation runs at: config.eval_img_size, default config.img_size."""
  return config.get('eval_img_size') or config.img_size


def build_eval_model(config: ml_collections.ConfigDict, dtype: Optional[str] = None):
  """The configured model at the eval size (`eval_img_size`)."""
  return build_model(config, dtype, img_size=eval_img_size(config))


def _abstract_params(model) -> Any:
  size = model.config.img_size
  return jax.eval_shape(lambda: model.init({'params': jax.random.key(0)},
                                           jnp.zeros((1, size, size, 3))))['params']


def _is_pos_embed(path) -> bool:
  return getattr(path[-1], 'key', None) == 'pos_embed'


def check_eval_model(config: ml_collections.ConfigDict, model, eval_model) -> None:
  """Evaluating the trained variables at another size needs size-independent parameters, or a
  position embedding (`at_eval_size` resamples it)."""
  if eval_model.config.img_size == model.config.img_size:
    return
  train, other = (jax.tree_util.tree_leaves_with_path(_abstract_params(m))
                  for m in (model, eval_model))
  differ = [jax.tree_util.keystr(p) for (p, a), (_, b) in zip(train, other)
            if a.shape != b.shape and not _is_pos_embed(p)]
  if differ:
    raise ValueError(
        f'{_FILE}: config.eval_img_size={eval_model.config.img_size} but {config.model} has '
        f'parameters that depend on the image size ({", ".join(differ[:3])} differ from '
        f'config.img_size={model.config.img_size}); leave config.eval_img_size unset, or '
        'fine-tune at that size and evaluate the checkpoint there (config.mode=eval).')


def at_eval_size(variables: Any, eval_model) -> Any:
  """`variables` as `eval_model` takes them: a position embedding of another grid resampled to
  the eval model's (`convert.resize_pos_embed`), everything else as it is. Traceable; the
  identity when the sizes agree."""
  grid = getattr(eval_model.config, 'grid', None)

  def fit(path, value):
    if grid is None or not _is_pos_embed(path) or value.shape[1] == 1 + grid[0] * grid[1]:
      return value
    return convert.resize_pos_embed(value, grid)

  return jax.tree_util.tree_map_with_path(fit, variables)


def check_model_settings(config: ml_collections.ConfigDict, model) -> None:
  """The method's settings the model must support (checked before anything compiles)."""
  if config.mixtoken and config.mix == 'mixtoken' and not model.config.supports_mixtoken:
    raise ValueError(f'{_FILE}: config.mixtoken=True but {config.model} has no tokens to mix '
                     '(supports_mixtoken is False); set --config.mixtoken=False.')


def objective_config(config: ml_collections.ConfigDict) -> objective.ObjectiveConfig:
  """The method's settings; dense_weight None = 0.5 with score maps or an online teacher, 0
  without."""
  dense_weight = config.dense_weight
  if dense_weight is None:
    dense_weight = 0.5 if config.data.score_maps_dir or config.get('online_teacher') else 0.0
  return objective.ObjectiveConfig(
      cls_weight=config.cls_weight, dense_weight=dense_weight,
      smoothing=config.smoothing, mixtoken=config.mixtoken, mix=config.mix,
      ground_truth_blend=config.ground_truth_blend)


def make_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int):
  """(lr schedule, total steps): warm-up, cosine, cool-down, in steps from the epoch recipe."""
  total = config.total_steps or config.num_epochs * steps_per_epoch
  warmup = config.warmup_steps
  if warmup is None:
    warmup = config.warmup_epochs * steps_per_epoch
  cooldown = config.cooldown_epochs * steps_per_epoch if config.total_steps is None else 0
  schedule = optim.lr_schedule(config.lr, total, warmup, init_lr=config.init_lr,
                               end_lr=config.end_lr, cooldown_steps=cooldown)
  return schedule, total


def make_optimizer(config: ml_collections.ConfigDict, params: Any,
                   schedule) -> optax.GradientTransformation:
  """config's optimizer (`optim.make_optimizer`); AGC spares the model's classifier."""
  return optim.make_optimizer(
      params, schedule, optimizer=config.optimizer, weight_decay=config.weight_decay,
      decay_mask=config.decay_mask, b1=config.b1, b2=config.b2, eps=config.eps,
      momentum=config.momentum, nesterov=config.nesterov, grad_clip_norm=config.grad_clip_norm,
      agc_clip=config.agc_clip, agc_eps=config.agc_eps,
      agc_exempt=MODEL_CONFIGS[config.model].head_names)
