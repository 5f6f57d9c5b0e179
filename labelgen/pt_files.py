"""PyTorch `.pt` files of tensors read into NumPy, without torch and without running pickles.

A `.pt` file written by `torch.save` (torch >= 1.6) is a zip archive:

  <archive>/data.pkl        a small pickle of the saved object; each tensor is a call
                            `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`
                            whose storage is a persistent id ('storage', <dtype>Storage, key, ...)
  <archive>/data/<key>      the raw bytes of storage `key`
  <archive>/byteorder       'little' or 'big' (absent in older files: little)

`load` unpickles `data.pkl` with the project's restricted unpickler (`lvvit_jax/safe_pickle.py`):
`find_class` resolves only the names a tensor needs (the rebuild functions, the storage types,
torch dtypes, `collections.OrderedDict`) to NumPy implementations here, and `persistent_load`
returns each storage as a NumPy array of its dtype. Any other global (a custom class,
`os.system`, ...) is refused with a `PtFileError` naming the file and the global, before
anything is called; the result must be arrays in plain containers (dict, list, tuple) or it is
refused too. Tensors are rebuilt from (size, stride, offset) with bounds checks, as contiguous
NumPy copies (bfloat16 through `ml_dtypes`).

Files in torch's legacy (pre-1.6, non-zip) format are read with `torch.load(weights_only=True)`
when torch is installed; without it they are an error that says so.

`LabelFiles` reads a tree of such files, `<dir>/<stem>.pt`, from a folder or from a zip archive
of the folder (whose members are themselves `.pt` zip files, read from memory).
"""
from __future__ import annotations

import collections
import io
import os
import zipfile
from typing import Any, Callable, Dict, Iterable, List, Optional

import numpy as np

from lvvit_jax import safe_pickle

_FILE = 'labelgen/pt_files.py'
_ZIP_MAGIC = b'PK\x03\x04'


class PtFileError(ValueError):
  """A `.pt` file that cannot be read as tensors (bad archive, refused global, bad tensor)."""


def _bfloat16() -> np.dtype:
  import ml_dtypes  # pylint: disable=g-import-not-at-top  (only bfloat16 tensors need it)
  return np.dtype(ml_dtypes.bfloat16)


# torch storage types and dtypes -> NumPy dtypes (callables: bfloat16 is imported lazily).
_STORAGE_DTYPES: Dict[str, Callable[[], np.dtype]] = {
    'HalfStorage': lambda: np.dtype(np.float16),
    'FloatStorage': lambda: np.dtype(np.float32),
    'DoubleStorage': lambda: np.dtype(np.float64),
    'BFloat16Storage': _bfloat16,
    'ByteStorage': lambda: np.dtype(np.uint8),
    'CharStorage': lambda: np.dtype(np.int8),
    'ShortStorage': lambda: np.dtype(np.int16),
    'IntStorage': lambda: np.dtype(np.int32),
    'LongStorage': lambda: np.dtype(np.int64),
    'BoolStorage': lambda: np.dtype(np.bool_),
    'UntypedStorage': lambda: np.dtype(np.uint8),  # `_rebuild_tensor_v3` passes the dtype
}
_TORCH_DTYPES: Dict[str, Callable[[], np.dtype]] = {
    'float16': _STORAGE_DTYPES['HalfStorage'], 'half': _STORAGE_DTYPES['HalfStorage'],
    'float32': _STORAGE_DTYPES['FloatStorage'], 'float': _STORAGE_DTYPES['FloatStorage'],
    'float64': _STORAGE_DTYPES['DoubleStorage'], 'double': _STORAGE_DTYPES['DoubleStorage'],
    'bfloat16': _bfloat16,
    'uint8': _STORAGE_DTYPES['ByteStorage'], 'int8': _STORAGE_DTYPES['CharStorage'],
    'int16': _STORAGE_DTYPES['ShortStorage'], 'short': _STORAGE_DTYPES['ShortStorage'],
    'int32': _STORAGE_DTYPES['IntStorage'], 'int': _STORAGE_DTYPES['IntStorage'],
    'int64': _STORAGE_DTYPES['LongStorage'], 'long': _STORAGE_DTYPES['LongStorage'],
    'uint16': lambda: np.dtype(np.uint16), 'uint32': lambda: np.dtype(np.uint32),
    'uint64': lambda: np.dtype(np.uint64), 'bool': _STORAGE_DTYPES['BoolStorage'],
}


class _StorageType:
  """What `find_class('torch', 'HalfStorage')` resolves to: just the element dtype."""

  def __init__(self, dtype: np.dtype):
    self.dtype = dtype


class _TorchDtype:
  """What `find_class('torch', 'float16')` resolves to (an argument of `_rebuild_tensor_v3`)."""

  def __init__(self, dtype: np.dtype):
    self.dtype = dtype


class _Unpickler(safe_pickle.RestrictedUnpickler):
  """Rebuilds tensors as NumPy arrays; refuses every global it does not know."""

  def __init__(self, data: bytes, name: str, read_record: Callable[[str], bytes],
               byteorder: str):
    super().__init__(
        data, name, {}, source=_FILE, error=PtFileError, subject='its data.pkl',
        expected='a tensor file',
        refusal='only tensors (and dicts, lists and tuples of them) are read from label '
                'files; re-save the file holding tensors only, or check where it came from.')
    self._read_record = read_record
    self._byteorder = '>' if byteorder == 'big' else '<'
    self._storages: Dict[str, np.ndarray] = {}
    self.allowed.update({
        ('torch._utils', '_rebuild_tensor'): self._rebuild_tensor,
        ('torch._utils', '_rebuild_tensor_v2'): self._rebuild_tensor_v2,
        ('torch._utils', '_rebuild_tensor_v3'): self._rebuild_tensor_v3,
        ('torch._utils', '_rebuild_parameter'): self._rebuild_parameter,
        ('collections', 'OrderedDict'): collections.OrderedDict,
    })

  def find_class(self, module: str, name: str) -> Any:
    if module in ('torch', 'torch.storage') and name in _STORAGE_DTYPES:
      return _StorageType(_STORAGE_DTYPES[name]())
    if module == 'torch' and name in _TORCH_DTYPES:
      return _TorchDtype(_TORCH_DTYPES[name]())
    return super().find_class(module, name)

  def persistent_load(self, pid: Any) -> np.ndarray:
    if (not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != 'storage'
        or not isinstance(pid[1], _StorageType)):
      raise self.error(f'unexpected persistent id {pid!r:.80}: not a torch storage.')
    _, storage_type, key, _, numel = pid[:5]
    key = str(key)
    if key not in self._storages:
      raw = self._read_record(f'data/{key}')
      dtype = storage_type.dtype.newbyteorder(self._byteorder)
      if len(raw) < int(numel) * dtype.itemsize:
        raise self.error(f'storage {key} holds {len(raw)} bytes, fewer than its {numel} '
                         f'elements of {storage_type.dtype}: the file is truncated.')
      array = np.frombuffer(raw, dtype, count=int(numel))
      self._storages[key] = array.astype(storage_type.dtype.newbyteorder('='), copy=False)
    return self._storages[key]

  def _view(self, storage: Any, offset: Any, size: Any, stride: Any) -> np.ndarray:
    if not isinstance(storage, np.ndarray) or storage.ndim != 1:
      raise self.error('a tensor is rebuilt from something that is not a storage.')
    try:
      offset = int(offset)
      size = tuple(int(s) for s in size)
      stride = tuple(int(s) for s in stride)
    except (TypeError, ValueError):
      raise self.error(f'tensor offset/size/stride {offset!r}/{size!r}/{stride!r} are not '
                       'integers.') from None
    if (len(size) != len(stride) or offset < 0 or min(size + (0,)) < 0
        or min(stride + (0,)) < 0):
      raise self.error(f'invalid tensor geometry: offset {offset}, size {size}, stride '
                       f'{stride}.')
    if 0 in size:
      return np.zeros(size, storage.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= storage.size:
      raise self.error(f'a tensor of size {size}, stride {stride}, offset {offset} reads past '
                       f'its storage of {storage.size} elements: the file is corrupt.')
    itemsize = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(storage[offset:], size,
                                           tuple(s * itemsize for s in stride), writeable=False)
    return np.array(view, order='C', copy=True)

  def _rebuild_tensor(self, storage, offset, size, stride) -> np.ndarray:
    return self._view(storage, offset, size, stride)

  def _rebuild_tensor_v2(self, storage, offset, size, stride, requires_grad=False,
                         backward_hooks=None, metadata=None) -> np.ndarray:
    del requires_grad, backward_hooks, metadata
    return self._view(storage, offset, size, stride)

  def _rebuild_tensor_v3(self, storage, offset, size, stride, requires_grad, backward_hooks,
                         dtype, metadata=None) -> np.ndarray:
    del requires_grad, backward_hooks, metadata
    if not isinstance(dtype, _TorchDtype) or not isinstance(storage, np.ndarray):
      raise self.error('_rebuild_tensor_v3 without a torch dtype and storage.')
    raw = storage.view(np.uint8)
    usable = raw.size - raw.size % dtype.dtype.itemsize
    typed = raw[:usable].view(dtype.dtype.newbyteorder(self._byteorder))
    return self._view(typed.astype(dtype.dtype, copy=False), offset, size, stride)

  def _rebuild_parameter(self, data, requires_grad=False, backward_hooks=None) -> np.ndarray:
    del requires_grad, backward_hooks
    if not isinstance(data, np.ndarray):
      raise self.error('_rebuild_parameter of something that is not a tensor.')
    return data


_PLAIN = (str, bytes, int, float, bool, type(None))


def _check_plain(obj: Any, name: str, depth: int = 0) -> None:
  """Accepts arrays (non-object) in dicts, lists and tuples, with plain keys and scalars."""
  if depth > 100:
    raise PtFileError(f'{_FILE}: {name}: containers nested more than 100 deep.')
  if isinstance(obj, np.ndarray):
    if obj.dtype == object:
      raise PtFileError(f'{_FILE}: {name}: holds an object array, not a tensor.')
  elif isinstance(obj, dict):
    for k, v in obj.items():
      if not isinstance(k, _PLAIN):
        raise PtFileError(f'{_FILE}: {name}: a dict key of type {type(k).__name__}.')
      _check_plain(v, name, depth + 1)
  elif isinstance(obj, (list, tuple)):
    for v in obj:
      _check_plain(v, name, depth + 1)
  elif not isinstance(obj, _PLAIN):
    raise PtFileError(f'{_FILE}: {name}: holds a {type(obj).__name__}, not tensors in plain '
                      'containers; re-save it holding tensors only.')


def _load_zip(data: bytes, name: str) -> Any:
  try:
    archive = zipfile.ZipFile(io.BytesIO(data))
  except zipfile.BadZipFile as e:
    raise PtFileError(f'{_FILE}: {name}: not a readable torch zip archive ({e}); the file is '
                      'truncated or not a .pt file.') from None
  pickles = [n for n in archive.namelist() if n.endswith('data.pkl') and n.count('/') == 1]
  if len(pickles) != 1:
    raise PtFileError(f'{_FILE}: {name}: a torch archive holds one <archive>/data.pkl, found '
                      f'{len(pickles)}; this is not a torch.save file (a TorchScript module?).')
  prefix = pickles[0][:-len('data.pkl')]
  names = set(archive.namelist())
  byteorder = 'little'
  if prefix + 'byteorder' in names:
    byteorder = archive.read(prefix + 'byteorder').decode('ascii', 'replace').strip()
    if byteorder not in ('little', 'big'):
      raise PtFileError(f'{_FILE}: {name}: byteorder record is {byteorder!r}.')

  def read_record(record: str) -> bytes:
    if prefix + record not in names:
      raise PtFileError(f'{_FILE}: {name}: record {prefix + record} is missing: the archive is '
                        'incomplete.')
    return archive.read(prefix + record)

  obj = _Unpickler(archive.read(pickles[0]), name, read_record, byteorder).load()
  _check_plain(obj, name)
  return obj


def _torch_to_numpy(obj: Any, torch: Any) -> Any:
  if isinstance(obj, torch.Tensor):
    t = obj.detach().cpu()
    if t.dtype == torch.bfloat16:
      return t.view(torch.int16).numpy().view(_bfloat16())
    return t.numpy()
  if isinstance(obj, dict):
    return type(obj)((k, _torch_to_numpy(v, torch)) for k, v in obj.items())
  if isinstance(obj, (list, tuple)):
    return type(obj)(_torch_to_numpy(v, torch) for v in obj)
  return obj


def _load_legacy(data: bytes, name: str) -> Any:
  """Torch's pre-1.6 format: only torch itself reads it (weights_only, so still no code runs)."""
  try:
    import torch  # pylint: disable=g-import-not-at-top  (optional fallback)
  except ImportError:
    raise PtFileError(f'{_FILE}: {name}: not a zip archive, i.e. torch\'s legacy (pre-1.6) '
                      'format, which only torch reads: install torch (CPU is enough) or '
                      're-save the files with a recent torch.') from None
  try:
    obj = torch.load(io.BytesIO(data), map_location='cpu', weights_only=True)
  except Exception as e:  # pylint: disable=broad-except  (torch raises many kinds)
    raise PtFileError(f'{_FILE}: {name}: torch.load(weights_only=True) cannot read it '
                      f'({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}); '
                      'it is corrupt or holds more than tensors.') from None
  obj = _torch_to_numpy(obj, torch)
  _check_plain(obj, name)
  return obj


def load(data: bytes, name: str = '<bytes>') -> Any:
  """The object saved in `.pt` bytes, tensors as NumPy arrays.

  Args:
    data: the file's bytes.
    name: what to call the file in errors (its path).

  Raises:
    PtFileError: the file is not a torch file, is corrupt, or holds anything but tensors in
      plain containers (the message names `name` and the refused global).
  """
  if data[:4] == _ZIP_MAGIC:
    return _load_zip(data, name)
  return _load_legacy(data, name)


def load_file(path: str) -> Any:
  """`load` of the file at `path`."""
  with open(path, 'rb') as f:
    return load(f.read(), path)


def _label_key(parts: List[str]) -> str:
  """'<dir>/<stem>.pt' from a path's components (the last two: class dir and file)."""
  return '/'.join(parts[-2:])


class LabelFiles:
  """A tree of `<dir>/<stem>.pt` files in a folder or a zip archive, by key '<dir>/<stem>.pt'.

  Keys are the last two path components, so a zip of the folder itself
  (`label_top5_train_nfnet/n01440764/x.pt`) and one of its content (`n01440764/x.pt`) read the
  same. Reading is thread-safe.
  """

  def __init__(self, path: str):
    self.path = path
    self._zip: Optional[zipfile.ZipFile] = None
    self._where: Dict[str, str] = {}
    if os.path.isdir(path):
      for root, dirs, files in os.walk(path):
        dirs.sort()
        for f in sorted(files):
          if f.endswith('.pt'):
            full = os.path.join(root, f)
            self._add(_label_key(os.path.relpath(full, path).split(os.sep)), full)
    elif os.path.isfile(path) and zipfile.is_zipfile(path):
      self._zip = zipfile.ZipFile(path)
      for info in self._zip.infolist():
        if not info.is_dir() and info.filename.endswith('.pt'):
          self._add(_label_key(info.filename.split('/')), info.filename)
    else:
      raise PtFileError(f'{_FILE}: --labels {path} is neither a folder nor a zip archive of '
                        'label files (<wnid>/<stem>.pt); point it at the unpacked folder or the '
                        '.zip.')
    if not self._where:
      raise PtFileError(f'{_FILE}: {path} holds no .pt files; expected <wnid>/<stem>.pt label '
                        'files (e.g. label_top5_train_nfnet).')

  def _add(self, key: str, where: str) -> None:
    if key in self._where:
      raise PtFileError(f'{_FILE}: {self.path}: two label files for {key}: {self._where[key]} '
                        f'and {where}; keep one tree of label files.')
    self._where[key] = where

  def __len__(self) -> int:
    return len(self._where)

  def __contains__(self, key: str) -> bool:
    return key in self._where

  def keys(self) -> Iterable[str]:
    """All keys, '<dir>/<stem>.pt', sorted."""
    return sorted(self._where)

  def describe(self, key: str) -> str:
    """Where the file of `key` is, for messages ('archive.zip:member' inside a zip)."""
    where = self._where[key]
    return f'{self.path}:{where}' if self._zip is not None else where

  def read(self, key: str) -> bytes:
    """The bytes of the file of `key` (KeyError if there is none)."""
    where = self._where[key]
    if self._zip is not None:
      return self._zip.read(where)
    with open(where, 'rb') as f:
      return f.read()

  def load(self, key: str) -> Any:
    """The tensors of the file of `key`, as NumPy (see `load`)."""
    return load(self.read(key), self.describe(key))

  def close(self) -> None:
    if self._zip is not None:
      self._zip.close()


def open_label_files(path: str) -> LabelFiles:
  """The label files under a folder or in a zip archive (see `LabelFiles`)."""
  return LabelFiles(path)
