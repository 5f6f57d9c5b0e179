"""The token-labeling loss: a hand computation, float32 under bfloat16, gradients, transforms."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lvvit_jax import token_labeling as tl


def _log_softmax(x):
  x = np.asarray(x, np.float64)
  return x - np.log(np.sum(np.exp(x), axis=-1, keepdims=True))


def _case():
  cls_logits = np.array([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]], np.float32)
  aux_logits = np.array([[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]],
                         [[-1.0, 4.0, 0.0], [2.0, 2.0, 1.0]]], np.float32)  # (B=2, N=2, K=3)
  cls_target = np.array([[0.7, 0.2, 0.1], [0.0, 0.5, 0.5]], np.float32)
  tok_target = np.array([[[1.0, 0.0, 0.0], [0.2, 0.3, 0.5]],
                         [[0.0, 1.0, 0.0], [0.6, 0.2, 0.2]]], np.float32)
  return cls_logits, aux_logits, cls_target, tok_target


def test_matches_a_hand_computation():
  cls_logits, aux_logits, cls_target, tok_target = _case()
  # SCE(x, t) = sum_k -t_k log_softmax(x)_k, by hand for the first cls row:
  # log_softmax([2, 0, -1]) = [2, 0, -1] - log(e^2 + 1 + e^-1).
  lse = np.log(np.exp(2.0) + 1.0 + np.exp(-1.0))
  row0 = -(0.7 * (2.0 - lse) + 0.2 * (0.0 - lse) + 0.1 * (-1.0 - lse))
  want_cls = np.mean(-np.sum(cls_target * _log_softmax(cls_logits), -1))
  np.testing.assert_allclose(-np.sum(cls_target[0] * _log_softmax(cls_logits[0])), row0)
  want_dense = np.sum(-tok_target * _log_softmax(aux_logits)) / 4  # mean over B * N tokens
  total, parts = jax.jit(functools.partial(tl.token_label_loss, cls_weight=1.0,
                                           dense_weight=0.5))(
                                               cls_logits, aux_logits, cls_target, tok_target)
  np.testing.assert_allclose(parts['cls'], want_cls, rtol=1e-6)
  np.testing.assert_allclose(parts['dense'], want_dense, rtol=1e-6)
  np.testing.assert_allclose(total, want_cls + 0.5 * want_dense, rtol=1e-6)
  total2, _ = tl.token_label_loss(cls_logits, aux_logits, cls_target, tok_target,
                                  cls_weight=0.3, dense_weight=1.0)
  np.testing.assert_allclose(total2, 0.3 * want_cls + want_dense, rtol=1e-6)
  # The default dense weight is the paper's 0.5.
  np.testing.assert_allclose(tl.token_label_loss(*_case())[0], total, rtol=1e-7)


def test_grid_shaped_token_targets_are_row_major():
  cls_logits, aux_logits, cls_target, tok_target = _case()
  # (B, N=2, K) and the same targets as a (B, gh=1, gw=2, K) grid.
  a = tl.token_label_loss(cls_logits, aux_logits, cls_target, tok_target)
  b = tl.token_label_loss(cls_logits, aux_logits, cls_target, tok_target.reshape(2, 1, 2, 3))
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_float32_under_bfloat16_and_finite_gradients():
  cls_logits, aux_logits, cls_target, tok_target = _case()
  cls16 = jnp.asarray(cls_logits, jnp.bfloat16)
  aux16 = jnp.asarray(aux_logits, jnp.bfloat16)
  total, parts = jax.jit(tl.token_label_loss)(cls16, aux16, cls_target, tok_target)
  assert total.dtype == jnp.float32 and parts['cls'].dtype == jnp.float32
  ref, _ = tl.token_label_loss(np.asarray(cls16, np.float32), np.asarray(aux16, np.float32),
                               cls_target, tok_target)
  np.testing.assert_allclose(total, ref, rtol=1e-6)

  grad_fn = jax.jit(jax.grad(lambda c, a: tl.token_label_loss(c, a, cls_target, tok_target)[0],
                             argnums=(0, 1)))
  g_cls, g_aux = grad_fn(jnp.asarray(cls_logits), jnp.asarray(aux_logits))
  # d/dx mean_b SCE = (softmax(x) - t) / B for targets that sum to 1.
  np.testing.assert_allclose(g_cls, (np.exp(_log_softmax(cls_logits)) - cls_target) / 2,
                             atol=1e-6)
  np.testing.assert_allclose(g_aux, 0.5 * (np.exp(_log_softmax(aux_logits)) - tok_target) / 4,
                             atol=1e-6)
  g16 = grad_fn(cls16, aux16)
  assert all(g.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(g, np.float32)))
             for g in g16)
  # Extreme logits stay finite (log_softmax, not log(softmax)).
  g_big = grad_fn(jnp.asarray(cls_logits) * 1e4, jnp.asarray(aux_logits) * 1e4)
  assert all(np.all(np.isfinite(g)) for g in g_big)


def test_vmap_over_micro_batches():
  cls_logits, aux_logits, cls_target, tok_target = _case()
  stack = lambda x: np.stack([x, x[::-1]])
  totals, _ = jax.vmap(tl.token_label_loss)(*map(stack, (cls_logits, aux_logits, cls_target,
                                                          tok_target)))
  np.testing.assert_allclose(totals[0], tl.token_label_loss(*_case())[0], rtol=1e-6)
  np.testing.assert_allclose(totals[1], totals[0], rtol=1e-6)  # order within a batch is free


def test_ground_truth_blend_as_the_release():
  teacher = np.array([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1]], np.float32)
  truth = np.array([[0.9, 0.05, 0.05], [0.9, 0.05, 0.05]], np.float32)
  blended = tl.blend_ground_truth(jnp.asarray(teacher), jnp.asarray(truth))
  # Row 0 agrees on the top class: r = 0.5; row 1 disagrees: r = 0.9 (the release's code).
  np.testing.assert_allclose(blended[0], 0.5 * teacher[0] + 0.5 * truth[0], atol=1e-7)
  np.testing.assert_allclose(blended[1], 0.9 * teacher[1] + 0.1 * truth[1], atol=1e-7)
  cls_logits, aux_logits, _, tok_target = _case()
  with_gt = tl.token_label_loss(cls_logits, aux_logits, teacher, tok_target, ground_truth=truth)
  by_hand = tl.token_label_loss(cls_logits, aux_logits, blended, tok_target)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), with_gt, by_hand)


def test_plain_label_targets_give_smoothed_cross_entropy():
  labels = np.array([2, 0])
  cls_t, tok_t = tl.label_targets(labels, grid=(1, 2), num_classes=3, smoothing=0.0)
  cls_logits, aux_logits, _, _ = _case()
  _, parts = tl.token_label_loss(cls_logits, aux_logits, cls_t, tok_t)
  want = -np.mean(_log_softmax(cls_logits)[np.arange(2), labels])
  np.testing.assert_allclose(parts['cls'], want, rtol=1e-6)


def test_bad_shapes_name_the_file():
  cls_logits, aux_logits, cls_target, tok_target = _case()
  with pytest.raises(ValueError, match='loss.py'):
    tl.token_label_loss(cls_logits, aux_logits, cls_target[:, :2], tok_target)
  with pytest.raises(ValueError, match='loss.py.*gh \\* gw = N'):
    tl.token_label_loss(cls_logits, aux_logits, cls_target, tok_target[:, :1])
  with pytest.raises(ValueError, match='loss.py.*label_targets'):
    tl.token_label_loss(cls_logits, aux_logits, cls_target, tok_target,
                        ground_truth=cls_target[:1])
