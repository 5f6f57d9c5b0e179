"""One restricted unpickler for every pickle the project reads: no code from a file ever runs.

    allowed = {**safe_pickle.NUMPY_ARRAYS, **safe_pickle.PLAIN_MAPPINGS}
    params = safe_pickle.loads(data, 'F0_haiku.npz', allowed, source=_FILE,
                               refusal='only NumPy arrays in dicts are read; ...')

A pickle names the callables that rebuild its objects as globals (`module.name`); a plain
`pickle.load` imports and calls whatever it names (`os.system` included). `RestrictedUnpickler`
resolves a global only through an allow-list `{(module, name): object}` that maps it to a
stand-in of the caller's choice (the NumPy rebuilders below, `dict` for a mapping class), and
refuses every other global with an error naming the file and `module.name`, before anything in
the pickle is called. A file that is empty, truncated, not a pickle (of protocol 2 or later:
what Python 3, NumPy, torch and dill write) or whose objects cannot be rebuilt is one error
naming the file too; the error class is the caller's (a `ValueError`; `PickleFileError` by
default), so a command line reports it in one line (`lvvit_jax/cli.py`).

Readers: `labelgen/pt_files.py` (torch `.pt` label files) and `lvvit_jax/models/nfnet_convert.py`
(DeepMind's Haiku checkpoints, NumPy arrays pickled by dill).
"""
from __future__ import annotations

import functools
import io
import pickle
import types
from typing import Any, Dict, Mapping, Optional, Tuple, Type

import numpy as np

_FILE = 'lvvit_jax/safe_pickle.py'

Allowed = Mapping[Tuple[str, str], Any]
PROTO = b'\x80'  # The first byte of every pickle of protocol >= 2.


class PickleFileError(ValueError):
  """A pickle that is refused (a global off the allow-list) or cannot be read."""


class RestrictedUnpickler(pickle.Unpickler):
  """Unpickles `data` resolving globals only through `allowed`; `load` raises `error` for all.

  Args:
    data: the pickle's bytes.
    name: what to call the file in errors (its path).
    allowed: {(module, name): what the global stands for}; the values are called by the pickle
      with arguments from the file, so each must be safe to call with any of them.
    source: the `_FILE` of the reader, which starts every message.
    error: the exception class raised (a ValueError subclass).
    refusal: after 'refusing to unpickle global m.n: ', what the file may hold and the fix.
    subject: what cannot be read in a failure message ('it', 'its data.pkl', ...).
    expected: what the file should be, e.g. 'a torch tensor file'.
  """

  def __init__(self, data: bytes, name: str, allowed: Allowed, *, source: str = _FILE,
               error: Type[ValueError] = PickleFileError,
               refusal: str = 'only the objects this reader expects are rebuilt; check where '
                              'the file came from.',
               subject: str = 'it', expected: str = 'the expected file'):
    super().__init__(io.BytesIO(data))
    self.data_size = len(data)
    self.head = bytes(data[:12])
    self.name = name
    self.allowed: Dict[Tuple[str, str], Any] = dict(allowed)
    self.source = source
    self.error_class = error
    self.refusal = refusal
    self.subject = subject
    self.expected = expected

  def error(self, what: str) -> ValueError:
    """The reader's error for this file: '<source>: <name>: <what>'."""
    return self.error_class(f'{self.source}: {self.name}: {what}')

  def find_class(self, module: str, name: str) -> Any:
    try:
      value = self.allowed[(module, name)]
    except KeyError:
      raise self.error(f'refusing to unpickle global {module}.{name}: {self.refusal}') from None
    # A fresh wrapper, so that the pickle's BUILD cannot set attributes (__defaults__, ...) of
    # the reader's own functions for later files.
    if isinstance(value, (types.FunctionType, types.MethodType)):
      return functools.partial(value)
    return value

  def persistent_load(self, pid: Any) -> Any:
    raise self.error(f'refusing persistent id {pid!r:.80}: this file should not have any.')

  def load(self) -> Any:
    """The unpickled object; every failure is `error` naming the file and what went wrong."""
    if self.data_size == 0:
      raise self.error(f'{self.subject} is empty (0 bytes); the file is truncated or not '
                       f'{self.expected}.')
    if self.head[:1] != PROTO:
      raise self.error(f'{self.subject} is not a pickle (of protocol 2 or later, as Python 3, '
                       f'NumPy, torch and dill write them): it starts with {self.head!r}; check '
                       f'that the file is {self.expected}.')
    try:
      return super().load()
    except self.error_class:
      raise
    except (EOFError, pickle.UnpicklingError) as e:
      text = str(e) or type(e).__name__
      if isinstance(e, EOFError) or 'truncated' in text:
        why = 'it ends early: the file is truncated (an interrupted download or copy?)'
      else:
        why = f'it is a corrupt pickle ({text})'
      raise self.error(f'{self.subject} cannot be read: {why}; check that the file is '
                       f'{self.expected}.') from None
    except Exception as e:  # pylint: disable=broad-except  (a stand-in given bad arguments)
      raise self.error(f'{self.subject} cannot be read ({type(e).__name__}: {e}); the file is '
                       f'corrupt or not {self.expected}.') from None


def loads(data: bytes, name: str, allowed: Allowed, **kwargs: Any) -> Any:
  """`RestrictedUnpickler(data, name, allowed, **kwargs).load()`."""
  return RestrictedUnpickler(data, name, allowed, **kwargs).load()


def load_file(path: str, allowed: Allowed, **kwargs: Any) -> Any:
  """`loads` of the file at `path` (a missing file is FileNotFoundError, as `open` raises)."""
  with open(path, 'rb') as f:
    data = f.read()
  return loads(data, path, allowed, **kwargs)


# ------------------------------------------------------------------------------------------------
# NumPy arrays rebuilt from their bytes: the globals NumPy 1 and 2 (and dill) pickle arrays with.

class _NdarrayClass:
  """What `numpy.ndarray` stands for: only `_reconstruct` accepts it, nothing can call it."""
  __slots__ = ()

  def __repr__(self) -> str:
    return 'numpy.ndarray'


NDARRAY = _NdarrayClass()


def _plain_dtype(dtype: Any) -> np.dtype:
  dtype = np.dtype(dtype)
  if dtype.hasobject:
    raise TypeError(f'dtype {dtype} holds Python objects; only plain numeric arrays are read')
  return dtype


def _shape(shape: Any) -> Tuple[int, ...]:
  sizes = isinstance(shape, tuple) and all(isinstance(n, int) and n >= 0 for n in shape)
  if not sizes or any(isinstance(n, bool) for n in shape):
    raise TypeError(f'array shape {shape!r:.80} is not a tuple of sizes')
  return shape


def _dtype(spec: Any, align: bool = False, copy: bool = False) -> np.dtype:
  """`numpy.dtype(spec, align, copy)` for a type string such as 'f4' (its BUILD sets the order)."""
  del copy
  if not isinstance(spec, str) or not isinstance(align, bool):
    raise TypeError(f'numpy.dtype of {spec!r:.40}: not a type string')
  return _plain_dtype(np.dtype(spec, align=align, copy=True))


def _reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
  """`numpy.core.multiarray._reconstruct(ndarray, (0,), b'b')`: an empty array whose pickled
  state (shape, dtype, bytes) the pickle's BUILD then sets through `ndarray.__setstate__`."""
  if subtype is not NDARRAY:
    raise TypeError(f'_reconstruct of {subtype!r:.40}: only numpy.ndarray is rebuilt')
  if int(np.prod(_shape(shape))) > 1:
    raise TypeError(f'_reconstruct with shape {shape}: NumPy pickles (0,) here')
  if isinstance(dtype, bytes):
    dtype = dtype.decode('ascii')
  return np.empty(shape, _dtype(dtype))


def _scalar(dtype: Any, data: Any) -> np.generic:
  """`numpy.core.multiarray.scalar(dtype, bytes)`: a NumPy scalar from its bytes."""
  if not isinstance(dtype, np.dtype) or not isinstance(data, bytes):
    raise TypeError('scalar() takes a dtype and bytes')
  dtype = _plain_dtype(dtype)
  if len(data) != dtype.itemsize:
    raise ValueError(f'a {dtype} scalar has {dtype.itemsize} bytes, not {len(data)}')
  return np.frombuffer(data, dtype)[0]


def _frombuffer(buf: Any, dtype: Any, shape: Any, order: str) -> np.ndarray:
  """`numpy.core.numeric._frombuffer`: an array pickled with protocol 5 (bytes in-band)."""
  if not isinstance(buf, (bytes, bytearray)) or not isinstance(dtype, np.dtype):
    raise TypeError('_frombuffer takes bytes and a dtype')
  if order not in ('C', 'F'):
    raise ValueError(f'_frombuffer order {order!r:.10}')
  flat = np.frombuffer(buf, _plain_dtype(dtype))
  return np.array(flat.reshape(_shape(shape), order=order), order=order, copy=True)


def _dill_create_array(f: Any, args: Any, state: Any, npdict: Optional[dict] = None
                       ) -> np.ndarray:
  """dill's `_create_array(f, args, state, npdict)`: `f(*args).__setstate__(state)`, where dill
  passes the array's own `__reduce__()` (`f` is `_reconstruct`: one of the allowed globals, as
  everything callable here) and `npdict` is None."""
  if not callable(f) or not isinstance(args, tuple) or npdict:
    raise TypeError('_create_array rebuilds a plain numpy.ndarray only')
  array = f(*args)
  if type(array) is not np.ndarray:  # pylint: disable=unidiomatic-typecheck
    raise TypeError(f'_create_array made a {type(array).__name__}, not a numpy.ndarray')
  array.__setstate__(state)
  _plain_dtype(array.dtype)
  return array


NUMPY_ARRAYS: Dict[Tuple[str, str], Any] = {
    ('numpy', 'ndarray'): NDARRAY,
    ('numpy', 'dtype'): _dtype,
    # NumPy 1 pickles numpy.core.*, NumPy 2 numpy._core.* (and reads both).
    ('numpy.core.multiarray', '_reconstruct'): _reconstruct,
    ('numpy._core.multiarray', '_reconstruct'): _reconstruct,
    ('numpy.core.multiarray', 'scalar'): _scalar,
    ('numpy._core.multiarray', 'scalar'): _scalar,
    ('numpy.core.numeric', '_frombuffer'): _frombuffer,   # pickle protocol 5
    ('numpy._core.numeric', '_frombuffer'): _frombuffer,
    # dill wraps an array's own reduce (dill.dill before dill 0.3.0).
    ('dill._dill', '_create_array'): _dill_create_array,
    ('dill.dill', '_create_array'): _dill_create_array,
}

# Mappings rebuilt as plain dicts (protocol 2+ writes a dict itself without any global).
PLAIN_MAPPINGS: Dict[Tuple[str, str], Any] = {
    ('builtins', 'dict'): dict,
    ('collections', 'OrderedDict'): dict,
}
