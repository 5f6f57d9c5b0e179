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


def _init(model, skip_gain=0.0, seed=0):
  """Variables drawn in NumPy from the reference's init distributions (gains 1, biases 0,
  kernels N(0, 1 / fan_in), the given skip_gain): compiling Flax's init (its random number
  generators) costs more than the rest of this file on 2 CPU cores; `test_init_distributions`
  checks the module's own init once."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    if name in ('gain', 'skip_gain'):
      return jnp.full(leaf.shape, 1.0 if name == 'gain' else skip_gain, jnp.float32)
    if name == 'bias':
      return jnp.zeros(leaf.shape, jnp.float32)
    scale = np.float32(1 / np.sqrt(np.prod(leaf.shape[:-1])))  # float32 all the way
    return jnp.asarray(rng.standard_normal(leaf.shape, np.float32) * scale)

  return jax.tree_util.tree_map_with_path(draw, _param_shapes(model))


DEMO = create_model('nfnet_demo')
# nfnet_demo narrowed to 16 channels: its programs compile in seconds on 2 CPU cores.
TINY = {'widths': (16, 16, 16, 16), 'group_sizes': (8, 8, 8, 8), 'stem_widths': (8, 8, 8),
        'img_size': 32}
TINY_MODEL = create_model('nfnet_demo', **TINY)
# One compile of its eval and dense logits, shared by the tests that need them.
tiny_outputs = jax.jit(lambda v, x: (TINY_MODEL.apply(v, x),
                                     TINY_MODEL.apply(v, x, method='dense_logits')))


@pytest.mark.parametrize('name', sorted(REFERENCE_PARAMS))
def test_param_counts_equal_the_reference(name):
  # The activation changes no shape; 'identity' only makes the trace quicker.
  variables = _param_shapes(create_model(name, activation='identity'))
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
  np.testing.assert_allclose(np.asarray(w), 0.0, atol=1e-4)


def test_avg_pool_same_divides_by_the_valid_count():
  """hk.avg_pool 2x2/2 SAME: odd sides pad at the end; the last row averages 2 values, not 4."""
  x = np.arange(25, dtype=np.float32).reshape(1, 5, 5, 1)
  got = np.asarray(nfnet.avg_pool_2x2_same(jnp.asarray(x)))[0, ..., 0]
  want = np.array([[x[0, r:r + 2, c:c + 2, 0].mean() for c in (0, 2, 4)] for r in (0, 2, 4)])
  np.testing.assert_allclose(got, want)


def test_activations_have_unit_variance_and_gelu_is_tanh():
  x = jax.random.normal(jax.random.key(0), (300_000,))
  names = [n for n in nfnet.ACTIVATIONS if n not in ('identity', 'log_softmax')]  # log_softmax
  variances = jax.jit(lambda x: [jnp.var(nfnet.ACTIVATIONS[n](x)) for n in names])(x)  # mixes
  for name, var in zip(names, variances):                                             # channels
    assert abs(float(var) - 1.0) < 0.01, name
  np.testing.assert_allclose(nfnet.ACTIVATIONS['gelu'](x[:100]),
                             jax.nn.gelu(x[:100], approximate=True) * 1.7015043497085571)


def test_block_inputs_keep_unit_variance_at_init():
  """Normalizer-free signal propagation on N(0, 1) input (a narrow F0-like net, 64 px).

  At init (skip_gain 0) every block input has variance ~1; with every skip_gain 1 the block
  input grows as expected_std^2 (alpha^2 = 0.04 a block, reset at a stage's first block), so
  var / expected_std^2 ~ 1, i.e. beta * x has unit variance. Measured 0.70..0.95 over five
  seeds: each projection loses a few percent (SAME zero padding at the borders, a nonlinearity
  of a slightly sub-unit input). [0.6, 1.3] fails without the gammas (0.03 by the second
  block) or the standardisation (up to 5); the betas' schedule is checked exactly below.
  The stages are unstrided here: a 2x2 average pool divides white noise's variance by 4
  (its pixels are independent), which natural images, smooth at that scale, do not show.
  """
  model = create_model('nfnet_f0', depths=(1, 2, 1, 1), widths=(32, 64, 128, 128),
                       group_sizes=(16, 16, 32, 32), stage_strides=(1, 1, 1, 1), img_size=64)
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
  def block_input_vars(variables, x):
    _, state = model.apply(variables, x, capture_intermediates=wanted, mutable=['intermediates'])
    return jnp.stack([jnp.var(state['intermediates'][n]['__call__'][0]) for n in names])

  x = jax.random.normal(jax.random.key(1), (8, 64, 64, 3))
  at_init = np.asarray(block_input_vars(_init(model), x))
  assert np.all((at_init > 0.6) & (at_init < 1.3)), at_init
  ratio = np.asarray(block_input_vars(_init(model, skip_gain=1.0), x)) / np.array(expected)
  assert np.all((ratio > 0.6) & (ratio < 1.3)), ratio


def test_block_schedule_matches_the_reference():
  """F0's per-block beta = 1 / expected_std, stochastic-depth rate, stride and width."""
  seen = []

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, nfnet.NFBlock) and context.method_name == '__call__':
      b = context.module
      seen.append((b.name, round(b.beta ** -2, 6), round(b.drop_path, 6), b.stride, b.out_ch))
    return next_fun(*args, **kwargs)

  with flax.linen.intercept_methods(record):
    _param_shapes(create_model('nfnet_f0', activation='identity'))
  # expected_std^2: 1 at the start, reset to 1 + alpha^2 after a stage's first block, then
  # + alpha^2 a block; drop rate 0.1 * i / 12.
  variances = [1, 1.04, 1.04, 1.08, 1.04, 1.08, 1.12, 1.16, 1.2, 1.24, 1.04, 1.08]
  strides = [1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1, 1]
  widths = [256, 512, 512] + [1536] * 9
  assert seen == [(nfnet.block_name(i), variances[i], round(0.1 * i / 12, 6), strides[i],
                   widths[i]) for i in range(12)]


def test_f0_at_its_test_size_is_finite_and_dense():
  model = create_model('nfnet_f0')
  variables = _init(model, skip_gain=1.0)  # Every residual branch on.
  images = jax.random.normal(jax.random.key(1), (1, 256, 256, 3))
  logits, dense = jax.jit(lambda v, x: (model.apply(v, x), model.apply(
      v, x, method='dense_logits')))(variables, images)
  assert logits.shape == (1, 1000) and logits.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(logits))) and float(jnp.std(logits)) > 0
  assert dense.shape == (1, 8, 8, 1000) and model.config.grid == (8, 8)
  np.testing.assert_allclose(np.asarray(dense.mean(axis=(1, 2))), np.asarray(logits),
                             rtol=1e-4, atol=1e-4)


def test_init_distributions():
  """Haiku's initialisers: gains 1, biases 0, skip_gain 0 (shape ()), conv kernels N(0, 1 /
  fan_in) untruncated, hk.Linear's truncated normal (std 1 / sqrt(fan_in) before the cut at 2
  std) in squeeze-excite, the head N(0, 0.01)."""
  # A non-default PRNG: its random number programs compile several times faster on CPU.
  key = jax.random.key(0, impl='unsafe_rbg')
  block = nfnet.NFBlock(16, 1, 1.0, 0.2, 0.0, 0.5, 0.5, 8, 'gelu')
  init = jax.jit(lambda x: block.init(key, x, False))
  flat = flax.traverse_util.flatten_dict(init(jnp.zeros((1, 4, 4, 8)))['params'], sep='/')
  assert set(flat) == {f'{m}/{p}' for m in ('conv0', 'conv1', 'conv1b', 'conv2', 'conv_shortcut')
                       for p in ('kernel', 'gain', 'bias')} | {
      'squeeze_excite/linear/kernel', 'squeeze_excite/linear/bias',
      'squeeze_excite/linear_1/kernel', 'squeeze_excite/linear_1/bias', 'skip_gain'}
  for path, value in flat.items():
    if path.endswith('gain') or path.endswith('bias'):
      np.testing.assert_array_equal(value, 1.0 if path.endswith('/gain') else 0.0)
  assert flat['skip_gain'].shape == ()
  conv = np.asarray(nfnet.conv_init(key, (3, 3, 64, 64)))  # fan_in 576
  assert abs(conv.std() * 24 - 1) < 0.02 and np.abs(conv).max() > 3 / 24
  linear = np.asarray(nfnet.linear_init(key, (256, 256)))  # fan_in 256
  assert np.abs(linear).max() <= 2 / 16 and abs(linear.std() * 16 - 0.88) < 0.02
  head = np.asarray(nfnet.head_init(key, (256, 256)))
  assert abs(head.std() / 0.01 - 1) < 0.02


@pytest.mark.parametrize('name,size,grid', [('nfnet_f0', 576, (18, 18)), ('nfnet_f0', 200, (7, 7)),
                                            ('nfnet_demo', 64, (8, 8)),
                                            ('nfnet_demo', 66, (9, 9))])
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
  assert grids == {'nfnet_f0': (8, 8), 'nfnet_f6': (18, 18), 'nfnet_demo': (8, 8)}
  assert create_model('nfnet_f0', img_size=192).config.grid == (6, 6)


def test_dense_logits_average_to_the_eval_logits():
  variables = _init(TINY_MODEL, skip_gain=1.0)
  images = jax.random.normal(jax.random.key(1), (16, 32, 32, 3))
  logits, dense = tiny_outputs(variables, images)
  assert logits.shape == (16, 10) and logits.dtype == jnp.float32
  assert dense.shape == (16, 4, 4, 10) and TINY_MODEL.config.grid == (4, 4)
  assert dense.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(dense.mean(axis=(1, 2))), np.asarray(logits),
                             rtol=1e-5, atol=1e-5)


def test_se_ratio_zero_drops_squeeze_excite_and_its_global_context():
  # The blocks' squeeze-excite gates every position by the image mean; without it a position
  # sees only its receptive field (127 px for nfnet_demo's layout). At 160 px, pixels in the
  # top-left corner cannot reach the bottom-right cell without SE, and do with it.
  images = jax.random.normal(jax.random.key(1), (1, 160, 160, 3))
  changed = images.at[:, :8, :8].add(5.0)
  far = {}
  for se_ratio in (0.5, 0.0):
    model = create_model('nfnet_demo', **dict(TINY, img_size=160, se_ratio=se_ratio))
    variables = _init(model, skip_gain=1.0)
    has_se = any('squeeze_excite' in '/'.join(map(str, k))
                 for k in flax.traverse_util.flatten_dict(variables['params']))
    assert has_se == (se_ratio > 0)
    dense = jax.jit(lambda v, x, m=model: m.apply(v, x, method='dense_logits'))
    a, b = dense(variables, images), dense(variables, changed)
    assert a.shape == (1, 20, 20, 10)
    far[se_ratio] = float(jnp.max(jnp.abs(a[0, -1, -1] - b[0, -1, -1])))
    assert float(jnp.max(jnp.abs(a[0, 0, 0] - b[0, 0, 0]))) > 1e-3  # the corner cell moves
  assert far[0.0] == 0.0 and far[0.5] > 1e-4, far
  with pytest.raises(ValueError, match='se_ratio'):
    create_model('nfnet_demo', se_ratio=-0.5)


def test_stochastic_depth_and_dropout_only_in_training():
  images = jax.random.normal(jax.random.key(1), (16, 32, 32, 3))
  variables = _init(TINY_MODEL, skip_gain=1.0)  # At init (skip_gain 0) the branches are 0.
  logits = np.asarray(tiny_outputs(variables, images)[0])

  def train(drop_path_rate, drop_rate):
    m = create_model('nfnet_demo', **TINY, drop_path_rate=drop_path_rate, drop_rate=drop_rate)
    run = jax.jit(lambda v, x, key: m.apply(v, x, train=True, rngs={'dropout': key}))
    outputs = [run(variables, images, jax.random.key(k)) for k in (0, 1)]
    assert all(aux is None for _, aux in outputs)  # (cls logits, no aux head)
    return [np.asarray(cls) for cls, _ in outputs]

  # Block i of 4 drops with 0.5 * i / 4: an example keeps all its branches with p ~ 0.41,
  # and then its training logits are its eval logits (no other randomness with drop_rate 0).
  a, b = train(0.5, 0.0)
  assert not np.allclose(a, b)
  kept = np.isclose(a, logits, rtol=1e-4, atol=1e-5).all(axis=1)  # per example
  assert 0 < kept.sum() < len(kept), kept
  a, b = train(0.0, 0.5)
  assert not np.allclose(a, logits) and not np.allclose(a, b)
  with pytest.raises(Exception, match='dropout'):  # train=True draws from the 'dropout' rng
    jax.eval_shape(lambda v, x: TINY_MODEL.apply(v, x, train=True), variables, images)


def test_mix_box_raises_naming_the_setting():
  variables = _param_shapes(DEMO, 64)
  with pytest.raises(ValueError, match=r'nfnet\.py.*config\.mixtoken = False'):
    DEMO.apply(variables, jnp.zeros((1, 64, 64, 3)), train=True,
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
  variables = _init(TINY_MODEL, skip_gain=1.0)
  images = jax.random.normal(jax.random.key(1), (16, 32, 32, 3))
  reference, _ = tiny_outputs(variables, images)  # float32, compiled once for three tests
  model = create_model('nfnet_demo', **TINY, dtype='bfloat16')
  logits, dense = jax.jit(lambda v, x: (model.apply(v, x), model.apply(
      v, x, method='dense_logits')))(variables, images)
  assert logits.dtype == dense.dtype == jnp.float32
  error = np.abs(np.asarray(logits) - np.asarray(reference)).max()
  assert 0 < error < 0.05 * np.abs(np.asarray(reference)).max()
