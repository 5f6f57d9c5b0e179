"""Preemption (SIGTERM): every process learns of it at the same step.

Multi-process runs use JAX's coordination service: `jax.distributed.initialize` installs a
SIGTERM notifier, and `multihost_utils.reached_preemption_sync_point(step)` turns a notice
received by any process into the same step on all of them, so they save together. A single
process installs its own SIGTERM handler that sets a flag. Either way the trainer finishes
the step it is in, saves, waits for the save and exits 0.
"""
from __future__ import annotations

import signal
import types
from typing import Optional

from absl import logging
import jax
from jax.experimental import multihost_utils


class PreemptionWatch:
  """`reached(step)` is True (on every process) at the step the run must save and stop."""

  def __init__(self):
    self._multi = jax.process_count() > 1
    self._signalled = False
    self._previous = None
    if not self._multi:
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum: int, frame: Optional[types.FrameType]) -> None:
    del signum, frame
    logging.warning('SIGTERM received: the run saves a checkpoint after this step and exits.')
    self._signalled = True

  def reached(self, step: int) -> bool:
    if not self._multi:
      return self._signalled
    try:
      return multihost_utils.reached_preemption_sync_point(step)
    except RuntimeError:  # The preemption service is off (e.g. initialised without it).
      return False

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None
