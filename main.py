"""Trains or evaluates a model (LV-ViT, NFNet), or makes score maps with a teacher, from a config.

    python main.py --config configs/lvvit.py:variant=s --workdir W                 # train
    python main.py --config configs/lvvit.py:variant=s --workdir W \\
        --config.mode=eval --config.init_from=CKPT                                   # evaluate
    python main.py --config configs/nfnet.py:variant=f0 --workdir W                # NFNet-F0
    python main.py --config configs/demo.py --workdir workdir/demo                  # make demo
    python main.py --config configs/labelgen.py --workdir W \\
        --config.teacher=CKPT --config.out=DIR                                      # score maps

`config.mode` is 'train' (train and evaluate; a rerun with the same workdir resumes from its
latest checkpoint) or 'eval'. Multi-process runs (several hosts, or several processes on one
host): on a TPU pod slice or a SLURM allocation JAX finds its peers from the environment; by
hand, start every process with --coordinator_address=HOST:PORT --num_processes=N
--process_id=I (the same address everywhere: process 0's host and a free port).
`configs/labelgen.py` sets mode 'labelgen': a teacher's score maps (`labelgen/generate.py`).

A bad setting, a missing or foreign file (config file, data, checkpoint) ends the run with one
line on stderr, `main.py: error: <what and the fix>`, and exit status 2; `--verbose` shows the
traceback instead (`lvvit_jax/cli.py`).
"""
import logging as py_logging
import sys
from typing import List

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from lvvit_jax import cli

PROG = 'main.py'
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
flags.DEFINE_bool('verbose', False, 'Show the traceback of a bad setting or file, not one line.')
flags.mark_flags_as_required(['config', 'workdir'])

MODES = ('train', 'eval', 'labelgen')


class _QuietLibraries(py_logging.Filter):
  """Keeps Orbax's per-save INFO chatter out of the run's log (its warnings still show)."""

  def filter(self, record) -> bool:
    return record.levelno >= py_logging.WARNING or '/orbax/' not in record.pathname


def _root_cause(error: BaseException) -> BaseException:
  while error.__cause__ or error.__context__:
    error = error.__cause__ or error.__context__
  return error


def _command_line_error(error: Exception, argv: List[str]) -> str:
  """One line for an error raised while parsing the flags (config files load then)."""
  root = _root_cause(error)
  config = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), '')
  if '--config' in argv[:-1]:  # --config FILE
    config = argv[argv.index('--config') + 1]
  if isinstance(error, flags.Error) and not str(error).startswith('flag --config='):
    # absl's own: an unknown flag, a missing --workdir, a value of the wrong type.
    return f'{cli.one_line(error).rstrip(".")}; see python {PROG} --helpshort.'
  if isinstance(root, KeyError):  # --config.<key>=... names no field of the config
    keys = [a[2:].partition('=')[0] for a in argv if a.startswith('--config.')]
    key = next((k for k in keys if k.split('.')[-1] == root.args[0]), root.args[0])
    hint = str(error).split('\\n')[-1].strip('\'" ') if 'Did you mean' in str(error) else ''
    return (f'--{key}: {config} has no such setting{f" ({hint})" if hint else ""}; check the '
            'name against the config file.')
  if isinstance(root, (ValueError, TypeError)) and str(error).startswith('flag --config='):
    return cli.one_line(root)   # get_config's own message names the file, the key and the fix
  if isinstance(root, OSError):  # config_flags: 'Failed loading ... Attempted ...: <why>'
    why = str(root).strip().splitlines()[-1].strip()
    return (f'--config={config}: cannot read the config file ({why}); pass a recipe such as '
            '--config=configs/lvvit.py:variant=s.')
  return (f'--config={config}: not a config file ({type(root).__name__}: {cli.one_line(root)}); '
          'pass a recipe such as --config=configs/lvvit.py:variant=s (--verbose: traceback).')


def parse_flags(argv: List[str]) -> List[str]:
  """absl's flag parsing, with every error as one line on stderr and exit status 2."""
  verbose = any(a in ('--verbose', '--verbose=true', '--verbose=True', '--verbose=1')
                for a in argv)
  try:
    rest = FLAGS(argv)
    hasattr(FLAGS.config, 'mode')  # A file that failed to load raises on first use.
    return rest
  except Exception as e:  # pylint: disable=broad-except  (all of it is the command line's)
    if verbose:
      raise
    cli.report(PROG, ValueError(_command_line_error(e, argv)))
    sys.exit(cli.EXIT_STATUS)


def run(argv: List[str]) -> None:
  """Dispatches config.mode (after the multi-process set-up)."""
  if len(argv) > 1:
    raise ValueError(f'unexpected arguments {argv[1:]}; settings go in --config.<key>=<value>.')
  config = FLAGS.config
  logging.get_absl_handler().addFilter(_QuietLibraries())
  if config.mode not in MODES:
    raise ValueError(f'config.mode={config.mode!r} is not one of {MODES}; set --config.mode.')
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


def main(argv: List[str]) -> None:
  """`run`, with the library's bad-setting and file errors as one line (cli.user_errors)."""
  with cli.user_errors(PROG, verbose=FLAGS.verbose):
    run(argv)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
