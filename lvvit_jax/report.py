"""Prints the final evaluation of finished runs side by side, from their metrics.jsonl.

    python -m lvvit_jax.report teacher=workdir/demo/teacher student=workdir/demo/student ...

Each argument is a workdir, optionally named `name=workdir`. For every run: the last logged
eval metrics (`eval/<split>/top1`, `top5`), the step they were taken at, and the last
training loss. Reads only JSON: no TensorFlow, no JAX.
"""
from __future__ import annotations

import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

from lvvit_jax.metrics import METRICS_FILE
from lvvit_jax.metrics import read_metrics

_FILE = 'lvvit_jax/report.py'


def final_metrics(workdir: str) -> Dict[str, float]:
  """The last value of every metric of a run (eval and train), plus 'eval_step'."""
  if not os.path.exists(os.path.join(workdir, METRICS_FILE)):
    raise FileNotFoundError(f'{_FILE}: {workdir}/{METRICS_FILE} does not exist: {workdir} is '
                            'not the workdir of a trainer run (or it has logged nothing yet).')
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
  argv = sys.argv[1:] if argv is None else argv
  if not argv:
    print(__doc__, file=sys.stderr)
    return 2
  runs = []
  for arg in argv:
    name, eq, workdir = arg.partition('=')
    runs.append((name, workdir) if eq else (os.path.basename(arg.rstrip('/')), arg))
  print(table(runs))
  return 0


if __name__ == '__main__':
  sys.exit(main())
