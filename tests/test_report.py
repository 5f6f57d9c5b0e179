"""The table `make demo` ends with (`lvvit_jax/report.py`) and how metrics.jsonl is read."""
import json
import os
import subprocess
import sys

import pytest

from lvvit_jax import metrics
from lvvit_jax import report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_rows(workdir, rows):
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
    f.writelines(json.dumps(row) + '\n' for row in rows)
  return str(workdir)


def _run(module, *args):
  return subprocess.run([sys.executable, '-m', module, *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=120, check=False)


def test_table_shows_the_last_eval_its_step_and_the_last_loss(tmp_path):
  # A resumed run: eval at 50, then training rows after it; the table keeps step 100's eval
  # and the loss of the last training row, not an earlier one.
  run = _write_rows(tmp_path / 'student', [
      {'step': 50, 'loss': 2.5}, {'step': 50, 'eval/val/top1': 0.25, 'eval/val/top5': 0.5},
      {'step': 100, 'loss': 2.0}, {'step': 100, 'eval/val/top1': 0.911, 'eval/val/top5': 0.997},
      {'step': 110, 'loss': 1.75}])
  other = _write_rows(tmp_path / 'other', [{'step': 7, 'loss': 3.0},
                                           {'step': 7, 'eval/test/top1': 0.5}])
  lines = report.table([('student', run), ('other', other)]).splitlines()
  assert lines[0].split()[:5] == ['run', 'top-1', 'top-5', 'at', 'step']
  assert lines[1].split() == ['student', '91.1%', '99.7%', '100', '1.7500', run]
  # No eval of the split asked for: n/a, not another split's figure.
  assert lines[2].split() == ['other', 'n/a', 'n/a', '7', '3.0000', other]
  assert report.table([('other', other)], split='test').splitlines()[1].split()[1] == '50.0%'


def test_cli_names_runs_by_argument_or_folder(tmp_path):
  run = _write_rows(tmp_path / 'baseline', [{'step': 3, 'loss': 1.0},
                                            {'step': 3, 'eval/val/top1': 0.858}])
  out = _run('lvvit_jax.report', f'plain={run}', run + '/')
  assert out.returncode == 0, out.stderr
  rows = [line.split()[:2] for line in out.stdout.splitlines()[1:]]
  assert rows == [['plain', '85.8%'], ['baseline', '85.8%']]


def test_a_folder_without_metrics_is_one_line_naming_the_file(tmp_path):
  for module, args in (('lvvit_jax.report', []), ('lvvit_jax.plots', [str(tmp_path / 'c.png')])):
    out = _run(module, *args, f'x={tmp_path}')
    assert out.returncode == 2, (module, out.stderr)
    [line] = out.stderr.strip().splitlines()
    assert line.startswith(f'python -m {module}: error: lvvit_jax/metrics.py: '
                           f'{tmp_path}/metrics.jsonl does not exist'), line
    assert 'Traceback' not in out.stderr
  assert not os.path.exists(tmp_path / 'c.png')


def test_a_line_that_is_not_json_is_named_and_the_file_left_as_it_is(tmp_path):
  run = _write_rows(tmp_path / 'run', [{'step': 1, 'loss': 2.0}])
  path = os.path.join(run, 'metrics.jsonl')
  with open(path, 'a') as f:
    f.write('{"step": 2, "lo\n\n[1, 2]\n')
  before = open(path).read()
  with pytest.raises(ValueError, match=r'metrics.jsonl line 2 is not a JSON object'):
    metrics.read_metrics(run)
  with open(path, 'w') as f:
    f.write(before.replace('{"step": 2, "lo\n', ''))
  # A JSON value that is not an object (line 3 now, after the blank line) is refused too.
  with pytest.raises(ValueError, match=r'line 3 is not a JSON object \(\'\[1, 2\]\'\)'):
    metrics.read_metrics(run)
  out = _run('lvvit_jax.report', run)
  assert out.returncode == 2 and 'line 3 is not a JSON object' in out.stderr
  assert open(path).read() == before.replace('{"step": 2, "lo\n', '')


def test_reading_metrics_needs_neither_jax_nor_tensorflow():
  code = ('import sys; import lvvit_jax.report, lvvit_jax.plots; '
          'print(sorted(m for m in ("jax", "tensorflow") if m in sys.modules))')
  out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, check=True)
  assert out.stdout.strip() == '[]'
