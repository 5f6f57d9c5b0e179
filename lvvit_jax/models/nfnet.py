"""NFNet F0..F7 (Brock et al. 2021) as Flax linen modules, following DeepMind's reference.

Semantics are those of `deepmind-research/nfnets/{nfnet,base}.py`: scaled weight-standardised
convs with gain and bias, activations scaled by their gamma (GELU is JAX's default, the tanh
approximation), beta = 1 / expected_std at every block input, alpha = 0.2, SkipInit gain 0,
squeeze-excite times 2, stochastic depth without rescaling, no normalisation layers at all.

Names mirror the Haiku checkpoints so that `NFNet/~/<a>/~/<b>` is the Flax path `<a>/<b>`
(Haiku's `w` is `kernel` here, `b` is `bias`):

  | Flax path                              | params                 | Haiku module              |
  |----------------------------------------|------------------------|---------------------------|
  | stem_conv0 .. stem_conv3               | kernel, gain, bias     | NFNet/~/stem_conv0 ..     |
  | nf_block, nf_block_1, ... (global)     | skip_gain ()           | NFNet/~/nf_block, .._1 .. |
  | <block>/conv0, conv1, conv1b, conv2    | kernel, gain, bias     | .../nf_block/~/conv0 ...  |
  | <block>/conv_shortcut (where present)  | kernel, gain, bias     | .../~/conv_shortcut       |
  | <block>/squeeze_excite/linear{,_1}     | kernel, bias           | .../~/squeeze_excite/~/.. |
  | final_conv                             | kernel, gain, bias     | NFNet/~/final_conv        |
  | linear                                 | kernel, bias           | NFNet/~/linear            |

Block 0 is `nf_block` (no suffix), as Haiku numbers a module's second instance `_1`; use
`block_name(i)`. Conv kernels are (kh, kw, in / groups, out), gains and biases (out,).

Calls: `model.apply(v, x)` -> logits (B, K); `model.apply(v, x, train=True,
rngs={'dropout': k})` -> `(logits, None)`; `model.apply(v, x, method='dense_logits')` ->
(B, h, w, K), the `linear` head at every position of the final feature map.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

_FILE = 'lvvit_jax/models/nfnet.py'
Dtype = Any

WS_EPS = 1e-4
# Activations times the gamma that makes their output variance 1 on N(0, 1) input
# (`base.nonlinearities`; 'glu' is left out: it halves the channels, which no NFNet allows).
ACTIVATIONS: Dict[str, Callable[[jax.Array], jax.Array]] = {
    'identity': lambda x: x,
    'celu': lambda x: jax.nn.celu(x) * 1.270926833152771,
    'elu': lambda x: jax.nn.elu(x) * 1.2716004848480225,
    'gelu': lambda x: jax.nn.gelu(x, approximate=True) * 1.7015043497085571,
    'leaky_relu': lambda x: jax.nn.leaky_relu(x) * 1.70590341091156,
    'log_sigmoid': lambda x: jax.nn.log_sigmoid(x) * 1.9193484783172607,
    'log_softmax': lambda x: jax.nn.log_softmax(x) * 1.0002083778381348,
    'relu': lambda x: jax.nn.relu(x) * 1.7139588594436646,
    'relu6': lambda x: jax.nn.relu6(x) * 1.7131484746932983,
    'selu': lambda x: jax.nn.selu(x) * 1.0008515119552612,
    'sigmoid': lambda x: jax.nn.sigmoid(x) * 4.803835391998291,
    'silu': lambda x: jax.nn.silu(x) * 1.7881293296813965,
    'soft_sign': lambda x: jax.nn.soft_sign(x) * 2.338853120803833,
    'softplus': lambda x: jax.nn.softplus(x) * 1.9203323125839233,
    'tanh': lambda x: jnp.tanh(x) * 1.5939117670059204,
}

conv_init = nn.initializers.variance_scaling(1.0, 'fan_in', 'normal')  # Haiku's for WSConv2D
head_init = nn.initializers.normal(stddev=0.01)


def linear_init(key: jax.Array, shape: Tuple[int, ...], dtype: Dtype = jnp.float32) -> jax.Array:
  """Haiku's `hk.Linear` default: normal truncated at 2 std, std 1 / sqrt(fan_in), uncorrected."""
  return nn.initializers.truncated_normal(stddev=1.0 / math.sqrt(shape[0]))(key, shape, dtype)


def _ceil_div(n: int, d: int) -> int:
  return -(-n // d)


@dataclasses.dataclass(frozen=True)
class NFNetConfig:
  """Architecture of one variant (`base.nfnet_params`); defaults are the reference's values."""
  depths: Tuple[int, ...]
  img_size: int  # The test size: eval runs at it, `grid` is computed at it.
  train_img_size: int
  drop_rate: float  # Head dropout before `linear`.
  widths: Tuple[int, ...] = (256, 512, 1536, 1536)
  drop_path_rate: float = 0.1  # Stochastic depth; block i of n drops with rate * i / n.
  num_classes: int = 1000
  crop_pct: float = 1.0  # The F variants: the reference's eval crop, size / (size + 32).
  activation: str = 'gelu'
  alpha: float = 0.2
  se_ratio: float = 0.5  # Squeeze-excite width / block width; 0: no squeeze-excite.
  expansion: float = 0.5
  group_sizes: Tuple[int, ...] = (128, 128, 128, 128)  # Channels per group of the 3x3 convs.
  stem_widths: Tuple[int, ...] = (16, 32, 64)  # stem_conv3 has widths[0] // 2 channels.
  stem_strides: Tuple[int, ...] = (2, 1, 1, 2)
  stage_strides: Tuple[int, ...] = (1, 2, 2, 2)
  final_conv_mult: int = 2

  def __post_init__(self):
    per_stage = (self.depths, self.widths, self.stage_strides, self.group_sizes)
    if len({len(t) for t in per_stage}) != 1:
      raise ValueError(f'{_FILE}: depths {self.depths}, widths {self.widths}, stage_strides '
                       f'{self.stage_strides} and group_sizes {self.group_sizes} need one entry '
                       'per stage; give all four the same length.')
    if len(self.stem_strides) != len(self.stem_widths) + 1:
      raise ValueError(f'{_FILE}: stem_strides {self.stem_strides} needs one entry per stem '
                       f'conv, len(stem_widths) + 1 = {len(self.stem_widths) + 1}.')
    if self.se_ratio < 0:
      raise ValueError(f'{_FILE}: se_ratio {self.se_ratio} is negative; use a ratio of the block '
                       'width (0.5 in NFNets) or 0 for blocks without squeeze-excite.')
    if self.activation not in ACTIVATIONS:
      raise ValueError(f'{_FILE}: activation {self.activation!r} is not one of '
                       f'{sorted(ACTIVATIONS)}; set config.activation to one of them.')
    narrow = [w for w, g in zip(self.widths, self.group_sizes) if int(w * self.expansion) < g]
    if narrow:
      raise ValueError(f'{_FILE}: widths {narrow} times expansion {self.expansion} are below '
                       f'their group_sizes {self.group_sizes}, leaving zero groups; lower '
                       'group_sizes.')

  @property
  def grid(self) -> Tuple[int, int]:
    """(h, w) of the final feature map (and of `dense_logits`) at `img_size`, SAME padding."""
    side = self.img_size
    stage_strides = [s for s, d in zip(self.stage_strides, self.depths) if d]  # first blocks
    for s in tuple(self.stem_strides) + tuple(stage_strides):
      side = _ceil_div(side, s)
    return side, side

  @property
  def head_names(self) -> Tuple[str, ...]:
    """Top-level parameters whose shapes depend on num_classes (dropped on transfer)."""
    return ('linear',)

  @property
  def supports_mixtoken(self) -> bool:
    """NFNets have no tokens: MixToken cannot apply."""
    return False


def block_name(index: int) -> str:
  """Haiku's name of the `index`-th NFBlock (global over stages): nf_block, nf_block_1, ..."""
  return 'nf_block' if index == 0 else f'nf_block_{index}'


def standardize_kernel(kernel: jax.Array, gain: jax.Array, eps: float = WS_EPS) -> jax.Array:
  """Scaled WS: (w - mean) * gain / sqrt(max(fan_in * var, eps)) per output channel."""
  mean = jnp.mean(kernel, axis=(0, 1, 2), keepdims=True)
  var = jnp.var(kernel, axis=(0, 1, 2), keepdims=True)
  fan_in = np.prod(kernel.shape[:-1])
  scale = jax.lax.rsqrt(jnp.maximum(var * fan_in, eps)) * gain
  return kernel * scale - mean * scale


def avg_pool_2x2_same(x: jax.Array) -> jax.Array:
  """`hk.avg_pool` 2x2/2 with SAME padding: the divisor counts only the valid inputs."""
  return nn.avg_pool(x, (2, 2), strides=(2, 2), padding='SAME', count_include_pad=False)


class WSConv2D(nn.Module):
  """Conv with scaled weight standardisation, a per-channel `gain` and a `bias`; SAME, NHWC."""
  features: int
  kernel_size: int = 1
  stride: int = 1
  groups: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k = self.kernel_size
    kernel = self.param('kernel', conv_init,
                        (k, k, x.shape[-1] // self.groups, self.features), jnp.float32)
    gain = self.param('gain', nn.initializers.ones, (self.features,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (self.features,), jnp.float32)
    weight = standardize_kernel(kernel, gain).astype(self.dtype)  # Standardised in float32.
    out = jax.lax.conv_general_dilated(
        x.astype(self.dtype), weight, (self.stride, self.stride), 'SAME',
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=self.groups)
    return out + bias.astype(self.dtype)


class SqueezeExcite(nn.Module):
  """Mean pool, `linear` to hidden, ReLU, `linear_1` back, sigmoid: (B, 1, 1, C) gates."""
  hidden: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = jnp.mean(x, axis=(1, 2), dtype=jnp.float32).astype(self.dtype)
    h = nn.Dense(self.hidden, kernel_init=linear_init, dtype=self.dtype, name='linear')(h)
    h = nn.Dense(x.shape[-1], kernel_init=linear_init, dtype=self.dtype,
                 name='linear_1')(nn.relu(h))
    return nn.sigmoid(h)[:, None, None, :]


class NFBlock(nn.Module):
  """Pre-activation bottleneck: 1x1, two grouped 3x3 (the first strided), 1x1, SE, SkipInit."""
  out_ch: int
  stride: int
  beta: float
  alpha: float
  drop_path: float
  expansion: float
  se_ratio: float
  group_size: int
  activation: str
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    act = ACTIVATIONS[self.activation]
    groups = int(self.out_ch * self.expansion) // self.group_size
    width = self.group_size * groups
    conv = lambda c, k, s, g, name: WSConv2D(c, k, s, g, dtype=self.dtype, name=name)  # noqa: E731
    out = act(x) * self.beta
    projected = self.stride > 1 or x.shape[-1] != self.out_ch
    if self.stride > 1:
      shortcut = conv(self.out_ch, 1, 1, 1, 'conv_shortcut')(avg_pool_2x2_same(out))
    elif projected:
      shortcut = conv(self.out_ch, 1, 1, 1, 'conv_shortcut')(out)
    else:
      shortcut = x
    out = conv(width, 1, 1, 1, 'conv0')(out)
    out = conv(width, 3, self.stride, groups, 'conv1')(act(out))
    out = conv(width, 3, 1, groups, 'conv1b')(act(out))
    out = conv(self.out_ch, 1, 1, 1, 'conv2')(act(out))
    if self.se_ratio > 0:  # se_ratio 0: no squeeze-excite (no global context in the block)
      hidden = max(1, int(self.out_ch * self.se_ratio))
      out = (SqueezeExcite(hidden, dtype=self.dtype, name='squeeze_excite')(out) * 2) * out
    if train and 0.0 < self.drop_path < 1.0:
      # Per-example keep mask floor(keep + U[0, 1)), without rescaling by 1 / keep.
      r = jax.random.uniform(self.make_rng('dropout'), (out.shape[0], 1, 1, 1))
      out = out * jnp.floor(1.0 - self.drop_path + r).astype(out.dtype)
    out = out * self.param('skip_gain', nn.initializers.zeros, (), jnp.float32).astype(out.dtype)
    return out * self.alpha + shortcut


class NFNet(nn.Module):
  """Stem of four WS convs, NF blocks, `final_conv`, activation, mean pool, dropout, `linear`."""
  config: NFNetConfig
  dtype: Dtype = jnp.float32  # Compute dtype; parameters stay float32.

  @nn.compact
  def _forward(self, images: jax.Array, train: bool, dense: bool) -> jax.Array:
    c = self.config
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f'{_FILE}: expected NHWC images (B, H, W, 3), got {images.shape}.')
    act = ACTIVATIONS[c.activation]
    x = images.astype(self.dtype)
    stem = tuple(c.stem_widths) + (c.widths[0] // 2,)
    for i, (ch, s) in enumerate(zip(stem, c.stem_strides)):
      x = WSConv2D(ch, 3, s, dtype=self.dtype, name=f'stem_conv{i}')(x)
      x = act(x) if i < len(stem) - 1 else x
    num_blocks, index, expected_std = sum(c.depths), 0, 1.0
    for width, depth, stride, group_size in zip(c.widths, c.depths, c.stage_strides,
                                                c.group_sizes):
      for i in range(depth):
        x = NFBlock(width, stride if i == 0 else 1, 1.0 / expected_std, c.alpha,
                    c.drop_path_rate * index / num_blocks, c.expansion, c.se_ratio,
                    group_size, c.activation, dtype=self.dtype, name=block_name(index))(
                        x, train)
        index += 1
        # A stage's first block resets the expected std, then each block adds alpha^2.
        expected_std = math.sqrt((1.0 if i == 0 else expected_std) ** 2 + c.alpha ** 2)
    x = WSConv2D(c.final_conv_mult * x.shape[-1], 1, dtype=self.dtype, name='final_conv')(x)
    x = act(x)
    head = nn.Dense(c.num_classes, kernel_init=head_init, dtype=self.dtype, name='linear')
    if dense:
      return head(x).astype(jnp.float32)
    x = jnp.mean(x, axis=(1, 2), dtype=jnp.float32).astype(self.dtype)
    x = nn.Dropout(c.drop_rate, deterministic=not train)(x)
    return head(x).astype(jnp.float32)

  def dense_logits(self, images: jax.Array) -> jax.Array:
    """(B, h, w, K) float32: `linear` at every position after `final_conv` and the activation;
    its mean over positions is the eval logits (the head is affine)."""
    return self._forward(images, False, True)

  def __call__(self, images: jax.Array, train: bool = False,
               mix_box: Optional[jax.Array] = None):
    """Eval logits (B, K) float32; with train=True `(logits, None)` (no aux head).

    Training draws stochastic depth and head dropout from the 'dropout' rng.
    """
    if mix_box is not None:
      raise ValueError(f'{_FILE}: NFNets have no tokens to mix (supports_mixtoken is False) '
                       'but a mix_box was given; set config.mixtoken = False.')
    logits = self._forward(images, train, False)
    return (logits, None) if train else logits


Model = NFNet


def _variant(depths: Tuple[int, ...], train_size: int, test_size: int,
             drop_rate: float) -> NFNetConfig:
  # DeepMind's eval: centre crop size / (size + 32) of the shorter side, then resize.
  return NFNetConfig(depths=depths, img_size=test_size, train_img_size=train_size,
                     drop_rate=drop_rate, crop_pct=test_size / (test_size + 32))


# `base.nfnet_params`: depths, train and test sizes, head dropout.
CONFIGS = {
    'nfnet_f0': _variant((1, 2, 6, 3), 192, 256, 0.2),
    'nfnet_f1': _variant((2, 4, 12, 6), 224, 320, 0.3),
    'nfnet_f2': _variant((3, 6, 18, 9), 256, 352, 0.4),
    'nfnet_f3': _variant((4, 8, 24, 12), 320, 416, 0.4),
    'nfnet_f4': _variant((5, 10, 30, 15), 384, 512, 0.5),
    'nfnet_f5': _variant((6, 12, 36, 18), 416, 544, 0.5),
    'nfnet_f6': _variant((7, 14, 42, 21), 448, 576, 0.5),
    'nfnet_f7': _variant((8, 16, 48, 24), 480, 608, 0.5),
    # CPU demo (64 px digits, 10 classes): narrow, one block a stage, stem strides (2, 2, 1, 1)
    # (its 3x3 convs at 16x16, not 32x32) and one strided stage: an 8x8 final map, the LV-ViT
    # demo's token grid. Group width = block width (dense 3x3 convs): XLA's CPU weight gradient
    # of a grouped conv is ~10x slower than that of a dense one of the same size.
    'nfnet_demo': NFNetConfig(depths=(1, 1, 1, 1), img_size=64, train_img_size=64,
                              drop_rate=0.0, widths=(32, 64, 128, 128), num_classes=10,
                              crop_pct=1.0, group_sizes=(16, 32, 64, 64), stem_widths=(8, 16, 16),
                              stem_strides=(2, 2, 1, 1), stage_strides=(1, 2, 1, 1)),
}

# DeepMind's published ImageNet-1k top-1 at the test sizes (F6: trained with SAM).
PUBLISHED_TOP1 = {
    ('nfnet_f0', 256): 83.6, ('nfnet_f1', 320): 84.7, ('nfnet_f2', 352): 85.1,
    ('nfnet_f3', 416): 85.7, ('nfnet_f4', 512): 85.9, ('nfnet_f5', 544): 86.0,
    ('nfnet_f6', 576): 86.5,
}
