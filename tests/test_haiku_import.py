"""Facts about importing DeepMind's Haiku NFNet checkpoints: names, file format, refusals, CLI.

A checkpoint in DeepMind's format is written here: a pickle of {Haiku module name: {param name:
array}} with the reference's names, made from nfnet_demo with random values in every parameter
(each moves the logits). One variant pickles it as DeepMind's 2021 files are: the
mappings as Haiku's `FlatMapping`, the arrays through dill's `_create_array`, skip gains as
NumPy scalars, protocol 3 with NumPy 1's module names; stand-in modules registered under
Haiku's and dill's paths produce those bytes and are removed before loading (neither package is
installed: the loader must not need them).
"""
import collections.abc
import contextlib
import os
import pickle
import subprocess
import sys
import types

import flax
import jax
import numpy as np
import pytest

from lvvit_jax import checkpoints
from lvvit_jax import convert as convert_cli
from lvvit_jax.models import create_model
from lvvit_jax.models import nfnet_convert
from lvvit_jax.models.convert import CheckpointFileError
from lvvit_jax.models.convert import CheckpointMismatchError
from lvvit_jax.models.nfnet_convert import load_haiku_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME, IMG, CLASSES = 'nfnet_demo', 64, 10


def _flat(variables):
  return {k: np.asarray(v) for k, v in
          flax.traverse_util.flatten_dict(dict(variables), sep='/').items()}


def _to_haiku(flat_params):
  """{'NFNet/~/<a>/~/<b>': {'w' | 'b' | 'gain' | 'bias' | 'skip_gain': value}} of Flax params,
  named as the reference's Haiku modules are (written independently of the importer)."""
  out = {}
  for path, value in flat_params.items():
    *modules, leaf = path.split('/')[1:]
    if leaf == 'kernel':
      leaf = 'w'
    elif leaf == 'bias' and modules[-1].startswith('linear'):
      leaf = 'b'
    out.setdefault('NFNet/~/' + '/~/'.join(modules), {})[leaf] = value
  return out


def _images(batch=2, size=IMG, seed=0):
  return np.random.RandomState(seed).randn(batch, size, size, 3).astype(np.float32)


@pytest.fixture(scope='module')
def demo():
  """(random variables of nfnet_demo, their logits on _images(), the jitted apply)."""
  model = create_model(NAME)
  # Random values for every parameter (not the init's zero skip gains and biases, unit gains:
  # each parameter moves the logits), drawn on the host: compiling the init costs seconds.
  shapes = jax.eval_shape(model.init, jax.random.key(0), _images(1))
  rng = np.random.RandomState(1)
  variables = jax.tree_util.tree_map(
      lambda s: rng.normal(0.5, 0.3, s.shape).astype(np.float32), shapes)
  apply = jax.jit(model.apply)
  return variables, np.asarray(apply(variables, _images())), apply


@pytest.fixture(scope='module')
def demo_file(demo, tmp_path_factory):
  path = tmp_path_factory.mktemp('haiku') / 'demo_haiku.npz'
  path.write_bytes(pickle.dumps(_to_haiku(_flat(demo[0]))))
  return str(path)


STAND_IN_MODULES = ('haiku', 'haiku._src', 'haiku._src.data_structures', 'dill', 'dill._dill')


@contextlib.contextmanager
def _stand_in_haiku_and_dill():
  """Yields (FlatMapping, dill_array): Haiku's mapping as it pickles itself, and an ndarray
  wrapper pickled as dill pickles arrays; both modules are gone after the block."""
  assert not any(m in sys.modules for m in STAND_IN_MODULES)  # Not installed.
  modules = {m: types.ModuleType(m) for m in STAND_IN_MODULES}

  class FlatMapping(collections.abc.Mapping):
    """Haiku's immutable params mapping of 2020-21, pickled by its __reduce__ (current Haiku
    keeps a FlatMapping(dict) shim to read such files)."""

    def __init__(self, mapping):
      self._mapping = dict(mapping)

    def __getitem__(self, key):
      return self._mapping[key]

    def __iter__(self):
      return iter(self._mapping)

    def __len__(self):
      return len(self._mapping)

    def __reduce__(self):
      return FlatMapping, (self._mapping,)

  def _create_array(f, args, state, npdict=None):
    raise AssertionError('never called: the loader must not import dill')

  class DillArray:
    """dill's save_numpy_array: `_create_array(*array.__reduce__(), npdict=None)`."""

    def __init__(self, array):
      self.array = array

    def __reduce__(self):
      return _create_array, (*self.array.__reduce__(), None)

  for obj, module in ((FlatMapping, 'haiku._src.data_structures'), (_create_array, 'dill._dill')):
    obj.__module__, obj.__qualname__ = module, obj.__name__
    setattr(modules[module], obj.__name__, obj)
  sys.modules.update(modules)
  try:
    yield FlatMapping, DillArray
  finally:
    for m in STAND_IN_MODULES:
      sys.modules.pop(m, None)


def _deepmind_bytes(haiku_params):
  """The bytes of a file as DeepMind wrote them (see the module docstring)."""
  with _stand_in_haiku_and_dill() as (flat_mapping, dill_array):
    obj = flat_mapping({
        module: flat_mapping({p: (np.float32(v) if p == 'skip_gain' else dill_array(v))
                              for p, v in params.items()})
        for module, params in haiku_params.items()})
    data = pickle.dumps(obj, protocol=3)
  for module in ('multiarray', 'numeric'):  # NumPy 1's names of NumPy 2's numpy._core.*
    data = data.replace(b'cnumpy._core.%s\n' % module.encode(),
                        b'cnumpy.core.%s\n' % module.encode())
  return data


def test_f0_has_deepminds_94_modules_and_names():
  shapes = jax.eval_shape(create_model('nfnet_f0').init, jax.random.key(0), _images(1, 256))
  flat = flax.traverse_util.flatten_dict(dict(shapes), sep='/')
  layout = _to_haiku({k: tuple(v.shape) for k, v in flat.items()})
  # 4 stem convs, 12 blocks of 7 modules (4 convs, squeeze-excite's 2 linears, the block's
  # skip_gain), 4 shortcuts, final_conv, linear: what DeepMind's F0_haiku.npz holds.
  assert len(layout) == 94
  assert sorted(m for m in layout if m.endswith('conv_shortcut')) == [
      f'NFNet/~/{b}/~/conv_shortcut' for b in ('nf_block', 'nf_block_1', 'nf_block_3',
                                               'nf_block_9')]
  assert layout['NFNet/~/stem_conv0'] == {'w': (3, 3, 3, 16), 'gain': (16,), 'bias': (16,)}
  assert layout['NFNet/~/nf_block'] == {'skip_gain': ()}
  assert layout['NFNet/~/nf_block_3/~/conv1b'] == {'w': (3, 3, 128, 768), 'gain': (768,),
                                                   'bias': (768,)}
  assert layout['NFNet/~/nf_block_11/~/squeeze_excite/~/linear_1'] == {'w': (768, 1536),
                                                                       'b': (1536,)}
  assert layout['NFNet/~/linear'] == {'w': (3072, 1000), 'b': (1000,)}
  # The importer maps every one of these names back to where it came from.
  for path in flat:
    module, param = nfnet_convert.haiku_name(('params',) + tuple(path.split('/')[1:])).split(':')
    assert param in layout[module]
    assert nfnet_convert.flax_path(module, param) == ('params',) + tuple(path.split('/')[1:])


@pytest.mark.parametrize('fmt', ['plain_pickle', 'deepmind_dill_flatmapping'])
def test_import_reproduces_the_forward(fmt, demo, demo_file, tmp_path):
  variables, logits, apply = demo
  path = demo_file
  if fmt == 'deepmind_dill_flatmapping':
    data = _deepmind_bytes(_to_haiku(_flat(variables)))
    for name in (b'haiku._src.data_structures\nFlatMapping', b'dill._dill\n_create_array',
                 b'numpy.core.multiarray\n_reconstruct', b'numpy.core.multiarray\nscalar'):
      assert name in data
    path = tmp_path / 'F_haiku.npz'
    path.write_bytes(data)
  imported = load_haiku_checkpoint(str(path), NAME)
  assert not any(m in sys.modules for m in STAND_IN_MODULES)
  got, want = _flat(imported), _flat(variables)
  assert got.keys() == want.keys()
  for key, value in want.items():
    assert got[key].dtype == np.float32, key
    np.testing.assert_array_equal(got[key], value, err_msg=key)
  np.testing.assert_array_equal(np.asarray(apply(imported, _images())), logits)


class RunsACommand:

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return os.system, (f'touch {self.marker}',)


class CustomObject:
  pass


def test_a_pickle_naming_another_global_is_refused_and_nothing_runs(demo, tmp_path):
  marker = tmp_path / 'ran'
  params = _to_haiku(_flat(demo[0]))
  params['NFNet/~/linear']['b'] = RunsACommand(marker)
  path = tmp_path / 'evil_haiku.npz'
  path.write_bytes(pickle.dumps(params))
  with pytest.raises(CheckpointFileError, match=r'evil_haiku.npz: refusing to unpickle global '
                     r'(posix|nt|os)\.system: a Haiku checkpoint holds only NumPy arrays'):
    load_haiku_checkpoint(str(path), NAME)
  assert not marker.exists()
  path.write_bytes(pickle.dumps({'NFNet/~/linear': {'w': CustomObject()}}))
  with pytest.raises(CheckpointFileError, match=r'refusing to unpickle global '
                     r'tests\.test_haiku_import\.CustomObject'):
    load_haiku_checkpoint(str(path), NAME)


def test_truncated_empty_and_foreign_files_are_one_line_errors(demo_file, tmp_path):
  data = open(demo_file, 'rb').read()
  cases = {
      'truncated': (data[:len(data) // 2], r'truncated.npz: it cannot be read: it ends early: '
                                           r'the file is truncated'),
      'empty': (b'', r'empty.npz: it is empty \(0 bytes\)'),
      'text': (b'not a checkpoint\n', r"text.npz: it is not a pickle .*starts with b'not a "),
      'list': (pickle.dumps([np.zeros(3)]), r'list.npz: holds a list, not a dict of modules'),
      'object_array': (pickle.dumps({'NFNet/~/linear': {'b': np.array([None])}}),
                       r'dtype object holds Python objects'),
  }
  for name, (content, message) in cases.items():
    path = tmp_path / f'{name}.npz'
    path.write_bytes(content)
    with pytest.raises(CheckpointFileError, match=message) as info:
      load_haiku_checkpoint(str(path), NAME)
    assert str(info.value).startswith('lvvit_jax/models/nfnet_convert.py: ')
    assert '\n' not in str(info.value), name


def test_a_wrong_variant_lists_missing_unexpected_and_shapes(demo_file):
  with pytest.raises(CheckpointMismatchError) as info:
    load_haiku_checkpoint(demo_file, 'nfnet_f0')   # demo weights, F0 model
  message = str(info.value)
  assert 'holds 37 Haiku modules, nfnet_f0 has 94' in message
  # F0 has blocks nf_block_4 .. nf_block_11 (8 x 17 params) and shortcuts in nf_block_3 and
  # nf_block_9 (3 each) that the demo lacks; the demo's nf_block_2 has a shortcut F0's lacks.
  assert 'missing in checkpoint (142)' in message
  assert ('NFNet/~/nf_block_10/~/conv0:bias (model params/nf_block_10/conv0/bias)' in message)
  assert ("unexpected in checkpoint (3): ['NFNet/~/nf_block_2/~/conv_shortcut:bias', "
          "'NFNet/~/nf_block_2/~/conv_shortcut:gain', 'NFNet/~/nf_block_2/~/conv_shortcut:w']"
          in message)
  assert ('NFNet/~/final_conv:bias: checkpoint (256,) vs model (3072,) at params/final_conv/bias'
          in message)
  assert 'NFNet/~/linear:w: checkpoint (256, 10) vs model (3072, 10)' in message
  assert '--model' in message and ' more' in message  # The fix; long lists are cut.


def test_cli_writes_the_variables_checkpoint(demo, demo_file, tmp_path):
  variables, logits, apply = demo
  out = tmp_path / 'converted'
  convert_cli.main(['--model', NAME, '--haiku-checkpoint', demo_file, '--output', str(out)])
  restored, meta = checkpoints.load_variables(str(out))
  assert meta == {'model': NAME, 'overrides': {'num_classes': CLASSES, 'img_size': IMG}}
  got, want = _flat(restored), _flat(variables)
  assert got.keys() == want.keys()
  for key, value in want.items():
    np.testing.assert_array_equal(got[key], value, err_msg=key)
  np.testing.assert_array_equal(np.asarray(apply(restored, _images())), logits)


def test_cli_num_classes_drops_the_head_and_img_size_sets_the_model(demo, demo_file, tmp_path):
  out = tmp_path / 'converted_5'
  convert_cli.main(['--model', NAME, '--haiku-checkpoint', demo_file, '--output', str(out),
                    '--num-classes', '5', '--img-size', '96'])
  restored, meta = checkpoints.load_variables(str(out))
  assert meta['overrides'] == {'num_classes': 5, 'img_size': 96}
  head = restored['params']['linear']
  assert head['kernel'].shape == (256, 5) and 0.005 < np.std(head['kernel']) < 0.015
  np.testing.assert_array_equal(head['bias'], np.zeros(5))  # N(0, 0.01) and 0, as trained.
  got, want = _flat(restored), _flat(demo[0])
  assert got.keys() == want.keys()
  for key, value in want.items():
    if not key.startswith('params/linear/'):
      np.testing.assert_array_equal(got[key], value, err_msg=key)
  model = create_model(NAME, **meta['overrides'])
  assert jax.eval_shape(model.apply, restored, _images(1, 96)).shape == (1, 5)


def test_cli_source_flags_and_verbose(demo_file, tmp_path):
  out = str(tmp_path / 'out')
  for flags in ([], ['--haiku-checkpoint', demo_file, '--torch-checkpoint', demo_file]):
    with pytest.raises(SystemExit):   # argparse: exactly one source
      convert_cli.main(['--model', NAME, '--output', out] + flags)
  with pytest.raises(ValueError, match='--haiku-checkpoint'):
    convert_cli.main(['--model', NAME, '--torch-checkpoint', demo_file, '--output', out])
  with pytest.raises(ValueError, match="'lvvit_t' is not an NFNet"):
    convert_cli.main(['--model', 'lvvit_t', '--haiku-checkpoint', demo_file, '--output', out])
  empty = tmp_path / 'empty.npz'
  empty.write_bytes(b'')
  with pytest.raises(CheckpointFileError):   # --verbose: the error itself, with its traceback
    convert_cli.run(['--model', NAME, '--haiku-checkpoint', str(empty), '--output', out,
                     '--verbose'])
  assert not os.path.exists(out)


def _cli(*args):
  return subprocess.run([sys.executable, '-m', 'lvvit_jax.convert', *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)


def test_cli_errors_are_one_line_on_stderr_with_exit_status_2(tmp_path):
  text = tmp_path / 'notes.pth'
  text.write_text('this is not a checkpoint\n')
  run = _cli('--model', 'lvvit_t', '--torch-checkpoint', str(text), '--output',
             str(tmp_path / 'a'))
  assert run.returncode == 2, run.stderr
  assert run.stderr.count('\n') == 1, run.stderr
  assert run.stderr.startswith('python -m lvvit_jax.convert: error: lvvit_jax/models/convert.py: '
                               f'{text} is not a PyTorch checkpoint'), run.stderr

  marker = tmp_path / 'ran'
  evil = tmp_path / 'F0_haiku.npz'
  evil.write_bytes(pickle.dumps({'NFNet/~/linear': {'w': RunsACommand(marker)}}))
  run = _cli('--model', 'nfnet_f0', '--haiku-checkpoint', str(evil), '--output',
             str(tmp_path / 'b'))
  assert run.returncode == 2, run.stderr
  assert run.stderr.count('\n') == 1, run.stderr
  assert 'refusing to unpickle global' in run.stderr and '.system' in run.stderr, run.stderr
  assert not marker.exists()
  assert not os.path.exists(tmp_path / 'a') and not os.path.exists(tmp_path / 'b')
