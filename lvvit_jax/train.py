"""The trainer: any model of the registry (LV-ViT with token labeling, NFNets) on a
('data', 'fsdp') mesh, with Orbax checkpoints.

    python main.py --config configs/lvvit.py:variant=s --workdir W          # train (and eval)
    python main.py --config configs/lvvit.py:variant=s --config.mode=eval \\
        --config.init_from=CKPT --workdir W                                 # evaluate
    python main.py --config configs/nfnet.py:variant=f0 --workdir W         # NFNet-F0

The model, its eval size, the objective and the optimizer come from the config through
`lvvit_jax/recipe.py`. Top to bottom: config checks, mesh, input, model and sharded init, the
update step, checkpoint/resume, evaluation, the loop. No Trainer class: `train_and_evaluate`
reads as the run goes. The update step is a pure function `(state, batch, rng) -> (state, metrics)`,
jitted with explicit shardings and the state donated; metrics stay on the devices until a log
step; the next batch is sent to the devices while the current step runs.

Importing this module needs neither TensorFlow nor PyTorch (the input pipeline and clu's
writers are imported when a run starts), so benchmarks can build the same step on a lean
accelerator image.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import time
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

from absl import logging
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from lvvit_jax import augment as device_augment
from lvvit_jax import checkpoints
from lvvit_jax import evaluate as evaluate_lib
from lvvit_jax import optim
from lvvit_jax import sharding
from lvvit_jax import token_labeling
from lvvit_jax.models import convert
# The config's pieces (re-exported: `train.build_model` etc. are the trainer's API).
from lvvit_jax.recipe import at_eval_size
from lvvit_jax.recipe import build_eval_model
from lvvit_jax.recipe import build_model
from lvvit_jax.recipe import check_eval_model
from lvvit_jax.recipe import check_model_settings
from lvvit_jax.recipe import compute_dtype
from lvvit_jax.recipe import make_optimizer
from lvvit_jax.recipe import make_schedule
from lvvit_jax.recipe import objective_config
from lvvit_jax.token_labeling import objective

_FILE = 'lvvit_jax/train.py'


# ------------------------------------------------------------------------------------------------
# Config (the model, objective and optimizer: `lvvit_jax/recipe.py`).


def data_dir(config: ml_collections.ConfigDict, workdir: str, source: str) -> Optional[str]:
  """config.data.data_dir; the bundled digits default to WORKDIR/data."""
  if config.data.data_dir:
    return config.data.data_dir
  if source == 'digits' or source.startswith('digits:'):
    return os.path.join(workdir, 'data')
  return None


def num_streams(config: ml_collections.ConfigDict) -> int:
  """Data streams of the global batch (default: one per process); see `TrainInput`."""
  streams = config.data.num_streams or jax.process_count()
  if streams % jax.process_count():
    raise ValueError(f'{_FILE}: config.data.num_streams={streams} must be a multiple of the '
                     f'{jax.process_count()} processes (each process reads whole streams).')
  if config.batch_size % streams:
    raise ValueError(f'{_FILE}: config.batch_size={config.batch_size} is not divisible by '
                     f'config.data.num_streams={streams}; use a multiple of {streams}.')
  return streams


# ------------------------------------------------------------------------------------------------
# Input.


def pipeline_config(config: ml_collections.ConfigDict, workdir: str, *, source: str, split: str,
                    batch_size: int, stream: int, num_streams_: int, train: bool,
                    score_maps_dir: Optional[str] = None, label_feature: str = 'label',
                    crop_pct: float = 0.9, image_size: Optional[int] = None):
  """The `PipelineConfig` of one data stream (train) or of this process (eval, at
  `image_size`; default config.img_size)."""
  from lvvit_jax.data import augment as host_augment  # pylint: disable=g-import-not-at-top  (TF)
  from lvvit_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  # The host's part of config.aug (crop and resize); the rest: `device_augment_config`.
  aug = host_augment.AugmentConfig(image_size=config.img_size, scale=tuple(config.aug.scale),
                                   ratio=tuple(config.aug.ratio),
                                   resize=config.aug.resize)
  d = config.data
  return pipeline.PipelineConfig(
      source=source, split=split, data_dir=data_dir(config, workdir, source),
      score_maps_dir=score_maps_dir if train else None, batch_size=batch_size,
      image_size=image_size or config.img_size, crop_pct=crop_pct, augment=aug,
      seed=config.seed, shuffle_buffer=d.shuffle_buffer, cycle_length=d.cycle_length,
      num_parallel_calls=d.num_parallel_calls, threadpool_size=d.threadpool_size,
      prefetch=d.prefetch, autotune=d.autotune, process_index=stream, process_count=num_streams_,
      on_corrupt=d.on_corrupt, label_feature=label_feature)


def device_augment_config(config: ml_collections.ConfigDict):
  """The accelerator's part of config.aug (flip, RandAugment, erasing, normalisation).

  The train step applies it to the pipeline's uint8 crops (`lvvit_jax.augment.augment_batch`).
  """
  a = config.aug
  return device_augment.DeviceAugmentConfig(
      hflip=a.hflip, randaug_num_ops=a.randaug_num_ops, randaug_magnitude=a.randaug_magnitude,
      randaug_mstd=a.randaug_mstd, randaug_prob=a.randaug_prob, erase_prob=a.erase_prob)


def prepare_builtin_data(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes the bundled digits once (process 0) before any process reads them."""
  if not any(s == 'digits' or s.startswith('digits:')
             for s in [config.data.source] + [e.source for e in config.evals.values()]):
    return
  from lvvit_jax.data import digits  # pylint: disable=g-import-not-at-top
  source = config.data.source if config.data.source.startswith('digits') else 'digits'
  if jax.process_index() == 0:
    digits.ensure(data_dir(config, workdir, source), digits.parse(source))
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices('lvvit_jax: bundled data written')


class TrainInput:
  """This process's part of the global train batch, with the input positions behind it.

  The global batch is split into `num_streams` data streams, each a train iterator over its
  own shards (stream s of S reads shards s, s+S, ...; S defaults to the process count).
  Process p of P reads streams p*S/P ... (p+1)*S/P - 1 and concatenates their batches, so the
  global batch (and every example's augmentation) depends on S, not on how many processes
  read it: the same run on 1 or 2 processes sees the same data. `next()` returns
  (host batch, {stream: position after this batch}).
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, streams: int,
               states: Optional[Mapping[int, Mapping[str, int]]] = None):
    from lvvit_jax.data import pipeline  # pylint: disable=g-import-not-at-top  (TensorFlow)
    p, n = jax.process_index(), jax.process_count()
    self.streams = list(range(p * streams // n, (p + 1) * streams // n))
    per_stream = config.batch_size // streams
    # config.data.log_keys (debugging): every example's key, one line each, per process.
    self.keys_file = (os.path.join(workdir, 'keys', f'process_{p}.txt')
                      if config.data.get('log_keys') else None)
    self.iterators = {}
    for s in self.streams:
      cfg = pipeline_config(config, workdir, source=config.data.source,
                            split=config.data.train_split, batch_size=per_stream, stream=s,
                            num_streams_=streams, train=True,
                            score_maps_dir=config.data.score_maps_dir)
      cfg = dataclasses.replace(cfg, include_keys=self.keys_file is not None)
      self.iterators[s] = pipeline.make_train_iterator(cfg, (states or {}).get(s))

  def __iter__(self) -> 'TrainInput':
    return self

  def __next__(self) -> Tuple[Dict[str, np.ndarray], Dict[int, Dict[str, int]]]:
    parts = [next(self.iterators[s]) for s in self.streams]
    batch = {k: np.concatenate([b[k] for b in parts]) for k in parts[0]}
    if self.keys_file:
      os.makedirs(os.path.dirname(self.keys_file), exist_ok=True)
      with open(self.keys_file, 'a') as f:
        f.writelines(k.decode() + '\n' for k in batch.pop('key'))
    return batch, {s: self.iterators[s].state() for s in self.streams}


def prefetch_to_mesh(batches: Iterator, mesh: jax.sharding.Mesh, size: int = 2) -> Iterator:
  """(global device batch, extras) one or more steps ahead: transfers overlap the step."""
  queue = collections.deque()

  def enqueue():
    host_batch, extras = next(batches)
    queue.append((sharding.host_to_global(host_batch, mesh), extras))

  for _ in range(size):
    enqueue()
  while queue:
    out = queue.popleft()
    try:
      enqueue()
    except StopIteration:
      pass
    yield out


def train_source_info(config: ml_collections.ConfigDict, workdir: str):
  """(examples in the train split, its number of classes), with the start-up checks."""
  from lvvit_jax.data import score_maps  # pylint: disable=g-import-not-at-top  (TensorFlow)
  from lvvit_jax.data import sources  # pylint: disable=g-import-not-at-top
  d = config.data
  src = sources.get_source(d.source, d.train_split, data_dir(config, workdir, d.source))
  if src.num_classes and src.num_classes != config.num_classes:
    raise ValueError(f'{_FILE}: config.num_classes={config.num_classes} but {d.source} has '
                     f'{src.num_classes} classes; set --config.num_classes={src.num_classes}.')
  if d.score_maps_dir:
    manifest = score_maps.read_manifest(d.score_maps_dir)
    where = os.path.join(d.score_maps_dir, score_maps.MANIFEST_NAME)
    if manifest.num_classes != config.num_classes:
      raise ValueError(f'{_FILE}: {where} holds maps over {manifest.num_classes} classes but '
                       f'config.num_classes={config.num_classes}; point '
                       'config.data.score_maps_dir at maps of this dataset.')
    if d.score_maps_grid and tuple(manifest.grid) != tuple(d.score_maps_grid):
      raise ValueError(f'{_FILE}: {where} holds {manifest.grid[0]}x{manifest.grid[1]} maps but '
                       f'config.data.score_maps_grid={tuple(d.score_maps_grid)}; point '
                       'config.data.score_maps_dir at the intended maps or change the setting.')
  if len(src.shards) < num_streams(config):
    raise ValueError(f'{_FILE}: {d.source} split {d.train_split!r} has {len(src.shards)} shards '
                     f'but the run reads {num_streams(config)} data streams (processes); each '
                     'needs at least one shard: rewrite the data with more shards.')
  return src.num_examples


# ------------------------------------------------------------------------------------------------
# Model and sharded init.


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training (the rng is kept beside it)."""
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  ema_params: Any
  ema_batch_stats: Any


def init_train_state(model, tx: optax.GradientTransformation, rng: jax.Array) -> TrainState:
  """A fresh TrainState (traced under `jax.eval_shape` and a jitted init with out_shardings)."""
  size = model.config.img_size
  variables = model.init({'params': rng}, jnp.zeros((1, size, size, 3), jnp.float32))
  params = variables['params']
  batch_stats = variables.get('batch_stats', {})
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                    opt_state=tx.init(params), ema_params=params, ema_batch_stats=batch_stats)


def state_shardings(abstract_state: TrainState, mesh: jax.sharding.Mesh, min_size: int):
  """NamedShardings of the state: the FSDP rule on every tensor (replicated when fsdp = 1)."""
  return sharding.tree_shardings(abstract_state, mesh, min_size)


# ------------------------------------------------------------------------------------------------
# The update step.


def _micro_batches(x: jax.Array, k: int) -> jax.Array:
  """(B, ...) -> (k, B/k, ...): micro-batch j holds rows j, j+k, ...; each device keeps its rows."""
  return jnp.swapaxes(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 0, 1)


def make_update_step(model, tx: optax.GradientTransformation, schedule,
                     cfg: objective.ObjectiveConfig, *, ema_decay: float = 0.99992,
                     ema_warmup: bool = False, grad_accum_steps: int = 1, augment=None,
                     teacher=None):
  """The pure update step `(state, batch, rng) -> (state, metrics)`.

  A batch from the input pipeline (uint8 `image` with `aug_seed`) is first augmented here, per
  micro-batch, by `lvvit_jax.augment.augment_batch` with `augment` (a DeviceAugmentConfig; None:
  the recipe's defaults): flip, RandAugment, normalisation, erasing, composed into
  `label_affine`. A batch without `aug_seed` is used as it is (normalised float images).
  Forward in the model's compute dtype, loss in float32 (`objective.training_loss`), gradients
  accumulated over `grad_accum_steps` micro-batches (a scan; one optimizer update per step),
  the optimizer `tx` (its schedule gives the logged lr), EMA of params and batch statistics
  (`optim.ema_decay_at`: with `ema_warmup` the decay ramps up as TF1's). `rng` is the run's
  key; the step folds in its own number, and random bits depend only on an example's row in
  the global batch (the augmentation's only on the example's `aug_seed`), so the result does
  not depend on how the batch is split across devices. `teacher` (`make_online_teacher`), a
  function of the augmented images and their `label_affine` to a teacher's dense logits, makes
  the targets online: the teacher's on each crop instead of the score maps' or the labels.
  """
  augment = augment or device_augment.DeviceAugmentConfig()

  def loss_fn(params, batch_stats, batch, rng):
    if 'aug_seed' in batch:
      batch = dict(batch)
      image, affine = device_augment.augment_batch(
          batch.pop('image'), batch.pop('aug_seed'), batch['label_affine'], augment,
          getattr(model, 'dtype', jnp.float32))
      batch.update(image=image, label_affine=affine)
    teacher_logits = (None if teacher is None
                      else teacher(batch['image'], batch['label_affine']))
    return objective.training_loss(model, params, batch_stats, batch, rng, cfg,
                                   teacher_logits=teacher_logits)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def update_step(state: TrainState, batch: Mapping[str, jax.Array], rng: jax.Array):
    rng = jax.random.fold_in(rng, state.step)
    if grad_accum_steps == 1:
      (loss, (batch_stats, parts)), grads = grad_fn(state.params, state.batch_stats, batch, rng)
    else:
      micro = jax.tree.map(lambda x: _micro_batches(x, grad_accum_steps), dict(batch))

      def accumulate(carry, xs):
        grads_sum, batch_stats = carry
        mb, i = xs
        (loss, (batch_stats, parts)), grads = grad_fn(state.params, batch_stats, mb,
                                                      jax.random.fold_in(rng, i))
        return (jax.tree.map(jnp.add, grads_sum, grads), batch_stats), (loss, parts)

      zeros = jax.tree.map(jnp.zeros_like, state.params)
      (grads, batch_stats), (losses, parts) = jax.lax.scan(
          accumulate, (zeros, state.batch_stats), (micro, jnp.arange(grad_accum_steps)))
      grads = jax.tree.map(lambda g: g / grad_accum_steps, grads)
      loss, parts = jnp.mean(losses), jax.tree.map(jnp.mean, parts)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = optim.ema_decay_at(state.step, ema_decay, ema_warmup)
    new_state = state.replace(
        step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state,
        ema_params=optim.ema_update(state.ema_params, params, decay),
        ema_batch_stats=optim.ema_update(state.ema_batch_stats, batch_stats, decay))
    metrics = {'loss': loss, 'loss_cls': parts['cls'], 'loss_dense': parts['dense'],
               'grad_norm': optax.global_norm(grads), 'lr': schedule(state.step)}
    return new_state, metrics

  return update_step


ONLINE_VIEWS = ('crop', 'in_place')


def make_online_teacher(config: ml_collections.ConfigDict):
  """`(images (B, S, S, 3), label_affine (B, 2, 3)) -> dense logits (B, h, w, K)` of
  `config.online_teacher`, or None.

  The teacher (a trainer workdir or converted checkpoint; `config.online_teacher_ema` picks a
  workdir's EMA or raw weights) runs on the step's augmented images, resized to its own input
  size when that differs (`config.online_teacher_view='crop'`, the default), or on each crop put
  back in place at the source's scale, everything around it masked, its logits pooled over
  the crop as a stored map's (`'in_place'`, an ablation: `token_labeling.online`). Its variables
  are host arrays closed over, so they are constants of the compiled step, the same on every
  device and process: meant for small teachers (the demo's has 0.3M parameters); a large one
  labels once with `labelgen generate` instead.
  """
  path = config.get('online_teacher')
  if not path:
    return None
  view = config.get('online_teacher_view', 'crop')
  if view not in ONLINE_VIEWS:
    raise ValueError(f'{_FILE}: config.online_teacher_view={view!r}; use one of {ONLINE_VIEWS}.')
  if config.data.score_maps_dir:
    raise ValueError(f'{_FILE}: config.online_teacher={path!r} and config.data.score_maps_dir='
                     f'{config.data.score_maps_dir!r} both give targets; set one of them.')
  from labelgen import teacher as teacher_lib  # pylint: disable=g-import-not-at-top
  try:
    teacher = teacher_lib.load_teacher(path, ema=config.online_teacher_ema)
  except FileNotFoundError as e:
    raise FileNotFoundError(f'config.online_teacher: {e}') from e
  if teacher.num_classes != config.num_classes:
    raise ValueError(f'{_FILE}: config.online_teacher={path!r} predicts {teacher.num_classes} '
                     f'classes, config.num_classes is {config.num_classes}; use a teacher of '
                     'the same classes.')
  dense_logits = teacher_dense_logits(teacher)
  if view == 'crop':
    return lambda images, label_affine: dense_logits(images)

  def in_place(images, label_affine):
    canvas = token_labeling.in_place_canvas(images, label_affine, teacher.size)
    return token_labeling.in_place_logits(dense_logits(canvas), label_affine)

  return in_place


def teacher_dense_logits(teacher):
  """`images -> (B, h, w, K)` of a restored `labelgen.teacher.Teacher` (float32 host
  variables, constants under jit; a jax.Array spanning other processes could not be closed
  over); images of another size are resized to the teacher's first."""
  variables = jax.tree.map(lambda v: np.asarray(v, np.float32), dict(teacher.variables))
  size = teacher.size

  def dense_logits(images: jax.Array) -> jax.Array:
    if images.shape[1:3] != (size, size):
      images = jax.image.resize(images, (images.shape[0], size, size, images.shape[3]),
                                'linear')
    return teacher.model.apply(variables, images.astype(jnp.float32), method='dense_logits')

  return dense_logits


def jit_update_step(update_step, shardings: TrainState, mesh: jax.sharding.Mesh):
  """`update_step` jitted with the state's shardings, batch sharding, and the state donated."""
  repl = sharding.replicated(mesh)
  return sharding.AlignedJit(
      jax.jit(update_step, in_shardings=(shardings, sharding.batch_sharding(mesh), repl),
              out_shardings=(shardings, repl), donate_argnums=(0,)), 'update')


# ------------------------------------------------------------------------------------------------
# Checkpoint and resume.


def run_description(config: ml_collections.ConfigDict, model, streams: int,
                    mesh: jax.sharding.Mesh) -> Dict[str, Any]:
  """What a checkpoint belongs to: checked when a run resumes from its workdir."""
  # As its JSON will read back (tuple fields, e.g. an NFNet's depths, become lists).
  model_config = json.loads(json.dumps(dataclasses.asdict(model.config)))
  data = {'source': config.data.source, 'split': config.data.train_split,
          'score_maps_dir': config.data.score_maps_dir or '', 'seed': config.seed,
          'num_streams': streams}
  if config.get('online_teacher'):  # (absent otherwise: earlier checkpoints still resume)
    data['online_teacher'] = config.online_teacher
    if config.get('online_teacher_view', 'crop') != 'crop':
      data['online_teacher_view'] = config.online_teacher_view
  return {
      'model': config.model, 'model_config': model_config,
      'data': data,
      'batch_size': config.batch_size,
      'mesh': {'data': mesh.shape['data'], 'fsdp': mesh.shape['fsdp'],
               'processes': jax.process_count()},
  }


def data_positions(items: Mapping[int, Mapping[str, Any]], streams: int,
                   where: str) -> Dict[int, Dict[str, int]]:
  """The per-stream input positions of a checkpoint's data item (written by every process)."""
  positions = {int(s): dict(v) for item in items.values() for s, v in item['streams'].items()}
  if sorted(positions) != list(range(streams)):
    raise checkpoints.RunMismatchError(
        f'{_FILE}: {where} holds input positions of streams {sorted(positions)}, not of the '
        f'{streams} streams of this run; resume with the data layout it was written with.')
  return positions


def _with_tuples(described: Mapping[str, Any]) -> Dict[str, Any]:
  """A trainer checkpoint's model description with JSON's lists as the config's tuples."""
  return dict(described, model_config={k: tuple(v) if isinstance(v, list) else v
                                       for k, v in described['model_config'].items()})


def load_init(config: ml_collections.ConfigDict, model, abstract: TrainState, *, ema: bool
              ) -> Tuple[Dict[str, Any], List[str]]:
  """config.init_from's variables fitted to `model` (see `checkpoints.load_model_variables`)."""
  variables, described = checkpoints.load_model_variables(config.init_from, ema=ema)
  described = _with_tuples(described)
  checkpoints.check_same_architecture(described, config.model, model.config,
                                      setting=f'config.init_from={config.init_from}')
  target = {'params': abstract.params, 'batch_stats': abstract.batch_stats}
  return convert.adapt_variables(variables, target, model.config.grid,
                                 source=f'config.init_from={config.init_from}',
                                 head_names=model.config.head_names)


def apply_init(state: TrainState, variables: Mapping[str, Any], shardings: TrainState
               ) -> TrainState:
  """The state with loaded variables in place (and in its EMA), keeping what they lack."""
  def merged(current, loaded, target_sharding):
    flat = flax.traverse_util.flatten_dict(current)
    new = flax.traverse_util.flatten_dict(loaded)
    shard = flax.traverse_util.flatten_dict(target_sharding)
    for k, v in new.items():
      flat[k] = sharding.put(np.asarray(v, flat[k].dtype), shard[k])
    return flax.traverse_util.unflatten_dict(flat)

  params = merged(state.params, variables.get('params', {}), shardings.params)
  batch_stats = merged(state.batch_stats, variables.get('batch_stats', {}), shardings.batch_stats)
  # The EMA gets buffers of its own: the update step donates the state, and one buffer
  # donated twice is undefined behaviour.
  copy = lambda tree: jax.tree.map(jnp.copy, tree)  # noqa: E731
  return state.replace(params=params, batch_stats=batch_stats, ema_params=copy(params),
                       ema_batch_stats=copy(batch_stats))


class PendingMetrics:
  """Step metrics still on the devices; fetched (and checked for NaN/inf) only when needed."""

  def __init__(self):
    self.rows: List[Tuple[int, Any]] = []
    self.last_fetched_step = 0

  def add(self, step: int, metrics: Any) -> None:
    self.rows.append((step, metrics))

  def fetch(self) -> None:
    """Brings every pending row to the host; raises FloatingPointError at a non-finite loss."""
    self.rows = [(s, sharding.fetch(m)) for s, m in self.rows]
    for s, m in self.rows:
      if not np.isfinite(m['loss']):
        raise FloatingPointError(
            f'{_FILE}: the loss is {m["loss"]} at step {s}; training stops without saving it '
            '(the latest checkpoint is the last good one). Lower config.lr, set '
            'config.grad_clip_norm, or check the input.')
    if self.rows:
      self.last_fetched_step = self.rows[-1][0]

  def pop_mean(self) -> Dict[str, float]:
    """Fetches, averages and clears the pending rows (lr: the last one's)."""
    self.fetch()
    rows = [m for _, m in self.rows]
    out = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    out['lr'] = float(rows[-1]['lr'])
    self.rows = []
    return out


# ------------------------------------------------------------------------------------------------
# Evaluation.


@dataclasses.dataclass
class EvalSplit:
  name: str
  iterator: Any
  num_batches: int


def make_eval_splits(config: ml_collections.ConfigDict, workdir: str, model) -> List[EvalSplit]:
  """The configured eval splits at the size of `model` (the eval model) and its crop_pct
  (config.data.crop_pct overrides it); optional ones (ReaL, V2) are skipped when not prepared."""
  from lvvit_jax.data import pipeline  # pylint: disable=g-import-not-at-top  (TensorFlow)
  batch = config.data.eval_batch_size or config.batch_size
  per_process = batch // jax.process_count()
  crop_pct = config.data.crop_pct or model.config.crop_pct
  out = []
  for name, e in sorted(config.evals.items()):
    cfg = pipeline_config(config, workdir, source=e.source, split=e.split,
                          batch_size=per_process, stream=jax.process_index(),
                          num_streams_=jax.process_count(), train=False,
                          label_feature=e.get('label_feature', 'label'), crop_pct=crop_pct,
                          image_size=model.config.img_size)
    try:
      it = pipeline.make_eval_iterator(cfg)
    except ValueError as err:
      if e.get('optional', False):
        logging.info('eval split %s (%s %s) is not available, skipped: %s', name, e.source,
                     e.split, str(err).splitlines()[0])
        continue
      raise
    out.append(EvalSplit(name, it, it.num_batches))
  return out


def make_predict(model, var_shardings: Mapping[str, Any], mesh: jax.sharding.Mesh):
  """The jitted eval step over variables `{'params', 'batch_stats'}` placed as given.

  uint8 images (the eval pipeline's) are normalised on the device with the ImageNet mean/std;
  a position embedding of the training size is resampled to the eval model's (`at_eval_size`).
  """
  def predict(variables, images):
    if images.dtype == jnp.uint8:
      images = device_augment.normalize(images, dtype=getattr(model, 'dtype', jnp.float32))
    return model.apply(at_eval_size(variables, model), images)

  eval_step = evaluate_lib.make_eval_step(predict)
  repl = sharding.replicated(mesh)
  return sharding.AlignedJit(
      jax.jit(eval_step, in_shardings=(var_shardings, sharding.batch_sharding(mesh), repl),
              out_shardings=repl), 'eval')


def run_evals(eval_step, variables, splits: Sequence[EvalSplit], mesh) -> Dict[str, float]:
  out = {}
  for split in splits:
    result = evaluate_lib.evaluate(eval_step, variables, iter(split.iterator), mesh,
                                   num_batches=split.num_batches, desc=f'eval {split.name}')
    out[f'eval/{split.name}/top1'] = result['top1']
    out[f'eval/{split.name}/top5'] = result['top5']
    out[f'eval/{split.name}/count'] = result['count']
    logging.info('eval %s: top-1 %.4f, top-5 %.4f over %d examples', split.name, result['top1'],
                 result['top5'], result['count'])
  return out


def eval_variables(state: TrainState, ema: bool) -> Dict[str, Any]:
  if ema:
    return {'params': state.ema_params, 'batch_stats': state.ema_batch_stats}
  return {'params': state.params, 'batch_stats': state.batch_stats}


# ------------------------------------------------------------------------------------------------
# The loop.


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, float]:
  """Trains (resuming from WORKDIR/checkpoints if there are any) and evaluates; returns the
  last eval metrics."""
  from clu import periodic_actions  # pylint: disable=g-import-not-at-top  (TensorFlow)
  from lvvit_jax import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  from lvvit_jax import preemption  # pylint: disable=g-import-not-at-top

  # Checks and mesh: everything that can be wrong fails here, before any compile.
  os.makedirs(workdir, exist_ok=True)
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
  per_process_batch = sharding.check_global_batch(config.batch_size, mesh, jax.process_count())
  if config.grad_accum_steps < 1 or (config.batch_size // mesh.size) % config.grad_accum_steps:
    raise ValueError(f'{_FILE}: config.grad_accum_steps={config.grad_accum_steps} must divide '
                     f'the per-device batch {config.batch_size // mesh.size}.')
  streams = num_streams(config)
  model, eval_model = build_model(config), build_eval_model(config)
  check_model_settings(config, model)
  check_eval_model(config, model, eval_model)
  online_teacher = make_online_teacher(config)  # None without config.online_teacher
  if config.get('init_from_required') and not config.init_from:
    raise ValueError(f'{_FILE}: this recipe starts from a checkpoint: set --config.init_from to '
                     'a converted checkpoint (python -m lvvit_jax.convert) or a trainer workdir.')
  prepare_builtin_data(config, workdir)
  num_examples = train_source_info(config, workdir)
  steps_per_epoch = max(1, num_examples // config.batch_size)
  schedule, total_steps = make_schedule(config, steps_per_epoch)
  rng = jax.random.key(config.seed)
  init_rng, rng = jax.random.split(rng)
  abstract_params = jax.eval_shape(
      lambda r: model.init({'params': r}, jnp.zeros((1, config.img_size, config.img_size, 3))),
      init_rng)['params']
  tx = make_optimizer(config, abstract_params, schedule)
  abstract = jax.eval_shape(lambda r: init_train_state(model, tx, r), init_rng)
  shardings = state_shardings(abstract, mesh, config.mesh.fsdp_min_size)
  run = run_description(config, model, streams, mesh)

  ckpts = checkpoints.TrainCheckpoints(workdir, keep=config.keep, keep_best=config.keep_best)
  latest = ckpts.latest_step()
  positions = None
  if latest is not None:
    checkpoints.check_run(ckpts.run_description(latest), run,
                          where=f'{ckpts.directory}/{latest}')
    positions = data_positions(ckpts.restore_data(latest), streams,
                               f'{ckpts.directory}/{latest}')
  train_input = TrainInput(config, workdir, streams, positions)
  splits = make_eval_splits(config, workdir, eval_model)
  init_variables = None
  if latest is None and config.init_from:
    init_variables, dropped = load_init(config, model, abstract, ema=config.init_ema)
    if dropped:
      logging.info('init_from %s: freshly initialised %s (other class count).',
                   config.init_from, dropped)

  # State: resumed from the workdir, or initialised on the mesh (never whole on one host).
  target = {'state': jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                  abstract, shardings),
            'rng': jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=sharding.replicated(mesh))}
  if latest is not None:
    restored = ckpts.restore_state(latest, target)
    state, rng = restored['state'], jax.random.wrap_key_data(restored['rng'])
    logging.info('Resumed from %s/%d (mesh %s).', ckpts.directory, latest, dict(mesh.shape))
  else:
    state = jax.jit(lambda r: init_train_state(model, tx, r), out_shardings=shardings)(init_rng)
    if init_variables is not None:
      state = apply_init(state, init_variables, shardings)
  rng = jax.random.wrap_key_data(
      sharding.put(jax.random.key_data(rng), sharding.replicated(mesh)))
  start_step = int(sharding.fetch(state.step))
  logging.info('Training %s (%s, %s) at %d px (eval at %d) for %d steps from step %d: global '
               'batch %d (%d per process), %d examples/epoch, mesh %s, %d data streams.',
               config.model, compute_dtype(config), config.optimizer, config.img_size,
               eval_model.config.img_size, total_steps, start_step, config.batch_size,
               per_process_batch, num_examples, dict(mesh.shape), streams)

  update = jit_update_step(
      make_update_step(model, tx, schedule, objective_config(config),
                       ema_decay=config.ema_decay, ema_warmup=config.ema_warmup,
                       grad_accum_steps=config.grad_accum_steps,
                       augment=device_augment_config(config), teacher=online_teacher),
      shardings, mesh)
  eval_step = make_predict(
      eval_model, {'params': shardings.params, 'batch_stats': shardings.batch_stats}, mesh)
  log = metrics_lib.MetricsLog(workdir)
  hooks = []
  if jax.process_index() == 0:
    hooks.append(periodic_actions.ReportProgress(num_train_steps=total_steps, writer=log.writer,
                                                 every_steps=config.log_every))
    if config.profile:
      hooks.append(periodic_actions.Profile(logdir=workdir, num_profile_steps=5))
  watch = preemption.PreemptionWatch()
  eval_every = config.eval_every or steps_per_epoch
  pending = PendingMetrics()
  batches = prefetch_to_mesh(train_input, mesh)
  last_eval: Dict[str, float] = {}
  t0, steps_timed = time.perf_counter(), 0
  try:
    for step in range(start_step + 1, total_steps + 1):
      batch, positions = next(batches)
      with jax.profiler.StepTraceAnnotation('train', step_num=step):
        state, metrics = update(state, batch, rng)
      pending.add(step, metrics)
      steps_timed += 1
      for hook in hooks:
        hook(step)
      last = step == total_steps
      preempted = watch.reached(step)
      if step % config.log_every == 0 or last:
        scalars = pending.pop_mean()
        dt = time.perf_counter() - t0
        scalars.update(images_per_sec=config.batch_size * steps_timed / dt,
                       images_per_sec_per_device=config.batch_size * steps_timed / dt / mesh.size,
                       step_time=dt / steps_timed)
        log.write(step, scalars)
        logging.info('step %d: loss %.4f (cls %.4f, dense %.4f), lr %.3g, %.1f images/s', step,
                     scalars['loss'], scalars['loss_cls'], scalars['loss_dense'], scalars['lr'],
                     scalars['images_per_sec'])
        t0, steps_timed = time.perf_counter(), 0
      evaluated = None
      if splits and (step % eval_every == 0 or last):
        pending.fetch()
        evaluated = run_evals(eval_step, eval_variables(state, config.eval_ema), splits, mesh)
        log.write(step, evaluated)
        last_eval = evaluated
      if step % config.checkpoint_every == 0 or last or preempted or evaluated:
        pending.fetch()  # A non-finite loss raises before anything is saved.
        top1 = evaluated and evaluated.get(f'eval/{splits[0].name}/top1')
        ckpts.save(step, {'state': state, 'rng': jax.random.key_data(rng)},
                   {'streams': {str(s): p for s, p in positions.items()}}, run,
                   metrics={'top1': top1} if top1 is not None else None)
      if preempted:
        ckpts.wait()
        logging.warning('Preempted: saved the checkpoint of step %d in %s; exiting. Rerun the '
                        'same command to resume.', step, ckpts.directory)
        break
  finally:
    watch.close()
    ckpts.wait()
    ckpts.close()
    log.flush()
  return last_eval


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, float]:
  """`config.mode='eval'`: evaluates config.init_from (or WORKDIR's latest checkpoint)."""
  from lvvit_jax import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  os.makedirs(workdir, exist_ok=True)
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
  batch = config.data.eval_batch_size or config.batch_size
  sharding.check_global_batch(batch, mesh, jax.process_count(),
                              setting='config.data.eval_batch_size')
  model = build_eval_model(config)
  path = config.init_from or workdir
  prepare_builtin_data(config, workdir)
  splits = make_eval_splits(config, workdir, model)
  if not splits:
    raise ValueError(f'{_FILE}: no eval split is available; configure config.evals.')
  size = model.config.img_size
  abstract = jax.eval_shape(lambda r: model.init({'params': r}, jnp.zeros((1, size, size, 3))),
                            jax.random.key(0))
  abstract = {'params': abstract['params'], 'batch_stats': abstract.get('batch_stats', {})}
  variables, described = checkpoints.load_model_variables(path, ema=config.eval_ema)
  described = _with_tuples(described)
  checkpoints.check_same_architecture(described, config.model, model.config,
                                      setting=f'config.init_from={path}')
  variables, dropped = convert.adapt_variables(variables, abstract, model.config.grid,
                                               source=path, head_names=model.config.head_names)
  if dropped:
    raise ValueError(f'{_FILE}: {path} has heads for another class count than '
                     f'config.num_classes={config.num_classes}; set the class count it was '
                     'trained with.')
  shardings = sharding.tree_shardings(abstract, mesh, config.mesh.fsdp_min_size)
  variables = {k: variables.get(k, {}) for k in abstract}  # A model without batch_stats: {}.
  variables = jax.tree.map(lambda v, s: sharding.put(np.asarray(v, np.float32), s), variables,
                           shardings)
  eval_step = make_predict(model, shardings, mesh)
  results = run_evals(eval_step, variables, splits, mesh)
  log = metrics_lib.MetricsLog(workdir)
  log.write(0, results)
  log.flush()
  for name, value in results.items():
    print(f'{name}: {value:.4f}', flush=True)
  return results
