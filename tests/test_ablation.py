"""Every arm of the ablation (`configs/ablation.py`, run by `benchmarks/ablation.py`) is a
config of the trainer: a runlocal smoke run of each, and the settings that define the arm."""
import numpy as np
import pytest

from configs import ablation
from lvvit_jax import checkpoints
from lvvit_jax import train
from lvvit_jax.metrics import read_metrics
from tests.run_helpers import load_config
from tests.run_helpers import write_label_maps


@pytest.fixture(scope='module')
def root(digits_data, tmp_path_factory):
  """A demo root whose score_maps are synthetic maps of the digits' train split."""
  out = tmp_path_factory.mktemp('ablation_root')
  write_label_maps(digits_data['train'], str(out / 'score_maps'), grid=(8, 8), k=5)
  return str(out)


def _config(arm, root, digits_data, runlocal=True):
  return load_config(f'ablation.py:arm={arm},seed=1,root={root}{",runlocal" if runlocal else ""}',
                     **{'data.data_dir': digits_data['data_dir']})


def test_arms_differ_from_the_student_in_their_one_setting(root, digits_data):
  student = load_config(f'demo.py:stage=student,root={root}')
  configs = {arm: _config(arm, root, digits_data, runlocal=False) for arm in ablation.ARMS}
  for arm, c in configs.items():
    assert (c.total_steps, c.batch_size, c.aug.scale) == (
        student.total_steps, student.batch_size, student.aug.scale), arm
    assert c.seed == 1
  tl = configs['token_labeling']
  assert tl.data.score_maps_dir == f'{root}/score_maps' and tl.dense_weight == 0.5
  assert tl.mixtoken and tl.mix == 'mixtoken'
  assert configs['plain_cls'].data.score_maps_dir is None
  assert configs['plain_cls'].dense_weight == 0.0
  assert configs['plain_dense'].dense_weight == 0.5
  assert configs['relabel'].data.score_maps_dir and configs['relabel'].dense_weight == 0.0
  assert configs['tl_cutmix'].mix == 'cutmix'
  assert not configs['tl_no_mix'].mixtoken
  assert configs['vit_plain'].model == 'vit_s'
  assert not configs['vit_plain'].model_overrides.aux_head
  assert configs['vit_tl'].model_overrides.aux_head
  with pytest.raises(ValueError, match='arm=.nope.'):
    ablation.get_config('arm=nope')


@pytest.mark.slow
@pytest.mark.parametrize('arm', ablation.ARMS)
def test_every_arm_trains_with_runlocal(arm, root, digits_data, tmp_path):
  config = _config(arm, root, digits_data)
  workdir = str(tmp_path / arm)
  result = train.train_and_evaluate(config, workdir)
  rows = [r for r in read_metrics(workdir) if 'loss' in r]
  assert len(rows) == 2 and all(np.isfinite(r['loss']) for r in rows)
  # The loss is the arm's: the dense term weighted as configured (0: cls only).
  for r in rows:
    np.testing.assert_allclose(r['loss'], r['loss_cls'] + config.dense_weight * r['loss_dense'],
                               rtol=1e-5)
  assert 'eval/val/top1' in result
  run = checkpoints.TrainCheckpoints(workdir, read_only=True).run_description(4)
  assert run['model'] == config.model
  assert run['data']['score_maps_dir'] == (config.data.score_maps_dir or '')
