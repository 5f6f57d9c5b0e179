"""The CPU conv (matmul kernel gradient) equals XLA's convolution; training does not notice it.

`lvvit_jax/models/cpu_conv.py` replaces, on CPU only, the kernel gradient of the stem's convs
(XLA:CPU's is the step's bottleneck) by matmuls. Facts relied on: forward and both gradients
equal `lax.conv_general_dilated`'s to float32 rounding for every stem conv of the zoo; the
stem keeps `nn.Conv`'s parameters; accelerators keep XLA's convolution; and a few trainer update
steps give the same losses either way.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
import pytest

from lvvit_jax import sharding
from lvvit_jax import train
from lvvit_jax.models import cpu_conv
from lvvit_jax.models import create_model
from tests.run_helpers import load_config

DN = ('NHWC', 'HWIO', 'NHWC')

# (name, input NHWC, kernel HWIO, stride, padding): every stem conv shape of the zoo, at small
# batch and spatial sizes (the channels are the real ones).
STEM_CONVS = [
    ('conv1 7x7/2, 3->64', (2, 32, 32, 3), (7, 7, 3, 64), 2, ((3, 3), (3, 3))),
    ('conv1 7x7/2, 3->128 (L)', (2, 30, 30, 3), (7, 7, 3, 128), 2, ((3, 3), (3, 3))),
    ('conv2 3x3/1, 64->64', (2, 16, 16, 64), (3, 3, 64, 64), 1, ((1, 1), (1, 1))),
    ('conv2 3x3/1, 128->128 (L)', (2, 12, 12, 128), (3, 3, 128, 128), 1, ((1, 1), (1, 1))),
    ('proj 8x8/8, 64->384 (S)', (2, 16, 16, 64), (8, 8, 64, 384), 8, 'VALID'),
    ('proj 4x4/4, 64->128 (demo, patch 8)', (2, 16, 16, 64), (4, 4, 64, 128), 4, 'VALID'),
    ('proj 8x8/8, 128->768 (L)', (1, 16, 16, 128), (8, 8, 128, 768), 8, 'VALID'),
    ('patchify 16x16/16, 3->384 (vit_s)', (2, 32, 32, 3), (16, 16, 3, 384), 16, 'VALID'),
]


def _conv(fn, stride, padding):
  return lambda x, k: fn(x, k, (stride, stride), padding,
                         dimension_numbers=lax.conv_dimension_numbers(x.shape, k.shape, DN))


def _value_and_grads(fn, x, k, ct):
  y, vjp = jax.vjp(fn, x, k)
  return (y,) + vjp(ct)


@pytest.mark.parametrize('name,x_shape,k_shape,stride,padding', STEM_CONVS,
                         ids=[c[0] for c in STEM_CONVS])
def test_matmul_grad_equals_xla_conv_forward_and_gradients(name, x_shape, k_shape, stride,
                                                           padding):
  rng = np.random.default_rng(0)  # numpy: jax.random would compile a program per shape.
  x = jnp.asarray(rng.normal(size=x_shape), jnp.float32)
  k = jnp.asarray(rng.normal(size=k_shape) / np.sqrt(np.prod(k_shape[:3])), jnp.float32)
  plain = _conv(lax.conv_general_dilated, stride, padding)
  ct = jnp.asarray(rng.normal(size=jax.eval_shape(plain, x, k).shape), jnp.float32)
  with cpu_conv.use_matmul_grad(True):
    got = jax.jit(lambda x, k, ct: _value_and_grads(
        _conv(cpu_conv.conv_general_dilated, stride, padding), x, k, ct))(x, k, ct)
  want = jax.jit(lambda x, k, ct: _value_and_grads(plain, x, k, ct))(x, k, ct)
  for what, a, b in zip(('output', 'd input', 'd kernel'), got, want):
    assert a.shape == b.shape and a.dtype == b.dtype, (name, what)
    scale = float(jnp.max(jnp.abs(b)))
    err = float(jnp.max(jnp.abs(a - b)))
    assert err <= 2e-6 * scale, f'{name}, {what}: max error {err:.3g} of {scale:.3g}'


def test_nn_conv_keeps_its_parameters_and_takes_the_matmul_grad_on_cpu_only(monkeypatch):
  conv = nn.Conv(8, (3, 3), padding=((1, 1), (1, 1)), use_bias=False,
                 conv_general_dilated=cpu_conv.conv_general_dilated)
  x = jnp.ones((1, 6, 6, 4))
  shapes = jax.eval_shape(conv.init, jax.random.key(0), x)['params']
  assert jax.tree.map(jnp.shape, shapes) == {'kernel': (3, 3, 4, 8)}
  params = {'kernel': jnp.ones((3, 3, 4, 8))}

  def matmul_in_grad():
    grad = jax.grad(lambda p: conv.apply({'params': p}, x).sum())
    return 'dot_general' in str(jax.make_jaxpr(grad)(params))

  assert jax.default_backend() == 'cpu'
  assert matmul_in_grad()
  with cpu_conv.use_matmul_grad(False):
    assert not matmul_in_grad()
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  assert not matmul_in_grad()  # Accelerators: XLA's convolution and its own gradients.


def test_stem_parameter_names_and_shapes_are_nn_convs():
  model = create_model('lvvit_s', img_size=64, num_classes=10)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
  stem = jax.tree.map(lambda a: a.shape, params['params']['patch_embed'])
  assert stem['conv1'] == {'kernel': (7, 7, 3, 64)}
  assert stem['conv2'] == stem['conv3'] == {'kernel': (3, 3, 64, 64)}
  assert stem['proj'] == {'kernel': (8, 8, 64, 384), 'bias': (384,)}


def _losses(config, model, batches, matmul_grad: bool):
  mesh = sharding.make_mesh(devices=jax.devices()[:1])  # One device: the least to compile.
  schedule, _ = train.make_schedule(config, 100)
  rng = jax.random.key(0)
  size = config.img_size
  abstract = jax.eval_shape(lambda r: model.init({'params': r}, jnp.zeros((1, size, size, 3))),
                            rng)
  # Random parameters from numpy: a jitted `model.init` would cost more compile time than the
  # step itself, and the two runs only need the same start.
  values = np.random.default_rng(0)
  params = jax.tree.map(lambda a: jnp.asarray(values.normal(0, 0.05, a.shape), a.dtype),
                        abstract['params'])
  batch_stats = jax.tree_util.tree_map_with_path(
      lambda path, a: (jnp.ones if path[-1].key == 'var' else jnp.zeros)(a.shape, a.dtype),
      abstract['batch_stats'])
  tx = train.make_optimizer(config, params, schedule)
  copy = lambda tree: jax.tree.map(jnp.copy, tree)  # noqa: E731  (the step donates the state)
  state = train.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                           batch_stats=batch_stats, opt_state=tx.init(params),
                           ema_params=copy(params), ema_batch_stats=copy(batch_stats))
  shardings = train.state_shardings(state, mesh, config.mesh.fsdp_min_size)
  # A fresh jitted step per lowering: jit caches traces by function, not by the switch.
  step = train.jit_update_step(train.make_update_step(
      model, tx, schedule, train.objective_config(config), ema_decay=config.ema_decay),
      shardings, mesh)
  with cpu_conv.use_matmul_grad(matmul_grad):
    step = step.lower(state, sharding.host_to_global(batches[0], mesh), rng).compile()
  losses = []
  for b in batches:
    state, metrics = step(state, sharding.host_to_global(b, mesh), rng)
    losses.append(float(sharding.fetch(metrics['loss'])))
  return losses, state


@pytest.mark.slow  # Compiles the update step twice: ~20 s on a quiet 2-core machine.
def test_trainer_steps_give_the_same_losses_with_either_kernel_gradient():
  # The demo's stem and recipe (MixToken, AdamW, EMA; no device augmentation, which only
  # costs compile time here) at a small batch, one block.
  config = load_config('demo.py:stage=baseline', batch_size=8,
                       **{'model_overrides.stem_channels': 64, 'model_overrides.depth': 1})
  model = train.build_model(config)
  rng = np.random.default_rng(0)
  size, b = config.img_size, config.batch_size
  batches = [{'image': rng.normal(size=(b, size, size, 3)).astype(np.float32),
              'label': rng.integers(0, config.num_classes, b).astype(np.int32),
              'label_affine': np.tile(np.float32([[1, 0, 0], [0, 1, 0]]), (b, 1, 1))}
             for _ in range(2)]
  xla_losses, xla_state = _losses(config, model, batches, matmul_grad=False)
  mm_losses, mm_state = _losses(config, model, batches, matmul_grad=True)
  np.testing.assert_allclose(mm_losses, xla_losses, rtol=0, atol=1e-5)
  # The stem's kernels moved the same way (they are what the two lowerings differ on).
  for name in ('conv1', 'conv2', 'conv3', 'proj'):
    np.testing.assert_allclose(
        np.asarray(mm_state.params['patch_embed'][name]['kernel']),
        np.asarray(xla_state.params['patch_embed'][name]['kernel']), rtol=0, atol=1e-5)
