"""Scalar metrics of a run: clu metric writers (TensorBoard) plus WORKDIR/metrics.jsonl.

Process 0 writes both; other processes only log. `metrics.jsonl` holds one JSON object per
written step (`{"step": 100, "loss": ..., "eval/val/top1": ...}`), appended, so it can be read
without TensorFlow and survives restarts (a resumed run appends after the steps it redoes
nothing of: it starts after the checkpoint's step).
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, List, Mapping

METRICS_FILE = 'metrics.jsonl'
_FILE = 'lvvit_jax/metrics.py'


class MetricsLog:
  """Writes scalars to clu's default writer and to `metrics.jsonl` (process 0)."""

  def __init__(self, workdir: str):
    import jax  # pylint: disable=g-import-not-at-top  (read_metrics needs neither JAX nor TF)
    from clu import metric_writers  # pylint: disable=g-import-not-at-top  (imports TensorFlow)
    self.is_writer = jax.process_index() == 0
    self.writer = metric_writers.create_default_writer(workdir, just_logging=not self.is_writer)
    self.path = os.path.join(workdir, METRICS_FILE)

  def write(self, step: int, scalars: Mapping[str, Any]) -> None:
    scalars = {k: float(v) for k, v in scalars.items()}
    self.writer.write_scalars(step, scalars)
    if self.is_writer:
      with open(self.path, 'a') as f:
        f.write(json.dumps({'step': int(step), **{k: _json_float(v) for k, v in
                                                 scalars.items()}}) + '\n')

  def flush(self) -> None:
    self.writer.flush()

  def close(self) -> None:
    self.writer.close()


def _json_float(v: float) -> Any:
  return v if math.isfinite(v) else str(v)  # JSON has no NaN/inf literals.


def read_metrics(workdir: str) -> List[Dict[str, Any]]:
  """The rows of `WORKDIR/metrics.jsonl`, in order.

  Raises FileNotFoundError when `workdir` has no metrics.jsonl and ValueError naming the line
  when one is not a JSON object.
  """
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f'{_FILE}: {path} does not exist: {workdir} is not the workdir of a trainer run (or it '
        'has logged nothing yet); pass the --workdir of a run of main.py.')
  rows = []
  with open(path) as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        row = None
      if not isinstance(row, dict):
        raise ValueError(f'{_FILE}: {path} line {number} is not a JSON object '
                         f'({line.strip()[:60]!r}): the file was edited or cut short; remove that '
                         'line (the other lines are read as they are).')
      rows.append(row)
  return rows
