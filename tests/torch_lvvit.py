"""An independent PyTorch LV-ViT, written from SPEC section 1, as the parity reference.

It is deliberately written from the specification (and the layout of the authors' release),
not by translating `lvvit_jax/models/lvvit.py`, so that the two implementations can disagree.
Its `state_dict()` has exactly the official checkpoint names (`patch_embed.conv1.weight`,
`patch_embed.bn1.running_var`, `blocks.3.attn.qkv.weight`, `aux_head.bias`, ...).

    model = TorchLVViT.from_variant('lvvit_s', img_size=224, num_classes=1000)
    model.eval();  logits = model(images_nchw)                     # cls + 0.5 * max_t aux
    model.train(); cls, aux = model(images_nchw, box=(1, 0, 3, 2))  # aux un-mixed

Drop path and dropout are absent: parity is checked in the deterministic setting.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

import torch
from torch import nn
import torch.nn.functional as F

# SPEC section 1 table: dim, depth, heads, MLP hidden, stem channels, skip_lam.
VARIANTS = {
    'lvvit_t': dict(dim=240, depth=12, num_heads=4, mlp_hidden=720, stem_channels=64,
                    skip_lam=1.0),
    'lvvit_s': dict(dim=384, depth=16, num_heads=6, mlp_hidden=1152, stem_channels=64,
                    skip_lam=2.0),
    'lvvit_m': dict(dim=512, depth=20, num_heads=8, mlp_hidden=1536, stem_channels=64,
                    skip_lam=2.0),
    'lvvit_l': dict(dim=768, depth=24, num_heads=12, mlp_hidden=2304, stem_channels=128,
                    skip_lam=3.0),
}

EPS = 1e-5  # Both LayerNorm and BatchNorm.


class PatchEmbed(nn.Module):
  """Conv stem: 7x7/2 (pad 3), 3x3, 3x3 convs without bias, each + BN + ReLU; then `proj`."""

  def __init__(self, stem_channels: int, dim: int, patch_size: int):
    super().__init__()
    c = stem_channels
    self.conv1 = nn.Conv2d(3, c, kernel_size=7, stride=2, padding=3, bias=False)
    self.bn1 = nn.BatchNorm2d(c, eps=EPS, momentum=0.1)
    self.conv2 = nn.Conv2d(c, c, kernel_size=3, stride=1, padding=1, bias=False)
    self.bn2 = nn.BatchNorm2d(c, eps=EPS, momentum=0.1)
    self.conv3 = nn.Conv2d(c, c, kernel_size=3, stride=1, padding=1, bias=False)
    self.bn3 = nn.BatchNorm2d(c, eps=EPS, momentum=0.1)
    # The first conv already halved the image, so proj covers patch_size / 2 pixels of it.
    k = patch_size // 2
    self.proj = nn.Conv2d(c, dim, kernel_size=k, stride=k, bias=True)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = F.relu(self.bn1(self.conv1(x)))
    x = F.relu(self.bn2(self.conv2(x)))
    x = F.relu(self.bn3(self.conv3(x)))
    return self.proj(x)  # (B, D, gh, gw)


class Attention(nn.Module):
  """Multi-head self-attention; qkv output laid out as (3, heads, head_dim)."""

  def __init__(self, dim: int, num_heads: int):
    super().__init__()
    self.num_heads = num_heads
    self.scale = (dim // num_heads) ** -0.5
    self.qkv = nn.Linear(dim, 3 * dim, bias=False)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    b, n, d = x.shape
    h = self.num_heads
    qkv = self.qkv(x).reshape(b, n, 3, h, d // h).permute(2, 0, 3, 1, 4)  # (3, B, h, n, hd)
    q, k, v = qkv[0] * self.scale, qkv[1], qkv[2]
    attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)
    out = (attn @ v).transpose(1, 2).reshape(b, n, d)
    return self.proj(out)


class Mlp(nn.Module):
  """Linear, exact (erf) GELU, Linear."""

  def __init__(self, dim: int, hidden: int):
    super().__init__()
    self.fc1 = nn.Linear(dim, hidden)
    self.fc2 = nn.Linear(hidden, dim)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.fc2(F.gelu(self.fc1(x), approximate='none'))


class Block(nn.Module):
  """Pre-norm block whose residual branches are divided by skip_lam."""

  def __init__(self, dim: int, num_heads: int, mlp_hidden: int, skip_lam: float):
    super().__init__()
    self.skip_lam = skip_lam
    self.norm1 = nn.LayerNorm(dim, eps=EPS)
    self.attn = Attention(dim, num_heads)
    self.norm2 = nn.LayerNorm(dim, eps=EPS)
    self.mlp = Mlp(dim, mlp_hidden)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = x + self.attn(self.norm1(x)) / self.skip_lam
    return x + self.mlp(self.norm2(x)) / self.skip_lam


def partner_index(batch: int) -> torch.Tensor:
  """Partner of every example: 2i <-> 2i+1; an odd last example is its own partner."""
  idx = torch.arange(batch) ^ 1
  return torch.where(idx < batch, idx, torch.arange(batch))


def swap_in_box(grid: torch.Tensor, box: Sequence[int]) -> torch.Tensor:
  """grid (B, C, gh, gw): inside box = (row0, col0, row1, col1) take the partner's values."""
  r0, c0, r1, c1 = (int(v) for v in box)
  out = grid.clone()
  out[:, :, r0:r1, c0:c1] = grid[partner_index(grid.shape[0]), :, r0:r1, c0:c1]
  return out


class TorchLVViT(nn.Module):
  """LV-ViT with the official parameter names; MixToken with an explicit box in training."""

  def __init__(self, dim: int, depth: int, num_heads: int, mlp_hidden: int,
               stem_channels: int = 64, skip_lam: float = 1.0, num_classes: int = 1000,
               img_size: int = 224, patch_size: int = 16):
    super().__init__()
    self.patch_embed = PatchEmbed(stem_channels, dim, patch_size)
    after_conv1 = (img_size + 2 * 3 - 7) // 2 + 1
    self.grid = after_conv1 // (patch_size // 2)
    num_tokens = self.grid * self.grid
    self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
    self.pos_embed = nn.Parameter(torch.zeros(1, 1 + num_tokens, dim))
    nn.init.trunc_normal_(self.cls_token, std=0.02)
    nn.init.trunc_normal_(self.pos_embed, std=0.02)
    self.blocks = nn.ModuleList(
        [Block(dim, num_heads, mlp_hidden, skip_lam) for _ in range(depth)])
    self.norm = nn.LayerNorm(dim, eps=EPS)
    self.head = nn.Linear(dim, num_classes)
    self.aux_head = nn.Linear(dim, num_classes)

  @classmethod
  def from_variant(cls, name: str, **overrides) -> 'TorchLVViT':
    """The SPEC variant `name` with overrides (num_classes, img_size, patch_size, depth...)."""
    return cls(**{**VARIANTS[name], **overrides})

  def forward(self, x: torch.Tensor, box: Optional[Sequence[int]] = None):
    """x: NCHW images. Training: (cls (B, K), aux (B, N, K)); eval: cls + 0.5 * max aux."""
    x = self.patch_embed(x)
    if box is not None:
      x = swap_in_box(x, box)
    b, d, gh, gw = x.shape
    x = x.flatten(2).transpose(1, 2)  # (B, gh*gw, D), row-major over (row, col).
    x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1) + self.pos_embed
    for block in self.blocks:
      x = block(x)
    x = self.norm(x)
    cls_logits = self.head(x[:, 0])
    aux = self.aux_head(x[:, 1:])
    if box is not None:  # Un-mix: the same swap again gives each image its own token slots.
      k = aux.shape[-1]
      aux = swap_in_box(aux.transpose(1, 2).reshape(b, k, gh, gw), box)
      aux = aux.reshape(b, k, gh * gw).transpose(1, 2)
    if self.training:
      return cls_logits, aux
    return cls_logits + 0.5 * aux.max(dim=1).values

  def features(self, x: torch.Tensor) -> torch.Tensor:
    """Normed tokens (B, 1 + N, D), no mixing."""
    x = self.patch_embed(x).flatten(2).transpose(1, 2)
    x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
    for block in self.blocks:
      x = block(x)
    return self.norm(x)


@torch.no_grad()
def perturb_(model: nn.Module, seed: int = 0) -> nn.Module:
  """Makes every parameter and BN statistic non-trivial, in place, so none can be ignored.

  Default init leaves LayerNorm/BatchNorm at scale 1, bias 0 and running stats 0/1, which would
  let a swapped or dropped norm go unnoticed. Running variances land in [0.5, 2].
  """
  g = torch.Generator().manual_seed(seed)
  rand = lambda t: torch.rand(t.shape, generator=g)  # noqa: E731
  randn = lambda t: torch.randn(t.shape, generator=g)  # noqa: E731
  for module in model.modules():
    if isinstance(module, nn.BatchNorm2d):
      module.weight.copy_(0.5 + rand(module.weight))
      module.bias.copy_(0.2 * randn(module.bias))
      module.running_mean.copy_(0.3 * randn(module.running_mean))
      module.running_var.copy_(0.5 + 1.5 * rand(module.running_var))
    elif isinstance(module, nn.LayerNorm):
      module.weight.copy_(1.0 + 0.2 * randn(module.weight))
      module.bias.copy_(0.1 * randn(module.bias))
    elif isinstance(module, (nn.Linear, nn.Conv2d)) and module.bias is not None:
      module.bias.copy_(0.05 * randn(module.bias))
  model.cls_token.copy_(0.5 * randn(model.cls_token))
  model.pos_embed.copy_(0.5 * randn(model.pos_embed))
  return model


def nhwc_to_nchw(x) -> torch.Tensor:
  """NumPy/JAX NHWC images -> torch NCHW float32."""
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x, np.float32).transpose(0, 3, 1, 2)))


__all__ = ['TorchLVViT', 'VARIANTS', 'perturb_', 'nhwc_to_nchw', 'partner_index',
           'swap_in_box']
