"""Runs an lvvit_jax job from a config file.

    python main.py --config configs/demo.py --workdir workdir/demo

A config names its `job`; the job gets the config and the workdir (metrics, checkpoints).
Jobs: `demo` (lvvit_jax/demo.py: the method end to end on the bundled digits).
"""
from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from lvvit_jax import demo

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py[:arg]).',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Folder for metrics and checkpoints.')
flags.mark_flags_as_required(['config', 'workdir'])

JOBS = {'demo': demo.run}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'main.py: unexpected arguments {argv[1:]}')
  config = FLAGS.config
  if config.job not in JOBS:
    raise app.UsageError(f'main.py: config job {config.job!r} is not one of {sorted(JOBS)}.')
  logging.info('JAX %s: process %d/%d, devices %s', jax.__version__, jax.process_index(),
               jax.process_count(), jax.devices())
  JOBS[config.job](config, FLAGS.workdir)


if __name__ == '__main__':
  app.run(main)
