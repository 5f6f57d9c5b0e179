"""NFNets through the trainer: the reference recipe, start-up checks, training with exact
resume, and eval mode on a checkpoint at another size than training (`configs/nfnet.py`)."""
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lvvit_jax import checkpoints
from lvvit_jax import train
from lvvit_jax.metrics import read_metrics
from lvvit_jax.models import MODEL_CONFIGS
from tests.run_helpers import ROOT
from tests.run_helpers import load_config
from tests.run_helpers import write_mock_tfds
from tests.test_train import _assert_trees_equal
from tests.test_train import _losses
from tests.test_train import _runlocal
from tests.test_train import _state
from tests.test_train import no_compile  # noqa: F401  (a fixture)

VARIANTS = [f'f{i}' for i in range(8)]


# ------------------------------------------------------------------------------------------------
# The recipe.


@pytest.mark.parametrize('variant', VARIANTS)
def test_recipe_is_deepminds_at_the_registrys_sizes(variant):
  c = load_config(f'nfnet.py:variant={variant}')
  model = MODEL_CONFIGS[c.model]
  assert (c.img_size, c.eval_img_size) == (model.train_img_size, model.img_size)
  assert c.optimizer == 'sgd' and c.nesterov and c.momentum == 0.9
  assert c.lr == pytest.approx(0.1 * c.batch_size / 256) and c.batch_size == 4096
  assert (c.init_lr, c.end_lr, c.warmup_epochs, c.num_epochs, c.cooldown_epochs) == (0, 0, 5,
                                                                                     360, 0)
  assert (c.agc_clip, c.agc_eps, c.weight_decay, c.decay_mask) == (0.01, 1e-3, 2e-5, 'nfnet')
  assert (c.ema_decay, c.ema_warmup, c.smoothing) == (0.99999, True, 0.1)
  assert not c.mixtoken and c.dense_weight == 0 and c.model_overrides.drop_path_rate == 0.25
  assert c.aug.randaug_num_ops == 4 and c.aug.randaug_prob == 1 and c.aug.erase_prob == 0
  assert c.aug.randaug_magnitude == {'f0': 5, 'f1': 10, 'f2': 10}.get(variant, 10)
  assert model.crop_pct == pytest.approx(model.img_size / (model.img_size + 32))
  train.build_model(c)   # the overrides fit the model


def test_unknown_variant_is_named():
  with pytest.raises(ValueError, match=r"configs/nfnet.py: unknown variant 'f9'"):
    load_config('nfnet.py:variant=f9')


# ------------------------------------------------------------------------------------------------
# Start-up checks: a clear message before anything compiles.


@pytest.mark.parametrize('spec,overrides,message', [
    ('nfnet.py:variant=demo', {'mixtoken': True},
     r'config.mixtoken=True but nfnet_demo has no tokens to mix .*set --config.mixtoken=False'),
    ('nfnet.py:variant=demo', {'model_overrides.depth': 2},
     r"config.model_overrides has \['depth'\], which nfnet_demo does not have"),
    ('nfnet.py:variant=demo', {'optimizer': 'lamb'}, r"config.optimizer='lamb'; use one of"),
])
def test_bad_pairings_fail_at_start_up(spec, overrides, message, digits_data, tmp_path,
                                       no_compile):  # noqa: F811
  config = _runlocal(spec, digits_data, **overrides)
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(config, str(tmp_path / 'run'))


# ------------------------------------------------------------------------------------------------
# Training: it learns, and a resumed run equals the uninterrupted one bit for bit.


def _png(array):
  import io  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  out = io.BytesIO()
  Image.fromarray(array).save(out, format='PNG')
  return out.getvalue()


def _brightness_coded(i, example):
  """Mock MNIST whose class shows in the image's mean: learnable in a few SGD steps.

  (The digits are not, for an NFNet at init: its zero skip gains and AGC make the body start
  slowly, and mean-pooled features of a small digit on a large canvas hardly differ.)"""
  rng = np.random.default_rng(i)
  level = 20 + 22 * int(example['label'])
  image = np.clip(rng.normal(level, 8, (28, 28, 1)), 0, 255).astype(np.uint8)
  return dict(example, image=_png(image[..., 0]))


@pytest.mark.slow
def test_nfnet_trains_and_resumes_bitwise(tmp_path):
  # nfnet_demo (runlocal: 64 px, evaluated at 80) with the recipe's SGD, AGC, decay and EMA.
  data_dir = str(tmp_path / 'tfds')
  write_mock_tfds(data_dir, 'mnist', 'train', (32, 32), edit=_brightness_coded)
  overrides = {'total_steps': 32, 'log_every': 4, 'checkpoint_every': 16, 'eval_every': 32,
               'data.data_dir': data_dir, 'data.source': 'tfds:mnist',
               'evals.val.source': 'tfds:mnist', 'evals.val.split': 'train',
               'aug.randaug_num_ops': 0}  # RandAugment's tone ops would hide the class
  config = load_config('nfnet.py:variant=demo,runlocal', **overrides)
  whole = str(tmp_path / 'whole')
  result = train.train_and_evaluate(config, whole)
  losses = _losses(whole)
  assert len(losses) == 8 and np.mean(losses[-2:]) < losses[0] - 0.2, losses
  assert result['eval/val/count'] == 64
  state = _state(whole, 32)
  assert not state.get('batch_stats') and not state.get('ema_batch_stats')  # params only
  # Resume: the same workdir without its last checkpoint reruns steps 17..32 from step 16.
  resumed = str(tmp_path / 'resumed')
  shutil.copytree(whole, resumed)
  shutil.rmtree(os.path.join(resumed, 'checkpoints', '32'))
  train.train_and_evaluate(config, resumed)
  _assert_trees_equal(state, _state(resumed, 32))
  rows = [r for r in read_metrics(resumed) if 'loss' in r]
  assert [r['step'] for r in rows[len(losses):]] == [20, 24, 28, 32]
  np.testing.assert_array_equal([r['loss'] for r in rows[len(losses):]], losses[4:])
  # Eval mode on the trainer's workdir: its EMA weights at 80 px, as the run's last eval.
  evaluated = train.evaluate_checkpoint(
      load_config('nfnet.py:variant=demo,runlocal', mode='eval', init_from=whole, **overrides),
      str(tmp_path / 'eval'))
  assert evaluated['eval/val/top1'] == result['eval/val/top1'] > 0.2


# ------------------------------------------------------------------------------------------------
# Eval mode: an imported NFNet evaluated by main.py at its test size.


@pytest.mark.slow
def test_eval_mode_of_a_saved_nfnet_at_another_size(tmp_path):
  model = train.build_model(load_config('nfnet.py:variant=demo'), 'float32')
  variables = model.init({'params': jax.random.key(3)}, jnp.zeros((1, 64, 64, 3)))
  # A trained head would be confident; make the random one so, so that argmax is stable.
  params = dict(variables['params'])
  params['linear'] = {'kernel': variables['params']['linear']['kernel'] * 100.0,
                      'bias': variables['params']['linear']['bias']}
  ckpt = checkpoints.save_variables(str(tmp_path / 'ckpt'), {'params': params}, 'nfnet_demo',
                                    {'num_classes': 10, 'img_size': 64})
  tfds_dir = str(tmp_path / 'tfds')
  examples = write_mock_tfds(tfds_dir, 'mnist', 'test')
  overrides = {'mode': 'eval', 'init_from': ckpt, 'data.data_dir': tfds_dir,
               'data.eval_batch_size': 8, 'eval_img_size': 80,
               'evals.val.source': 'tfds:mnist', 'evals.val.split': 'test'}
  out = subprocess.run([sys.executable, 'main.py', '--config=configs/nfnet.py:variant=demo',
                        f'--workdir={tmp_path / "eval"}',
                        *[f'--config.{k}={v}' for k, v in overrides.items()]],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  printed = dict(re.findall(r'^(eval/val/\w+): ([\d.]+)$', out.stdout, re.M))
  assert float(printed['eval/val/count']) == len(examples) == 10
  # The same predictions directly: the model at 80 px on the pipeline's eval batches.
  config = load_config('nfnet.py:variant=demo', **overrides)
  eval_model = train.build_eval_model(config, 'float32')
  assert eval_model.config.img_size == 80
  [split] = train.make_eval_splits(config, str(tmp_path / 'eval'), eval_model)
  correct = count = 0
  for b in split.iterator:
    assert b['image'].shape[1:] == (80, 80, 3) and b['image'].dtype == np.uint8
    images = (b['image'] / 255.0 - np.float32([0.485, 0.456, 0.406])) / np.float32(
        [0.229, 0.224, 0.225])
    pred = np.argmax(np.asarray(eval_model.apply({'params': params}, images)), -1)
    correct += int(((pred == b['label']) & b['mask']).sum())
    count += int(b['mask'].sum())
  assert count == 10
  assert float(printed['eval/val/top1']) == pytest.approx(correct / 10, abs=1e-4)
