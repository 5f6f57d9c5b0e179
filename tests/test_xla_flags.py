"""XLA:CPU without YNNPACK's fusions: set on import, overridable, and invisible to training.

`lvvit_jax/__init__.py` adds `--xla_cpu_experimental_ynn_fusion_type=` to XLA_FLAGS (the stem's
convolution kernel gradients are ~20x faster with XLA's own emitters). Facts relied on: a fresh
process gets the flag from `import lvvit_jax`; LVVIT_JAX_XLA_DEFAULTS=0 or a XLA_FLAGS that
already sets it is left alone; and the trainer's update steps give the same losses and stem
kernels either way, to float32 rounding. XLA reads the flag once per process, so every case runs
in a subprocess (`python -m tests.test_xla_flags` runs the steps and prints them as JSON).
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.run_helpers import ROOT

YNN = '--xla_cpu_experimental_ynn_fusion_type='


def _run(code: str, **env) -> str:
  clean = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'LVVIT_JAX_XLA_DEFAULTS')}
  out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env={**clean, **env},
                       capture_output=True, text=True, check=True)
  return out.stdout.strip()


def test_import_sets_the_flag_unless_told_otherwise():
  show = "import os, lvvit_jax; print(os.environ.get('XLA_FLAGS', ''))"
  assert _run(show) == YNN
  assert _run(show, XLA_FLAGS='--xla_force_host_platform_device_count=2') == (
      '--xla_force_host_platform_device_count=2 ' + YNN)
  assert _run(show, LVVIT_JAX_XLA_DEFAULTS='0') == ''
  mine = '--xla_cpu_experimental_ynn_fusion_type=individual_dot'
  assert _run(show, XLA_FLAGS=mine) == mine


def update_steps(steps: int = 2):
  """Losses and stem kernels of a few trainer update steps on the demo's model (64-channel
  stem, one block, batch 8) from fixed random parameters and batches."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from lvvit_jax import sharding  # pylint: disable=g-import-not-at-top
  from lvvit_jax import train  # pylint: disable=g-import-not-at-top
  from tests.run_helpers import load_config  # pylint: disable=g-import-not-at-top
  config = load_config('demo.py:stage=baseline', batch_size=8,
                       **{'model_overrides.stem_channels': 64, 'model_overrides.depth': 1})
  model = train.build_model(config)
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  schedule, _ = train.make_schedule(config, 100)
  size, b = config.img_size, config.batch_size
  abstract = jax.eval_shape(lambda r: model.init({'params': r}, jnp.zeros((1, size, size, 3))),
                            jax.random.key(0))
  values = np.random.default_rng(0)  # Random parameters without compiling `model.init`.
  params = jax.tree.map(lambda a: jnp.asarray(values.normal(0, 0.05, a.shape), a.dtype),
                        abstract['params'])
  batch_stats = jax.tree_util.tree_map_with_path(
      lambda path, a: (jnp.ones if path[-1].key == 'var' else jnp.zeros)(a.shape, a.dtype),
      abstract['batch_stats'])
  tx = train.make_optimizer(config, params, schedule)
  copy = lambda tree: jax.tree.map(jnp.copy, tree)  # noqa: E731  (the step donates the state)
  state = train.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                           batch_stats=batch_stats, opt_state=tx.init(params),
                           ema_params=copy(params), ema_batch_stats=copy(batch_stats))
  shardings = train.state_shardings(state, mesh, config.mesh.fsdp_min_size)
  step = train.jit_update_step(train.make_update_step(
      model, tx, schedule, train.objective_config(config), ema_decay=config.ema_decay),
      shardings, mesh)
  losses = []
  for _ in range(steps):
    batch = {'image': values.normal(size=(b, size, size, 3)).astype(np.float32),
             'label': values.integers(0, config.num_classes, b).astype(np.int32),
             'label_affine': np.tile(np.float32([[1, 0, 0], [0, 1, 0]]), (b, 1, 1))}
    state, metrics = step(state, sharding.host_to_global(batch, mesh), jax.random.key(0))
    losses.append(float(sharding.fetch(metrics['loss'])))
  kernels = {name: np.asarray(state.params['patch_embed'][name]['kernel']).ravel()[:512].tolist()
             for name in ('conv1', 'conv2', 'conv3', 'proj')}
  return {'losses': losses, 'kernels': kernels}


@pytest.mark.slow  # Two processes compile the update step: ~30 s on a quiet 2-core machine.
def test_training_does_not_depend_on_the_flag():
  code = 'import json, tests.test_xla_flags as t; print(json.dumps(t.update_steps()))'
  ours = json.loads(_run(code).splitlines()[-1])
  xla = json.loads(_run(code, LVVIT_JAX_XLA_DEFAULTS='0').splitlines()[-1])
  np.testing.assert_allclose(ours['losses'], xla['losses'], rtol=0, atol=1e-5)
  for name in ours['kernels']:  # The stem's kernels moved the same way.
    np.testing.assert_allclose(ours['kernels'][name], xla['kernels'][name], rtol=0, atol=1e-5,
                               err_msg=name)
