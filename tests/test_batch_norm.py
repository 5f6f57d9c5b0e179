"""The stem's BatchNorm + ReLU: its CPU lowering (statistics as matrix products, a written-out
backward) equals `nn.relu(nn.BatchNorm(...))` to float32 rounding, in every output the trainer
uses; and the model's outputs and gradients and the trainer's losses do not depend on which
lowering ran (`LVVIT_JAX_CPU_LOWERING` switches this one and the blocks' dense layers' and
attention's, whose own tests are tests/test_dense.py and tests/test_attention.py)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lvvit_jax import train
from lvvit_jax.models import batch_norm
from lvvit_jax.models import create_model
from lvvit_jax.models import lowering as cpu_lowering
from tests.run_helpers import load_config
from tests.test_train import _losses

# The zoo's stems: the 7x7/2 conv's and the 3x3 convs' outputs (64 channels; 128 for lvvit_l),
# small batches and sides so that the test stays fast.
SHAPES = [(4, 16, 16, 64), (2, 8, 8, 128), (3, 5, 7, 32)]


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def _reference_and_new(shape, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=shape).astype(np.float32) * 2.0 + 0.7)
  ref = nn.BatchNorm(momentum=0.9, epsilon=1e-5)
  variables = ref.init(jax.random.key(0), x, use_running_average=False)
  # Non-trivial scale, bias and running statistics.
  variables = jax.tree.map(
      lambda a: a + jnp.asarray(rng.uniform(0.1, 0.5, a.shape).astype(np.float32)), variables)
  return x, ref, batch_norm.BatchNormReLU(momentum=0.9, epsilon=1e-5), variables


def _train_outputs(module, variables, x, relu):
  def loss(params, x):
    y, updates = module.apply({'params': params, 'batch_stats': variables['batch_stats']}, x,
                              use_running_average=False, mutable=['batch_stats'])
    y = nn.relu(y) if relu else y
    return jnp.sum(jnp.sin(3.0 * y)), (y, updates['batch_stats'])
  (value, (y, stats)), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
      variables['params'], x)
  return value, y, stats, grads


@pytest.mark.parametrize('lowering', ['1', '0'])
@pytest.mark.parametrize('shape', SHAPES)
def test_equals_flax_batch_norm_then_relu(shape, lowering, monkeypatch):
  monkeypatch.setenv(cpu_lowering.ENV, lowering)
  assert cpu_lowering.lowering() == ('matmul' if lowering == '1' else 'native')
  x, ref, new, variables = _reference_and_new(shape)
  # The same variables, so checkpoints and the converter cannot tell them apart.
  ref_tree = jax.tree.map(jnp.shape, ref.init(jax.random.key(0), x, use_running_average=False))
  new_tree = jax.tree.map(jnp.shape, new.init(jax.random.key(0), x, use_running_average=False))
  assert ref_tree == new_tree
  v0, y0, s0, (gp0, gx0) = _train_outputs(ref, variables, x, relu=True)
  v1, y1, s1, (gp1, gx1) = _train_outputs(new, variables, x, relu=False)
  assert abs(float(v1 - v0)) <= 1e-5 * abs(float(v0)) + 1e-4
  assert _rel(y1, y0) < 1e-6
  for name in ('mean', 'var'):                        # the running averages
    assert _rel(s1[name], s0[name]) < 1e-6, name
  assert _rel(gx1, gx0) < 1e-5
  for name in ('scale', 'bias'):
    assert _rel(gp1[name], gp0[name]) < 1e-5, name
  # Evaluation reads the running statistics.
  e0 = nn.relu(ref.apply(variables, x, use_running_average=True))
  e1 = new.apply(variables, x, use_running_average=True)
  np.testing.assert_allclose(e1, e0, rtol=1e-6, atol=1e-6)


def test_running_statistics_are_left_alone_while_initialising():
  x = jnp.ones((2, 4, 4, 8)) * 3.0
  stats = batch_norm.BatchNormReLU().init(jax.random.key(0), x,
                                          use_running_average=False)['batch_stats']
  np.testing.assert_array_equal(stats['mean'], 0.0)
  np.testing.assert_array_equal(stats['var'], 1.0)


def test_the_cpu_lowering_is_picked_by_backend_and_a_bad_setting_is_named(monkeypatch):
  monkeypatch.delenv(cpu_lowering.ENV, raising=False)
  assert jax.default_backend() == 'cpu' and cpu_lowering.lowering() == 'matmul'
  monkeypatch.setenv(cpu_lowering.ENV, 'yes')
  with pytest.raises(ValueError, match=r'lvvit_jax/models/lowering.py: LVVIT_JAX_CPU_LOWERING'):
    cpu_lowering.lowering()


def test_model_outputs_and_gradients_do_not_depend_on_the_lowering(monkeypatch):
  model = create_model('lvvit_t', img_size=32, patch_size=4, num_classes=10, depth=2,
                       drop_path_rate=0.0)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 32, 32, 3)).astype(np.float32))
  variables = model.init(jax.random.key(0), x)

  def loss(params):
    (cls, aux), updates = model.apply({**variables, 'params': params}, x, train=True,
                                      mutable=['batch_stats'])
    return jnp.sum(jnp.sin(cls)) + jnp.sum(jnp.sin(aux)), (cls, updates['batch_stats'])

  runs = {}
  for lowering in ('1', '0'):
    monkeypatch.setenv(cpu_lowering.ENV, lowering)
    runs[lowering] = jax.value_and_grad(loss, has_aux=True)(variables['params'])
  ((v1, (c1, s1)), g1), ((v0, (c0, s0)), g0) = runs['1'], runs['0']
  assert _rel(c1, c0) < 1e-5
  for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s0)):
    assert _rel(a, b) < 1e-5
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g1), jax.tree.leaves(g0)):
    assert _rel(a, b) < 1e-4, jax.tree_util.keystr(path)


@pytest.mark.slow
@pytest.mark.parametrize('env,values', [(cpu_lowering.ENV, ('1', '0')),
                                        (cpu_lowering.CHUNKS_ENV, ('2', '1'))])
def test_trainer_losses_do_not_depend_on_the_lowering(env, values, digits_data, tmp_path,
                                                      monkeypatch):
  # Every CPU lowering on and off; then the blocks in two batch parts and whole (opt-in, see
  # tests/test_block_chunks.py). Six steps: Adam turns rounding in the BatchNorm biases' tiny
  # gradients into full-size updates, so longer runs drift apart by more than rounding (1.3e-5
  # of a loss by step 10).
  losses = {}
  for value in values:
    monkeypatch.setenv(env, value)
    config = load_config('demo.py:stage=baseline,runlocal',
                         **{'data.data_dir': digits_data['data_dir'], 'total_steps': 6,
                            'log_every': 1, 'checkpoint_every': 6, 'eval_every': 6})
    train.train_and_evaluate(config, str(tmp_path / value))
    losses[value] = _losses(str(tmp_path / value))
  assert len(losses[values[0]]) == 6
  np.testing.assert_allclose(losses[values[0]], losses[values[1]], rtol=1e-5)
