"""Model zoo: `create_model(name, **overrides)`; one face for every model.

Every family is one file of this package (`lvvit.py`, `nfnet.py`, ...) exporting
  `CONFIGS`        {name: config dataclass instance},
  `Model`          the Flax module class, built as `Model(config, dtype=...)`,
  `PUBLISHED_TOP1` {(name, img_size): published ImageNet-1k top-1};
adding a model is adding such a file and its line in `_FAMILIES` below.

The contract that labelgen, the trainer and evaluation rely on (nothing outside `models/`
reaches into a module):
  `model.apply(v, images)`                            eval logits (B, K) float32;
  `model.apply(v, images, method='dense_logits')`     (B, h, w, K) float32, the dense annotation
                                                      a teacher writes as a score map;
  `model.apply(v, images, train=True, mix_box=box, rngs={'dropout': k},
              mutable=['batch_stats'])`               ((cls (B, K), aux (B, N, K) or None), updates);
                                                      `mix_box` must be None for a model without
                                                      tokens (`config.supports_mixtoken`);
  `model.config`: a frozen dataclass with `img_size`, `num_classes`, `crop_pct`,
  `drop_path_rate`, `grid` ((h, w) of `dense_logits` at `img_size`), `head_names` (top-level
  parameters that depend on num_classes) and `supports_mixtoken`.
Images are NHWC, normalised with the ImageNet mean and std.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict

import jax.numpy as jnp

from lvvit_jax.models import lvvit
from lvvit_jax.models import nfnet
from lvvit_jax.models.lvvit import LVViT
from lvvit_jax.models.lvvit import LVViTConfig

_FILE = 'lvvit_jax/models/__init__.py'

# The registry: one line per family file.
_FAMILIES = (lvvit, nfnet)

MODEL_CONFIGS: Dict[str, Any] = {n: c for f in _FAMILIES for n, c in f.CONFIGS.items()}
PUBLISHED_TOP1 = {k: v for f in _FAMILIES for k, v in f.PUBLISHED_TOP1.items()}
_MODULES = {n: f.Model for f in _FAMILIES for n in f.CONFIGS}

_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


def get_config(name: str, **overrides: Any) -> Any:
  """The architecture config of `name` with `overrides` applied (any field of its config)."""
  if name not in MODEL_CONFIGS:
    raise ValueError(f'{_FILE}: unknown model {name!r}; choose one of {sorted(MODEL_CONFIGS)}.')
  base = MODEL_CONFIGS[name]
  fields = {f.name for f in dataclasses.fields(base)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(f'{_FILE}: unknown override(s) {unknown} for {name}; valid ones are '
                     f'{sorted(fields)} and dtype.')
  return dataclasses.replace(base, **overrides)


def create_model(name: str, *, dtype: Any = jnp.float32, **overrides: Any) -> Any:
  """Returns the Flax module for `name` (any key of MODEL_CONFIGS).

  Overrides: num_classes, img_size, drop_path_rate and any other field of the family's config
  (LV-ViT: patch_size, where the stem keeps its 7x7/2 and two 3x3 convs and `proj` gets
  kernel and stride patch_size / 2; NFNet: depths, widths, group_sizes, stem_strides,
  stage_strides, activation, drop_rate, ...). `dtype` is the compute dtype (e.g. jnp.bfloat16 or
  'bfloat16'); parameters stay float32.
  """
  if isinstance(dtype, str):
    if dtype not in _DTYPES:
      raise ValueError(f'{_FILE}: dtype {dtype!r} is not one of {sorted(_DTYPES)}.')
    dtype = _DTYPES[dtype]
  config = get_config(name, **overrides)
  return _MODULES[name](config, dtype=dtype)


__all__ = ['LVViT', 'LVViTConfig', 'MODEL_CONFIGS', 'PUBLISHED_TOP1', 'create_model',
           'get_config']
