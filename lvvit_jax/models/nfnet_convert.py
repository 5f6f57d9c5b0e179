"""Import of DeepMind's NFNet checkpoints (Haiku) into Flax variables, without Haiku or dill.

    variables = load_haiku_checkpoint('F0_haiku.npz', 'nfnet_f0')
    model = create_model('nfnet_f0')          # num_classes as in the file (1000)
    logits = model.apply(variables, images)

DeepMind's `F0_haiku.npz` .. `F6_haiku.npz` are not NumPy archives despite the name: each is a
dill pickle of the Haiku parameters, `{module name: {param name: array}}` (`dill.load` in
DeepMind's demo colab), written in 2021. Reading one needs Haiku installed, so it names Haiku's
immutable `FlatMapping`, which pickles itself as `haiku._src.data_structures.FlatMapping(dict)`
(current Haiku keeps that name only to read such files); dill pickles each array as
`dill._dill._create_array(*array.__reduce__(), None)`. They are read with the project's
restricted unpickler (`lvvit_jax/safe_pickle.py`) allowing `HAIKU_GLOBALS` only: what
rebuilds NumPy arrays (NumPy 1 and 2 names, dill's `_create_array`) and mappings, Haiku's
rebuilt as dicts. No code from the file runs and neither Haiku nor dill is needed; any other
global is refused by name.

Names (`lvvit_jax/models/nfnet.py` mirrors Haiku's): module `NFNet/~/<a>/~/<b>` is the Flax
path `params/<a>/<b>`, `w` is `kernel`, `b` is `bias`; `gain`, `bias` and `skip_gain` keep
their names. Layouts are the same (conv kernels HWIO, linear (in, out)): nothing is
transposed. Every module and parameter is accounted for: missing or unexpected ones and shape
mismatches raise one `CheckpointMismatchError` listing them; nothing is loaded partially.

Overrides: `num_classes` (default: the file's) different from the file's drops the `linear`
classifier, freshly initialised as in training (N(0, 0.01) kernel, zero bias); `img_size`
(default: the variant's test size) only sets the model's size: the net is fully convolutional.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple

import flax
import jax
import jax.numpy as jnp
import numpy as np

from lvvit_jax import safe_pickle
from lvvit_jax.models import create_model
from lvvit_jax.models import nfnet
from lvvit_jax.models.convert import CheckpointFileError
from lvvit_jax.models.convert import mismatch_error

_FILE = 'lvvit_jax/models/nfnet_convert.py'

HAIKU_ROOT = 'NFNet/~/'
HAIKU_SEP = '/~/'
HEAD = 'linear'
_TO_FLAX = {'w': 'kernel', 'b': 'bias', 'gain': 'gain', 'bias': 'bias', 'skip_gain': 'skip_gain'}

HaikuParams = Dict[str, Dict[str, np.ndarray]]
Path = Tuple[str, ...]


def _haiku_mapping(*args: Any, **kwargs: Any) -> dict:
  """What Haiku's mapping classes stand for: `FlatMapping(dict)` -> that dict."""
  return dict(*args, **kwargs)


HAIKU_GLOBALS: Dict[Tuple[str, str], Any] = {
    **safe_pickle.NUMPY_ARRAYS,
    **safe_pickle.PLAIN_MAPPINGS,
    # Haiku's immutable params mappings: FlatMapping's __reduce__ is (FlatMapping, (dict,))
    # (FlatMap, its later name, reduces to FlatMapping too); frozendict (2020) to (cls, (dict,)).
    ('haiku._src.data_structures', 'FlatMapping'): _haiku_mapping,
    ('haiku._src.data_structures', 'FlatMap'): _haiku_mapping,
    ('haiku._src.data_structures', 'frozendict'): _haiku_mapping,
}

_REFUSAL = ("a Haiku checkpoint holds only NumPy arrays in dicts ({module: {param: array}}), so "
            "nothing else is rebuilt and no code from the file runs; check that this is "
            "DeepMind's NFNet file (F0_haiku.npz .. F6_haiku.npz) and where it came from.")


def is_nfnet(model_name: str) -> bool:
  """Whether `model_name` is an NFNet (what DeepMind's Haiku checkpoints hold)."""
  return model_name in nfnet.CONFIGS


def _check_nfnet(model_name: str) -> None:
  if not is_nfnet(model_name):
    raise ValueError(f'{_FILE}: {model_name!r} is not an NFNet; DeepMind\'s Haiku checkpoints '
                     f'hold NFNets ({sorted(nfnet.CONFIGS)}); import LV-ViT from the authors\' '
                     'PyTorch file with --torch-checkpoint.')


def read_haiku_params(path: str) -> HaikuParams:
  """`{module: {param: float array}}` of a Haiku checkpoint file, read without running code.

  Raises:
    CheckpointFileError: a refused global (named), an empty, truncated or foreign file, or
      content that is not a two-level mapping of arrays.
    FileNotFoundError, IsADirectoryError: `path` is no file.
  """
  try:
    obj = safe_pickle.load_file(path, HAIKU_GLOBALS, source=_FILE, error=CheckpointFileError,
                                refusal=_REFUSAL, expected="DeepMind's Haiku NFNet checkpoint")
  except (FileNotFoundError, IsADirectoryError) as e:
    raise type(e)(f'{_FILE}: {path} is not a file; give the path of the downloaded '
                  'checkpoint (F0_haiku.npz .. F6_haiku.npz) as --haiku-checkpoint.') from None

  def bad(what: str) -> CheckpointFileError:
    return CheckpointFileError(f'{_FILE}: {path}: {what}; a Haiku checkpoint is {{module name: '
                               '{param name: array}}: check that this is the right file.')

  if not isinstance(obj, dict):
    raise bad(f'holds a {type(obj).__name__}, not a dict of modules')
  out: HaikuParams = {}
  for module, module_params in obj.items():
    if not isinstance(module, str) or not isinstance(module_params, dict):
      raise bad(f'entry {module!r:.60} is a {type(module_params).__name__}, not a dict of '
                'parameters')
    out[module] = {}
    for param, value in module_params.items():
      if not isinstance(param, str) or not isinstance(value, (np.ndarray, np.generic)):
        raise bad(f'{module}:{param!r:.40} is a {type(value).__name__}, not an array')
      value = np.asarray(value)
      if value.dtype.kind not in 'fiu':
        raise bad(f'{module}:{param} is an array of {value.dtype}, not of numbers')
      out[module][param] = value
  return out


def flax_path(module: str, param: str) -> Optional[Path]:
  """('params', ...) of Haiku's `module`/`param`, or None when it is no NFNet name."""
  if not module.startswith(HAIKU_ROOT) or param not in _TO_FLAX:
    return None
  parts = tuple(module[len(HAIKU_ROOT):].split(HAIKU_SEP))
  if not all(parts) or any('/' in p for p in parts):
    return None
  return ('params',) + parts + (_TO_FLAX[param],)


def haiku_name(path: Path) -> str:
  """'<module>:<param>', Haiku's name of the Flax variable `path` (inverse of `flax_path`)."""
  module = HAIKU_ROOT + HAIKU_SEP.join(path[1:-1])
  leaf = {'kernel': 'w', 'bias': 'b' if path[-2].startswith('linear') else 'bias'}.get(
      path[-1], path[-1])
  return f'{module}:{leaf}'


def _model_shapes(model: Any) -> Dict[Path, Tuple[int, ...]]:
  """{('params', ...): shape} of the model's variables, without computing them."""
  size = model.config.img_size
  dummy = jnp.zeros((1, size, size, 3), jnp.float32)
  shapes = jax.eval_shape(lambda: model.init({'params': jax.random.key(0)}, dummy))
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(shapes))
  return {k: tuple(v.shape) for k, v in flat.items()}


def haiku_layout(model_name: str, **overrides: Any) -> Dict[str, Dict[str, Tuple[int, ...]]]:
  """{module: {param: shape}} of the Haiku checkpoint that fits `create_model(model_name)`."""
  layout: Dict[str, Dict[str, Tuple[int, ...]]] = {}
  for path, shape in _model_shapes(create_model(model_name, **overrides)).items():
    module, param = haiku_name(path).split(':')
    layout.setdefault(module, {})[param] = shape
  return layout


def _file_classes(params: Mapping[str, Mapping[str, np.ndarray]]) -> Optional[int]:
  kernel = params.get(HAIKU_ROOT + HEAD, {}).get('w')
  return int(kernel.shape[-1]) if kernel is not None and kernel.ndim == 2 else None


def convert_haiku_params(params: Mapping[str, Mapping[str, np.ndarray]], model_name: str,
                         source: str = 'checkpoint', **overrides: Any) -> Dict[str, Any]:
  """Flax variables `{'params': ...}` (float32 NumPy) of Haiku `params` for `model_name`.

  `source` names the file in errors. Overrides as `load_haiku_checkpoint`.
  """
  _check_nfnet(model_name)
  file_classes = _file_classes(params)
  if 'num_classes' not in overrides and file_classes is not None:
    overrides['num_classes'] = file_classes
  model = create_model(model_name, **overrides)
  config = model.config
  expected = _model_shapes(model)
  heads = set(config.head_names)
  drop_heads = file_classes is not None and file_classes != config.num_classes

  found: Dict[Path, np.ndarray] = {}
  misshapen, unexpected, bad_shapes = set(), [], []
  for module in sorted(params):
    for param in sorted(params[module]):
      value, name, path = params[module][param], f'{module}:{param}', flax_path(module, param)
      if path is None or path not in expected or path in found:
        unexpected.append(name)
        continue
      if drop_heads and path[1] in heads:
        continue
      if value.shape != expected[path]:
        misshapen.add(path)
        bad_shapes.append(f'{name}: checkpoint {value.shape} vs model {expected[path]} at '
                          f'{"/".join(path)}')
        continue
      found[path] = value.astype(np.float32, copy=False)

  dropped = [k for k in expected if drop_heads and k[1] in heads]
  missing = sorted(f'{haiku_name(k)} (model {"/".join(k)})' for k in expected
                   if k not in found and k not in misshapen and k not in dropped)
  if missing or unexpected or bad_shapes:
    modules = len({haiku_name(k).split(':')[0] for k in expected})
    raise mismatch_error(
        f'{_FILE}: {source} does not fit {model_name} (num_classes={config.num_classes}): it '
        f'holds {len(params)} Haiku modules, {model_name} has {modules}.',
        missing, unexpected, bad_shapes,
        'Check that --model is the file\'s variant (F0_haiku.npz is nfnet_f0, F1 nfnet_f1, ...); '
        '--num-classes drops the classifier.', limit=20)

  # A fresh classifier for the new class count, initialised as in training.
  for i, k in enumerate(sorted(dropped)):
    found[k] = (np.asarray(nfnet.head_init(jax.random.key(i), expected[k], jnp.float32))
                if k[-1] == 'kernel' else np.zeros(expected[k], np.float32))
  return flax.traverse_util.unflatten_dict(found)


def load_haiku_checkpoint(path: str, model_name: str, **overrides: Any) -> Dict[str, Any]:
  """Reads DeepMind's Haiku NFNet checkpoint (`F0_haiku.npz` ..) and returns Flax variables.

  Returns `{'params': ...}` (NumPy float32) for `create_model(model_name, **overrides)`;
  `num_classes` defaults to the file's, `img_size` to the variant's.

  Raises:
    CheckpointFileError: the file is refused (a global that does not rebuild arrays, named),
      empty, truncated or not a Haiku checkpoint.
    CheckpointMismatchError: missing/unexpected modules or shape mismatches (all listed).
  """
  _check_nfnet(model_name)  # Before reading a file of up to 1.7 GB.
  return convert_haiku_params(read_haiku_params(path), model_name, source=path, **overrides)


def checkpoint_overrides(variables: Mapping[str, Any], model_name: str,
                         img_size: Optional[int] = None) -> Dict[str, int]:
  """The num_classes (read off the variables) and img_size (default: the variant's) of an
  imported NFNet: what `create_model` needs to rebuild it."""
  kernel = variables['params'][HEAD]['kernel']
  size = img_size if img_size is not None else nfnet.CONFIGS[model_name].img_size
  return {'num_classes': int(kernel.shape[1]), 'img_size': int(size)}
