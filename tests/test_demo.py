"""`make demo` end to end: main.py trains on the bundled digits and the loss goes down."""
import glob
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_main_demo_trains(tmp_path):
  cmd = [sys.executable, 'main.py', '--config', 'configs/demo.py:runlocal',
         '--config.total_steps=30', '--config.warmup_steps=3', '--config.log_every=10',
         '--config.model_overrides.depth=2', f'--workdir={tmp_path}']
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  losses = [float(x) for x in re.findall(r'^step +\d+ +loss ([0-9.]+)', out.stdout, re.M)]
  assert len(losses) == 3, out.stdout
  assert losses[-1] < losses[0] - 0.2, losses  # It learns, not just runs.
  accuracy = float(re.search(r'digits test accuracy ([0-9.]+)', out.stdout).group(1))
  assert 0.0 <= accuracy <= 1.0
  assert glob.glob(os.path.join(tmp_path, 'events.out.tfevents.*'))  # clu/TensorBoard metrics
