"""The trainer end to end on the bundled digits: recipes, exact resume, mesh, init_from, eval.

Runs are in-process (`train.train_and_evaluate`) on the 4 virtual CPU devices of conftest.py,
except where a real process must be signalled (SIGTERM) or a CLI is the point.
"""
import dataclasses
import os
import re
import signal
import subprocess
import sys
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lvvit_jax import checkpoints
from lvvit_jax import sharding
from lvvit_jax import train
from lvvit_jax.metrics import read_metrics
from tests.run_helpers import ROOT
from tests.run_helpers import load_config
from tests.run_helpers import write_label_maps
from tests.run_helpers import write_mock_tfds

RECIPES = ['lvvit.py:variant=t', 'lvvit.py:variant=s', 'lvvit.py:variant=m',
           'lvvit.py:variant=l', 'finetune.py:variant=s', 'transfer.py:variant=s', 'demo.py']


def _runlocal(spec, digits_data, **overrides):
  sep = ',' if ':' in spec else ':'
  return load_config(f'{spec}{sep}runlocal', **{'data.data_dir': digits_data['data_dir'],
                                                 **overrides})


def _losses(workdir):
  return [r['loss'] for r in read_metrics(workdir) if 'loss' in r]


def _state(workdir, step, keys=('params', 'batch_stats', 'ema_params', 'ema_batch_stats',
                                'opt_state', 'step')):
  ckpts = checkpoints.TrainCheckpoints(workdir, read_only=True)
  return ckpts.restore_numpy(step, keys)


def _assert_trees_equal(a, b):
  fa = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(a)}
  fb = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(b)}
  assert sorted(fa) == sorted(fb) and len(fa) > 10
  for k in fa:
    np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


# ------------------------------------------------------------------------------------------------
# Every recipe, shrunk with runlocal.


@pytest.mark.slow
@pytest.mark.parametrize('spec', RECIPES)
def test_every_recipe_trains_with_runlocal(spec, digits_data, tmp_path):
  config = _runlocal(spec, digits_data)
  workdir = str(tmp_path / 'run')
  result = train.train_and_evaluate(config, workdir)
  losses = _losses(workdir)
  assert len(losses) == config.total_steps // config.log_every
  # It learns: the last logged window is clearly below the first.
  assert np.mean(losses[-2:]) < losses[0] - 0.05, losses
  rows = read_metrics(workdir)
  assert {'loss', 'loss_cls', 'loss_dense', 'lr', 'grad_norm', 'images_per_sec',
          'images_per_sec_per_device', 'step_time'} <= set(rows[0])
  assert rows[-1]['step'] == config.total_steps and 'eval/val/top1' in rows[-1]
  assert result['eval/val/top1'] == rows[-1]['eval/val/top1']
  ckpts = checkpoints.TrainCheckpoints(workdir, read_only=True)
  assert ckpts.all_steps() == [config.checkpoint_every, config.total_steps]


def test_short_runs_read_without_the_tf_data_autotuner(digits_data, tmp_path):
  """runlocal and the demo turn tf.data's autotuner off (a finished iterator waits for its
  model thread, up to a minute); the recipes keep it. The setting reaches the pipeline."""
  def train_cfg(config):
    return train.pipeline_config(config, str(tmp_path), source=config.data.source,
                                 split='train', batch_size=8, stream=0, num_streams_=1,
                                 train=True)
  from lvvit_jax.data import pipeline  # pylint: disable=g-import-not-at-top  (TensorFlow)
  for config in (_runlocal('lvvit.py:variant=t', digits_data),
                 load_config('demo.py:stage=student')):
    assert not pipeline.dataset_options(train_cfg(config)).autotune.enabled
  assert train_cfg(load_config('lvvit.py:variant=s')).autotune


# ------------------------------------------------------------------------------------------------
# Exact resume: a run stopped by SIGTERM and restarted equals one uninterrupted run.


def _cli_args(config_spec, overrides):
  return [f'--config={config_spec}'] + [f'--config.{k}={v}' for k, v in overrides.items()]


@pytest.mark.slow
def test_sigterm_then_restart_equals_one_run_bitwise(digits_data, tmp_path):
  overrides = {'data.data_dir': digits_data['data_dir'], 'total_steps': 12, 'log_every': 1,
               'checkpoint_every': 100, 'eval_every': 100, 'model_overrides.depth': 1}
  whole = str(tmp_path / 'whole')
  train.train_and_evaluate(_runlocal('lvvit.py:variant=t', digits_data, **overrides), whole)

  resumed = str(tmp_path / 'resumed')
  cmd = [sys.executable, 'main.py', *_cli_args('configs/lvvit.py:variant=t,runlocal', overrides),
         f'--workdir={resumed}']
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
  log = []
  for line in proc.stdout:  # SIGTERM once step 4 is logged: the run is mid-training.
    log.append(line)
    if re.search(r'step 4: loss', line):
      proc.send_signal(signal.SIGTERM)
      break
  log.extend(proc.stdout)
  assert proc.wait(timeout=600) == 0, ''.join(log[-30:])
  text = ''.join(log)
  stopped = int(re.search(r'Preempted: saved the checkpoint of step (\d+)', text).group(1))
  assert 4 <= stopped < 12, text[-3000:]
  assert checkpoints.TrainCheckpoints(resumed, read_only=True).all_steps() == [stopped]

  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert f'Resumed from {resumed}/checkpoints/{stopped}' in out.stderr
  _assert_trees_equal(_state(whole, 12), _state(resumed, 12))
  # The resumed run logged exactly the steps after the stop.
  steps = [r['step'] for r in read_metrics(resumed) if 'loss' in r]
  assert steps == list(range(1, 13)), steps
  np.testing.assert_array_equal(_losses(whole), _losses(resumed))


# ------------------------------------------------------------------------------------------------
# Mesh: data parallel and FSDP compute the same step; FSDP shards the large tensors.


def _model_and_batches(num_batches=3, batch=8, size=32, classes=10):
  config = load_config('lvvit.py:variant=t', img_size=size, num_classes=classes,
                       **{'model_overrides.depth': 2, 'model_overrides.patch_size': 8})
  model = train.build_model(config, 'float32')
  rng = np.random.default_rng(0)
  batches = [{'image': rng.normal(size=(batch, size, size, 3)).astype(np.float32),
              'label': rng.integers(0, classes, batch).astype(np.int32)}
             for _ in range(num_batches)]
  return config, model, batches


def _run_steps(config, model, batches, data, fsdp, min_size=4096):
  mesh = sharding.make_mesh(data, fsdp)
  schedule = train.optim.lr_schedule(1e-3, 100, 2)
  init_rng = jax.random.key(0)
  params = jax.eval_shape(lambda r: model.init({'params': r}, jnp.zeros((1, 32, 32, 3))),
                          init_rng)['params']
  tx = train.make_optimizer(config, params, schedule)
  abstract = jax.eval_shape(lambda r: train.init_train_state(model, tx, r), init_rng)
  shardings = train.state_shardings(abstract, mesh, min_size)
  state = jax.jit(lambda r: train.init_train_state(model, tx, r), out_shardings=shardings)(init_rng)
  step = train.jit_update_step(train.make_update_step(
      model, tx, schedule, train.objective_config(config)), shardings, mesh)
  rng = jax.random.key(1)
  losses = []
  for b in batches:
    state, metrics = step(state, sharding.host_to_global(b, mesh), rng)
    losses.append(float(sharding.fetch(metrics['loss'])))
  return state, losses


@pytest.mark.slow
def test_data_parallel_and_fsdp_agree_and_fsdp_shards(tmp_path):
  config, model, batches = _model_and_batches()
  dp_state, dp_losses = _run_steps(config, model, batches, data=4, fsdp=1)
  for data, fsdp in ((1, 4), (2, 2)):
    fsdp_state, fsdp_losses = _run_steps(config, model, batches, data=data, fsdp=fsdp)
    np.testing.assert_allclose(fsdp_losses, dp_losses, rtol=2e-5)
    np.testing.assert_allclose(
        np.asarray(jax.device_get(fsdp_state.params['blocks_1']['mlp']['fc1']['kernel'])),
        np.asarray(jax.device_get(dp_state.params['blocks_1']['mlp']['fc1']['kernel'])),
        rtol=1e-4, atol=1e-6)
    kernel = fsdp_state.params['blocks_0']['mlp']['fc1']['kernel']   # (240, 720)
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, 'fsdp')
    assert kernel.addressable_shards[0].data.shape == (240, 720 // fsdp)
    mu = fsdp_state.opt_state[0].mu['blocks_0']['mlp']['fc1']['kernel']
    assert mu.sharding.spec == jax.sharding.PartitionSpec(None, 'fsdp')
    # Per-device bytes: sharded leaves hold 1/fsdp, the small ones stay whole.
    for tree in (fsdp_state.params, fsdp_state.opt_state):
      expected = sum(x.nbytes // fsdp if sharding.fsdp_axis(x.shape, fsdp, 4096) is not None
                     else x.nbytes for x in jax.tree.leaves(tree))
      assert sharding.per_device_bytes(tree) == expected
      full = sum(x.nbytes for x in jax.tree.leaves(tree))
      assert expected < (1 / fsdp + 0.1) * full   # Most bytes are in sharded tensors.
  assert sharding.per_device_bytes(dp_state.params) == sum(
      x.nbytes for x in jax.tree.leaves(dp_state.params))


def test_fsdp_rule_picks_the_largest_divisible_dimension():
  assert sharding.param_spec((240, 720), 4, 100) == jax.sharding.PartitionSpec(None, 'fsdp')
  assert sharding.param_spec((722, 240), 4, 100) == jax.sharding.PartitionSpec(None, 'fsdp')
  assert sharding.param_spec((3, 3, 3, 64), 4, 100) == jax.sharding.PartitionSpec(
      None, None, None, 'fsdp')
  assert sharding.param_spec((240,), 4, 1000) == jax.sharding.PartitionSpec()   # too small
  assert sharding.param_spec((7, 9), 4, 1) == jax.sharding.PartitionSpec()      # no divisor
  assert sharding.param_spec((240, 720), 1, 1) == jax.sharding.PartitionSpec()  # no fsdp


# ------------------------------------------------------------------------------------------------
# Token labels through the trainer, and init_from a converted PyTorch checkpoint.


@pytest.mark.slow
def test_training_with_score_maps_uses_token_targets(digits_data, tmp_path):
  maps = write_label_maps(digits_data['train'], str(tmp_path / 'maps'), grid=(4, 4))
  config = _runlocal('lvvit.py:variant=t', digits_data, total_steps=8, log_every=4,
                     **{'data.score_maps_dir': maps})
  train.train_and_evaluate(config, str(tmp_path / 'run'))
  rows = [r for r in read_metrics(str(tmp_path / 'run')) if 'loss' in r]
  assert len(rows) == 2 and all(np.isfinite(r['loss_dense']) for r in rows)
  run = checkpoints.TrainCheckpoints(str(tmp_path / 'run'), read_only=True).run_description(8)
  assert run['data']['score_maps_dir'] == maps


def test_batch_targets_use_maps_and_fall_back_per_example():
  from lvvit_jax.token_labeling import objective
  from lvvit_jax.token_labeling import targets
  rng = np.random.default_rng(0)
  b, k, classes = 4, 3, 10
  batch = {'label': np.array([1, 2, 3, 4]),
           'topk_logits': rng.normal(size=(b, 5, 5, k)).astype(np.float16),
           'topk_idx': rng.integers(0, classes, (b, 5, 5, k)).astype(np.int32),
           'map_box': np.tile(np.float32([0, 0, 1, 1]), (b, 1)),
           'label_affine': np.tile(np.float32([[1, 0, 0], [0, 1, 0]]), (b, 1, 1)),
           'has_map': np.array([True, False, True, True])}
  cls_t, tok_t = objective.batch_targets(batch, grid=4, num_classes=classes)
  want_cls, want_tok = targets.token_targets(*(batch[k] for k in objective.MAP_KEYS), grid=4,
                                             num_classes=classes)
  plain_cls, plain_tok = targets.label_targets(batch['label'], grid=4, num_classes=classes)
  for i, has in enumerate(batch['has_map']):
    np.testing.assert_allclose(cls_t[i], (want_cls if has else plain_cls)[i], rtol=1e-6)
    np.testing.assert_allclose(tok_t[i], (want_tok if has else plain_tok)[i], rtol=1e-6)
  no_maps = {'label': batch['label']}
  np.testing.assert_allclose(objective.batch_targets(no_maps, grid=4, num_classes=classes)[0],
                             plain_cls)


@pytest.fixture(scope='module')
def converted(tmp_path_factory):
  """A converted PyTorch lvvit_t (depth 2) at 32 px with 5 classes."""
  import torch
  from lvvit_jax.models import convert
  from tests.torch_lvvit import TorchLVViT
  from tests.torch_lvvit import perturb_
  torch.manual_seed(0)
  model = perturb_(TorchLVViT.from_variant('lvvit_t', img_size=32, num_classes=5, depth=2), 0)
  base = tmp_path_factory.mktemp('converted')
  torch.save({'state_dict_ema': model.state_dict()}, base / 'ckpt.pth')
  variables = convert.load_torch_checkpoint(str(base / 'ckpt.pth'), 'lvvit_t', depth=2)
  return checkpoints.save_variables(str(base / 'vars'), variables, 'lvvit_t',
                                    {'num_classes': 5, 'img_size': 32, 'depth': 2})


@pytest.mark.slow
def test_init_from_a_converted_checkpoint_at_another_size_and_class_count(
    converted, digits_data, tmp_path):
  from lvvit_jax.models import convert
  config = _runlocal('lvvit.py:variant=t', digits_data, init_from=converted, total_steps=4,
                     log_every=2, checkpoint_every=2)
  model = train.build_model(config)
  init_rng = jax.random.key(0)
  params = jax.eval_shape(lambda r: model.init({'params': r}, jnp.zeros((1, 64, 64, 3))),
                          init_rng)['params']
  tx = train.make_optimizer(config, params, train.optim.lr_schedule(1e-3, 4, 1))
  abstract = jax.eval_shape(lambda r: train.init_train_state(model, tx, r), init_rng)
  variables, dropped = train.load_init(config, model, abstract, ema=True)
  assert sorted(dropped) == ['params/aux_head/bias', 'params/aux_head/kernel',
                             'params/head/bias', 'params/head/kernel']
  source, _ = checkpoints.load_variables(converted)
  np.testing.assert_array_equal(variables['params']['blocks_1']['attn']['qkv']['kernel'],
                                source['params']['blocks_1']['attn']['qkv']['kernel'])
  np.testing.assert_array_equal(variables['batch_stats']['patch_embed']['bn1']['var'],
                                source['batch_stats']['patch_embed']['bn1']['var'])
  assert source['params']['pos_embed'].shape == (1, 1 + 2 * 2, 240)
  np.testing.assert_allclose(variables['params']['pos_embed'],
                             convert.resample_pos_embed(source['params']['pos_embed'], (4, 4)))
  # And the trainer runs from it: the first checkpoint's EMA starts from those weights.
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(config, workdir)
  assert _losses(workdir) and np.isfinite(_losses(workdir)).all()


# ------------------------------------------------------------------------------------------------
# Evaluation of a checkpoint on mock TFDS data.


@pytest.mark.slow
def test_eval_mode_counts_every_example_once(digits_data, tmp_path):
  config = _runlocal('lvvit.py:variant=t', digits_data, total_steps=2, log_every=1,
                     checkpoint_every=2, **{'model_overrides.depth': 1})
  trained = str(tmp_path / 'trained')
  train.train_and_evaluate(config, trained)
  tfds_dir = str(tmp_path / 'tfds')
  examples = write_mock_tfds(tfds_dir, 'mnist', 'test')
  from lvvit_jax.data.sources import MAX_LABELS
  real = write_mock_tfds(  # Examples 1 and 4 have no correct class (ReaL leaves them out).
      tfds_dir, 'imagenet2012_real', 'validation', (3, 3),
      edit=lambda i, e: dict(e, real_label=e['real_label'][:0 if i in (1, 4) else MAX_LABELS]))
  config.mode = 'eval'
  config.init_from = trained
  config.data.data_dir = tfds_dir
  config.data.eval_batch_size = 8   # 10 examples -> 3 + 3 + 4 per process: one padded batch
  config.evals = {'val': {'source': 'tfds:mnist', 'split': 'test'},
                  'real': {'source': 'tfds:imagenet2012_real', 'split': 'validation',
                           'label_feature': 'real_label', 'optional': True},
                  'v2': {'source': 'tfds:imagenet_v2', 'split': 'test', 'optional': True}}
  results = train.evaluate_checkpoint(config, str(tmp_path / 'eval'))
  assert results['eval/val/count'] == len(examples) == 10
  assert 'eval/v2/top1' not in results   # optional and not prepared: skipped
  # ReaL: an example counts when it has correct classes, and is right if it predicts any.
  with_labels = [e for e in real if len(e['real_label'])]
  assert results['eval/real/count'] == len(with_labels) == 4
  # The same numbers by hand: the EMA weights' predictions on the same eval batches.
  variables, _ = checkpoints.load_model_variables(trained, ema=True)
  model = train.build_model(config)
  splits = {s.name: s for s in train.make_eval_splits(config, str(tmp_path / 'eval'), model)}
  assert sorted(splits) == ['real', 'val']
  it = splits['val'].iterator
  correct = count = 0
  for b in it:
    pred = np.argmax(np.asarray(model.apply(variables, b['image'])), -1)
    correct += int(((pred == b['label']) & b['mask']).sum())
    count += int(b['mask'].sum())
  assert count == 10 and results['eval/val/top1'] == pytest.approx(correct / 10)
  batches = list(splits['real'].iterator)
  labels = sorted(tuple(sorted(int(c) for c in row if c >= 0)) for b in batches
                  for row, m in zip(b['labels'], b['mask']) if m)
  assert labels == sorted(tuple(sorted(int(c) for c in e['real_label'])) for e in real), (
      labels, [e['real_label'] for e in real])
  hits = sum(int(np.argmax(np.asarray(model.apply(variables, b['image'][i:i + 1])))
                 in set(b['labels'][i]) - {-1})
             for b in batches for i in range(len(b['mask'])) if b['mask'][i])
  assert results['eval/real/top1'] == pytest.approx(hits / 4)


# ------------------------------------------------------------------------------------------------
# Bad settings: a clear message at start-up, before any compile.


@pytest.fixture()
def no_compile(monkeypatch):
  """Fails the test if anything is jitted (the errors must come first)."""
  import clu.periodic_actions  # noqa: F401  (jits a helper when first imported)

  def refuse(*args, **kwargs):
    raise AssertionError('compiled before the configuration error')
  monkeypatch.setattr(jax, 'jit', refuse)


@pytest.mark.parametrize('overrides,error,message', [
    ({'batch_size': 6}, ValueError, r'config.batch_size=6 is not divisible by the 4 devices'),
    ({'data.num_streams': 3}, ValueError,
     r'config.batch_size=8 is not divisible by config.data.num_streams=3'),
    ({'data.source': '/does/not/exist'}, ValueError, r'/does/not/exist/dataset_info.json does '
     r'not exist'),
    ({'data.source': 'tfds:imagenet2012'}, ValueError, r"TFDS dataset 'imagenet2012'"),
    ({'data.score_maps_dir': '/no/maps'}, ValueError, r'/no/maps/manifest.json does not exist'),
    ({'num_classes': 7}, ValueError, r'config.num_classes=7 but digits has 10 classes'),
    ({'init_from': '/no/checkpoint'}, FileNotFoundError, r'/no/checkpoint does not exist'),
    ({'model': 'lvvit_x'}, ValueError, r"config.model='lvvit_x' is not a model"),
    ({'mesh.fsdp': 3}, ValueError, r'config.mesh.fsdp=3 must be >= 1 and divide the 4 devices'),
    ({'aug.resize': 'lanczos'}, ValueError,
     r"resize='lanczos'; use one of \('pil', 'area', 'plain'\) \(config: aug.resize\)"),
])
def test_bad_settings_fail_at_start_up(overrides, error, message, digits_data, tmp_path,
                                       no_compile):
  config = _runlocal('lvvit.py:variant=t', digits_data, **overrides)
  with pytest.raises(error, match=message):
    train.train_and_evaluate(config, str(tmp_path / 'run'))


def test_unknown_variant_and_missing_init_from_are_named():
  with pytest.raises(ValueError, match=r"unknown variant 'x'; use one of \['l', 'm', 's', 't'\]"):
    load_config('lvvit.py:variant=x')
  with pytest.raises(ValueError, match=r'unknown config argument'):
    load_config('lvvit.py:size=3')


def _main(*args, timeout=600):
  return subprocess.run([sys.executable, 'main.py', *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=timeout)


def test_main_reports_a_bad_config_in_one_line_and_verbose_shows_the_traceback(tmp_path):
  bad = ('--config=configs/nfnet.py:variant=x', f'--workdir={tmp_path}')
  out = _main(*bad)
  assert out.returncode == 2, out.stderr[-2000:]
  assert out.stderr.splitlines() == [
      "main.py: error: configs/nfnet.py: unknown variant 'x'; use one of ['demo', 'f0', 'f1', "
      "'f2', 'f3', 'f4', 'f5', 'f6', 'f7'] (configs/nfnet.py:variant=f0)."]
  out = _main(*bad, '--verbose')
  assert out.returncode != 0 and 'Traceback (most recent call last)' in out.stderr
  assert "ValueError: configs/nfnet.py: unknown variant 'x'" in out.stderr


@pytest.mark.slow
def test_main_reports_a_missing_init_from_in_one_line(digits_data, tmp_path):
  out = _main('--config=configs/nfnet.py:variant=demo,runlocal', '--config.mode=eval',
              '--config.init_from=/no/checkpoint', f'--workdir={tmp_path}',
              f'--config.data.data_dir={digits_data["data_dir"]}')
  assert out.returncode == 2, out.stderr[-3000:]
  assert 'Traceback' not in out.stderr
  assert out.stderr.splitlines()[-1].startswith(
      'main.py: error: lvvit_jax/checkpoints.py: /no/checkpoint does not exist; point it at')


def test_recipe_needs_init_from(digits_data, tmp_path, no_compile):
  config = load_config('finetune.py:variant=s', **{'data.data_dir': digits_data['data_dir']})
  with pytest.raises(ValueError, match='this recipe starts from a checkpoint: set '
                                       '--config.init_from'):
    train.train_and_evaluate(config, str(tmp_path / 'run'))


def test_score_maps_of_other_data_or_grid_are_refused(digits_data, tmp_path, no_compile):
  other = write_label_maps(digits_data['validation'], str(tmp_path / 'other'), grid=(4, 4))
  config = _runlocal('lvvit.py:variant=t', digits_data, **{'data.score_maps_dir': other})
  with pytest.raises(ValueError, match=r"maps of 'digits64' split 'validation'"):
    train.train_and_evaluate(config, str(tmp_path / 'a'))
  maps = write_label_maps(digits_data['train'], str(tmp_path / 'maps'), grid=(4, 4))
  config = _runlocal('lvvit.py:variant=t', digits_data, **{'data.score_maps_dir': maps,
                                                           'data.score_maps_grid': (18, 18)})
  with pytest.raises(ValueError, match=r'holds 4x4 maps but config.data.score_maps_grid=\(18, 18\)'):
    train.train_and_evaluate(config, str(tmp_path / 'b'))
  wide = write_label_maps(digits_data['train'], str(tmp_path / 'wide'), grid=(4, 4),
                          num_classes=1000)
  config = _runlocal('lvvit.py:variant=t', digits_data, **{'data.score_maps_dir': wide})
  with pytest.raises(ValueError, match=r'holds maps over 1000 classes but config.num_classes=10'):
    train.train_and_evaluate(config, str(tmp_path / 'c'))


def test_init_from_another_model_is_named(converted, digits_data, tmp_path, no_compile):
  config = _runlocal('lvvit.py:variant=s', digits_data, init_from=converted)
  with pytest.raises(checkpoints.RunMismatchError,
                     match=r'holds a lvvit_t \(.*dim=240.*\) but config.model is lvvit_s '
                           r'\(.*dim=384'):
    train.train_and_evaluate(config, str(tmp_path / 'run'))


def test_topk_hits_single_and_multi_label():
  from lvvit_jax import evaluate
  logits = np.array([[0, 5, 4, 3, 2, 1, 0.5],     # top-1 class 1, top-5 {1, 2, 3, 4, 5}
                     [9, 0, 0, 0, 0, 0, 1],       # top-1 class 0
                     [0, -1, .1, .2, .3, .4, 7],  # top-1 class 6, top-5 {6, 5, 4, 3, 2}
                     [1, 2, 3, 4, 5, 6, 7]], np.float32)
  mask = np.array([True, True, True, False])
  single = evaluate.topk_hits(logits, np.array([2, 0, 1, 6]), mask)
  assert {k: int(v) for k, v in single.items()} == {'top1': 1, 'top5': 2, 'count': 3}
  multi = np.array([[3, 1, -1], [-1, -1, -1], [5, 4, -1], [6, -1, -1]])
  hits = evaluate.topk_hits(logits, multi, mask)   # row 1 has no label: not counted
  assert {k: int(v) for k, v in hits.items()} == {'top1': 1, 'top5': 2, 'count': 2}
