"""Online token labeling: targets from a teacher run on the student's own crop.

Facts a user relies on: the cls target is the teacher's prediction for the crop (softmax of its
logits averaged over positions) and each token's target its logits over that token's cells;
with such targets `training_loss` is the same loss as with any other targets (a teacher sure of
the label everywhere gives the plain-label loss); the trainer builds the teacher from
`config.online_teacher` and refuses ambiguous or mismatched settings. The ablation's second
view puts each crop back in place on a masked canvas (pixels where the crop was cut from, the
crop's mean colour elsewhere) and pools the teacher's logits over the crop as a map's.
"""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import demo
from lvvit_jax import checkpoints
from lvvit_jax import token_labeling as tl
from lvvit_jax import train
from lvvit_jax.models import create_model
from tests.test_cutmix import _variables

K = 10


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _smooth(p, s=0.1):
  return (p * (1 - s + s / K) + s / K) / (1 + s / K)


def test_cls_is_the_teacher_prediction_and_tokens_its_positions_on_the_same_grid():
  logits = np.random.default_rng(0).normal(0, 3, (2, 8, 8, K)).astype(np.float32)
  cls, tok = tl.crop_targets(logits, grid=8, smoothing=0.1)
  np.testing.assert_allclose(cls, _smooth(_softmax(logits.mean((1, 2)))), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(tok, _smooth(_softmax(logits)), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(np.sum(tok, -1), 1.0, rtol=1e-6)


def test_a_finer_teacher_grid_averages_the_positions_each_token_covers():
  logits = np.random.default_rng(1).normal(0, 3, (2, 16, 12, K)).astype(np.float32)
  pooled = np.asarray(tl.logits_on_grid(logits, (8, 4)))
  np.testing.assert_allclose(pooled[:, 3, 2], logits[:, 6:8, 6:9].mean((1, 2)), rtol=1e-5)
  _, tok = tl.crop_targets(logits, grid=(8, 4), smoothing=0.0)
  np.testing.assert_allclose(tok, _softmax(pooled), rtol=1e-5, atol=1e-7)


def test_a_coarser_teacher_grid_is_resampled_bilinearly():
  logits = np.random.default_rng(2).normal(0, 3, (1, 4, 4, K)).astype(np.float32)
  np.testing.assert_allclose(tl.logits_on_grid(logits, 8),
                             jax.image.resize(logits, (1, 8, 8, K), 'linear'), rtol=1e-6)
  with pytest.raises(ValueError, match='online.py.*dense_logits must be'):
    tl.crop_targets(logits[0], grid=8)


def test_a_teacher_sure_of_the_label_everywhere_gives_the_plain_label_loss():
  model = create_model('lvvit_t', img_size=32, patch_size=8, depth=1, dim=32, num_heads=2,
                       mlp_hidden=64, num_classes=K)
  b = 4
  images = np.random.default_rng(3).standard_normal((b, 32, 32, 3)).astype(np.float32)
  labels = np.array([3, 1, 4, 1])
  variables = _variables(model, images)
  sure = 60.0 * np.asarray(jax.nn.one_hot(labels, K))[:, None, None, :] * np.ones((b, 4, 4, 1))
  cfg = tl.ObjectiveConfig(mixtoken=False, ground_truth_blend=True)
  batch = {'image': images, 'label': labels}
  args = (model, variables['params'], variables['batch_stats'], batch, jax.random.key(0), cfg)
  plain, (_, plain_parts) = tl.training_loss(*args)
  online, (_, online_parts) = tl.training_loss(*args, teacher_logits=jnp.asarray(sure))
  np.testing.assert_allclose(online, plain, rtol=1e-5)
  np.testing.assert_allclose(online_parts['dense'], plain_parts['dense'], rtol=1e-5)
  # And a teacher that is wrong everywhere changes the loss (the targets are really used; the
  # random model predicts nearly uniformly, so any target costs about log K).
  wrong = np.roll(sure, 1, axis=-1)
  other, _ = tl.training_loss(*args, teacher_logits=jnp.asarray(wrong))
  assert abs(float(other) - float(plain)) > 1e-2


def _save_teacher(path, num_classes=K):
  cfg = dict(img_size=32, num_classes=num_classes, depth=1, patch_size=8, dim=32, num_heads=2,
             mlp_hidden=64, stem_channels=16)
  model = create_model('lvvit_t', **cfg)
  variables = model.init({'params': jax.random.key(0)}, jnp.zeros((1, 32, 32, 3)))
  return checkpoints.save_variables(path, jax.tree.map(np.asarray, variables), 'lvvit_t', cfg)


def test_the_trainer_runs_the_configured_teacher_on_the_crops(tmp_path):
  teacher = _save_teacher(str(tmp_path / 'teacher'))
  config = demo.get_config('stage=baseline')
  assert train.make_online_teacher(config) is None
  config.online_teacher = teacher
  dense_logits = train.make_online_teacher(config)
  images = jnp.zeros((2, 64, 64, 3))  # the student's size; the teacher runs at its own 32 px
  affine = jnp.tile(jnp.float32([[0.5, 0, 0.25], [0, 0.5, 0.5]]), (2, 1, 1))
  assert jax.jit(dense_logits)(images, affine).shape == (2, 4, 4, K)
  config.online_teacher_view = 'in_place'
  assert jax.jit(train.make_online_teacher(config))(images, affine).shape == (2, 4, 4, K)
  config.online_teacher_view = 'whole'
  with pytest.raises(ValueError, match="online_teacher_view='whole'; use one of"):
    train.make_online_teacher(config)
  config.online_teacher_view = 'crop'
  config.data.score_maps_dir = str(tmp_path / 'maps')
  with pytest.raises(ValueError, match='online_teacher=.*score_maps_dir=.*set one of them'):
    train.make_online_teacher(config)
  config.data.score_maps_dir = None
  config.online_teacher = str(tmp_path / 'nowhere')
  with pytest.raises(FileNotFoundError, match='config.online_teacher: .*nowhere does not exist'):
    train.make_online_teacher(config)
  config.online_teacher = _save_teacher(str(tmp_path / 'other'), num_classes=7)
  with pytest.raises(ValueError, match='predicts 7 classes, config.num_classes is 10'):
    train.make_online_teacher(config)


def test_the_dense_weight_defaults_to_the_paper_beta_with_an_online_teacher():
  from lvvit_jax import recipe  # pylint: disable=g-import-not-at-top
  config = demo.get_config('stage=baseline')
  config.dense_weight = None
  assert recipe.objective_config(config).dense_weight == 0.0
  config.online_teacher = 'somewhere'
  assert recipe.objective_config(config).dense_weight == 0.5
  assert isinstance(config, ml_collections.ConfigDict)


def _ramp(size):
  """(1, size, size, 3): channel 0 = row centre, 1 = column centre, 2 = their sum (normalised)."""
  c = (np.arange(size, dtype=np.float32) + 0.5) / size
  y, x = np.meshgrid(c, c, indexing='ij')
  return np.stack([y, x, y + x], -1)[None]


def test_in_place_puts_each_crop_back_where_it_was_cut_and_masks_the_rest():
  source = _ramp(64)
  # The crop of rows [16, 48) and columns [8, 40) of the source, resized to 64 px: on a linear
  # image the bilinear resize is exact away from the edges, and so is sampling it back.
  crop = np.asarray(jax.image.resize(source[:, 16:48, 8:40], (1, 64, 64, 3), 'linear'))
  affine = np.float32([[[0.5, 0, 0.25], [0, 0.5, 0.125]]])
  canvas = np.asarray(tl.in_place_canvas(crop, affine, 64))
  np.testing.assert_allclose(canvas[0, 17:47, 9:39], source[0, 17:47, 9:39], atol=1e-5)
  outside = np.ones((64, 64), bool)
  outside[16:48, 8:40] = False
  np.testing.assert_allclose(canvas[0][outside], np.broadcast_to(crop.mean((1, 2)), (
      outside.sum(), 3)), atol=1e-6)
  # The identity affine gives the image back.
  np.testing.assert_allclose(tl.in_place_canvas(source, np.float32([[[1, 0, 0], [0, 1, 0]]]),
                                                64), source, atol=1e-6)
  with pytest.raises(ValueError, match='online.py: label_affine must be'):
    tl.in_place_canvas(source, np.zeros((1, 3, 3), np.float32), 64)


def test_in_place_logits_pool_the_canvas_map_over_the_crop():
  # Logits linear in the canvas row: each crop token's pooled logit is the row of its centre.
  k = 3
  rows = (np.arange(8, dtype=np.float32) + 0.5) / 8
  logits = np.broadcast_to(rows[None, :, None, None] * np.float32([1, 2, -1]), (1, 8, 8, k))
  affine = np.float32([[[0.5, 0, 0.25], [0, 0.5, 0.25]]])  # the middle half of the canvas
  tokens = np.asarray(tl.in_place_logits(jnp.asarray(logits), affine))
  centres = 0.25 + 0.5 * rows  # source rows of the crop's token centres
  expected = np.broadcast_to(centres[None, :, None, None] * np.float32([1, 2, -1]), (1, 8, 8, k))
  np.testing.assert_allclose(tokens, expected, atol=1e-5)


def test_a_map_of_every_class_pools_as_the_same_map_stored_as_top_k():
  rng = np.random.default_rng(3)
  logits = rng.normal(0, 2, (2, 8, 8, 4)).astype(np.float32)
  classes = np.broadcast_to(np.arange(4, dtype=np.int32), logits.shape)
  box = np.float32([[0, 0, 1, 1], [0.1, 0.0, 0.9, 1.0]])
  affine = np.float32([[[0.5, 0, 0.2], [0, 0.6, 0.1]], [[0.3, 0, 0.6], [0, -0.4, 0.9]]])
  want = tl.pool_topk_logits(logits, classes, box, affine, grid=(4, 6), num_classes=4)
  got = tl.pool_dense_logits(logits, box, affine, grid=(4, 6))
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_the_canvas_can_be_another_size_than_the_crop():
  source = _ramp(32)
  crop = np.asarray(jax.image.resize(source[:, 8:24, 4:20], (1, 64, 64, 3), 'linear'))
  affine = np.float32([[[0.5, 0, 0.25], [0, 0.5, 0.125]]])
  canvas = np.asarray(tl.in_place_canvas(crop, affine, 32))
  assert canvas.shape == (1, 32, 32, 3)
  np.testing.assert_allclose(canvas[0, 9:23, 5:19], source[0, 9:23, 5:19], atol=1e-5)
