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
from tests.test_online_targets import _save_teacher


@pytest.fixture(scope='module')
def root(digits_data, tmp_path_factory):
  """A demo root whose score_maps are synthetic maps of the digits' train split and whose
  teacher is a random small LV-ViT (32 px: the online arm resizes the crops for it)."""
  out = tmp_path_factory.mktemp('ablation_root')
  write_label_maps(digits_data['train'], str(out / 'score_maps'), grid=(8, 8), k=5)
  _save_teacher(str(out / 'teacher'))
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
  assert student.mixtoken is False
  unmixed = [a for a in ablation.ARMS if a not in ('token_labeling', 'tl_cutmix')]
  assert all(configs[a].mixtoken is False for a in unmixed)
  assert configs['tl_no_mix'].ground_truth_blend == student.ground_truth_blend
  assert configs['plain_cls'].data.score_maps_dir is None
  assert configs['plain_cls'].dense_weight == 0.0
  assert configs['plain_dense'].dense_weight == 0.5
  assert configs['relabel'].data.score_maps_dir and configs['relabel'].dense_weight == 0.0
  assert configs['tl_cutmix'].mixtoken and configs['tl_cutmix'].mix == 'cutmix'
  assert configs['vit_plain'].model == 'vit_s'
  assert not configs['vit_plain'].model_overrides.aux_head
  assert configs['vit_tl'].model_overrides.aux_head
  online = configs['online']
  assert online.online_teacher == f'{root}/teacher' and online.online_teacher_ema is False
  assert online.data.score_maps_dir is None and online.dense_weight == 0.5
  assert online.ground_truth_blend == student.ground_truth_blend
  assert online.online_teacher_view == 'crop'
  in_place = configs['online_in_place']
  assert in_place.online_teacher_view == 'in_place'
  assert in_place.online_teacher == online.online_teacher and in_place.dense_weight == 0.5
  assert all(configs[a].online_teacher is None for a in ablation.ARMS
             if not a.startswith('online'))
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
  assert run['data'].get('online_teacher') == config.online_teacher
  assert run['data'].get('online_teacher_view') == ('in_place' if arm == 'online_in_place'
                                                    else None)


def test_the_summary_compares_unmixed_arms_with_unmixed_arms():
  from benchmarks import ablation as bench  # pylint: disable=g-import-not-at-top
  results = {'plain_dense': [70.0, 72.0], 'relabel': [75.0, 75.0], 'tl_no_mix': [80.0, 82.0],
             'token_labeling': [40.0, 44.0], 'tl_cutmix': [41.0, 41.0]}
  text = bench.summary(results, [0, 1])
  assert '6. token labeling, no mixing (demo student)' in text and '81.0' in text
  assert 'token labeling > ReLabel (no mixing): holds: 81.0 vs 75.0' in text
  assert ('token labeling > plain labels + dense loss (no mixing): holds: 81.0 vs 71.0'
          in text)
  assert ('MixToken > CutMix (token labeling): holds (within one standard deviation): '
          '42.0 vs 41.0' in text)
  assert 'MixToken > no mixing (token labeling): does not hold: 42.0 vs 81.0' in text
  assert 'ReLabel > plain labels (cls only)' not in text  # plain_cls was not run
