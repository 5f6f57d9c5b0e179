"""Learning curves from metrics.jsonl (`lvvit_jax/plots.py`): the x axis, the mean and band."""
import json
import os

import numpy as np
import pytest

from lvvit_jax import plots


def _write_run(workdir, batch, evals):
  """A metrics.jsonl as the trainer writes it: train rows, then eval rows at some steps."""
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
    for step, top1 in evals:
      f.write(json.dumps({'step': step, 'loss': 1.0, 'images_per_sec': 3.0 * batch,
                          'step_time': 1 / 3.0}) + '\n')
      f.write(json.dumps({'step': step, 'eval/val/top1': top1, 'eval/val/top5': 1.0}) + '\n')
  return str(workdir)


def _png_width(path):
  """The width in pixels of the PNG at `path`, after checking that it is one."""
  with open(path, 'rb') as f:
    head = f.read(24)
  assert head[:8] == b'\x89PNG\r\n\x1a\n'
  return int.from_bytes(head[16:20], 'big')


def test_curve_is_top1_against_images_seen(tmp_path):
  w = _write_run(tmp_path / 'a', 64, [(50, 0.25), (100, 0.5)])
  x, y = plots.eval_curve(w)
  np.testing.assert_array_equal(x, [3200, 6400])
  np.testing.assert_allclose(y, [25.0, 50.0])


def test_runs_of_one_name_give_mean_and_std(tmp_path):
  a = _write_run(tmp_path / 'a', 8, [(10, 0.2), (20, 0.6)])
  b = _write_run(tmp_path / 'b', 8, [(10, 0.4), (20, 1.0)])
  x, mean, std = plots.mean_curve([a, b])
  np.testing.assert_array_equal(x, [80, 160])
  np.testing.assert_allclose(mean, [30.0, 80.0])
  np.testing.assert_allclose(std, [10.0, 20.0])
  assert plots.parse_runs([f'tl={a}', f'tl={b}', f'plain={a}']) == {'tl': [a, b], 'plain': [a]}
  out = plots.plot_curves(plots.parse_runs([f'tl={a}', f'tl={b}', f'plain={a}']),
                          str(tmp_path / 'c.png'), title='t')
  assert _png_width(out) > 0


def test_runs_evaluated_at_other_points_are_refused(tmp_path):
  a = _write_run(tmp_path / 'a', 8, [(10, 0.2), (20, 0.6)])
  b = _write_run(tmp_path / 'b', 8, [(10, 0.4), (30, 1.0)])
  with pytest.raises(ValueError, match='other points'):
    plots.mean_curve([a, b])
  empty = tmp_path / 'c'
  os.makedirs(empty)
  (empty / 'metrics.jsonl').write_text(json.dumps({'step': 1, 'loss': 1.0}) + '\n')
  with pytest.raises(ValueError, match='no training row'):
    plots.eval_curve(str(empty))


def test_many_curves_put_the_legend_beside_the_axes(tmp_path):
  """Past six curves the legend would cover the lower ones: it moves right, the figure widens."""
  a = _write_run(tmp_path / 'a', 8, [(10, 0.2), (20, 0.6)])
  few = plots.plot_curves({f'arm {i}': [a] for i in range(plots._LEGEND_INSIDE_MAX)},
                          str(tmp_path / 'few.png'))
  many = plots.plot_curves({f'arm {i}': [a] for i in range(plots._LEGEND_INSIDE_MAX + 1)},
                           str(tmp_path / 'many.png'))
  assert _png_width(many) > 1.4 * _png_width(few)
