"""Import of the authors' PyTorch LV-ViT checkpoints into Flax variables.

    variables = load_torch_checkpoint('lvvit_s-26M-224-83.3.pth.tar', 'lvvit_s')
    model = create_model('lvvit_s')          # num_classes / img_size as in the checkpoint
    logits = model.apply(variables, images)

The checkpoint is a dict holding the state dict directly or under `state_dict`,
`state_dict_ema` or `model` (EMA preferred when both are present), keys possibly prefixed with
`module.`. A file of another format (or a truncated one) is `CheckpointFileError`. Every key
is accounted for: unexpected or missing keys and shape mismatches raise
`CheckpointMismatchError` listing them; nothing is loaded partially.

Overrides: `img_size` different from the checkpoint's resamples the position-embedding grid
bicubically (the cls position is kept); `num_classes` different from the checkpoint's drops
both heads, which are then freshly initialised. Without overrides both are read off the
checkpoint. PyTorch is needed here only (lazily imported), never in the model itself.
"""
from __future__ import annotations

import pickle
import re
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

from absl import logging

import flax
import jax
import jax.numpy as jnp
import numpy as np

from lvvit_jax.models import create_model
from lvvit_jax.models import get_config
from lvvit_jax.models.lvvit import dense_init

_FILE = 'lvvit_jax/models/convert.py'

STATE_DICT_KEYS = ('state_dict_ema', 'state_dict', 'model')
HEAD_KEYS = ('head', 'aux_head')
_ZIP_MAGIC = b'PK\x03\x04'  # torch.save since torch 1.6
_PICKLE_MAGIC = b'\x80'      # a pickle of protocol >= 2: torch's legacy format


class CheckpointMismatchError(ValueError):
  """The checkpoint does not fit the model: lists missing/unexpected keys and bad shapes."""


class CheckpointFileError(ValueError):
  """A checkpoint file that cannot be read: another format, truncated or corrupt."""


def mismatch_error(header: str, missing: Sequence[str], unexpected: Sequence[str],
                   bad_shapes: Sequence[str], fix: str,
                   limit: Optional[int] = None) -> CheckpointMismatchError:
  """One error listing all that does not fit (each list cut to `limit` entries if given)."""
  lines = [header]
  for what, items in (('missing in checkpoint', missing), ('unexpected in checkpoint', unexpected),
                      ('shape mismatches', bad_shapes)):
    if items:
      shown = list(items) if limit is None else list(items)[:limit]
      more = f' ... and {len(items) - len(shown)} more' if len(shown) < len(items) else ''
      lines.append(f'{what} ({len(items)}): {shown}{more}')
  lines.append(fix)
  return CheckpointMismatchError('\n'.join(lines))


def _first_line(error: BaseException) -> str:
  text = str(error).strip()
  return f'{type(error).__name__}: {text.splitlines()[0]}' if text else type(error).__name__


def _torch_load(path: str) -> Mapping[str, Any]:
  """The object saved in a `torch.save` file; a file of another format is CheckpointFileError."""
  try:
    with open(path, 'rb') as f:
      head = f.read(len(_ZIP_MAGIC))
  except (FileNotFoundError, IsADirectoryError) as e:
    raise type(e)(f'{_FILE}: {path} is not a file; give the path of the downloaded checkpoint '
                  '(e.g. lvvit_s-26M-224-83.3.pth.tar) as --torch-checkpoint.') from None
  if not (head == _ZIP_MAGIC or head.startswith(_PICKLE_MAGIC)):
    raise CheckpointFileError(
        f'{_FILE}: {path} is not a PyTorch checkpoint: neither a zip archive (torch.save) nor a '
        f'pickle (it starts with {head!r}); give the .pth / .pth.tar file the authors published.')
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        f'{_FILE}: reading a PyTorch checkpoint needs torch; install the CPU '
        'build (`pip install torch==2.13.0` or `pip install -r requirements-dev.txt`).') from e
  try:  # Tensors and plain containers only: no code from the file runs.
    return torch.load(path, map_location='cpu', weights_only=True)
  except pickle.UnpicklingError:
    pass  # A global weights_only does not allow (or a corrupt pickle: the retry says which).
  except Exception as e:  # pylint: disable=broad-except  (torch raises many kinds)
    raise CheckpointFileError(f'{_FILE}: {path} cannot be read by torch.load ({_first_line(e)}); '
                              'the file is truncated or corrupt: copy or download it '
                              'again.') from None
  # Training checkpoints also pickle e.g. the argparse Namespace of the run.
  logging.warning('%s: %s holds more than tensors; loading it with full unpickling (only do '
                  'this for files you trust).', _FILE, path)
  try:
    return torch.load(path, map_location='cpu', weights_only=False)
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointFileError(f'{_FILE}: {path} cannot be read by torch.load ({_first_line(e)}); '
                              'the file is truncated, corrupt or not a checkpoint.') from None


def extract_state_dict(obj: Mapping[str, Any]) -> Dict[str, np.ndarray]:
  """The flat state dict of a checkpoint object as float32 NumPy arrays, `module.` stripped."""
  if not isinstance(obj, Mapping):
    raise CheckpointMismatchError(
        f'{_FILE}: expected a dict checkpoint, got {type(obj).__name__}.')
  for key in STATE_DICT_KEYS:
    if key in obj and isinstance(obj[key], Mapping):
      obj = obj[key]
      break
  out = {}
  for k, v in obj.items():
    if k.startswith('module.'):
      k = k[len('module.'):]
    if hasattr(v, 'detach'):  # torch.Tensor
      v = v.detach().cpu().float().numpy() if v.is_floating_point() else v.cpu().numpy()
    out[k] = np.asarray(v)
  return out


def _torch_to_flax_name(key: str) -> Optional[Tuple[str, Tuple[str, ...], str]]:
  """Maps a torch key to (collection, flax path, transform), or None when it is not ours."""
  if key in ('cls_token', 'pos_embed'):
    return 'params', (key,), 'none'
  m = re.fullmatch(r'patch_embed\.(conv[123]|proj)\.(weight|bias)', key)
  if m:
    return 'params', ('patch_embed', m[1], 'kernel' if m[2] == 'weight' else 'bias'), (
        'conv' if m[2] == 'weight' else 'none')
  m = re.fullmatch(r'patch_embed\.(bn[123])\.(weight|bias|running_mean|running_var)', key)
  if m:
    name = {'weight': ('params', 'scale'), 'bias': ('params', 'bias'),
            'running_mean': ('batch_stats', 'mean'), 'running_var': ('batch_stats', 'var')}[m[2]]
    return name[0], ('patch_embed', m[1], name[1]), 'none'
  m = re.fullmatch(r'blocks\.(\d+)\.(norm1|norm2)\.(weight|bias)', key)
  if m:
    return 'params', (f'blocks_{m[1]}', m[2], 'scale' if m[3] == 'weight' else 'bias'), 'none'
  m = re.fullmatch(r'blocks\.(\d+)\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)', key)
  if m:
    outer, inner = m[2].split('.')
    leaf = 'kernel' if m[3] == 'weight' else 'bias'
    return 'params', (f'blocks_{m[1]}', outer, inner, leaf), 'dense' if leaf == 'kernel' else 'none'
  m = re.fullmatch(r'(norm)\.(weight|bias)', key)
  if m:
    return 'params', ('norm', 'scale' if m[2] == 'weight' else 'bias'), 'none'
  m = re.fullmatch(r'(head|aux_head)\.(weight|bias)', key)
  if m:
    leaf = 'kernel' if m[2] == 'weight' else 'bias'
    return 'params', (m[1], leaf), 'dense' if leaf == 'kernel' else 'none'
  return None


def _flax_to_torch_name(full: Tuple[str, ...]) -> str:
  """The official PyTorch key of a Flax variable path (inverse of `_torch_to_flax_name`)."""
  leaf = {'kernel': 'weight', 'scale': 'weight', 'mean': 'running_mean',
          'var': 'running_var'}.get(full[-1], full[-1])
  parts = [re.sub(r'^blocks_(\d+)$', r'blocks.\1', p) for p in full[1:-1]]
  return '.'.join(parts + [leaf])


def _transform(value: np.ndarray, how: str) -> np.ndarray:
  if how == 'conv':  # (out, in, kh, kw) -> (kh, kw, in, out)
    return np.transpose(value, (2, 3, 1, 0))
  if how == 'dense':  # (out, in) -> (in, out)
    return np.transpose(value, (1, 0))
  return value


def _torch_shape(flax_shape: Tuple[int, ...], how: str) -> Tuple[int, ...]:
  """The PyTorch-layout shape of a Flax parameter (inverse of `_transform`)."""
  if how == 'conv':  # (kh, kw, in, out) -> (out, in, kh, kw)
    return (flax_shape[3], flax_shape[2], flax_shape[0], flax_shape[1])
  if how == 'dense':  # (in, out) -> (out, in)
    return (flax_shape[1], flax_shape[0])
  return flax_shape


def resize_pos_embed(pos_embed: jax.Array, new_grid: Tuple[int, int]) -> jax.Array:
  """Bicubically resamples the (1, 1 + h*w, D) grid part to new_grid; the cls position is kept.

  The old grid is taken as square. Uses `jax.image.resize(method='bicubic')` (Keys cubic,
  antialiased when shrinking), i.e. a smooth grid stays smooth. Traceable: the evaluation at
  another size (`config.eval_img_size`) calls it inside its jitted step.
  """
  cls_pos, grid_pos = pos_embed[:, :1], pos_embed[0, 1:]
  old = int(round(np.sqrt(grid_pos.shape[0])))
  if old * old != grid_pos.shape[0]:
    raise CheckpointMismatchError(
        f'{_FILE}: pos_embed has {grid_pos.shape[0]} grid positions, not a '
        f'square grid; cannot resample.')
  grid_pos = grid_pos.reshape(old, old, -1)
  new = jax.image.resize(grid_pos.astype(jnp.float32),
                         (new_grid[0], new_grid[1], grid_pos.shape[-1]), method='bicubic')
  new = new.reshape(1, new_grid[0] * new_grid[1], -1).astype(pos_embed.dtype)
  return jnp.concatenate([cls_pos, new], axis=1)


def resample_pos_embed(pos_embed: np.ndarray, new_grid: Tuple[int, int]) -> np.ndarray:
  """`resize_pos_embed` on a NumPy array (the converter's and checkpoint loaders' form)."""
  return np.asarray(resize_pos_embed(jnp.asarray(pos_embed), new_grid)).astype(pos_embed.dtype)


def convert_state_dict(state_dict: Mapping[str, np.ndarray], model_name: str,
                       **overrides: Any) -> Dict[str, Any]:
  """Converts a flat PyTorch state dict (NumPy values) to Flax variables for `model_name`."""
  state_dict = dict(state_dict)
  state_dict = {k: v for k, v in state_dict.items() if not k.endswith('num_batches_tracked')}
  # Read num_classes / img_size off the checkpoint unless the caller overrides them.
  base = get_config(model_name)
  ckpt_classes = state_dict['head.weight'].shape[0] if 'head.weight' in state_dict else None
  if 'num_classes' not in overrides and ckpt_classes is not None:
    overrides['num_classes'] = ckpt_classes
  ckpt_grid = None
  if 'pos_embed' in state_dict:
    n = state_dict['pos_embed'].shape[1] - 1
    ckpt_grid = int(round(np.sqrt(n)))
    if 'img_size' not in overrides and ckpt_grid * ckpt_grid == n:
      patch = overrides.get('patch_size', base.patch_size)
      overrides['img_size'] = ckpt_grid * patch
  model = create_model(model_name, **overrides)
  config = model.config
  size = config.img_size
  dummy = jnp.zeros((1, size, size, 3), jnp.float32)
  shapes = jax.eval_shape(lambda: model.init({'params': jax.random.key(0)}, dummy))
  expected = flax.traverse_util.flatten_dict(flax.core.unfreeze(shapes))
  drop_heads = ckpt_classes is not None and ckpt_classes != config.num_classes

  found, unexpected, bad_shapes = {}, [], []
  for key, value in sorted(state_dict.items()):
    target = _torch_to_flax_name(key)
    if target is None:
      unexpected.append(key)
      continue
    collection, path, how = target
    if drop_heads and path[0] in HEAD_KEYS:
      continue
    full = (collection,) + path
    if full not in expected:
      unexpected.append(key)
      continue
    torch_shape = tuple(value.shape)
    want = tuple(expected[full].shape)
    if value.ndim == len(want):  # Otherwise the transpose would fail: a shape mismatch.
      value = _transform(value, how)
    if (key == 'pos_embed' and value.ndim == 3 and value.shape != want
        and value.shape[2] == want[2]):
      value = resample_pos_embed(value, config.grid)
    if tuple(value.shape) != want:
      # Both shapes in the checkpoint's (PyTorch) layout, so they compare with the file.
      bad_shapes.append(f'{key}: checkpoint {torch_shape} vs model {_torch_shape(want, how)} '
                        f'at {"/".join(full)}')
      continue
    found[full] = value.astype(np.float32)

  heads = {k for k in expected if k[0] == 'params' and k[1] in HEAD_KEYS}
  missing = sorted(f'{_flax_to_torch_name(k)} (model {"/".join(k)})' for k in expected
                   if k not in found and not (drop_heads and k in heads))
  if missing or unexpected or bad_shapes:
    raise mismatch_error(
        f'{_FILE}: checkpoint does not fit {model_name} (img_size={config.img_size}, '
        f'num_classes={config.num_classes}).', missing, unexpected, bad_shapes,
        'Check --model matches the checkpoint; use --num-classes to drop the heads and '
        '--img-size to resample the position embedding.')

  if drop_heads:
    # Fresh heads for the new class count, initialised as in training (the model's dense_init
    # kernels, zero biases). Only the heads: compiling a whole-model init just for them costs
    # seconds to minutes of XLA time on CPU (one threefry per parameter).
    for i, k in enumerate(sorted(heads)):
      shape = expected[k].shape
      found[k] = (np.asarray(dense_init(jax.random.key(i), shape, jnp.float32))
                  if k[-1] == 'kernel' else np.zeros(shape, np.float32))
  return flax.traverse_util.unflatten_dict(found)


def load_torch_checkpoint(path: str, model_name: str, **overrides: Any) -> Dict[str, Any]:
  """Reads an official PyTorch checkpoint file and returns Flax variables.

  Returns `{'params': ..., 'batch_stats': ...}` (NumPy float32) for
  `create_model(model_name, **overrides)`; `num_classes` and `img_size` default to the
  checkpoint's. Raises CheckpointMismatchError on missing/unexpected keys or shape mismatches.
  """
  return convert_state_dict(extract_state_dict(_torch_load(path)), model_name, **overrides)


def checkpoint_overrides(variables: Mapping[str, Any], model_name: str) -> Dict[str, int]:
  """The num_classes and img_size that converted `variables` were built for."""
  params = variables['params']
  n = params['pos_embed'].shape[1] - 1
  patch = get_config(model_name).patch_size
  grid = int(round(np.sqrt(n)))
  return {'num_classes': int(params['head']['kernel'].shape[1]), 'img_size': grid * patch}


def adapt_variables(variables: Mapping[str, Any], target: Mapping[str, Any],
                    grid: Tuple[int, int], *, source: str = 'checkpoint',
                    head_names: Sequence[str] = HEAD_KEYS) -> Tuple[Dict[str, Any], list]:
  """Fits restored Flax `variables` to a model whose variables have the shapes of `target`.

  A position embedding of another grid is resampled to `grid` (bicubic, cls kept); heads of
  another class count (`head_names`: the model's `config.head_names`, LV-ViT's `head` and
  `aux_head` by default) are left out, for the caller to keep freshly initialised ones.
  Anything else that differs (a missing or extra variable, another shape) raises
  `CheckpointMismatchError` listing all of it.

  Returns:
    (the variables to load, nested like `target` but without dropped heads; the '/'-joined
    names of the dropped variables).
  """
  have = flax.traverse_util.flatten_dict(dict(variables))
  want = flax.traverse_util.flatten_dict(dict(target))
  heads_differ = any(k[1] in head_names and k in have and np.shape(have[k]) != np.shape(want[k])
                     for k in want if len(k) > 1)
  out, dropped, bad = {}, [], []
  for key, spec in want.items():
    if key not in have:
      continue
    value = np.asarray(have[key])
    if (key[-1] == 'pos_embed' and value.ndim == 3 and value.shape != tuple(spec.shape)
        and value.shape[-1] == spec.shape[-1]):
      value = resample_pos_embed(value, grid)
    if heads_differ and len(key) > 1 and key[1] in head_names:
      dropped.append('/'.join(key))
      continue
    if value.shape != tuple(spec.shape):
      bad.append(f'{"/".join(key)}: {source} {value.shape} vs model {tuple(spec.shape)}')
      continue
    out[key] = value
  missing = sorted('/'.join(k) for k in want if k not in have)
  unexpected = sorted('/'.join(k) for k in have if k not in want)
  if missing or unexpected or bad:
    lines = [f'{_FILE}: {source} does not fit the model.']
    for what, items in (('missing in the checkpoint', missing), ('not in the model', unexpected),
                        ('shape mismatches', bad)):
      if items:
        lines.append(f'{what} ({len(items)}): {items[:20]}{" ..." if len(items) > 20 else ""}')
    lines.append('Check that the checkpoint is of the configured model (config.model and '
                 'config.model_overrides); img_size and num_classes may differ.')
    raise CheckpointMismatchError('\n'.join(lines))
  return flax.traverse_util.unflatten_dict(out), dropped
