"""The recipes' optimizer pieces: decay masks, schedule, NFNet's SGD + AGC, EMA warm-up."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lvvit_jax import optim
from lvvit_jax.models import create_model


def test_weight_decay_mask_matches_spec():
  model = create_model('lvvit_t', img_size=32, patch_size=4, depth=2)
  params = jax.eval_shape(lambda: model.init({'params': jax.random.key(0)},
                                             jnp.zeros((1, 32, 32, 3))))['params']
  mask = optim.weight_decay_mask(params)
  assert not mask['cls_token'] and not mask['pos_embed']
  assert mask['patch_embed']['conv1']['kernel'] and mask['patch_embed']['proj']['kernel']
  assert not mask['patch_embed']['proj']['bias'] and not mask['patch_embed']['bn1']['scale']
  assert mask['blocks_0']['attn']['qkv']['kernel'] and mask['aux_head']['kernel']
  assert not mask['blocks_0']['norm1']['scale'] and not mask['head']['bias']
  # Exactly the two embeddings are exempt among the leaves with ndim >= 2.
  leaves = jax.tree_util.tree_leaves_with_path(params)
  decayed = jax.tree_util.tree_leaves(mask)
  exempt = [jax.tree_util.keystr(p) for (p, leaf), d in zip(leaves, decayed)
            if leaf.ndim >= 2 and not d]
  assert sorted(exempt) == ["['cls_token']", "['pos_embed']"]
  assert not any(d for (_, leaf), d in zip(leaves, decayed) if leaf.ndim < 2)


def test_schedule_warmup_cosine_cooldown():
  sched = optim.lr_schedule(1.6e-3, total_steps=310, warmup_steps=5, init_lr=1e-6, end_lr=1e-5,
                            cooldown_steps=10)
  lrs = np.array([float(sched(s)) for s in range(311)])
  np.testing.assert_allclose(lrs[0], 1e-6, rtol=1e-5)
  np.testing.assert_allclose(lrs[5], 1.6e-3, rtol=1e-5)
  assert np.all(np.diff(lrs[:6]) > 0) and np.all(np.diff(lrs[5:301]) <= 1e-12)
  np.testing.assert_allclose(lrs[300:], 1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------------
# The NFNet recipe: SGD with Nesterov momentum, AGC and L2 decay (DeepMind's `SGD_AGC`).


def _unitwise_norm(x):
  """DeepMind's unit-wise norm, by hand: per output unit (last axis) for kernels, whole else."""
  x = np.asarray(x, np.float64)
  if np.squeeze(x).ndim <= 1:
    return np.full_like(x, np.sqrt(np.sum(x ** 2)))
  return np.broadcast_to(np.sqrt(np.sum(x ** 2, axis=tuple(range(x.ndim - 1)), keepdims=True)),
                         x.shape)


def _agc_by_hand(g, p, clip=0.01, eps=1e-3):
  max_norm = clip * np.maximum(_unitwise_norm(p), eps)
  g_norm = _unitwise_norm(g)
  return np.where(g_norm > max_norm, g * max_norm / np.maximum(g_norm, 1e-6), g)


def _tree(rng, scale=1.0):
  return {'stem_conv0': {'kernel': scale * rng.normal(size=(3, 3, 2, 4)),
                         'gain': 1 + scale * rng.normal(size=4),
                         'bias': scale * rng.normal(size=4)},
          'nf_block': {'skip_gain': np.float64(scale * rng.normal()),
                       'squeeze_excite': {'linear': {'kernel': scale * rng.normal(size=(4, 2)),
                                                     'bias': np.zeros(2)}}},
          'linear': {'kernel': scale * rng.normal(size=(4, 3)), 'bias': np.zeros(3)}}


def _f32(tree):
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


def test_agc_clips_each_output_unit_and_spares_the_classifier_weight():
  rng = np.random.default_rng(0)
  params = _tree(rng)
  grads = _tree(rng, scale=0.02)
  # Output unit 0 of the stem kernel gets a large gradient, unit 1 a tiny one.
  grads['stem_conv0']['kernel'][..., 0] *= 100.0
  grads['stem_conv0']['kernel'][..., 1] *= 1e-3
  grads['linear']['kernel'] *= 1e3
  grads['linear']['bias'] = rng.normal(size=3)
  tx = optim.adaptive_grad_clip(_f32(params), 0.01)
  out, _ = tx.update(_f32(grads), tx.init(_f32(params)), _f32(params))
  out = jax.tree.map(np.asarray, out)
  k = out['stem_conv0']['kernel']
  np.testing.assert_allclose(k, _agc_by_hand(grads['stem_conv0']['kernel'],
                                             params['stem_conv0']['kernel']), rtol=1e-5)
  unit_norm = np.sqrt((k ** 2).sum(axis=(0, 1, 2)))
  p_norm = np.sqrt((params['stem_conv0']['kernel'] ** 2).sum(axis=(0, 1, 2)))
  np.testing.assert_allclose(unit_norm[0], 0.01 * p_norm[0], rtol=1e-5)   # clipped to the bound
  np.testing.assert_allclose(k[..., 1], grads['stem_conv0']['kernel'][..., 1], rtol=1e-6)  # kept
  # The classifier's weight is never clipped; its bias (zero: bound 0.01 * 1e-3) is, as
  # DeepMind's reference; so are gains, biases, skip gains and the squeeze-excite linears.
  np.testing.assert_allclose(out['linear']['kernel'], grads['linear']['kernel'], rtol=1e-6)
  for path in (('linear', 'bias'), ('stem_conv0', 'gain'), ('stem_conv0', 'bias'),
               ('nf_block', 'skip_gain'), ('nf_block', 'squeeze_excite', 'linear', 'kernel')):
    g, p, o = grads, params, out
    for key in path:
      g, p, o = g[key], p[key], o[key]
    np.testing.assert_allclose(o, _agc_by_hand(g, p), rtol=1e-5, atol=1e-12, err_msg=str(path))
  np.testing.assert_allclose(np.linalg.norm(out['linear']['bias']), 1e-5, rtol=1e-4)


def test_nfnet_decay_and_clipping_masks():
  model = create_model('nfnet_demo')
  params = jax.eval_shape(lambda: model.init({'params': jax.random.key(0)},
                                             jnp.zeros((1, 64, 64, 3))))['params']
  leaves = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(
      optim.nfnet_decay_mask(params))}
  decayed = sorted(k for k, v in leaves.items() if v)
  assert decayed and all(k.endswith("['kernel']") for k in decayed)
  assert "['linear']['kernel']" in decayed
  assert "['nf_block']['squeeze_excite']['linear']['kernel']" in decayed
  assert not leaves["['nf_block']['skip_gain']"] and not leaves["['stem_conv0']['gain']"]
  assert not any(v for k, v in leaves.items() if k.endswith("['bias']"))
  assert sum(1 for k in leaves if k.endswith("['kernel']")) == len(decayed)
  clipped = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(
      optim.agc_mask(params, ('linear',)))}
  assert [k for k, v in clipped.items() if not v] == ["['linear']['kernel']"]


def test_nesterov_sgd_with_agc_and_decay_matches_a_hand_computation():
  """Two steps of the NFNet optimizer against DeepMind's SGD_AGC update written out in NumPy:
  clip, g += wd * p (not gains or biases), buf = m * buf + g, p -= lr * (g + m * buf)."""
  rng = np.random.default_rng(1)
  params = _tree(rng)
  grads = [_tree(rng, scale=0.05), _tree(rng, scale=0.05)]
  lr = lambda step: 0.1 * (step + 1)  # noqa: E731  (a schedule: step 0 -> 0.1, step 1 -> 0.2)
  wd, m = 0.05, 0.9
  tx = optim.make_optimizer(_f32(params), lr, optimizer='sgd', weight_decay=wd,
                            decay_mask='nfnet', momentum=m, nesterov=True, agc_clip=0.01,
                            agc_exempt=('linear',))
  p_jax, state = _f32(params), tx.init(_f32(params))
  flat = lambda t: {jax.tree_util.keystr(k): v for k, v in  # noqa: E731
                    jax.tree_util.tree_leaves_with_path(t)}
  p_np = flat(params)
  buf = {k: np.zeros_like(v) for k, v in p_np.items()}
  for step, g in enumerate(grads):
    updates, state = tx.update(_f32(g), state, p_jax)
    p_jax = optax.apply_updates(p_jax, updates)
    for key, gk in flat(g).items():
      name = key.split("'")[-2]
      exempt = key == "['linear']['kernel']"
      gk = gk if exempt else _agc_by_hand(gk, p_np[key])
      if not optim.is_gain_or_bias(name):
        gk = gk + wd * p_np[key]
      buf[key] = m * buf[key] + gk
      p_np[key] = p_np[key] - lr(step) * (gk + m * buf[key])
  for key, value in flat(p_jax).items():
    np.testing.assert_allclose(value, p_np[key], rtol=2e-5, atol=1e-7, err_msg=key)


def test_ema_warmup_is_tf1s():
  assert optim.ema_decay_at(jnp.int32(5), 0.99999) == 0.99999
  np.testing.assert_allclose(optim.ema_decay_at(jnp.int32(0), 0.99999, warmup=True), 0.1)
  np.testing.assert_allclose(optim.ema_decay_at(jnp.int32(90), 0.99999, warmup=True), 0.91)
  np.testing.assert_allclose(optim.ema_decay_at(jnp.int32(10**7), 0.99999, warmup=True),
                             0.99999, rtol=1e-7)
  np.testing.assert_allclose(optim.ema_decay_at(jnp.int32(100), 0.9, warmup=True), 0.9)


def test_unknown_optimizer_or_mask_is_named():
  params = {'w': jnp.zeros((2, 2))}
  sched = optim.lr_schedule(0.1, 10, 1)
  with pytest.raises(ValueError, match=r"config.optimizer='lamb'; use one of \('adamw', 'sgd'\)"):
    optim.make_optimizer(params, sched, optimizer='lamb')
  with pytest.raises(ValueError, match=r"config.decay_mask='vit'; use one of \['lvvit', 'nfnet'\]"):
    optim.make_optimizer(params, sched, decay_mask='vit')
