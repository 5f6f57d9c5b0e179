"""NFNet (lvvit_jax/models/nfnet.py): DeepMind's parameter counts, WS conv, signal propagation,
dense logits, train-mode randomness and the registry face."""
import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lvvit_jax.models import PUBLISHED_TOP1
from lvvit_jax.models import create_model
from lvvit_jax.models import nfnet

# Exact counts of `deepmind-research/nfnets/nfnet.py` at 1000 classes (F0 71,489,284; the paper
# rounds F1..F6 to 132.6M, 193.8M, 254.9M, 316.1M, 377.2M, 438.4M).
REFERENCE_PARAMS = {
    'nfnet_f0': 71_489_284, 'nfnet_f1': 132_634_256, 'nfnet_f2': 193_779_228,
    'nfnet_f3': 254_924_200, 'nfnet_f4': 316_069_172, 'nfnet_f5': 377_214_144,
    'nfnet_f6': 438_359_116, 'nfnet_f7': 499_504_088,
}


def _param_shapes(model, size=32):
  x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  return jax.eval_shape(lambda x: model.init({'params': jax.random.key(0)}, x), x)


def _init(model, size):
  return jax.jit(model.init)({'params': jax.random.key(0)}, jnp.zeros((1, size, size, 3)))


@pytest.mark.parametrize('name', sorted(REFERENCE_PARAMS))
def test_param_counts_equal_the_reference(name):
  variables = _param_shapes(create_model(name))
  assert list(variables) == ['params']  # No BatchNorm, no batch statistics.
  count = sum(p.size for p in jax.tree.leaves(variables))
  assert count == REFERENCE_PARAMS[name]
  paper = {'nfnet_f1': 132.6, 'nfnet_f2': 193.8, 'nfnet_f3': 254.9, 'nfnet_f4': 316.1,
           'nfnet_f5': 377.2, 'nfnet_f6': 438.4}.get(name)
  assert paper is None or round(count / 1e6, 1) == paper


def test_parameter_names_mirror_the_haiku_modules():
  params = _param_shapes(create_model('nfnet_f0'))['params']
  blocks = [nfnet.block_name(i) for i in range(12)]
  assert blocks[:3] == ['nf_block', 'nf_block_1', 'nf_block_2']
  assert set(params) == {f'stem_conv{i}' for i in range(4)} | set(blocks) | {
      'final_conv', 'linear'}
  # Shortcut convs where the stride or the width changes: each stage's first block.
  with_shortcut = {b for b in blocks if 'conv_shortcut' in params[b]}
  assert with_shortcut == {'nf_block', 'nf_block_1', 'nf_block_3', 'nf_block_9'}
  block = params['nf_block_3']
  assert block['skip_gain'].shape == ()
  assert block['conv1']['kernel'].shape == (3, 3, 128, 768)  # groups of 128 channels
  assert {k: v.shape for k, v in block['conv1'].items()} == {
      'kernel': (3, 3, 128, 768), 'gain': (768,), 'bias': (768,)}
  assert block['squeeze_excite']['linear']['kernel'].shape == (1536, 768)
  assert block['squeeze_excite']['linear_1']['kernel'].shape == (768, 1536)
  assert params['stem_conv3']['kernel'].shape == (3, 3, 64, 128)
  assert params['final_conv']['kernel'].shape == (1, 1, 1536, 3072)
  assert params['linear']['kernel'].shape == (3072, 1000)


def _numpy_ws_conv(x, kernel, gain, bias, stride, groups):
  """Scaled WS and a SAME, grouped, strided conv written out in NumPy (float64)."""
  kernel = kernel.astype(np.float64)
  mean = kernel.mean(axis=(0, 1, 2), keepdims=True)
  var = kernel.var(axis=(0, 1, 2), keepdims=True)
  fan_in = np.prod(kernel.shape[:-1])
  w = (kernel - mean) / np.sqrt(np.maximum(var * fan_in, 1e-4)) * gain
  k, _, cin_g, cout = w.shape
  b, h, wd, _ = x.shape
  out_h, out_w = -(-h // stride), -(-wd // stride)
  pad_h = max((out_h - 1) * stride + k - h, 0)
  pad_w = max((out_w - 1) * stride + k - wd, 0)
  xp = np.pad(x, ((0, 0), (pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2),
                  (0, 0)))
  cout_g = cout // groups
  out = np.zeros((b, out_h, out_w, cout))
  for i in range(out_h):
    for j in range(out_w):
      patch = xp[:, i * stride:i * stride + k, j * stride:j * stride + k]
      for g in range(groups):
        cols = slice(g * cout_g, (g + 1) * cout_g)
        out[:, i, j, cols] = np.einsum('bhwc,hwco->bo', patch[..., g * cin_g:(g + 1) * cin_g],
                                       w[..., cols])
  return out + bias


@pytest.mark.parametrize('k,stride,groups,size', [(3, 2, 2, 7), (3, 1, 4, 6), (1, 1, 1, 5),
                                                  (3, 2, 1, 8)])
def test_ws_conv_equals_its_formula(k, stride, groups, size):
  rng = np.random.default_rng(k + stride + groups + size)
  cin, cout = 8, 12
  x = rng.normal(size=(2, size, size, cin)).astype(np.float32)
  params = {'kernel': rng.normal(size=(k, k, cin // groups, cout)).astype(np.float32),
            'gain': rng.uniform(0.5, 2, cout).astype(np.float32),
            'bias': rng.normal(size=cout).astype(np.float32)}
  conv = nfnet.WSConv2D(cout, k, stride, groups)
  got = conv.apply({'params': params}, x)
  want = _numpy_ws_conv(x, params['kernel'], params['gain'], params['bias'], stride, groups)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


def test_ws_eps_floors_a_constant_kernel():
  """A constant kernel has var 0: the scale is rsqrt(1e-4) * gain, the standardised kernel 0."""
  w = nfnet.standardize_kernel(jnp.full((3, 3, 4, 2), 0.7), jnp.ones((2,)))
  np.testing.assert_allclose(np.asarray(w), 0.0, atol=1e-5)


def test_avg_pool_same_divides_by_the_valid_count():
  """hk.avg_pool 2x2/2 SAME: odd sides pad at the end; the last row averages 2 values, not 4."""
  x = np.arange(25, dtype=np.float32).reshape(1, 5, 5, 1)
  got = np.asarray(nfnet.avg_pool_2x2_same(jnp.asarray(x)))[0, ..., 0]
  want = np.array([[x[0, r:r + 2, c:c + 2, 0].mean() for c in (0, 2, 4)] for r in (0, 2, 4)])
  np.testing.assert_allclose(got, want)


def test_activations_have_unit_variance_and_gelu_is_tanh():
  x = jax.random.normal(jax.random.key(0), (1_000_000,))
  for name, act in nfnet.ACTIVATIONS.items():
    if name not in ('identity', 'log_softmax'):  # log_softmax acts across channels
      assert abs(float(jnp.var(act(x))) - 1.0) < 0.01, name
  np.testing.assert_allclose(nfnet.ACTIVATIONS['gelu'](x[:100]),
                             jax.nn.gelu(x[:100], approximate=True) * 1.7015043497085571)


def test_block_inputs_keep_unit_variance_at_init():
  """Normalizer-free signal propagation on N(0, 1) input (a narrow F0-like net, 64 px).

  At init (skip_gain 0) every block input has variance ~1; with every skip_gain 1 the block
  input grows as expected_std^2 (alpha^2 = 0.04 a block, reset at a stage's first block), so
  var / expected_std^2 ~ 1, i.e. beta * x has unit variance. Measured 0.7..0.95: each
  projection loses a few percent (SAME zero padding at the borders, a nonlinearity of a
  slightly sub-unit input); [0.6, 1.3] fails on a missing gamma (/2.9 a layer), beta or WS.
  The stages are unstrided here: a 2x2 average pool divides white noise's variance by 4
  (its pixels are independent), which natural images, smooth at that scale, do not show.
  """
  model = create_model('nfnet_f0', depths=(1, 2, 2, 2), widths=(64, 128, 256, 256),
                       group_sizes=(16, 32, 64, 64), stage_strides=(1, 1, 1, 1), img_size=64)
  c = model.config
  # Outputs captured: the stem's and every block's, i.e. the inputs of every block and of
  # final_conv; with skip_gains 1 the reference expects 1 after the stem, then expected_std^2.
  names = ['stem_conv3'] + [nfnet.block_name(i) for i in range(sum(c.depths))]
  expected, std = [1.0], 1.0
  for depth in c.depths:
    for i in range(depth):
      std = math.sqrt((1.0 if i == 0 else std) ** 2 + c.alpha ** 2)
      expected.append(std ** 2)

  def wanted(module, method):
    return method == '__call__' and module.name in names

  @jax.jit
  def block_input_vars(params, x):
    _, state = model.apply({'params': params}, x, capture_intermediates=wanted,
                           mutable=['intermediates'])
    return jnp.stack([jnp.var(state['intermediates'][n]['__call__'][0]) for n in names])

  params = _init(model, 64)['params']
  x = jax.random.normal(jax.random.key(1), (8, 64, 64, 3))
  at_init = np.asarray(block_input_vars(params, x))
  assert np.all((at_init > 0.6) & (at_init < 1.3)), at_init
  flat = flax.traverse_util.flatten_dict(params)
  ones = flax.traverse_util.unflatten_dict(
      {k: jnp.ones_like(v) if k[-1] == 'skip_gain' else v for k, v in flat.items()})
  ratio = np.asarray(block_input_vars(ones, x)) / np.array(expected)
  assert np.all((ratio > 0.6) & (ratio < 1.3)), ratio


def test_f0_at_its_test_size_is_finite():
  model = create_model('nfnet_f0')
  variables = _init(model, 256)
  images = jax.random.normal(jax.random.key(1), (1, 256, 256, 3))
  logits = jax.jit(model.apply)(variables, images)
  assert logits.shape == (1, 1000) and logits.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(logits)))


@pytest.mark.parametrize('name,size,grid', [('nfnet_f0', 256, (8, 8)), ('nfnet_f0', 576, (18, 18)),
                                            ('nfnet_f0', 200, (7, 7)), ('nfnet_demo', 64, (16, 16)),
                                            ('nfnet_demo', 66, (17, 17))])
def test_grid_is_the_dense_logits_map(name, size, grid):
  """SAME padding: ceil division by every stride (200 px: 100, 50, 50, 25, 13, 7)."""
  model = create_model(name, img_size=size)
  assert model.config.grid == grid
  x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
  dense, _ = jax.eval_shape(lambda x: model.init_with_output(
      {'params': jax.random.key(0)}, x, method='dense_logits'), x)
  assert dense.shape == (2, *grid, model.config.num_classes)


def test_grid_of_the_variants_at_their_test_sizes():
  grids = {n: create_model(n).config.grid for n in ('nfnet_f0', 'nfnet_f6', 'nfnet_demo')}
  assert grids == {'nfnet_f0': (8, 8), 'nfnet_f6': (18, 18), 'nfnet_demo': (16, 16)}
  assert create_model('nfnet_f0', img_size=192).config.grid == (6, 6)


def test_dense_logits_average_to_the_eval_logits():
  model = create_model('nfnet_demo')
  variables = _init(model, 64)
  images = jax.random.normal(jax.random.key(1), (3, 64, 64, 3))
  dense = model.apply(variables, images, method='dense_logits')
  logits = model.apply(variables, images)
  assert dense.shape == (3, *model.config.grid, 10) and dense.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(dense.mean(axis=(1, 2))), np.asarray(logits),
                             rtol=1e-5, atol=1e-6)


def _with_skip_gain(params, value):
  flat = flax.traverse_util.flatten_dict(params)
  return flax.traverse_util.unflatten_dict(
      {k: jnp.full_like(v, value) if k[-1] == 'skip_gain' else v for k, v in flat.items()})


def test_stochastic_depth_and_dropout_only_in_training():
  images = jax.random.normal(jax.random.key(1), (16, 64, 64, 3))
  eval_model = create_model('nfnet_demo')
  params = _with_skip_gain(_init(eval_model, 64)['params'], 1.0)  # At init the branches are 0.
  logits = eval_model.apply({'params': params}, images)

  def train(**overrides):
    model = create_model('nfnet_demo', **overrides)
    return lambda key: model.apply({'params': params}, images, train=True,
                                   rngs={'dropout': jax.random.key(key)})

  # No randomness left when both rates are 0: training logits are the eval logits.
  plain, aux = train(drop_path_rate=0.0, drop_rate=0.0)(0)
  assert aux is None
  np.testing.assert_allclose(np.asarray(plain), np.asarray(logits), rtol=1e-5, atol=1e-6)
  # Block i of 4 drops with 0.5 * i / 4: an example keeps all branches with p ~ 0.41.
  for overrides in ({'drop_path_rate': 0.5, 'drop_rate': 0.0},
                    {'drop_path_rate': 0.0, 'drop_rate': 0.5}):
    run = train(**overrides)
    a, b = run(0)[0], run(1)[0]
    assert not np.allclose(a, logits) and not np.allclose(a, b), overrides
    # Per example: some examples of a batch are untouched while others change.
    if overrides['drop_path_rate']:
      same = np.isclose(np.asarray(a), np.asarray(logits), rtol=1e-4, atol=1e-5).all(axis=1)
      assert 0 < same.sum() < len(same)
  np.testing.assert_allclose(np.asarray(eval_model.apply({'params': params}, images)),
                             np.asarray(logits))
  with pytest.raises(Exception, match='dropout'):
    create_model('nfnet_demo', drop_path_rate=0.5).apply({'params': params}, images, train=True)


def test_mix_box_raises_naming_the_setting():
  model = create_model('nfnet_demo')
  variables = _param_shapes(model, 64)
  with pytest.raises(ValueError, match=r'nfnet\.py.*config\.mixtoken = False'):
    model.apply(variables, jnp.zeros((1, 64, 64, 3)), train=True,
                mix_box=jnp.array([0, 0, 2, 2]), rngs={'dropout': jax.random.key(0)})


def test_registry_and_contract():
  model = create_model('nfnet_f0', num_classes=10)
  c = model.config
  assert (c.img_size, c.train_img_size, c.drop_rate, c.drop_path_rate) == (256, 192, 0.2, 0.1)
  assert c.crop_pct == pytest.approx(256 / 288)
  assert c.head_names == ('linear',) and not c.supports_mixtoken
  params = _param_shapes(model)['params']
  assert params['linear']['kernel'].shape == (3072, 10)
  assert PUBLISHED_TOP1[('nfnet_f0', 256)] == 83.6
  assert PUBLISHED_TOP1[('nfnet_f6', 576)] == 86.5
  sizes = {n: (create_model(n).config.train_img_size, create_model(n).config.img_size)
           for n in ('nfnet_f1', 'nfnet_f7')}
  assert sizes == {'nfnet_f1': (224, 320), 'nfnet_f7': (480, 608)}
  with pytest.raises(ValueError, match=r'nfnet\.py.*group_sizes'):
    create_model('nfnet_f0', depths=(1, 1, 1))
  with pytest.raises(ValueError, match=r'nfnet\.py.*activation'):
    create_model('nfnet_f0', activation='glu')


def test_bfloat16_compute_keeps_float32_params_and_logits():
  model = create_model('nfnet_demo', dtype='bfloat16')
  variables = _init(model, 64)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))
  images = jax.random.normal(jax.random.key(1), (2, 64, 64, 3))
  logits = model.apply(variables, images)
  dense = model.apply(variables, images, method='dense_logits')
  assert logits.dtype == dense.dtype == jnp.float32
  reference = create_model('nfnet_demo').apply(variables, images)
  error = np.abs(np.asarray(logits) - np.asarray(reference)).max()
  assert error < 0.05 * np.abs(np.asarray(reference)).max()
