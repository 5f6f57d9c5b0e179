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

import jax

METRICS_FILE = 'metrics.jsonl'


class MetricsLog:
  """Writes scalars to clu's default writer and to `metrics.jsonl` (process 0)."""

  def __init__(self, workdir: str):
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
  """The rows of `WORKDIR/metrics.jsonl`, in order."""
  with open(os.path.join(workdir, METRICS_FILE)) as f:
    return [json.loads(line) for line in f if line.strip()]
