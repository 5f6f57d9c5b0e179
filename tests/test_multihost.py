"""Multi-host training on 127.0.0.1: two processes equal one, and faults lose nothing.

Two processes with 2 CPU devices each (`jax.distributed` on 127.0.0.1, gloo collectives) form
one 4-device mesh; the one-process reference runs in this process on the 4 virtual devices of
conftest.py. Both read the same two data streams (`config.data.num_streams=2`), so they see
the same global batches. The dataset has 40 images in 4 shards: an epoch is 5 steps of 8.
"""
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from lvvit_jax import checkpoints
from lvvit_jax import train
from lvvit_jax.data import sources
from lvvit_jax.metrics import read_metrics
from run_helpers import ROOT
from run_helpers import load_config

pytestmark = pytest.mark.slow

STEPS = 7


@pytest.fixture(scope='module')
def small_data(digits_data, tmp_path_factory):
  """40 training images (4 per digit, 4 shards) and 10 for validation (2 shards)."""
  base = tmp_path_factory.mktemp('small')
  images = os.path.join(digits_data['data_dir'], 'digits64', 'images')
  for split, per_class, shards in (('train', 4, 4), ('validation', 1, 2)):
    for label in range(10):
      src_dir = os.path.join(images, 'train', str(label))
      dst_dir = base / 'images' / split / str(label)
      dst_dir.mkdir(parents=True)
      offset = 0 if split == 'train' else 4
      for name in sorted(os.listdir(src_dir))[offset:offset + per_class]:
        shutil.copy(os.path.join(src_dir, name), dst_dir / name)
    sources.write_image_folder_shards(str(base / 'images' / split), str(base / 'shards'),
                                      split=split, name='small', num_shards=shards)
  return str(base / 'shards')


def _overrides(small_data, **more):
  out = {'data.source': small_data, 'data.num_streams': 2, 'data.shuffle_buffer': 16,
         'data.cycle_length': 2, 'batch_size': 8, 'total_steps': STEPS, 'log_every': 1,
         'checkpoint_every': 2, 'eval_every': STEPS, 'model_overrides.depth': 1,
         'data.log_keys': True}
  out['evals.val.source'] = small_data
  out.update(more)
  return out


def _config(small_data, **more):
  return load_config('lvvit.py:variant=t,runlocal', **_overrides(small_data, **more))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _launch(workdir, overrides, processes=2, devices=2):
  """Starts `processes` main.py processes of one run; returns the Popen objects."""
  env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
  port = _free_port()
  args = [f'--config.{k}={v}' for k, v in overrides.items()]
  procs = []
  for p in range(processes):
    cmd = [sys.executable, 'main.py', '--config=configs/lvvit.py:variant=t,runlocal', *args,
           f'--workdir={workdir}']
    if processes > 1:
      cmd += [f'--coordinator_address=127.0.0.1:{port}', f'--num_processes={processes}',
              f'--process_id={p}']
    procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True))
  return procs


def _finish(procs, timeout=600):
  outs = []
  for p in procs:
    out, _ = p.communicate(timeout=timeout)
    outs.append((p.returncode, out))
  return outs


def _run(workdir, overrides, **kwargs):
  outs = _finish(_launch(workdir, overrides, **kwargs))
  for rc, out in outs:
    assert rc == 0, out[-4000:]
  return [out for _, out in outs]


def _wait_for(procs, pattern, timeout=600):
  """Reads process 0's output until `pattern` appears; returns what was read."""
  seen, t0 = [], time.time()
  for line in procs[0].stdout:
    seen.append(line)
    if re.search(pattern, line):
      return ''.join(seen)
    assert time.time() - t0 < timeout
  raise AssertionError(''.join(seen[-40:]))


def _losses(workdir):
  return [(r['step'], r['loss']) for r in read_metrics(workdir) if 'loss' in r]


def _arrays(workdir, step=STEPS, keys=('params', 'ema_params', 'batch_stats', 'opt_state')):
  state = checkpoints.TrainCheckpoints(workdir, read_only=True).restore_numpy(step, keys)
  return {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(state)}


def _assert_same(a, b, rtol=0.0):
  """Bitwise, or to `rtol` of each tensor's largest magnitude (sums in another order)."""
  assert sorted(a) == sorted(b) and len(a) > 10
  for k in a:
    if rtol:
      np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=rtol * np.abs(a[k]).max(),
                                 err_msg=k)
    else:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.fixture(scope='module')
def two_process_run(small_data, tmp_path_factory):
  """An uninterrupted two-process data-parallel run: the reference of the fault tests."""
  workdir = str(tmp_path_factory.mktemp('two') / 'run')
  _run(workdir, _overrides(small_data))
  return workdir


# ------------------------------------------------------------------------------------------------
# Two processes equal one.


@pytest.mark.parametrize('fsdp', [1, 2])
def test_two_processes_equal_one(fsdp, small_data, two_process_run, tmp_path):
  more = {'mesh.fsdp': fsdp, 'mesh.fsdp_min_size': 1024}
  one = str(tmp_path / 'one')
  train.train_and_evaluate(_config(small_data, **more), one)
  two = two_process_run if fsdp == 1 else str(tmp_path / 'two')
  if fsdp != 1:
    _run(two, _overrides(small_data, **more))
  l1, l2 = _losses(one), _losses(two)
  assert [s for s, _ in l1] == [s for s, _ in l2] == list(range(1, STEPS + 1))
  np.testing.assert_allclose([v for _, v in l2], [v for _, v in l1], rtol=1e-6)
  # Gradients are all-reduced in another order (gloo across processes): the same to float
  # rounding, not bitwise.
  keys = ('params', 'ema_params', 'batch_stats')
  _assert_same(_arrays(one, keys=keys), _arrays(two, keys=keys), rtol=1e-4)
  run = checkpoints.TrainCheckpoints(two, read_only=True).run_description(STEPS)
  assert run['mesh'] == {'data': 4 // fsdp, 'fsdp': fsdp, 'processes': 2}


def test_processes_read_disjoint_data_that_covers_the_dataset(small_data, two_process_run):
  per_process = []
  for p in range(2):
    with open(os.path.join(two_process_run, 'keys', f'process_{p}.txt')) as f:
      per_process.append(f.read().split())
  epoch = [keys[:20] for keys in per_process]   # 5 steps x 4 examples per process
  assert not set(epoch[0]) & set(epoch[1])
  every = set(epoch[0]) | set(epoch[1])
  assert len(every) == 40 == sources.get_source(small_data, 'train').num_examples
  # Each process read only its own shards: stream p reads shards p and p + 2.
  src = sources.get_source(small_data, 'train')
  for p, keys in enumerate(epoch):
    shard_keys = set()
    for i in (p, p + 2):
      shard_keys |= {k.decode() for k in (e['key'] for e in
                                          src.shard_dataset(i).as_numpy_iterator())}
    assert set(keys) == shard_keys


def test_every_process_writes_its_part_of_each_checkpoint(two_process_run):
  step_dir = os.path.join(two_process_run, 'checkpoints', str(STEPS))
  assert {'process_0.json', 'process_1.json'} <= set(os.listdir(os.path.join(step_dir, 'data')))
  state_files = os.listdir(os.path.join(step_dir, 'state'))
  assert any('process_1' in name for name in state_files), state_files  # OCDBT per process
  positions = checkpoints.TrainCheckpoints(two_process_run, read_only=True).restore_data(STEPS)
  assert sorted(positions) == [0, 1]
  assert sorted(positions[0]['streams']) == ['0'] and sorted(positions[1]['streams']) == ['1']


# ------------------------------------------------------------------------------------------------
# Faults.


def test_kill_both_processes_and_restart(small_data, two_process_run, tmp_path):
  workdir = str(tmp_path / 'run')
  procs = _launch(workdir, _overrides(small_data))
  _wait_for(procs, r'step 5: loss')
  for p in procs:
    p.kill()
  _finish(procs)
  latest = checkpoints.TrainCheckpoints(workdir, read_only=True).latest_step()
  assert latest in (2, 4)
  outs = _run(workdir, _overrides(small_data))
  assert f'Resumed from {workdir}/checkpoints/{latest}' in outs[0]
  _assert_same(_arrays(two_process_run), _arrays(workdir))


def test_sigterm_to_one_process_saves_both_and_resumes(small_data, two_process_run, tmp_path):
  workdir = str(tmp_path / 'run')
  procs = _launch(workdir, _overrides(small_data, checkpoint_every=100))
  _wait_for(procs, r'step 3: loss')
  procs[1].send_signal(signal.SIGTERM)
  outs = _finish(procs)
  assert [rc for rc, _ in outs] == [0, 0], outs[1][1][-3000:]
  stopped = int(re.search(r'Preempted: saved the checkpoint of step (\d+)', outs[0][1]).group(1))
  assert f'Preempted: saved the checkpoint of step {stopped}' in outs[1][1]
  assert 3 <= stopped < STEPS
  _run(workdir, _overrides(small_data, checkpoint_every=100))
  _assert_same(_arrays(two_process_run), _arrays(workdir))
