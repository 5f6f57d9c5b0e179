"""Orbax checkpoints: model variables (the converter's) and the trainer's train state.

A variables checkpoint is a folder:
    DIR/variables/   Orbax StandardCheckpointer tree {'params': ..., 'batch_stats': ...}
    DIR/model.json   {"model": "lvvit_s", "overrides": {"num_classes": 1000, "img_size": 224}}
so that `create_model(meta['model'], **meta['overrides'])` rebuilds the module it belongs to.
The converter writes it; training and evaluation restore it (e.g. as an init checkpoint).

A train-state checkpoint (`TrainCheckpoints`, the trainer's) is a step folder of an Orbax
CheckpointManager in WORKDIR/checkpoints:
    <step>/state/   step, params, batch_stats, opt_state, EMA params and batch_stats, rng
                    (each process writes the shards it holds)
    <step>/data/    process_<i>.json: each process's input-pipeline positions
    <step>/run/     run.json: model name and architecture, data layout, mesh (checked on resume)
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

from absl import logging
from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp

from lvvit_jax.models import get_config

_FILE = 'lvvit_jax/checkpoints.py'

MODEL_FILE = 'model.json'
VARIABLES_DIR = 'variables'


def save_variables(directory: str, variables: Mapping[str, Any], model_name: str,
                   overrides: Optional[Mapping[str, Any]] = None) -> str:
  """Writes `variables` and the model description under `directory` (created; must not exist)."""
  directory = os.path.abspath(directory)
  if os.path.exists(os.path.join(directory, VARIABLES_DIR)):
    raise FileExistsError(
        f'{_FILE}: {directory}/{VARIABLES_DIR} already exists; choose a new '
        f'output directory or delete it.')
  os.makedirs(directory, exist_ok=True)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(directory, VARIABLES_DIR), dict(variables))
  checkpointer.wait_until_finished()
  with open(os.path.join(directory, MODEL_FILE), 'w') as f:
    json.dump({'model': model_name, 'overrides': dict(overrides or {})}, f, indent=2)
  return directory


def load_variables(directory: str, target: Any = None) -> Tuple[Dict[str, Any], Dict[str, Any]]:
  """Returns (variables, model description) of a folder written by `save_variables`.

  `target` (e.g. the `jax.eval_shape` of the model's init, possibly with shardings) restores
  straight into that structure and placement; without it arrays come back as written.
  """
  directory = os.path.abspath(directory)
  meta_path = os.path.join(directory, MODEL_FILE)
  if not os.path.exists(meta_path):
    raise FileNotFoundError(
        f'{_FILE}: {meta_path} not found; {directory} is not a variables '
        f'checkpoint (write one with `python -m lvvit_jax.convert`).')
  with open(meta_path) as f:
    meta = json.load(f)
  variables = ocp.StandardCheckpointer().restore(os.path.join(directory, VARIABLES_DIR), target)
  return variables, meta


# ------------------------------------------------------------------------------------------------
# Train-state checkpoints (the trainer's): WORKDIR/checkpoints/<step>/{state, data, run}.

STATE_ITEM = 'state'   # TrainState fields and the run's rng: every process writes its shards
DATA_ITEM = 'data'     # input positions: every process writes process_<i>.json
RUN_ITEM = 'run'       # what the run is (model, data layout, mesh): process 0 writes run.json


class ProcessJsonHandler(ocp.CheckpointHandler):
  """Each process writes (and every process can read) its own small JSON file.

  The trainer's input positions are per process (each reads its own shards), so unlike Orbax's
  JsonCheckpointHandler, which writes from the primary host only, every process writes
  `process_<index>.json`; `restore` returns all of them, keyed by process index.
  """

  def save(self, directory: epath.Path, args: 'ProcessJsonSave') -> None:
    directory = epath.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f'process_{jax.process_index()}.json'
    path.write_text(json.dumps(args.item, sort_keys=True))

  def restore(self, directory: epath.Path,
              args: Optional['ProcessJsonRestore'] = None) -> Dict[int, Any]:
    del args
    out = {}
    for path in sorted(epath.Path(directory).glob('process_*.json')):
      out[int(path.name[len('process_'):-len('.json')])] = json.loads(path.read_text())
    return out


@ocp.args.register_with_handler(ProcessJsonHandler, for_save=True)
@dataclasses.dataclass
class ProcessJsonSave(ocp.args.CheckpointArgs):
  item: Mapping[str, Any]


@ocp.args.register_with_handler(ProcessJsonHandler, for_restore=True)
@dataclasses.dataclass
class ProcessJsonRestore(ocp.args.CheckpointArgs):
  item: Optional[Any] = None


class RunMismatchError(ValueError):
  """The workdir's checkpoint belongs to another model or data layout than the config."""


class TrainCheckpoints:
  """The trainer's Orbax CheckpointManager in `WORKDIR/checkpoints`.

  Saves are asynchronous (the loop blocks only while device arrays are copied to host memory)
  and every process writes its own array shards and its own input positions; Orbax commits a
  step by renaming its temporary directory once every process is done, so a step directory
  that exists is complete. Keeps the last `keep` steps plus the best one by eval top-1.
  """

  def __init__(self, workdir: str, *, keep: int = 3, keep_best: bool = True,
               async_save: bool = True, read_only: bool = False):
    self.directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
    if keep < 1:
      raise ValueError(f'{_FILE}: config.keep={keep}: keep at least the latest checkpoint.')
    if not read_only:
      self._warn_incomplete()
    policies = [ocp.checkpoint_managers.LatestN(n=keep)]
    if keep_best:
      policies.append(ocp.checkpoint_managers.BestN(
          get_metric_fn=lambda m: m['top1'], n=1, keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
        enable_async_checkpointing=async_save, cleanup_tmp_directories=not read_only,
        create=not read_only, read_only=read_only)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={STATE_ITEM: ocp.PyTreeCheckpointHandler(),
                       DATA_ITEM: ProcessJsonHandler(),
                       RUN_ITEM: ocp.JsonCheckpointHandler()})

  def _warn_incomplete(self) -> None:
    """Names step directories a killed run left half-written (Orbax then removes them)."""
    if not os.path.isdir(self.directory):
      return
    for name in sorted(os.listdir(self.directory)):
      if ocp.path.step.TMP_DIR_SUFFIX in name:
        logging.warning('%s: %s/%s is an incomplete checkpoint (the run was killed while '
                        'saving it); it is ignored and removed, and the run resumes from the '
                        'latest complete step.', _FILE, self.directory, name)

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def all_steps(self) -> Sequence[int]:
    return self.manager.all_steps()

  def _restore(self, step: int, **items: ocp.args.CheckpointArgs) -> Any:
    return self.manager.restore(step, args=ocp.args.Composite(**items))

  def run_description(self, step: int) -> Dict[str, Any]:
    """The `run` item of a saved step (what the run that wrote it was)."""
    return self._restore(step, **{RUN_ITEM: ocp.args.JsonRestore()})[RUN_ITEM]

  def restore_data(self, step: int) -> Dict[int, Any]:
    """The input positions of a saved step, as written by each process (by process index)."""
    return self._restore(step, **{DATA_ITEM: ProcessJsonRestore()})[DATA_ITEM]

  def restore_state(self, step: int, target: Any) -> Any:
    """The state item restored into `target` (ShapeDtypeStructs with shardings: resharded)."""
    return self._restore(step, **{STATE_ITEM: ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target))}
    )[STATE_ITEM]

  def restore_numpy(self, step: int, keys: Sequence[str]) -> Dict[str, Any]:
    """Only the state's `keys` (e.g. 'ema_params'), as NumPy arrays on this host."""
    tree = self.manager.item_metadata(step)[STATE_ITEM].tree['state']
    target = {'state': {k: jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), tree[k])
                        for k in keys if k in tree}}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
    return self._restore(step, **{STATE_ITEM: ocp.args.PyTreeRestore(
        item=target, restore_args=restore_args, partial_restore=True)})[STATE_ITEM]['state']

  def save(self, step: int, state: Any, data: Mapping[str, Any], run: Mapping[str, Any],
           metrics: Optional[Mapping[str, float]] = None) -> None:
    """Starts an async save of `state` (a pytree of global arrays) at `step`."""
    self.manager.save(step, args=ocp.args.Composite(**{
        STATE_ITEM: ocp.args.PyTreeSave(state),
        DATA_ITEM: ProcessJsonSave(dict(data)),
        RUN_ITEM: ocp.args.JsonSave(dict(run)),
    }), metrics=dict(metrics) if metrics else None, force=True)

  def wait(self) -> None:
    """Blocks until the last async save is committed."""
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


# ------------------------------------------------------------------------------------------------
# Checks and loading for resume, init_from and eval.

# Architecture fields that may differ between a checkpoint and the model it initialises.
ADAPTABLE_FIELDS = ('img_size', 'num_classes', 'drop_path_rate', 'crop_pct')


def check_run(stored: Mapping[str, Any], current: Mapping[str, Any], where: str) -> None:
  """Refuses to resume a checkpoint of another model or data order; logs a mesh change."""
  def describe(run):
    cfg = run['model_config']
    shape = ''.join(f', {k} {cfg[k]}' for k in ('dim', 'depth', 'width', 'depths') if k in cfg)
    return f"{run['model']} (img_size {cfg['img_size']}, {cfg['num_classes']} classes{shape})"

  if stored['model'] != current['model'] or stored['model_config'] != current['model_config']:
    diff = sorted(k for k in set(stored['model_config']) | set(current['model_config'])
                  if stored['model_config'].get(k) != current['model_config'].get(k))
    raise RunMismatchError(
        f'{_FILE}: {where} is a checkpoint of {describe(stored)} but the config describes '
        f'{describe(current)} (differing: {diff or ["model"]}). Use another --workdir, or set '
        'the config to the checkpoint\'s model to resume it.')
  if stored['data'] != current['data']:
    diff = {k: (stored['data'].get(k), current['data'].get(k)) for k in current['data']
            if stored['data'].get(k) != current['data'].get(k)}
    raise RunMismatchError(
        f'{_FILE}: {where} was written with another data order: (checkpoint, config) = {diff}. '
        'Its input positions do not apply; resume with the same data settings (set '
        'config.data.num_streams to the checkpoint\'s when the process count changed) or use '
        'another --workdir.')
  if stored['mesh'] != current['mesh']:
    logging.info('%s was written on mesh %s; restoring onto %s (resharded).', where,
                 stored['mesh'], current['mesh'])
  if stored['batch_size'] != current['batch_size']:
    logging.warning('%s was trained with batch %d; continuing with %d.', where,
                    stored['batch_size'], current['batch_size'])


def check_same_architecture(described: Mapping[str, Any], model_name: str, model_config: Any,
                            setting: str) -> None:
  """A checkpoint of another architecture is an error naming both (size/classes may differ)."""
  want = dataclasses.asdict(model_config)
  have = dict(described['model_config'])
  diff = sorted(k for k in want if k not in ADAPTABLE_FIELDS and have.get(k) != want[k])
  if diff:
    raise RunMismatchError(
        f'{_FILE}: {setting} holds a {described["model"]} '
        f'({", ".join(f"{k}={have.get(k)}" for k in diff)}) but config.model is {model_name} '
        f'({", ".join(f"{k}={want[k]}" for k in diff)}); point init_from at a checkpoint of '
        f'{model_name} or set config.model (and config.model_overrides) to match.')


def load_model_variables(path: str, *, ema: bool = True
                         ) -> Tuple[Dict[str, Any], Dict[str, Any]]:
  """(variables {'params', 'batch_stats'} as NumPy, {'model', 'model_config'}) of `path`.

  `path` is a variables checkpoint (`python -m lvvit_jax.convert`, `save_variables`), a trainer
  workdir (its latest step) or one step folder of a trainer's `checkpoints/`. For trainer
  checkpoints `ema` picks the EMA weights (the reported model) over the raw ones.
  """
  path = os.path.abspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{_FILE}: {path} does not exist; point it at a converted '
                            'checkpoint (python -m lvvit_jax.convert), a trainer workdir or one '
                            'of its checkpoints/<step> folders.')
  if os.path.exists(os.path.join(path, MODEL_FILE)):
    variables, meta = load_variables(path)
    config = get_config(meta['model'], **meta['overrides'])
    variables = {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}
    return variables, {'model': meta['model'], 'model_config': dataclasses.asdict(config)}
  if os.path.isdir(os.path.join(path, 'checkpoints')):
    workdir, step = path, None
  elif (os.path.isdir(os.path.join(path, STATE_ITEM)) and path.rstrip('/').split('/')[-1].isdigit()
        and os.path.basename(os.path.dirname(path)) == 'checkpoints'):
    workdir, step = os.path.dirname(os.path.dirname(path)), int(os.path.basename(path))
  else:
    raise FileNotFoundError(f'{_FILE}: {path} is neither a variables checkpoint (no '
                            f'{MODEL_FILE}) nor a trainer workdir (no checkpoints/) nor a step '
                            'folder of one; point it at one of those.')
  ckpts = TrainCheckpoints(workdir, read_only=True)
  step = ckpts.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f'{_FILE}: {workdir}/checkpoints holds no complete checkpoint.')
  keys = ('ema_params', 'ema_batch_stats') if ema else ('params', 'batch_stats')
  arrays = ckpts.restore_numpy(step, keys)
  run = ckpts.run_description(step)
  variables = {'params': arrays[keys[0]], 'batch_stats': arrays.get(keys[1]) or {}}
  logging.info('Loaded %s weights of %s/checkpoints/%d.', 'EMA' if ema else 'raw', workdir, step)
  return variables, {'model': run['model'], 'model_config': run['model_config']}
