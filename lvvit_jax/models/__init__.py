"""Model zoo: `create_model(name, **overrides)` for the LV-ViT family and the ViT baseline."""
from __future__ import annotations

import dataclasses
from typing import Any, Dict

import jax.numpy as jnp

from lvvit_jax.models.lvvit import LVViT
from lvvit_jax.models.lvvit import LVViTConfig

# SPEC section 1. drop_path_rate is the recipe's (training) value; inference ignores it.
MODEL_CONFIGS: Dict[str, LVViTConfig] = {
    'lvvit_t': LVViTConfig(dim=240, depth=12, num_heads=4, mlp_hidden=720, stem_channels=64,
                           skip_lam=1.0, drop_path_rate=0.1, crop_pct=0.9),
    'lvvit_s': LVViTConfig(dim=384, depth=16, num_heads=6, mlp_hidden=1152, stem_channels=64,
                           skip_lam=2.0, drop_path_rate=0.1, crop_pct=0.9),
    'lvvit_m': LVViTConfig(dim=512, depth=20, num_heads=8, mlp_hidden=1536, stem_channels=64,
                           skip_lam=2.0, drop_path_rate=0.2, crop_pct=1.0),
    'lvvit_l': LVViTConfig(dim=768, depth=24, num_heads=12, mlp_hidden=2304, stem_channels=128,
                           skip_lam=3.0, drop_path_rate=0.3, crop_pct=1.0),
    # Ablation baseline: S-sized plain ViT (naive 16x16 patchify, unscaled residuals, no aux).
    'vit_s': LVViTConfig(dim=384, depth=16, num_heads=6, mlp_hidden=1152, skip_lam=1.0,
                         drop_path_rate=0.1, crop_pct=0.9, conv_stem=False, aux_head=False),
}

# Published ImageNet-1k top-1 (SPEC sections 1 and 6), by (name, size); L@288 is the paper's
# number without a released checkpoint.
PUBLISHED_TOP1 = {
    ('lvvit_t', 224): 79.1, ('lvvit_s', 224): 83.3, ('lvvit_s', 384): 84.4,
    ('lvvit_m', 224): 84.0, ('lvvit_m', 384): 85.4, ('lvvit_m', 448): 85.5,
    ('lvvit_l', 288): 85.3, ('lvvit_l', 448): 86.2, ('lvvit_l', 512): 86.4,
}

_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


def get_config(name: str, **overrides: Any) -> LVViTConfig:
  """The architecture config of `name` with `overrides` applied (any LVViTConfig field)."""
  if name not in MODEL_CONFIGS:
    raise ValueError(f'lvvit_jax/models/__init__.py: unknown model {name!r}; choose one of '
                     f'{sorted(MODEL_CONFIGS)}.')
  fields = {f.name for f in dataclasses.fields(LVViTConfig)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(f'lvvit_jax/models/__init__.py: unknown override(s) {unknown} for '
                     f'{name}; valid ones are {sorted(fields)} and dtype.')
  return dataclasses.replace(MODEL_CONFIGS[name], **overrides)


def create_model(name: str, *, dtype: Any = jnp.float32, **overrides: Any) -> LVViT:
  """Returns the Flax module for `name` ('lvvit_t', 'lvvit_s', 'lvvit_m', 'lvvit_l', 'vit_s').

  Overrides: num_classes, img_size, drop_path_rate, patch_size (the stem keeps its 7x7/2 and
  two 3x3 convs; `proj` gets kernel and stride patch_size / 2), and any other LVViTConfig
  field. `dtype` is the compute dtype (e.g. jnp.bfloat16 or 'bfloat16'); parameters stay
  float32.
  """
  if isinstance(dtype, str):
    if dtype not in _DTYPES:
      raise ValueError(f'lvvit_jax/models/__init__.py: dtype {dtype!r} is not one of '
                       f'{sorted(_DTYPES)}.')
    dtype = _DTYPES[dtype]
  return LVViT(get_config(name, **overrides), dtype=dtype)


__all__ = ['LVViT', 'LVViTConfig', 'MODEL_CONFIGS', 'PUBLISHED_TOP1', 'create_model',
           'get_config']
