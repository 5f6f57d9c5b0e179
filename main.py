"""Trains or evaluates LV-ViT, or makes score maps with a teacher, from a config file.

    python main.py --config configs/lvvit.py:variant=s --workdir W                 # train
    python main.py --config configs/lvvit.py:variant=s --workdir W \\
        --config.mode=eval --config.init_from=CKPT                                   # evaluate
    python main.py --config configs/demo.py --workdir workdir/demo                  # make demo
    python main.py --config configs/labelgen.py --workdir W \\
        --config.teacher=CKPT --config.out=DIR                                      # score maps

`config.mode` is 'train' (train and evaluate; a rerun with the same workdir resumes from its
latest checkpoint) or 'eval'. Multi-process runs (several hosts, or several processes on one
host): on a TPU pod slice or a SLURM allocation JAX finds its peers from the environment; by
hand, start every process with --coordinator_address=HOST:PORT --num_processes=N
--process_id=I (the same address everywhere: process 0's host and a free port).
`configs/labelgen.py` sets mode 'labelgen': a teacher's score maps (`labelgen/generate.py`).
"""
import logging as py_logging

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py[:arg]).',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Folder for checkpoints and metrics (resumed if present).')
flags.DEFINE_string('coordinator_address', None, 'Multi-process: HOST:PORT of process 0.')
flags.DEFINE_integer('num_processes', None, 'Multi-process: number of processes.')
flags.DEFINE_integer('process_id', None, 'Multi-process: this process, 0..num_processes-1.')
flags.DEFINE_bool('distributed', False, 'Multi-process: call jax.distributed.initialize() and '
                  'let JAX find its peers (automatic on SLURM, Open MPI and TPU pods that set '
                  'TPU_WORKER_HOSTNAMES).')
flags.mark_flags_as_required(['config', 'workdir'])

MODES = ('train', 'eval', 'labelgen')


class _QuietLibraries(py_logging.Filter):
  """Keeps Orbax's per-save INFO chatter out of the run's log (its warnings still show)."""

  def filter(self, record) -> bool:
    return record.levelno >= py_logging.WARNING or '/orbax/' not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'main.py: unexpected arguments {argv[1:]}')
  config = FLAGS.config
  logging.get_absl_handler().addFilter(_QuietLibraries())
  if config.mode not in MODES:
    raise app.UsageError(f'main.py: config.mode={config.mode!r} is not one of {MODES}.')
  import jax  # pylint: disable=g-import-not-at-top
  # CPU processes need gloo for cross-process collectives; accelerators ignore this setting.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  from lvvit_jax import sharding  # pylint: disable=g-import-not-at-top
  sharding.maybe_initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                        FLAGS.process_id, force=FLAGS.distributed)
  from lvvit_jax import train  # pylint: disable=g-import-not-at-top
  logging.info('JAX %s: process %d/%d, %d local / %d global devices (%s)', jax.__version__,
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count(), jax.devices()[0].device_kind)
  if config.mode == 'train':
    train.train_and_evaluate(config, FLAGS.workdir)
  elif config.mode == 'labelgen':
    from labelgen import generate  # pylint: disable=g-import-not-at-top  (TensorFlow)
    generate.generate_from_config(config, FLAGS.workdir)
  else:
    train.evaluate_checkpoint(config, FLAGS.workdir)


if __name__ == '__main__':
  app.run(main)
