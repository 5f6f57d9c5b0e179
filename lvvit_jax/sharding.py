"""The device mesh, the parameter-sharding rule, and host batches as global arrays.

One `jax.sharding.Mesh` with axes ('data', 'fsdp') serves the whole run:

* batches are sharded over both axes along the batch dimension (every device holds
  batch / num_devices examples);
* parameters and optimizer state are replicated under pure data parallelism (fsdp = 1); with
  fsdp > 1 every tensor of at least `min_size` elements is sharded along its largest dimension
  divisible by the fsdp size (smaller ones, and ones with no such dimension, stay replicated).
  XLA's SPMD partitioner then gathers each weight where it is used and reduce-scatters its
  gradient.

Devices are laid out in `jax.devices()` order (grouped by process), so process p owns a
contiguous block of the global batch: `host_to_global` places each process's local batch there.
"""
from __future__ import annotations

import math
import os
from typing import Any, Mapping, Optional, Sequence

from absl import logging
import jax
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

_FILE = 'lvvit_jax/sharding.py'
AXES = ('data', 'fsdp')
BATCH_AXES = ('data', 'fsdp')


def mesh_shape(data: int, fsdp: int, num_devices: int) -> tuple[int, int]:
  """Resolves (data, fsdp) against the device count; -1 on `data` takes the rest."""
  if fsdp < 1 or num_devices % fsdp:
    raise ValueError(f'{_FILE}: config.mesh.fsdp={fsdp} must be >= 1 and divide the '
                     f'{num_devices} devices; pick a divisor of {num_devices}.')
  if data == -1:
    data = num_devices // fsdp
  if data < 1 or data * fsdp != num_devices:
    raise ValueError(f'{_FILE}: config.mesh.data={data} x config.mesh.fsdp={fsdp} must equal '
                     f'the {num_devices} devices; set config.mesh.data=-1 to use the rest.')
  return data, fsdp


def make_mesh(data: int = -1, fsdp: int = 1,
              devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A ('data', 'fsdp') mesh over `devices` (default: all), in process-grouped device order."""
  devices = list(jax.devices() if devices is None else devices)
  data, fsdp = mesh_shape(data, fsdp, len(devices))
  return Mesh(np.asarray(devices, dtype=object).reshape(data, fsdp), AXES)


def fsdp_axis(shape: Sequence[int], fsdp: int, min_size: int) -> Optional[int]:
  """The dimension a tensor of `shape` is sharded along under FSDP, or None (replicated).

  Tensors of at least `min_size` elements are sharded along their largest dimension divisible
  by `fsdp` (the first such on ties).
  """
  if fsdp <= 1 or math.prod(shape) < min_size:
    return None
  best = None
  for axis, n in enumerate(shape):
    if n % fsdp == 0 and (best is None or n > shape[best]):
      best = axis
  return best


def param_spec(shape: Sequence[int], fsdp: int, min_size: int) -> P:
  """PartitionSpec of a parameter (or optimizer-state) tensor under the FSDP rule."""
  axis = fsdp_axis(shape, fsdp, min_size)
  if axis is None:
    return P()
  spec = [None] * len(shape)
  spec[axis] = 'fsdp'
  return P(*spec)


def tree_shardings(tree: Any, mesh: Mesh, min_size: int) -> Any:
  """NamedShardings for every array leaf of `tree` (shapes or arrays) under the FSDP rule."""
  fsdp = mesh.shape['fsdp']
  return jax.tree.map(
      lambda x: NamedSharding(mesh, param_spec(np.shape(x), fsdp, min_size)), tree)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batch dimension over every device of the mesh."""
  return NamedSharding(mesh, P(BATCH_AXES))


def check_global_batch(batch_size: int, mesh: Mesh, process_count: int,
                       setting: str = 'config.batch_size') -> int:
  """The per-process batch size; a clear error if the global batch does not split evenly."""
  if batch_size % mesh.size:
    raise ValueError(f'{_FILE}: {setting}={batch_size} is not divisible by the {mesh.size} '
                     f'devices; use a multiple of {mesh.size} (e.g. '
                     f'{max(mesh.size, batch_size // mesh.size * mesh.size)}).')
  if batch_size % process_count:
    raise ValueError(f'{_FILE}: {setting}={batch_size} is not divisible by the '
                     f'{process_count} processes; use a multiple of {process_count}.')
  return batch_size // process_count


def host_to_global(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict:
  """This process's part of a batch (leading dim = per-process batch) -> global jax.Arrays.

  The global batch spans the processes of `mesh` (all of them for the trainer's mesh, one for
  a mesh of local devices). The transfer to the devices is asynchronous, so calling this one
  step ahead prefetches.
  """
  sharding = batch_sharding(mesh)
  n = len({d.process_index for d in mesh.devices.flat})
  out = {}
  for k, v in batch.items():
    v = np.asarray(v)
    if v.dtype.kind in 'SUO':  # Strings (keys) stay on the host.
      continue
    out[k] = jax.make_array_from_process_local_data(sharding, v, (v.shape[0] * n,) + v.shape[1:])
  return out


def put(value: Any, sharding_: jax.sharding.Sharding) -> jax.Array:
  """A host value (the same on every process) as a global array with `sharding_`.

  Unlike `jax.device_put` of an array that lives on one device, this works when the sharding
  spans other processes' devices: each process fills in the shards it holds.
  """
  value = np.asarray(value)
  return jax.make_array_from_callback(value.shape, sharding_, lambda index: value[index])


def fetch(tree: Any) -> Any:
  """Replicated (or fully addressable) device values -> NumPy, also in multi-process runs."""
  def get(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(x.addressable_data(0))
    return np.asarray(x)
  return jax.tree.map(get, tree)


def per_device_bytes(tree: Any) -> int:
  """Bytes one device holds of `tree` (the first addressable device's shards)."""
  device = jax.local_devices()[0]
  total = 0
  for x in jax.tree.leaves(tree):
    for shard in x.addressable_shards:
      if shard.device == device:
        total += shard.data.nbytes
  return total


def detected_cluster() -> Optional[str]:
  """The multi-process launcher this process runs under, from its environment, or None."""
  def more_than_one(variable: str) -> bool:
    try:
      return int(os.environ.get(variable, '1') or 1) > 1
    except ValueError:
      return False
  if more_than_one('SLURM_NTASKS'):
    return 'SLURM'
  if more_than_one('OMPI_COMM_WORLD_SIZE'):
    return 'Open MPI'
  if len([h for h in os.environ.get('TPU_WORKER_HOSTNAMES', '').split(',') if h]) > 1:
    return 'TPU pod slice'
  return None


def maybe_initialize_distributed(coordinator_address: Optional[str] = None,
                                 num_processes: Optional[int] = None,
                                 process_id: Optional[int] = None,
                                 force: bool = False) -> bool:
  """Calls `jax.distributed.initialize` when this is a multi-process run; True if it did.

  A run is multi-process when the three arguments are given (by hand), when `force` is set
  (main.py's --distributed: JAX then finds its peers itself, e.g. on a TPU pod slice), or when
  the environment shows a launcher of several processes (SLURM, Open MPI, TPU_WORKER_HOSTNAMES);
  JAX discovers the rest from the environment. Must run before anything touches the devices.
  """
  explicit = [coordinator_address, num_processes, process_id]
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      raise ValueError(f'{_FILE}: --coordinator_address, --num_processes and --process_id go '
                       'together; give all three (or none, on SLURM or a TPU pod).')
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    return True
  cluster = detected_cluster()
  if cluster or force:
    logging.info('Multi-process run (%s); initialising jax.distributed.', cluster or 'forced')
    jax.distributed.initialize()
    return True
  return False


class AlignedJit:
  """A jitted function whose first call per argument signature compiles, then waits for peers.

  On CPU, cross-process collectives are gloo's, and the first collective of a program creates
  its gloo context with a fixed 30 s timeout: a process that finished compiling a big step
  waits there for a peer still compiling and fails (`Gloo context initialization failed:
  DEADLINE_EXCEEDED`) when the peer is slower by more than that, e.g. on a loaded machine. So in
  multi-process runs each new signature is compiled ahead of time and the processes meet at a
  coordination-service barrier (its own generous timeout) before the program first runs.
  Single-process runs call the jitted function directly.
  """

  def __init__(self, jitted, name: str, timeout_s: float = 1800.0):
    self._jitted, self._name, self._timeout_ms = jitted, name, int(timeout_s * 1000)
    self._compiled = {}

  def lower(self, *args):
    return self._jitted.lower(*args)

  def __call__(self, *args):
    if jax.process_count() == 1:
      return self._jitted(*args)
    leaves, treedef = jax.tree.flatten(args)
    signature = (treedef, tuple((getattr(x, 'shape', None), str(getattr(x, 'dtype', type(x))))
                                for x in leaves))
    compiled = self._compiled.get(signature)
    if compiled is None:
      compiled = self._jitted.lower(*args).compile()
      self._compiled[signature] = compiled
      barrier = f'lvvit_jax:{self._name}:{len(self._compiled)}'
      from jax._src import distributed  # pylint: disable=g-import-not-at-top  (no public barrier)
      distributed.global_state.client.wait_at_barrier(barrier, self._timeout_ms)
    return compiled(*args)
