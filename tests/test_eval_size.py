"""Evaluating at another size than the training size (`config.eval_img_size`, lvvit_jax/recipe.py).

A ViT's position embedding is resampled to the eval grid (the converter's bicubic resampling),
the other variables are used as they are, and the trainer's periodic eval agrees with
`config.mode=eval` of the same checkpoint. Any other size-dependent parameter is refused.
"""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lvvit_jax import recipe
from lvvit_jax import train
from lvvit_jax.metrics import read_metrics
from lvvit_jax.models import convert
from lvvit_jax.models import create_model
from tests.run_helpers import load_config

_DEMO_SIZE = dict(num_classes=10, dtype='float32', depth=1, dim=64, num_heads=2, mlp_hidden=128,
                  stem_channels=16, patch_size=8)


def _leaves(tree):
  return {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_only_the_position_embedding_is_resampled_to_the_eval_grid():
  model = create_model('lvvit_t', img_size=64, **_DEMO_SIZE)
  eval_model = create_model('lvvit_t', img_size=96, **_DEMO_SIZE)
  variables = model.init({'params': jax.random.key(0)}, jnp.zeros((1, 64, 64, 3)))
  want = jax.eval_shape(lambda: eval_model.init({'params': jax.random.key(0)},
                                                jnp.zeros((1, 96, 96, 3))))
  got = jax.jit(lambda v: recipe.at_eval_size(v, eval_model))(variables)
  assert {k: v.shape for k, v in _leaves(got).items()} == {
      k: v.shape for k, v in _leaves(want).items()}
  before, after = _leaves(variables), _leaves(got)
  key = "['params']['pos_embed']"
  assert before[key].shape == (1, 1 + 8 * 8, 64) and after[key].shape == (1, 1 + 12 * 12, 64)
  np.testing.assert_allclose(after[key], convert.resample_pos_embed(np.asarray(before[key]),
                                                                    (12, 12)), atol=1e-6)
  np.testing.assert_array_equal(after[key][:, 0], before[key][:, 0])  # the cls position
  for k in before:
    if k != key:
      np.testing.assert_array_equal(after[k], before[k], err_msg=k)
  # At the training size nothing changes, and the eval model runs on the resampled variables.
  same = recipe.at_eval_size(variables, model)
  assert all(same_leaf is leaf for same_leaf, leaf in zip(jax.tree.leaves(same),
                                                          jax.tree.leaves(variables)))
  logits = eval_model.apply(got, jnp.ones((2, 96, 96, 3)))
  assert logits.shape == (2, 10) and np.isfinite(np.asarray(logits)).all()


class _SizeDependentHead(nn.Module):
  """A stub model whose classifier reads the flattened image: its kernel depends on the size."""
  config: object

  @nn.compact
  def __call__(self, x):
    return nn.Dense(10)(x.reshape(x.shape[0], -1))


@dataclasses.dataclass(frozen=True)
class _StubConfig:
  img_size: int


def test_other_size_dependent_parameters_are_refused():
  config = load_config('demo.py:stage=student')
  train_model, eval_model = (_SizeDependentHead(_StubConfig(s)) for s in (16, 24))
  with pytest.raises(ValueError, match=r"config.eval_img_size=24 but lvvit_t has parameters that "
                                       r"depend on the image size \(\['Dense_0'\]\['kernel'\]"):
    recipe.check_eval_model(config, train_model, eval_model)
  recipe.check_eval_model(config, train_model, train_model)   # the same size: nothing to check
  lvvit = [create_model('lvvit_t', img_size=s, **_DEMO_SIZE) for s in (64, 96)]
  recipe.check_eval_model(config, *lvvit)                      # only pos_embed differs: allowed


@pytest.mark.slow
def test_trainer_evals_at_the_eval_size_as_eval_mode_does(digits_data, tmp_path):
  overrides = {'data.data_dir': digits_data['data_dir'], 'eval_img_size': 96,
               'data.crop_pct': 1.0, 'total_steps': 6, 'eval_every': 6, 'checkpoint_every': 6,
               'model_overrides.depth': 1}
  config = load_config('demo.py:stage=baseline,runlocal', **overrides)
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(config, workdir)
  [in_training] = [r for r in read_metrics(workdir) if 'eval/val/top1' in r]
  assert in_training['step'] == 6
  eval_config = load_config('demo.py:stage=baseline,runlocal', **overrides, mode='eval',
                            init_from=workdir)
  results = train.evaluate_checkpoint(eval_config, str(tmp_path / 'eval'))
  assert results['eval/val/count'] == 360
  # In training the 8x8 position grid is resampled inside the eval step; eval mode resamples it
  # when loading: the same predictions.
  assert results['eval/val/top1'] == pytest.approx(in_training['eval/val/top1'], abs=1e-6)
  assert results['eval/val/top5'] == pytest.approx(in_training['eval/val/top5'], abs=1e-6)
