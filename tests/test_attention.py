"""Multi-head attention's CPU lowering (`lvvit_jax/models/attention.py`) equals
`jax.nn.dot_product_attention` to float32 rounding, forward and gradients, and is used on the CPU
backend for float32 only. (The model and the trainer with either lowering:
tests/test_batch_norm.py, which switches every CPU lowering.)"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lvvit_jax.models import attention
from lvvit_jax.models import lowering
from tests.test_batch_norm import _rel

# (B, N, heads, head_dim): the demo's blocks at 64 and 96 px, LV-ViT-S's, and odd sizes.
SHAPES = [(4, 65, 4, 32), (2, 145, 4, 32), (2, 197, 6, 64), (3, 5, 1, 8), (1, 2, 3, 4)]


def _per_head_numpy(qkv, num_heads):
  """The definition, head by head in float64: softmax(q k^T / sqrt(hd)) v."""
  qkv = np.asarray(qkv, np.float64)
  b, n, d3 = qkv.shape
  hd = d3 // 3 // num_heads
  out = np.zeros((b, n, num_heads * hd))
  for h in range(num_heads):
    q, k, v = (qkv[..., (i * num_heads + h) * hd:(i * num_heads + h + 1) * hd] for i in range(3))
    s = q @ k.transpose(0, 2, 1) / np.sqrt(hd)
    p = np.exp(s - s.max(-1, keepdims=True))
    out[..., h * hd:(h + 1) * hd] = (p / p.sum(-1, keepdims=True)) @ v
  return out


def _value_and_grads(fn, qkv, num_heads):
  def loss(qkv):
    y = fn(qkv, num_heads)
    return jnp.sum(jnp.sin(3.0 * y)), y
  (value, y), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(qkv)
  return value, y, grad


@pytest.mark.parametrize('b,n,heads,hd', SHAPES)
def test_equals_xla_attention_forward_and_gradients(b, n, heads, hd, monkeypatch):
  rng = np.random.default_rng(n + heads)
  qkv = jnp.asarray(rng.normal(size=(b, n, 3 * heads * hd)).astype(np.float32) * 2.0)
  monkeypatch.setenv(lowering.ENV, '0')   # jax.nn.dot_product_attention
  value0, y0, g0 = _value_and_grads(attention.multi_head, qkv, heads)
  monkeypatch.delenv(lowering.ENV)        # the CPU lowering
  value1, y1, g1 = _value_and_grads(attention.multi_head, qkv, heads)
  assert y1.shape == y0.shape == (b, n, heads * hd) and y1.dtype == jnp.float32
  np.testing.assert_allclose(y1, _per_head_numpy(qkv, heads), rtol=1e-5, atol=1e-5)
  assert _rel(y1, y0) < 1e-6
  assert abs(float(value1 - value0)) <= 1e-5 * abs(float(value0)) + 1e-5
  assert _rel(g1, g0) < 1e-5


def test_split_and_merge_heads_follow_the_qkv_layout():
  # qkv's last axis is (3, heads, head_dim): q of head 1 is columns [hd, 2 hd).
  b, n, heads, hd = 2, 3, 2, 4
  qkv = jnp.arange(b * n * 3 * heads * hd, dtype=jnp.float32).reshape(b, n, 3 * heads * hd)
  q, k, v = attention.split_heads(qkv, heads)
  assert q.shape == (b * heads, n, hd)
  np.testing.assert_array_equal(q[1 * heads + 1], qkv[1, :, hd:2 * hd])      # batch 1, head 1
  np.testing.assert_array_equal(v[0], qkv[0, :, 2 * heads * hd:2 * heads * hd + hd])
  np.testing.assert_array_equal(attention.merge_heads(k, b), qkv[..., heads * hd:2 * heads * hd])


def test_the_lowering_is_used_on_cpu_for_float32_unless_turned_off(monkeypatch):
  calls = []
  keys_major = attention.keys_major
  monkeypatch.setattr(attention, 'keys_major', lambda *a: calls.append(1) or keys_major(*a))
  qkv = jnp.ones((2, 5, 24), jnp.float32)
  monkeypatch.delenv(lowering.ENV, raising=False)
  attention.multi_head(qkv, 2)
  assert calls == [1]
  out = attention.multi_head(qkv.astype(jnp.bfloat16), 2)   # jax.nn's dtype handling
  assert calls == [1] and out.dtype == jnp.bfloat16
  monkeypatch.setenv(lowering.ENV, '0')
  attention.multi_head(qkv, 2)
  assert calls == [1]
