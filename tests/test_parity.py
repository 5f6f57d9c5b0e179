"""Parity of the Flax LV-ViT with an independent PyTorch LV-ViT (tests/torch_lvvit.py).

Random PyTorch weights (BatchNorm and LayerNorm statistics and affine parameters randomised too)
are saved as an official-layout checkpoint, imported with `load_torch_checkpoint`, and both
models are run on the same images: inference logits, training logits with MixToken, the
BatchNorm running statistics after a training step, and the token features all agree to 1e-4
in float32, for lvvit_t and lvvit_s.

BatchNorm running variance: PyTorch updates it with the *unbiased* batch variance
(n / (n - 1) times the biased one, n = B * H * W per channel); Flax's BatchNorm with the
*biased* one. The batch statistics used to normalise are the same (biased) in both. The batch
term differs by 1 / (n - 1): 4e-5 relative for B = 2 at 224 (n = 2 * 112 * 112), a tenth of that
in the running value. Flax's BatchNorm has no unbiased option; the tests pin both rules.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from lvvit_jax.models import create_model
from lvvit_jax.models.convert import load_torch_checkpoint
from tests.torch_lvvit import TorchLVViT
from tests.torch_lvvit import nhwc_to_nchw
from tests.torch_lvvit import perturb_

ATOL = 1e-4
VARIANTS = ['lvvit_t', 'lvvit_s']
BOX = (1, 0, 4, 3)  # Token rows 1..3, columns 0..2 (half open), on the grid.
BN_MOMENTUM_TORCH = 0.1


def _make_pair(name, path, seed=0, **overrides):
  """(torch model, flax model, flax variables, pristine torch state dict, jitted train step).

  The Flax variables come from the PyTorch weights through an official-layout checkpoint.
  """
  torch.manual_seed(seed)
  torch_model = perturb_(TorchLVViT.from_variant(name, **overrides), seed)
  state = {k: v.clone() for k, v in torch_model.state_dict().items()}
  torch.save({'state_dict_ema': state}, path)
  variables = load_torch_checkpoint(str(path), name, **overrides)
  flax_model = create_model(name, drop_path_rate=0.0, **overrides)
  return torch_model, flax_model, variables, state, _train_apply(flax_model)


def _images(batch, size, seed=0):
  return np.random.RandomState(seed).randn(batch, size, size, 3).astype(np.float32)


def _train_apply(flax_model):
  return jax.jit(lambda v, x, box: flax_model.apply(
      v, x, train=True, mix_box=box, rngs={'dropout': jax.random.key(0)},
      mutable=['batch_stats']))


def _assert_batch_stats_follow_torch(updates, old_state, new_state, n):
  """Flax's running stats after one step equal PyTorch's, modulo the variance convention."""
  m = BN_MOMENTUM_TORCH
  for i in (1, 2, 3):
    prefix = f'patch_embed.bn{i}.'
    stats = updates['batch_stats']['patch_embed'][f'bn{i}']
    np.testing.assert_allclose(stats['mean'], new_state[prefix + 'running_mean'].numpy(),
                               atol=1e-6)
    old_var = old_state[prefix + 'running_var'].numpy()
    torch_var = new_state[prefix + 'running_var'].numpy()
    # PyTorch: (1 - m) * old + m * unbiased; Flax: (1 - m) * old + m * biased.
    unbiased = (torch_var - (1 - m) * old_var) / m
    biased = unbiased * (n - 1) / n
    np.testing.assert_allclose(stats['var'], (1 - m) * old_var + m * biased, atol=1e-6)
    np.testing.assert_allclose(stats['var'], torch_var, atol=m * unbiased.max() / n + 1e-6)


@pytest.fixture(scope='module', params=VARIANTS)
def full_size(request, tmp_path_factory):
  """A variant at 224 (14x14 tokens, 1000 classes) in both frameworks."""
  path = tmp_path_factory.mktemp(request.param) / 'ckpt.pth.tar'
  return _make_pair(request.param, path, img_size=224)


@pytest.mark.slow
def test_inference_matches_torch_at_224(full_size):
  torch_model, flax_model, variables, _, _ = full_size
  x = _images(2, 224)
  torch_model.eval()
  with torch.no_grad():
    expected = torch_model(nhwc_to_nchw(x)).numpy()
  got = np.asarray(jax.jit(flax_model.apply)(variables, x))
  assert got.shape == (2, 1000)
  assert np.abs(expected).max() > 0.5  # Logits are not trivially small.
  np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0)


@pytest.mark.slow
def test_training_with_mixtoken_matches_torch_at_224(full_size):
  torch_model, _, variables, state, train = full_size
  x = _images(2, 224, seed=1)
  torch_model.train()  # BatchNorm normalises with batch statistics and updates running ones.
  torch_model.load_state_dict(state)
  with torch.no_grad():
    cls_t, aux_t = torch_model(nhwc_to_nchw(x), box=BOX)
  (cls_f, aux_f), updates = train(variables, x, jnp.array(BOX))
  assert cls_f.shape == (2, 1000) and aux_f.shape == (2, 196, 1000)
  np.testing.assert_allclose(cls_f, cls_t.numpy(), atol=ATOL, rtol=0)
  np.testing.assert_allclose(aux_f, aux_t.numpy(), atol=ATOL, rtol=0)
  _assert_batch_stats_follow_torch(updates, state, torch_model.state_dict(), n=2 * 112 * 112)


SMALL = dict(img_size=32, patch_size=4, num_classes=10)  # 8x8 tokens.


@pytest.fixture(scope='module', params=VARIANTS)
def small(request, tmp_path_factory):
  """A variant with full depth and width on 32x32 images, patch 4 (proj 2x2): 8x8 tokens."""
  path = tmp_path_factory.mktemp(request.param + '_small') / 'ckpt.pth'
  return _make_pair(request.param, path, seed=3, **SMALL)


def test_features_are_cls_then_row_major_tokens_like_torch(small):
  torch_model, flax_model, variables, _, _ = small
  x = _images(3, 32, seed=2)
  got = jax.jit(lambda v, x: flax_model.apply(v, x, method='features'))(variables, x)
  dim = flax_model.config.dim
  assert got.shape == (3, 1 + 64, dim)
  torch_model.eval()
  with torch.no_grad():
    expected = torch_model.features(nhwc_to_nchw(x)).numpy()
  np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0)


def test_mixtoken_partners_are_neighbours_like_torch(small):
  # With 4 examples the pairing matters: 0<->1 and 2<->3 (the release's i <-> B-1-i would give
  # 0<->3 and 1<->2); a batch of 2 cannot tell them apart.
  torch_model, _, variables, state, train = small
  x = _images(4, 32, seed=4)
  box = (2, 3, 7, 6)
  torch_model.train()
  torch_model.load_state_dict(state)
  with torch.no_grad():
    cls_t, aux_t = torch_model(nhwc_to_nchw(x), box=box)
  (cls_f, aux_f), updates = train(variables, x, jnp.array(box))
  np.testing.assert_allclose(cls_f, cls_t.numpy(), atol=ATOL, rtol=0)
  np.testing.assert_allclose(aux_f, aux_t.numpy(), atol=ATOL, rtol=0)
  # Mixing changed the outputs (the box is not a no-op) ...
  (cls_plain, _), _ = train(variables, x, jnp.array((0, 0, 0, 0)))
  assert np.abs(np.asarray(cls_plain) - np.asarray(cls_f)).max() > 1e-2
  # ... and BatchNorm sees the un-mixed images (the stem runs before MixToken).
  _assert_batch_stats_follow_torch(updates, state, torch_model.state_dict(), n=4 * 16 * 16)


def test_running_variance_update_is_biased_unlike_torch(small):
  """The one known difference: visible with the small stem (n = 2 * 16 * 16 per channel)."""
  torch_model, _, variables, state, train = small
  x = 3.0 * _images(2, 32, seed=5)
  torch_model.train()
  torch_model.load_state_dict(state)
  with torch.no_grad():
    torch_model(nhwc_to_nchw(x), box=(0, 0, 0, 0))
  _, updates = train(variables, x, jnp.array((0, 0, 0, 0)))
  n = 2 * 16 * 16
  new_state = torch_model.state_dict()
  m = BN_MOMENTUM_TORCH
  for i in (1, 2, 3):
    old = state[f'patch_embed.bn{i}.running_var'].numpy()
    torch_var = new_state[f'patch_embed.bn{i}.running_var'].numpy()
    flax_var = np.asarray(updates['batch_stats']['patch_embed'][f'bn{i}']['var'])
    # torch - flax = m * (unbiased - biased) = m * biased / (n - 1) > 0.
    gap = (flax_var - (1 - m) * old) / (n - 1)
    np.testing.assert_allclose(torch_var - flax_var, gap, atol=1e-6)
    assert gap.min() > 1e-5  # Well above the tolerance: the two rules are told apart.


def test_norm_epsilons_matter_and_match_torch(tmp_path):
  # Tiny activations make eps (1e-5 for both LayerNorm and BatchNorm) count against the
  # variances, so e.g. Flax's default LayerNorm eps 1e-6 would fail here (checked on the torch
  # side below) while passing the tests above.
  overrides = dict(depth=2, **SMALL)
  torch.manual_seed(0)
  torch_model = perturb_(TorchLVViT.from_variant('lvvit_t', **overrides), 0)
  with torch.no_grad():
    for i in (1, 2, 3):
      getattr(torch_model.patch_embed, f'conv{i}').weight.mul_(1e-3)
      getattr(torch_model.patch_embed, f'bn{i}').running_var.mul_(1e-5)
    for p in (torch_model.patch_embed.proj.weight, torch_model.patch_embed.proj.bias,
              torch_model.cls_token, torch_model.pos_embed):
      p.mul_(1e-3)
  torch.save(torch_model.state_dict(), tmp_path / 'ckpt.pth')
  variables = load_torch_checkpoint(str(tmp_path / 'ckpt.pth'), 'lvvit_t', **overrides)
  flax_model = create_model('lvvit_t', **overrides)
  x = _images(2, 32, seed=6)
  torch_model.eval()
  with torch.no_grad():
    expected = torch_model(nhwc_to_nchw(x)).numpy()
    got = np.asarray(jax.jit(flax_model.apply)(variables, x))
    np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0)
    for module in torch_model.modules():
      if isinstance(module, torch.nn.LayerNorm):
        module.eps = 1e-6
    assert np.abs(torch_model(nhwc_to_nchw(x)).numpy() - got).max() > 100 * ATOL
    for module in torch_model.modules():
      if isinstance(module, torch.nn.LayerNorm):
        module.eps = 1e-5
      elif isinstance(module, torch.nn.BatchNorm2d):
        module.eps = 1e-6
    assert np.abs(torch_model(nhwc_to_nchw(x)).numpy() - got).max() > 100 * ATOL
