"""Facts about importing official PyTorch checkpoints: the CLI, wrappers, resampling, errors.

Checkpoints are written by the independent PyTorch LV-ViT in tests/torch_lvvit.py, with the
official key names. The model is lvvit_t (full depth and width) on 64x64 images (4x4 tokens)
with 10 classes: small enough for seconds, and expressible through the CLI.
"""
import flax
import jax
import numpy as np
import pytest
import torch

from lvvit_jax import checkpoints
from lvvit_jax import convert as convert_cli
from lvvit_jax.models import create_model
from lvvit_jax.models.convert import CheckpointMismatchError
from lvvit_jax.models.convert import load_torch_checkpoint
from lvvit_jax.models.convert import resample_pos_embed
from tests.torch_lvvit import TorchLVViT
from tests.torch_lvvit import nhwc_to_nchw
from tests.torch_lvvit import perturb_

NAME = 'lvvit_t'
IMG, CLASSES = 64, 10  # 64 -> 32 after conv1 -> 4x4 tokens with proj 8x8/8.
ATOL = 1e-4


def _flat(variables):
  """{'params/blocks_0/attn/qkv/kernel': array, ...}"""
  return {k: np.asarray(v) for k, v in
          flax.traverse_util.flatten_dict(dict(variables), sep='/').items()}


def _images(batch, size, seed=0):
  return np.random.RandomState(seed).randn(batch, size, size, 3).astype(np.float32)


@pytest.fixture(scope='module')
def torch_model():
  torch.manual_seed(0)
  model = perturb_(TorchLVViT.from_variant(NAME, img_size=IMG, num_classes=CLASSES), 0)
  return model.eval()


@pytest.fixture(scope='module')
def state(torch_model):
  """The official-layout state dict (with num_batches_tracked, as PyTorch saves it)."""
  return {k: v.clone() for k, v in torch_model.state_dict().items()}


@pytest.fixture(scope='module')
def ckpt_path(state, tmp_path_factory):
  path = tmp_path_factory.mktemp('ckpt') / 'lvvit_t.pth.tar'
  torch.save({'state_dict_ema': state, 'epoch': 299}, path)
  return str(path)


@pytest.fixture(scope='module')
def direct(ckpt_path):
  return load_torch_checkpoint(ckpt_path, NAME)


def test_cli_writes_an_orbax_checkpoint_equal_to_direct_conversion(
    ckpt_path, direct, torch_model, tmp_path):
  out = tmp_path / 'converted'
  convert_cli.main(['--model', NAME, '--torch-checkpoint', ckpt_path, '--output', str(out)])
  variables, meta = checkpoints.load_variables(str(out))
  # The description rebuilds the module: class count and image size read off the checkpoint.
  assert meta == {'model': NAME, 'overrides': {'num_classes': CLASSES, 'img_size': IMG}}
  restored, expected = _flat(variables), _flat(direct)
  assert restored.keys() == expected.keys()
  for key, value in expected.items():
    np.testing.assert_array_equal(restored[key], value, err_msg=key)
  model = create_model(meta['model'], **meta['overrides'])
  x = _images(2, IMG)
  apply = jax.jit(model.apply)
  logits = np.asarray(apply(variables, x))
  np.testing.assert_allclose(logits, np.asarray(apply(direct, x)), atol=1e-6)
  with torch.no_grad():
    np.testing.assert_allclose(logits, torch_model(nhwc_to_nchw(x)).numpy(), atol=ATOL, rtol=0)
  # An existing output is never overwritten.
  with pytest.raises(FileExistsError, match='already exists'):
    convert_cli.main(['--model', NAME, '--torch-checkpoint', ckpt_path, '--output', str(out)])


def test_cli_img_size_resamples_pos_embed_and_keeps_everything_else(ckpt_path, direct, tmp_path):
  out = tmp_path / 'converted_96'
  convert_cli.main(['--model', NAME, '--torch-checkpoint', ckpt_path, '--output', str(out),
                    '--img-size', '96'])
  variables, meta = checkpoints.load_variables(str(out))
  assert meta['overrides'] == {'num_classes': CLASSES, 'img_size': 96}
  pos, old_pos = np.asarray(variables['params']['pos_embed']), direct['params']['pos_embed']
  assert pos.shape == (1, 1 + 6 * 6, 240)  # 96 -> 48 -> 6x6 tokens.
  np.testing.assert_array_equal(pos[:, 0], old_pos[:, 0])  # The cls position is kept.
  restored, expected = _flat(variables), _flat(direct)
  for key, value in expected.items():
    if key != 'params/pos_embed':
      np.testing.assert_array_equal(restored[key], value, err_msg=key)
  model = create_model(NAME, **meta['overrides'])
  assert jax.jit(model.apply)(variables, _images(2, 96)).shape == (2, CLASSES)


def _smooth_grid(n, channels=8, seed=0):
  """(n, n, C): per channel a low-frequency wave of the cell centres ((i + 0.5) / n)."""
  r = np.random.RandomState(seed)
  fy, fx, phase = r.uniform(-1, 1, channels), r.uniform(-1, 1, channels), r.uniform(0, 6, channels)
  centres = (np.arange(n) + 0.5) / n
  y, x = np.meshgrid(centres, centres, indexing='ij')
  return np.sin(2 * np.pi * (fy * y[..., None] + fx * x[..., None]) + phase)


@pytest.mark.parametrize('old,new', [(14, 24), (24, 14)])
def test_pos_embed_resampling_keeps_a_smooth_grid_smooth(old, new):
  cls_pos = np.random.RandomState(1).randn(1, 1, 8)
  pos = np.concatenate([cls_pos, _smooth_grid(old).reshape(1, old * old, 8)], axis=1)
  out = resample_pos_embed(pos.astype(np.float32), (new, new))
  assert out.shape == (1, 1 + new * new, 8) and out.dtype == np.float32
  np.testing.assert_array_equal(out[:, 0], cls_pos[:, 0].astype(np.float32))
  err = np.abs(out[0, 1:].reshape(new, new, 8) - _smooth_grid(new))
  # Away from the border the resampled grid is the same function on the new cell centres;
  # at the border (new centres beyond the old outermost ones) it is within 0.15 of amplitude 1
  # (nearest-neighbour resampling is off by 0.33 for 14 -> 24).
  assert err[2:-2, 2:-2].max() < 0.02
  assert err.max() < 0.15


def test_num_classes_override_drops_both_heads_only(tmp_path):
  # Two blocks, 32x32 images, patch 4: conversion with new heads initialises the whole model
  # once, which is the slow part at full depth.
  small = dict(depth=2, img_size=32, patch_size=4)
  torch.manual_seed(1)
  torch_model = perturb_(TorchLVViT.from_variant(NAME, num_classes=CLASSES, **small), 1)
  path = tmp_path / 'ckpt.pth'
  torch.save({'state_dict': torch_model.state_dict()}, path)
  kept = load_torch_checkpoint(str(path), NAME, **small)
  variables = load_torch_checkpoint(str(path), NAME, num_classes=5, **small)
  params = variables['params']
  for head in ('head', 'aux_head'):
    assert params[head]['kernel'].shape == (240, 5) and params[head]['bias'].shape == (5,)
    # Fresh as in training: N(0, 0.02) kernels, zero biases.
    assert 0.01 < np.std(params[head]['kernel']) < 0.03
    np.testing.assert_array_equal(params[head]['bias'], np.zeros(5))
  new, old = _flat(variables), _flat(kept)
  assert new.keys() == old.keys()
  for key, value in old.items():
    if key.split('/')[1] not in ('head', 'aux_head'):
      np.testing.assert_array_equal(new[key], value, err_msg=key)
  logits = jax.jit(create_model(NAME, num_classes=5, **small).apply)(variables, _images(2, 32))
  assert logits.shape == (2, 5) and np.isfinite(np.asarray(logits)).all()


WRAPPERS = {
    'state_dict_ema': lambda sd: {'state_dict_ema': sd, 'epoch': 3},
    'state_dict': lambda sd: {'state_dict': sd, 'optimizer': {'lr': 0.1}},
    'model': lambda sd: {'model': sd},
    'bare': lambda sd: dict(sd),
    'module_prefix': lambda sd: {'state_dict': {'module.' + k: v for k, v in sd.items()}},
    'module_prefix_bare': lambda sd: {'module.' + k: v for k, v in sd.items()},
}


@pytest.mark.parametrize('wrapper', sorted(WRAPPERS))
def test_every_checkpoint_wrapper_loads_the_same_variables(wrapper, state, direct, tmp_path):
  path = tmp_path / 'ckpt.pth'
  torch.save(WRAPPERS[wrapper](state), path)
  loaded, expected = _flat(load_torch_checkpoint(str(path), NAME)), _flat(direct)
  assert loaded.keys() == expected.keys()
  for key, value in expected.items():
    np.testing.assert_array_equal(loaded[key], value, err_msg=key)


def test_ema_weights_are_preferred_over_raw_weights(state, direct, tmp_path):
  raw = {k: (v + 1.0 if v.is_floating_point() else v) for k, v in state.items()}
  path = tmp_path / 'both.pth'
  torch.save({'state_dict': raw, 'state_dict_ema': state}, path)
  np.testing.assert_array_equal(load_torch_checkpoint(str(path), NAME)['params']['cls_token'],
                                direct['params']['cls_token'])


def _mismatch(sd, tmp_path, model_name=NAME):
  path = tmp_path / 'bad.pth'
  torch.save({'state_dict_ema': sd}, path)
  with pytest.raises(CheckpointMismatchError) as info:
    load_torch_checkpoint(str(path), model_name)
  return str(info.value)


@pytest.mark.parametrize('key,flax_path', [
    ('blocks.3.mlp.fc1.bias', 'params/blocks_3/mlp/fc1/bias'),
    ('patch_embed.bn2.running_var', 'batch_stats/patch_embed/bn2/var'),
])
def test_missing_key_is_named(key, flax_path, state, tmp_path):
  sd = {k: v for k, v in state.items() if k != key}
  message = _mismatch(sd, tmp_path)
  assert 'missing in checkpoint (1)' in message
  assert f'{key} (model {flax_path})' in message  # The file's key name, and where it goes.
  assert 'unexpected' not in message


def test_unexpected_keys_are_named(state, tmp_path):
  # A qkv bias (the model has none) and a key of some other model.
  sd = dict(state, **{'blocks.0.attn.qkv.bias': torch.zeros(720),
                      'dist_token': torch.zeros(1, 1, 240)})
  message = _mismatch(sd, tmp_path)
  assert 'unexpected in checkpoint (2)' in message
  assert 'blocks.0.attn.qkv.bias' in message and 'dist_token' in message
  assert 'missing' not in message


@pytest.mark.parametrize('key,shape,line', [
    # Both shapes in PyTorch layout (out, in), as the file stores them.
    ('blocks.2.mlp.fc1.weight', (240, 720),
     'blocks.2.mlp.fc1.weight: checkpoint (240, 720) vs model (720, 240) at '
     'params/blocks_2/mlp/fc1/kernel'),
    ('patch_embed.conv2.weight', (64 * 64 * 9,),
     'patch_embed.conv2.weight: checkpoint (36864,) vs model (64, 64, 3, 3) at '
     'params/patch_embed/conv2/kernel'),
])
def test_a_wrong_shape_is_named_with_both_shapes(key, shape, line, state, tmp_path):
  sd = dict(state, **{key: state[key].reshape(shape)})
  message = _mismatch(sd, tmp_path)
  assert 'shape mismatches (1)' in message and line in message


def test_a_wrong_variant_reports_shapes_and_missing_blocks(state, tmp_path):
  message = _mismatch(state, tmp_path, model_name='lvvit_s')  # lvvit_t weights, lvvit_s model.
  assert 'shape mismatches' in message
  assert 'cls_token: checkpoint (1, 1, 240) vs model (1, 1, 384)' in message
  assert 'blocks.0.attn.qkv.weight: checkpoint (720, 240) vs model (1152, 384)' in message
  assert 'patch_embed.proj.weight: checkpoint (240, 64, 8, 8) vs model (384, 64, 8, 8)' in message
  # lvvit_t has 12 blocks, lvvit_s 16.
  assert 'blocks.15.attn.qkv.weight (model params/blocks_15/attn/qkv/kernel)' in message
  assert '--model' in message  # The message says how to fix it.
