"""Prints the final evaluation of finished runs side by side, from their metrics.jsonl.

    python -m lvvit_jax.report teacher=workdir/demo/teacher student=workdir/demo/student ...

Each argument is a workdir, optionally named `name=workdir`. For every run: the last logged
eval metrics (`eval/<split>/top1`, `top5`), the step they were taken at, and the last
training loss. Reads only JSON: no TensorFlow, no JAX.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

from lvvit_jax.metrics import read_metrics


def final_metrics(workdir: str) -> Dict[str, float]:
  """The last value of every metric of a run (eval and train), plus 'eval_step'."""
  out: Dict[str, float] = {}
  for row in read_metrics(workdir):
    out.update({k: v for k, v in row.items() if k != 'step'})
    if any(k.startswith('eval/') for k in row):
      out['eval_step'] = row['step']
  return out


def table(runs: Sequence[Tuple[str, str]], split: str = 'val') -> str:
  """A plain-text table of (name, workdir) runs: eval top-1/top-5 of `split`, last loss."""
  lines = [f'{"run":12s} {"top-1":>7s} {"top-5":>7s} {"at step":>8s} {"last loss":>10s}  workdir']
  for name, workdir in runs:
    m = final_metrics(workdir)
    top1, top5 = m.get(f'eval/{split}/top1'), m.get(f'eval/{split}/top5')
    fmt = lambda v: f'{100 * v:6.1f}%' if v is not None else '    n/a'  # noqa: E731
    loss = m.get('loss')
    lines.append(f'{name:12s} {fmt(top1):>7s} {fmt(top5):>7s} {m.get("eval_step", 0):>8d} '
                 f'{loss if loss is not None else float("nan"):10.4f}  {workdir}')
  return '\n'.join(lines)


def main(argv: Optional[List[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m lvvit_jax.report',
                                   description=__doc__.splitlines()[0])
  parser.add_argument('runs', nargs='+', help='workdir or name=workdir')
  parser.add_argument('--split', default='val', help='the eval split to show')
  parser.add_argument('--verbose', action='store_true', help='tracebacks for errors')
  args = parser.parse_args(argv)
  runs = []
  for arg in args.runs:
    name, eq, workdir = arg.partition('=')
    runs.append((name, workdir) if eq else (os.path.basename(arg.rstrip('/')), arg))
  from lvvit_jax import cli  # pylint: disable=g-import-not-at-top
  with cli.user_errors('python -m lvvit_jax.report', verbose=args.verbose):
    print(table(runs, args.split))
  return 0


if __name__ == '__main__':
  sys.exit(main())
