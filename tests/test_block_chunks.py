"""The transformer blocks over independent parts of the batch (`lowering.block_chunks`, used by
`lvvit_jax/models/lvvit.py` on XLA:CPU when LVVIT_JAX_CPU_BLOCK_CHUNKS asks for it) give the
model's outputs and gradients of the whole batch to float32 rounding, in training (with
MixToken) and inference. (The trainer's losses with and without: tests/test_batch_norm.py.)"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lvvit_jax.models import lowering
from lvvit_jax.models import lvvit
from tests.test_batch_norm import _rel


def _model(**overrides):
  config = lvvit.LVViTConfig(**{**dict(dim=48, depth=2, num_heads=3, mlp_hidden=96,
                                       stem_channels=16, num_classes=7, img_size=32,
                                       patch_size=8), **overrides})
  return lvvit.LVViT(config)


def _outputs_and_grads(model, variables, images, box):
  def loss(params):
    (cls, aux), _ = model.apply({**variables, 'params': params}, images, train=True,
                                mix_box=box, mutable=['batch_stats'])
    return jnp.sum(jnp.sin(cls)) + jnp.sum(jnp.cos(aux)), (cls, aux)
  (_, (cls, aux)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables['params'])
  return cls, aux, grads, jax.jit(model.apply)(variables, images)


@pytest.mark.parametrize('conv_stem', [True, False])
def test_the_blocks_over_two_parts_equal_the_whole_batch(conv_stem, monkeypatch):
  monkeypatch.setenv(lowering.CHUNKS_ENV, '2')
  model = _model(conv_stem=conv_stem, aux_head=True)
  images = jnp.asarray(np.random.default_rng(0).normal(size=(6, 32, 32, 3)).astype(np.float32))
  variables = model.init(jax.random.key(0), images[:1])
  box = jnp.array([1, 0, 3, 2])
  assert lowering.block_chunks(6) == 2          # the CPU backend with the lowering on
  chunked = _outputs_and_grads(model, variables, images, box)
  monkeypatch.setenv(lowering.CHUNKS_ENV, '1')
  assert lowering.block_chunks(6) == 1
  whole = _outputs_and_grads(model, variables, images, box)
  for a, b in zip(chunked[:2] + chunked[3:], whole[:2] + whole[3:]):   # cls, aux, inference
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  whole_grads = dict(jax.tree_util.tree_leaves_with_path(whole[2]))
  for path, g in jax.tree_util.tree_leaves_with_path(chunked[2]):
    assert _rel(g, whole_grads[path]) < 1e-5, jax.tree_util.keystr(path)


def test_parts_only_when_asked_where_they_divide_the_batch_and_with_the_lowering_on(monkeypatch):
  monkeypatch.delenv(lowering.CHUNKS_ENV, raising=False)
  assert lowering.block_chunks(8) == 1                   # off by default
  monkeypatch.setenv(lowering.CHUNKS_ENV, '2')
  assert [lowering.block_chunks(b) for b in (1, 2, 3, 8, 9)] == [1, 2, 1, 2, 1]
  monkeypatch.setenv(lowering.CHUNKS_ENV, '4')
  assert [lowering.block_chunks(b) for b in (2, 8, 12)] == [1, 4, 4]
  for bad in ('0', 'two', '-1', ''):
    monkeypatch.setenv(lowering.CHUNKS_ENV, bad)
    with pytest.raises(ValueError, match='LVVIT_JAX_CPU_BLOCK_CHUNKS'):
      lowering.block_chunks(8)
  # Asked for two parts, an odd batch runs whole.
  monkeypatch.setenv(lowering.CHUNKS_ENV, '2')
  model = _model()
  images = jnp.ones((3, 32, 32, 3))
  variables = model.init(jax.random.key(1), images[:1])
  assert model.apply(variables, images).shape == (3, 7)
  monkeypatch.setenv(lowering.ENV, '0')
  assert lowering.block_chunks(8) == 1

