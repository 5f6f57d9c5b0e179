"""The teacher of `labelgen generate`: any zoo model, restored and run through the model contract.

`load_teacher` rebuilds the model a checkpoint describes at the run's input side
(`create_model(name, img_size=--size, ...)`; the config refuses a side the model cannot take)
and fits the checkpoint's variables to it (`convert.adapt_variables`: a position embedding is
resampled to the new grid, nothing else may differ). `make_dense_topk` is the step:
`model.apply(v, images, method='dense_logits')`, (B, h, w, K) float32, and its top-k at every
position. Nothing here knows a model family (`lvvit_jax/models/__init__.py`, the contract):
LV-ViT's dense logits are its aux head on the patch tokens, `vit_s`'s its class head on them,
an NFNet's its classifier at every position of the last feature map (SPEC section 2).

Finer maps (`stitch` n > 1, shift and stitch as in Long et al.'s FCN): the teacher runs on n x n
copies of each image translated by sub-stride shifts, and their maps interleave into one n times
finer per axis. Cell m of the fine grid is centred at (m + 1/2) * stride / n, where the plain
map's cell i is centred at (i + 1/2) * stride, so copy a sees the image moved by
stride * (2a + 1 - n) / (2n) pixels (edge pixels repeat at the border). The map still covers the
whole input (`map_box` unchanged) and the step costs n^2 forward passes.

Devices: data parallel over this process's devices; the forward pass and top-k are one jitted
function with explicit shardings (`device_step`), and `teacher_outputs` keeps the devices one
batch ahead of the host that writes the results.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any, Callable, Dict, Iterable, Iterator, Mapping, Optional, Tuple

import flax
import jax
import jax.numpy as jnp
import numpy as np

from labelgen.settings import GenerateError
from lvvit_jax import checkpoints
from lvvit_jax import sharding
from lvvit_jax.models import convert
from lvvit_jax.models import create_model

_FILE = 'labelgen/teacher.py'
Step = Callable[[Any, jax.Array], Dict[str, jax.Array]]


@dataclasses.dataclass(frozen=True)
class Teacher:
  """A restored teacher: the module, its variables (NumPy) and the manifest's description."""
  model: Any
  variables: Mapping[str, Any]
  description: Mapping[str, Any]
  stitch: int = 1

  @property
  def size(self) -> int:
    return self.model.config.img_size

  @property
  def grid(self) -> Tuple[int, int]:
    """The written map's (h, w): the model's grid, `stitch` times finer."""
    return tuple(g * self.stitch for g in self.model.config.grid)

  @property
  def num_classes(self) -> int:
    return self.model.config.num_classes


def weights_sha256(variables: Mapping[str, Any]) -> str:
  """Hex SHA-256 of every variable's name, shape, dtype and bytes (in name order)."""
  h = hashlib.sha256()
  for path, value in sorted(flax.traverse_util.flatten_dict(dict(variables)).items()):
    value = np.ascontiguousarray(value)
    h.update(f'{"/".join(path)}:{value.shape}:{value.dtype};'.encode())
    h.update(value.tobytes())
  return h.hexdigest()


def _build(name: str, fields: Dict[str, Any], trained_size: int, dtype: str,
           checkpoint: str) -> Any:
  """The module at fields['img_size']; a side the model cannot take is a --size error."""
  size = fields['img_size']
  try:
    model = create_model(name, dtype=dtype, **fields)
  except ValueError as e:
    if size == trained_size:
      raise  # the checkpoint's own description: not a --size problem
    raise GenerateError(f'{_FILE}: --size {size} does not fit the teacher {name} '
                        f'({checkpoint}, trained at {trained_size}): {e}') from None
  if min(model.config.grid) < 1:
    raise GenerateError(f'{_FILE}: --size {size} leaves the teacher {name} ({checkpoint}) an '
                        f'empty {model.config.grid} map; use a larger --size, e.g. its '
                        f'checkpoint\'s {trained_size}.')
  return model


def stitch_shifts(model: Any, stitch: int) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
  """The pixel shifts (rows, columns) of the `stitch` copies per axis (module docstring).

  Raises GenerateError when the model's stride (img_size / grid) does not split into whole
  pixels that way.
  """
  if stitch < 1:
    raise GenerateError(f'{_FILE}: --stitch {stitch} must be at least 1 (1: the plain map).')
  size, grid = model.config.img_size, tuple(model.config.grid)
  shifts = []
  for g in grid:
    stride = size // g
    twice = [stride * (2 * a + 1 - stitch) for a in range(stitch)]
    if size % g or any(t % (2 * stitch) for t in twice):
      raise GenerateError(f'{_FILE}: --stitch {stitch}: the teacher maps {size} px to {g} '
                          f'cells (stride {size / g:g}), which {stitch} shifts cannot split '
                          'into whole pixels; use a --stitch that divides the stride (2 for '
                          'strides that are multiples of 4), or 1.')
    shifts.append(tuple(t // (2 * stitch) for t in twice))
  return shifts[0], shifts[1]


def shift_images(images: jax.Array, dy: int, dx: int) -> jax.Array:
  """`out[:, y, x] = images[:, y + dy, x + dx]`, edge pixels repeated outside the image."""
  p = max(abs(dy), abs(dx))
  if not p:
    return images
  _, h, w, _ = images.shape
  padded = jnp.pad(images, ((0, 0), (p, p), (p, p), (0, 0)), mode='edge')
  return padded[:, p + dy:p + dy + h, p + dx:p + dx + w]


def stitched_dense_logits(model: Any, variables: Any, images: jax.Array,
                          stitch: int = 1) -> jax.Array:
  """(B, h * stitch, w * stitch, K) float32: `dense_logits` of the shifted copies, interleaved."""
  if stitch == 1:
    return model.apply(variables, images, method='dense_logits')
  rows, cols = stitch_shifts(model, stitch)
  copies = [shift_images(images, dy, dx) for dy in rows for dx in cols]
  logits = model.apply(variables, jnp.concatenate(copies), method='dense_logits')
  b = images.shape[0]
  _, h, w, k = logits.shape
  # (a, c, b, i, j) -> fine cell (i * n + a, j * n + c)
  logits = logits.reshape(stitch, stitch, b, h, w, k).transpose(2, 3, 0, 4, 1, 5)
  return logits.reshape(b, h * stitch, w * stitch, k)


def load_teacher(checkpoint: str, *, size: Optional[int] = None, ema: bool = True,
                 dtype: str = 'float32', stitch: int = 1) -> Teacher:
  """Restores a teacher from `checkpoint` at `size` (default: the size it was trained at).

  Args:
    checkpoint: a converted checkpoint, a trainer workdir or one of its step folders.
    size: input side; another than the checkpoint's resamples a position embedding.
    ema: for trainer checkpoints, the EMA weights (else the raw ones).
    dtype: compute dtype, 'float32' or 'bfloat16' (resolved, not 'auto').
    stitch: maps `stitch` times finer per axis from shifted copies (module docstring).
  """
  variables, described = checkpoints.load_model_variables(checkpoint, ema=ema)
  name = described['model']
  fields = dict(described['model_config'])
  trained_size = int(fields['img_size'])
  fields['img_size'] = int(size or trained_size)
  model = _build(name, fields, trained_size, dtype, checkpoint)
  stitch_shifts(model, stitch)  # a --stitch the model's stride cannot take fails here
  s = model.config.img_size
  target = jax.eval_shape(lambda: model.init({'params': jax.random.key(0)},
                                             jnp.zeros((1, s, s, 3), jnp.float32)))
  fitted, dropped = convert.adapt_variables(variables, target, model.config.grid,
                                            source=checkpoint,
                                            head_names=model.config.head_names)
  if dropped:  # Cannot happen with the checkpoint's own class count; guards a broken one.
    raise GenerateError(f'{_FILE}: {checkpoint}: its heads do not fit its own description '
                        f'({dropped}); the checkpoint is inconsistent, rewrite it.')
  fitted = {collection: fitted.get(collection, {}) for collection in target}
  description = {
      'checkpoint': os.path.abspath(checkpoint), 'model': name, 'size': s,
      'checkpoint_size': trained_size, 'dtype': dtype, 'ema': bool(ema),
      'weights_sha256': weights_sha256(variables)}
  if stitch > 1:  # (absent for plain maps, as in manifests written before the option)
    description['stitch'] = stitch
  return Teacher(model, fitted, description, stitch)


def make_dense_topk(model: Any, k: int, stitch: int = 1) -> Step:
  """`(variables, images (B, S, S, 3)) -> {'topk_logits', 'topk_idx', 'pred'}` (unjitted).

  topk_logits float16 and topk_idx int16, both (B, h, w, k) on the model's `config.grid`
  times `stitch` (row = y); pred int32 (B,): argmax of the dense logits averaged over positions.
  """
  def dense_topk(variables, images):
    logits = stitched_dense_logits(model, variables, images, stitch)  # (B, h, w, K) float32
    values, idx = jax.lax.top_k(logits, k)
    return {'topk_logits': values.astype(jnp.float16), 'topk_idx': idx.astype(jnp.int16),
            'pred': jnp.argmax(jnp.mean(logits, axis=(1, 2)), axis=-1).astype(jnp.int32)}
  return dense_topk


def device_step(teacher: Teacher, k: int, mesh: jax.sharding.Mesh) -> Tuple[Any, Step]:
  """(the variables replicated on `mesh`, the jitted dense top-k on batches sharded over it)."""
  variables = jax.device_put(
      jax.tree.map(lambda v: np.asarray(v, np.float32), dict(teacher.variables)),
      sharding.replicated(mesh))
  step = jax.jit(make_dense_topk(teacher.model, k, teacher.stitch),
                 in_shardings=(sharding.replicated(mesh), sharding.batch_sharding(mesh)),
                 out_shardings=sharding.batch_sharding(mesh))
  return variables, step


def teacher_outputs(step: Step, variables: Any, mesh: jax.sharding.Mesh,
                    batches: Iterable[Tuple[int, Dict[str, np.ndarray], int]]
                    ) -> Iterator[Tuple[int, Dict[str, np.ndarray], Dict[str, np.ndarray]]]:
  """(shard index, host rows, teacher outputs) per batch; the device runs one batch ahead.

  `batches` yields (shard index, batch with images padded to the step's size, real examples);
  rows and outputs keep the real examples only.
  """
  def fetched(item):
    i, batch, n, out = item
    rows = {k: batch[k][:n] for k in ('key', 'label', 'map_box', 'position')}
    return i, rows, {k: np.asarray(v)[:n] for k, v in out.items()}

  pending = None
  for i, batch, n in batches:
    images = sharding.host_to_global({'image': batch['image']}, mesh)['image']
    out = step(variables, images)  # dispatched asynchronously
    if pending is not None:
      yield fetched(pending)
    pending = (i, batch, n, out)
  if pending is not None:
    yield fetched(pending)
