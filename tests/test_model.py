"""Facts about the Flax LV-ViT family: sizes, outputs, MixToken inside the model, bfloat16."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lvvit_jax.models import create_model
from lvvit_jax.models import get_config

# SPEC section 1: parameters incl. aux head and BN scale/bias, not running stats.
PARAM_COUNTS = [
    ('lvvit_t', 224, 8_534_720),
    ('lvvit_s', 224, 26_151_824),
    ('lvvit_m', 224, 55_830_544),
    ('lvvit_l', 224, 150_021_968),
    ('lvvit_s', 384, 26_297_744),
    ('lvvit_m', 448, 56_131_600),
    ('lvvit_l', 288, 150_120_272),
    ('lvvit_l', 448, 150_473_552),
    ('lvvit_l', 512, 150_657_872),
]

SMALL = dict(img_size=32, patch_size=4, num_classes=10)


def _shapes(model, size):
  x = jnp.zeros((1, size, size, 3), jnp.float32)
  return jax.eval_shape(lambda: model.init({'params': jax.random.key(0)}, x))


@pytest.mark.parametrize('name,size,expected', PARAM_COUNTS)
def test_parameter_counts_match_spec(name, size, expected):
  shapes = _shapes(create_model(name, img_size=size), size)
  assert sum(p.size for p in jax.tree.leaves(shapes['params'])) == expected
  # Running statistics live apart from the parameters (3 BNs x mean/var).
  assert len(jax.tree.leaves(shapes['batch_stats'])) == 6


def test_vit_baseline_is_plain():
  config = get_config('vit_s')
  assert not config.conv_stem and not config.aux_head and config.skip_lam == 1.0
  shapes = _shapes(create_model('vit_s'), 224)
  assert 'batch_stats' not in shapes and 'aux_head' not in shapes['params']
  assert shapes['params']['patch_embed']['proj']['kernel'].shape == (16, 16, 3, 384)


def test_drop_path_schedule_is_linear_from_zero():
  model = create_model('lvvit_s', img_size=32, patch_size=4)
  variables = model.init({'params': jax.random.key(0)}, jnp.zeros((1, 32, 32, 3)))
  bound = model.bind(variables)
  rates = [b.drop_path for b in bound.blocks]
  np.testing.assert_allclose(rates, 0.1 * np.arange(16) / 15)


def test_unknown_override_is_a_clear_error():
  with pytest.raises(ValueError, match='unknown override'):
    create_model('lvvit_s', num_clases=10)
  with pytest.raises(ValueError, match='unknown model'):
    create_model('lvvit_xl')


@pytest.fixture(scope='module')
def tiny():
  model = create_model('lvvit_t', drop_path_rate=0.0, **SMALL)
  x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  variables = model.init({'params': jax.random.key(0)}, x)
  return model, variables, x


def test_inference_is_cls_plus_half_max_aux(tiny):
  model, variables, x = tiny
  logits = model.apply(variables, x)
  (cls, aux), _ = model.apply(variables, x, train=True, mutable=['batch_stats'],
                              rngs={'dropout': jax.random.key(0)})
  assert logits.shape == (4, 10) and cls.shape == (4, 10) and aux.shape == (4, 64, 10)
  # Same computation in eval mode through the training outputs' formula.
  feats = model.apply(variables, x, method='features')
  assert feats.shape == (4, 65, 240)
  params = variables['params']
  cls_e = feats[:, 0] @ params['head']['kernel'] + params['head']['bias']
  aux_e = feats[:, 1:] @ params['aux_head']['kernel'] + params['aux_head']['bias']
  np.testing.assert_allclose(logits, cls_e + 0.5 * aux_e.max(axis=1), atol=1e-4)


def test_mix_box_swaps_partner_tokens_and_unmixes_aux(tiny):
  model, variables, x = tiny
  run = lambda imgs, box: model.apply(  # noqa: E731
      variables, imgs, train=True, mix_box=box, mutable=['batch_stats'],
      rngs={'dropout': jax.random.key(0)})[0]
  full = jnp.array([0, 0, 8, 8])
  (cls_mixed, aux_mixed) = run(x[:2], full)
  (cls_plain, aux_plain) = run(x[1::-1], None)  # The pair in swapped order, no mixing.
  # With the whole grid swapped, example 0 sees example 1's tokens and vice versa ...
  np.testing.assert_allclose(cls_mixed, cls_plain, atol=1e-4)
  # ... and the aux outputs are swapped back, so aux[0] still belongs to image 0's slots.
  np.testing.assert_allclose(aux_mixed, aux_plain[::-1], atol=1e-4)
  # An empty box is no mixing at all.
  cls_empty, aux_empty = run(x[:2], jnp.array([3, 3, 3, 3]))
  cls_none, aux_none = run(x[:2], None)
  np.testing.assert_allclose(cls_empty, cls_none, atol=1e-6)
  np.testing.assert_allclose(aux_empty, aux_none, atol=1e-6)


def test_traced_box_does_not_recompile(tiny):
  model, variables, x = tiny

  @jax.jit
  def step(box):
    return model.apply(variables, x, train=True, mix_box=box, mutable=['batch_stats'],
                       rngs={'dropout': jax.random.key(0)})[0][0]

  outs = [step(jnp.array(b, jnp.int32)) for b in ([0, 0, 4, 4], [2, 1, 8, 5], [0, 0, 0, 0])]
  assert step._cache_size() == 1
  assert not np.allclose(outs[0], outs[1])


def test_drop_path_is_per_sample_and_only_in_training():
  model = create_model('lvvit_t', drop_path_rate=0.9, depth=3, **SMALL)
  x = jnp.tile(jax.random.normal(jax.random.key(1), (1, 32, 32, 3)), (8, 1, 1, 1))
  variables = model.init({'params': jax.random.key(0)}, x)
  (cls, _), _ = model.apply(variables, x, train=True, mutable=['batch_stats'],
                            rngs={'dropout': jax.random.key(3)})
  # Identical images, different per-sample paths -> different outputs within the batch.
  assert np.unique(np.round(np.asarray(cls[:, 0]), 5)).size > 1
  eval_out = model.apply(variables, x)
  np.testing.assert_allclose(eval_out, eval_out[:1].repeat(8, 0), atol=1e-5)


def test_image_size_mismatch_is_a_clear_error(tiny):
  model, variables, _ = tiny
  with pytest.raises(ValueError, match='img_size'):
    model.apply(variables, jnp.zeros((1, 48, 48, 3)))


def test_bfloat16_compute_keeps_float32_params_and_stays_close():
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  m32 = create_model('lvvit_s', depth=4, **SMALL)
  m16 = create_model('lvvit_s', depth=4, dtype='bfloat16', **SMALL)
  variables = m32.init({'params': jax.random.key(0)}, x)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(
      m16.init({'params': jax.random.key(0)}, x)))
  out32 = m32.apply(variables, x)
  out16 = m16.apply(variables, x)
  assert out16.dtype == jnp.float32  # Logits come back in float32 for the loss.
  scale = float(jnp.abs(out32).max())
  assert float(jnp.abs(out16 - out32).max()) < 0.05 * scale
  (cls16, aux16), _ = m16.apply(variables, x, train=True, mix_box=jnp.array([0, 0, 4, 4]),
                                mutable=['batch_stats'], rngs={'dropout': jax.random.key(0)})
  assert np.isfinite(np.asarray(cls16)).all() and np.isfinite(np.asarray(aux16)).all()
