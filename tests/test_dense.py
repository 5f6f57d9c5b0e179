"""The blocks' dense layers: the CPU lowering of their backward (`lvvit_jax/models/dense.py`)
equals `nn.Dense` with `lax.dot_general` to float32 rounding, forward and gradients, and is
used on the CPU backend only. (The model and the trainer with either lowering:
tests/test_batch_norm.py, which switches every CPU lowering.)"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lvvit_jax.models import dense
from lvvit_jax.models import lowering
from tests.test_batch_norm import _rel

# The blocks' products: qkv and fc1 (D -> 3D, 4D), proj and fc2; tokens as (B, N, D) and rows.
SHAPES = [((4, 17, 32), 96), ((4, 17, 96), 32), ((6, 24), 40), ((2, 3, 5, 16), 8)]


def _outputs(product, x_shape, features, use_bias, dtype=jnp.float32):
  rng = np.random.default_rng(sum(x_shape) + features)
  x = jnp.asarray(rng.normal(size=x_shape).astype(np.float32))
  layer = nn.Dense(features, use_bias=use_bias, dtype=dtype, dot_general=product)
  variables = layer.init(jax.random.key(0), x)

  def loss(params, x):
    y = layer.apply({'params': params}, x)
    return jnp.sum(jnp.sin(3.0 * y.astype(jnp.float32))), y
  (value, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
      variables['params'], x)
  return variables, value, y, grads


@pytest.mark.parametrize('use_bias', [True, False])
@pytest.mark.parametrize('x_shape,features', SHAPES)
def test_equals_nn_dense_forward_and_gradients(x_shape, features, use_bias):
  v0, value0, y0, (gp0, gx0) = _outputs(None, x_shape, features, use_bias)
  v1, value1, y1, (gp1, gx1) = _outputs(dense._dense_dot_general, x_shape, features, use_bias)
  assert jax.tree.map(jnp.shape, v1) == jax.tree.map(jnp.shape, v0)   # the same parameters
  np.testing.assert_array_equal(y1, y0)                               # the forward is lax's
  assert abs(float(value1 - value0)) <= 1e-6 * abs(float(value0)) + 1e-6
  assert _rel(gx1, gx0) < 1e-6
  assert _rel(gp1['kernel'], gp0['kernel']) < 1e-6
  assert gp1['kernel'].shape == gp0['kernel'].shape == (x_shape[-1], features)
  if use_bias:
    np.testing.assert_array_equal(gp1['bias'], gp0['bias'])


def test_bfloat16_compute_keeps_the_dtypes_of_nn_dense():
  _, _, y0, (gp0, gx0) = _outputs(None, (4, 9, 32), 64, True, dtype=jnp.bfloat16)
  _, _, y1, (gp1, gx1) = _outputs(dense._dense_dot_general, (4, 9, 32), 64, True,
                                  dtype=jnp.bfloat16)
  assert y1.dtype == y0.dtype == jnp.bfloat16
  assert gp1['kernel'].dtype == gp0['kernel'].dtype == jnp.float32
  assert gx1.dtype == gx0.dtype
  assert _rel(gp1['kernel'], gp0['kernel']) < 2e-2   # bfloat16 products, summed in another order


def test_other_contractions_are_left_to_lax():
  x = jnp.arange(24.0).reshape(2, 3, 4)
  w = jnp.arange(12.0).reshape(3, 4)
  dims = (((1,), (0,)), ((), ()))     # not Dense's contraction
  np.testing.assert_array_equal(dense._dense_dot_general(x, w, dims),
                                jax.lax.dot_general(x, w, dims))


def test_the_lowering_is_used_on_cpu_unless_turned_off(monkeypatch):
  monkeypatch.delenv(lowering.ENV, raising=False)
  assert jax.default_backend() == 'cpu' and dense.product() is dense._dense_dot_general
  monkeypatch.setenv(lowering.ENV, '0')
  assert dense.product() is None
