"""The LV-ViT family (SPEC section 1) as Flax linen modules.

Module and parameter names mirror the authors' PyTorch release (`patch_embed/conv1`,
`blocks_3/attn/qkv`, `aux_head`, ...) so that checkpoint conversion is a renaming plus
transposes (see `lvvit_jax/models/convert.py`).

Calls:
  inference: `model.apply(v, images)` -> `cls + 0.5 * max_tokens(aux)`, (B, K) float32.
  training:  `model.apply(v, images, train=True, mix_box=box, rngs={'dropout': k},
             mutable=['batch_stats'])` -> `((cls (B, K), aux (B, N, K)), updates)`.
  features:  `model.apply(v, images, method='features')` -> normed tokens (B, 1 + N, D).
  dense:     `model.apply(v, images, method='dense_logits')` -> (B, gh, gw, K) float32: the aux
             head on every patch token (a model without one, `vit_s`: the class head).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from lvvit_jax.models import attention
from lvvit_jax.models import batch_norm
from lvvit_jax.models import dense
from lvvit_jax.models import lowering
from lvvit_jax.token_labeling.mixtoken import mix_tokens
from lvvit_jax.token_labeling.mixtoken import unmix_tokens

Dtype = Any

LN_EPS = 1e-5
BN_EPS = 1e-5
BN_MOMENTUM = 0.9  # Flax convention: new = 0.9 * old + 0.1 * batch (PyTorch momentum 0.1).
AUX_WEIGHT_AT_INFERENCE = 0.5

dense_init = nn.initializers.truncated_normal(stddev=0.02)
embed_init = nn.initializers.truncated_normal(stddev=0.02)


@dataclasses.dataclass(frozen=True)
class LVViTConfig:
  """Architecture hyper-parameters of one variant (SPEC section 1 table)."""
  dim: int
  depth: int
  num_heads: int
  mlp_hidden: int
  stem_channels: int = 64
  skip_lam: float = 1.0
  drop_path_rate: float = 0.0
  crop_pct: float = 0.9
  num_classes: int = 1000
  img_size: int = 224
  patch_size: int = 16
  conv_stem: bool = True  # False: the plain ViT patchify (one conv patch x patch, stride patch).
  aux_head: bool = True

  def __post_init__(self):
    # A side that is not a multiple of the patch leaves pixels outside every token (and a
    # teacher's map would not cover the image it claims to).
    p, s = self.patch_size, self.img_size
    if p >= 1 and (s < p or s % p):
      raise ValueError(f'lvvit_jax/models/lvvit.py: img_size {s} is not a multiple of the patch '
                       f'size {p}; use e.g. img_size={max(p, s // p * p)}.')

  @property
  def grid(self) -> Tuple[int, int]:
    """Token grid (gh, gw) for square `img_size` inputs."""
    return (token_grid(self.img_size, self.patch_size, self.conv_stem),) * 2

  @property
  def num_tokens(self) -> int:
    gh, gw = self.grid
    return gh * gw

  @property
  def head_names(self) -> Tuple[str, ...]:
    """Top-level parameter names whose shapes depend on num_classes (dropped on transfer)."""
    return ('head', 'aux_head') if self.aux_head else ('head',)

  @property
  def supports_mixtoken(self) -> bool:
    """MixToken mixes the patch tokens after the stem: every LV-ViT (and ViT) has them."""
    return True


def token_grid(img_size: int, patch_size: int, conv_stem: bool = True) -> int:
  """Tokens along one side for an image side of `img_size` pixels."""
  if not conv_stem:
    return img_size // patch_size
  after_conv1 = (img_size + 2 * 3 - 7) // 2 + 1
  return after_conv1 // (patch_size // 2)


class ConvStem(nn.Module):
  """7x7/2 conv + BN + ReLU, two 3x3 conv + BN + ReLU, then the `proj` conv to `dim`.

  The convs are `nn.Conv`s (parameters `conv1/kernel`, ..., `proj/bias`); on CPU their kernel
  gradients are fast only with YNNPACK's fusions off (`lvvit_jax/__init__.py` sets that). BN +
  ReLU is `batch_norm.BatchNormReLU`: `nn.BatchNorm`'s variables, with a CPU lowering.
  """
  config: LVViTConfig
  dtype: Dtype = jnp.float32

  def setup(self):
    c = self.config
    if c.conv_stem:
      if c.patch_size % 2 or c.patch_size < 2:
        raise ValueError(
            f'lvvit_jax/models/lvvit.py: patch_size must be even (the stem halves the image '
            f'before `proj`), got {c.patch_size}.')
      conv = lambda k, s, p: nn.Conv(  # noqa: E731
          c.stem_channels, (k, k), strides=(s, s), padding=((p, p), (p, p)), use_bias=False,
          dtype=self.dtype)
      self.conv1 = conv(7, 2, 3)
      self.conv2 = conv(3, 1, 1)
      self.conv3 = conv(3, 1, 1)
      self.bn1, self.bn2, self.bn3 = (
          batch_norm.BatchNormReLU(BN_MOMENTUM, BN_EPS, dtype=self.dtype) for _ in range(3))
      proj_size = c.patch_size // 2
    else:
      proj_size = c.patch_size
    self.proj = nn.Conv(c.dim, (proj_size, proj_size), strides=(proj_size, proj_size),
                        padding='VALID', dtype=self.dtype)

  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    if self.config.conv_stem:
      for conv, bn in ((self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3)):
        x = bn(conv(x), use_running_average=not train)
    return self.proj(x)


class Attention(nn.Module):
  """Multi-head self-attention with one bias-free qkv projection laid out (3, heads, hd)."""
  dim: int
  num_heads: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    product = dense.product()   # the CPU lowering of the backward (lvvit_jax/models/dense.py)
    qkv = nn.Dense(3 * d, use_bias=False, kernel_init=dense_init, dtype=self.dtype,
                   dot_general=product, name='qkv')(x)
    # softmax(q k^T * hd^-0.5) v per head, with its CPU lowering (lvvit_jax/models/attention.py).
    out = attention.multi_head(qkv, self.num_heads)
    return nn.Dense(d, kernel_init=dense_init, dtype=self.dtype, dot_general=product,
                    name='proj')(out)


class Mlp(nn.Module):
  hidden: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    product = dense.product()   # the CPU lowering of the backward (lvvit_jax/models/dense.py)
    x = nn.Dense(self.hidden, kernel_init=dense_init, dtype=self.dtype, dot_general=product,
                 name='fc1')(x)
    x = nn.gelu(x, approximate=False)
    return nn.Dense(d, kernel_init=dense_init, dtype=self.dtype, dot_general=product,
                    name='fc2')(x)


class Block(nn.Module):
  """Pre-norm block with scaled residual branches: x + DropPath(f(LN(x))) / skip_lam."""
  dim: int
  num_heads: int
  mlp_hidden: int
  skip_lam: float
  drop_path: float
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    # Per-sample drop path: one Bernoulli per example, broadcast over tokens and channels.
    drop = nn.Dropout(self.drop_path, broadcast_dims=(1, 2), deterministic=not train)
    ln = lambda name: nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name=name)  # noqa: E731
    y = Attention(self.dim, self.num_heads, dtype=self.dtype, name='attn')(ln('norm1')(x))
    x = x + drop(y) / self.skip_lam
    y = Mlp(self.mlp_hidden, dtype=self.dtype, name='mlp')(ln('norm2')(x))
    return x + drop(y) / self.skip_lam


class LVViT(nn.Module):
  """LV-ViT: conv stem, MixToken, scaled-residual blocks, cls head and per-token aux head."""
  config: LVViTConfig
  dtype: Dtype = jnp.float32  # Compute dtype; parameters stay float32.

  def setup(self):
    c = self.config
    self.patch_embed = ConvStem(c, dtype=self.dtype)
    self.cls_token = self.param('cls_token', embed_init, (1, 1, c.dim))
    self.pos_embed = self.param('pos_embed', embed_init, (1, 1 + c.num_tokens, c.dim))
    rates = [c.drop_path_rate * i / max(c.depth - 1, 1) for i in range(c.depth)]
    self.blocks = [
        Block(c.dim, c.num_heads, c.mlp_hidden, c.skip_lam, rates[i], dtype=self.dtype)
        for i in range(c.depth)
    ]
    self.norm = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype)
    self.head = nn.Dense(c.num_classes, kernel_init=dense_init, dtype=self.dtype)
    if c.aux_head:
      self.aux_head = nn.Dense(c.num_classes, kernel_init=dense_init, dtype=self.dtype)

  def _encode(self, images: jax.Array, train: bool,
              mix_box: Optional[jax.Array]) -> Tuple[jax.Array, Tuple[int, int]]:
    """Normed tokens (B, 1 + N, D) and the token grid; tokens mixed inside `mix_box`."""
    c = self.config
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f'lvvit_jax/models/lvvit.py: expected NHWC images (B, H, W, 3), got '
                       f'{images.shape}.')
    x = self.patch_embed(images.astype(self.dtype), train)
    b, gh, gw, d = x.shape
    if gh * gw != c.num_tokens:
      raise ValueError(
          f'lvvit_jax/models/lvvit.py: images of {images.shape[1:3]} give a {gh}x{gw} token '
          f'grid but the model was built for img_size={c.img_size} ({c.grid[0]}x{c.grid[1]}); '
          f'create the model with img_size={images.shape[1]} (and resample pos_embed).')
    if mix_box is not None:
      x = mix_tokens(x, mix_box)
    x = x.reshape(b, gh * gw, d)
    cls = jnp.broadcast_to(self.cls_token, (b, 1, d)).astype(x.dtype)
    x = jnp.concatenate([cls, x], axis=1) + self.pos_embed.astype(x.dtype)
    return self.norm(self._blocks(x, train)), (gh, gw)

  def _blocks(self, x: jax.Array, train: bool) -> jax.Array:
    """The blocks over (B, 1 + N, D) tokens; on XLA:CPU, when LVVIT_JAX_CPU_BLOCK_CHUNKS asks
    for it, over independent parts of the batch (`lowering.block_chunks`: every op of a block is
    per example, so only float rounding in the parameters' gradients, summed over the parts,
    differs). Measured on one CPU device; on a mesh the parts are resharded (correct, its speed
    not measured)."""
    chunks = lowering.block_chunks(x.shape[0])
    parts = []
    for part in (jnp.split(x, chunks) if chunks > 1 else [x]):
      for block in self.blocks:
        part = block(part, train)
      parts.append(part)
    return parts[0] if chunks == 1 else jnp.concatenate(parts)

  def features(self, images: jax.Array, train: bool = False,
               mix_box: Optional[jax.Array] = None) -> jax.Array:
    """Normed token features (B, 1 + N, D): cls first, then patch tokens row-major."""
    return self._encode(images, train, mix_box)[0]

  def dense_logits(self, images: jax.Array) -> jax.Array:
    """(B, gh, gw, K) float32: the aux head on every patch token, row-major (the annotation a
    teacher writes as a score map); without an aux head (`vit_s`) the class head instead."""
    x, (gh, gw) = self._encode(images, False, None)
    head = self.aux_head if self.config.aux_head else self.head
    logits = head(x[:, 1:]).astype(jnp.float32)
    return logits.reshape(logits.shape[0], gh, gw, logits.shape[-1])

  def __call__(self, images: jax.Array, train: bool = False,
               mix_box: Optional[jax.Array] = None):
    """Inference logits (B, K), or in training `(cls (B, K), aux (B, N, K))` un-mixed.

    `mix_box` (int (4,) = row0, col0, row1, col1 on the token grid, may be traced) applies
    MixToken after the stem; the aux outputs are swapped back with the same box so each
    belongs to its own image (token targets are never mixed).
    """
    x, (gh, gw) = self._encode(images, train, mix_box)
    cls_logits = self.head(x[:, 0]).astype(jnp.float32)
    aux_logits = None
    if self.config.aux_head:
      aux = self.aux_head(x[:, 1:])
      if mix_box is not None:
        b, _, k = aux.shape
        aux = unmix_tokens(aux.reshape(b, gh, gw, k), mix_box).reshape(b, gh * gw, k)
      aux_logits = aux.astype(jnp.float32)
    if train:
      return cls_logits, aux_logits
    if aux_logits is None:
      return cls_logits
    return cls_logits + AUX_WEIGHT_AT_INFERENCE * jnp.max(aux_logits, axis=1)


Model = LVViT

# SPEC section 1. drop_path_rate is the recipe's (training) value; inference ignores it.
CONFIGS = {
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
