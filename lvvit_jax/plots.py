"""Learning curves as PNG: eval top-1 against training images, from runs' metrics.jsonl.

    python -m lvvit_jax.plots docs/curves.png student=workdir/demo/student \\
        baseline=workdir/demo/baseline [--split val] [--title ...]

A name given several times (`arm=w1 arm=w2 arm=w3`, e.g. the seeds of an ablation arm) is
drawn as the mean curve with a band of one standard deviation. The x axis is training images:
a run's logged step times its batch size, which every train row carries as
`images_per_sec * step_time` (no TensorFlow, no JAX: JSON and matplotlib only).
"""
from __future__ import annotations

import argparse
import collections
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from lvvit_jax.metrics import read_metrics

_FILE = 'lvvit_jax/plots.py'


def batch_size(rows: Sequence[Mapping[str, float]], workdir: str) -> int:
  """The run's global batch, from a train row (images_per_sec * step_time)."""
  for row in rows:
    if 'images_per_sec' in row and 'step_time' in row:
      return int(round(row['images_per_sec'] * row['step_time']))
  raise ValueError(f'{_FILE}: {workdir}/metrics.jsonl has no training row (images_per_sec, '
                   'step_time); is it the workdir of a trainer run that has logged a step?')


def eval_curve(workdir: str, split: str = 'val') -> Tuple[np.ndarray, np.ndarray]:
  """(training images, eval top-1 in %) at every eval of `split` in the run's metrics.jsonl."""
  rows = read_metrics(workdir)
  batch = batch_size(rows, workdir)
  key = f'eval/{split}/top1'
  points = {int(r['step']): float(r[key]) for r in rows if key in r}
  if not points:
    raise ValueError(f'{_FILE}: {workdir}/metrics.jsonl has no {key}; set config.eval_every so '
                     'the run evaluates during training.')
  steps = np.array(sorted(points))
  return steps * batch, 100.0 * np.array([points[s] for s in steps])


def mean_curve(workdirs: Sequence[str], split: str = 'val'
               ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(images, mean top-1, standard deviation) over runs evaluated at the same points."""
  curves = [eval_curve(w, split) for w in workdirs]
  x = curves[0][0]
  for w, (xi, _) in zip(workdirs, curves):
    if not np.array_equal(xi, x):
      raise ValueError(f'{_FILE}: {w} was evaluated at other points than {workdirs[0]}; give '
                       'the runs of one curve the same batch size and config.eval_every.')
  ys = np.stack([y for _, y in curves])
  return x, ys.mean(0), ys.std(0)


_LEGEND_INSIDE_MAX = 6   # more curves than this: the legend goes right of the axes


def plot_curves(runs: Mapping[str, Sequence[str]], out: str, split: str = 'val',
                title: Optional[str] = None) -> str:
  """Draws every named curve (mean and +-1 std band for several runs) into the PNG `out`."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  legend_outside = len(runs) > _LEGEND_INSIDE_MAX  # (it would hide the lower curves)
  fig, ax = plt.subplots(figsize=(10.5 if legend_outside else 7, 4.2), dpi=110)
  for name, workdirs in runs.items():
    x, mean, std = mean_curve(workdirs, split)
    label = name if len(workdirs) == 1 else f'{name} (mean of {len(workdirs)})'
    line, = ax.plot(x, mean, marker='o', markersize=3, label=label)
    if len(workdirs) > 1:
      ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2)
  ax.set_xlabel('training images')
  ax.set_ylabel(f'eval top-1 on {split} (%)')
  ax.set_ylim(0, 100)
  ax.grid(alpha=0.3)
  if legend_outside:
    ax.legend(loc='center left', bbox_to_anchor=(1.01, 0.5), fontsize=8)
  else:
    ax.legend(loc='lower right', fontsize=8)
  if title:
    ax.set_title(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(out)
  plt.close(fig)
  return out


def parse_runs(items: Sequence[str]) -> Dict[str, List[str]]:
  """['a=w1', 'a=w2', 'b=w3'] -> {'a': ['w1', 'w2'], 'b': ['w3']} (a bare workdir names itself)."""
  runs: Dict[str, List[str]] = collections.OrderedDict()
  for item in items:
    name, eq, workdir = item.partition('=')
    if not eq:
      name, workdir = item.rstrip('/').split('/')[-1], item
    runs.setdefault(name, []).append(workdir)
  return runs


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m lvvit_jax.plots',
                                   description=__doc__.splitlines()[0])
  parser.add_argument('out', help='PNG file to write')
  parser.add_argument('runs', nargs='+', help='name=workdir (repeat a name for mean +- std)')
  parser.add_argument('--split', default='val')
  parser.add_argument('--title', default=None)
  parser.add_argument('--verbose', action='store_true', help='tracebacks for errors')
  args = parser.parse_args(argv)
  from lvvit_jax import cli  # pylint: disable=g-import-not-at-top
  with cli.user_errors('python -m lvvit_jax.plots', verbose=args.verbose):
    print(f'wrote {plot_curves(parse_runs(args.runs), args.out, args.split, args.title)}')
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
