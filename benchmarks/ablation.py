"""The paper's ablations in small: every arm of `configs/ablation.py` with several seeds.

    make demo                                    # the teacher and its maps in workdir/demo
    python -m benchmarks.ablation [--seeds 3] [--arms token_labeling,relabel,...] \\
        [--root workdir/demo] [--out workdir/ablation] [--steps N]

Each (arm, seed) is one trainer run (`main.py --config configs/ablation.py:arm=A,seed=S`, a
subprocess, one after another: they time the machine); a rerun skips finished runs (the
trainer resumes from its checkpoints). Prints and writes (`--results`) the eval top-1 of every
run, the mean and standard deviation per arm, and which of the paper's orderings hold here
(token labeling > ReLabel > plain labels; MixToken > CutMix); draws the mean curves with a band
of one standard deviation (`--plot`). Not run by the tests (minutes per run); each arm's config
is smoke-tested by `tests/test_ablation.py`.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from typing import Dict, List, Sequence

import numpy as np

from configs import ablation as ablation_config
from lvvit_jax import plots
from lvvit_jax import report

_FILE = 'benchmarks/ablation.py'
LABELS = {
    'plain_cls': '1. plain labels, cls loss only',
    'plain_dense': '2. plain labels + dense loss (demo baseline)',
    'relabel': '3. ReLabel (map pooled over the crop, cls only)',
    'token_labeling': '4. token labeling + MixToken (the paper)',
    'tl_cutmix': '5. token labeling + CutMix',
    'tl_no_mix': '6. token labeling, no mixing (demo student)',
    'vit_plain': '7a. plain ViT, plain labels',
    'vit_tl': '7b. plain ViT + aux head, token labels',
    'online': '8. teacher on each crop (online, no mixing)',
    'online_in_place': '9. teacher on each crop in place (rest masked)',
}
# (Unmixed arms are compared with unmixed arms: only 4 and 5 mix.)
ORDERINGS = (
    ('token labeling > ReLabel (no mixing)', 'tl_no_mix', 'relabel'),
    ('ReLabel > plain labels (cls only)', 'relabel', 'plain_cls'),
    ('token labeling > plain labels + dense loss (no mixing)', 'tl_no_mix', 'plain_dense'),
    ('MixToken > CutMix (token labeling)', 'token_labeling', 'tl_cutmix'),
    ('MixToken > no mixing (token labeling)', 'token_labeling', 'tl_no_mix'),
    ('token labels > plain labels on the plain ViT', 'vit_tl', 'vit_plain'),
    ('teacher on the crop > stored maps (no mixing)', 'online', 'tl_no_mix'),
    ('teacher on the crop in place (no context) > stored maps', 'online_in_place', 'tl_no_mix'),
)


def run_arm(arm: str, seed: int, root: str, workdir: str, steps: int) -> float:
  """Trains one (arm, seed) unless finished; returns its wall seconds (0 when skipped)."""
  cmd = [sys.executable, 'main.py', '--config',
         f'configs/ablation.py:arm={arm},seed={seed},root={root}', '--workdir', workdir]
  if steps:
    cmd.append(f'--config.total_steps={steps}')
  start = time.time()
  subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
  return time.time() - start


def final_top1(workdir: str) -> float:
  return 100.0 * report.final_metrics(workdir)['eval/val/top1']


def summary(results: Dict[str, List[float]], seeds: Sequence[int]) -> str:
  """The table of arms (mean, std, per seed) and the orderings, as text."""
  lines = [f'{"arm":48s} {"mean":>6s} {"std":>5s}  per seed ({", ".join(map(str, seeds))})']
  for arm, values in results.items():
    lines.append(f'{LABELS[arm]:48s} {np.mean(values):6.1f} {np.std(values):5.1f}  '
                 + ', '.join(f'{v:.1f}' for v in values))
  lines.append('')
  for text, a, b in ORDERINGS:
    if a in results and b in results:
      ma, mb = np.mean(results[a]), np.mean(results[b])
      sd = max(np.std(results[a]), np.std(results[b]))
      verdict = 'holds' if ma > mb else 'does not hold'
      if abs(ma - mb) <= sd:
        verdict += ' (within one standard deviation)'
      lines.append(f'{text}: {verdict}: {ma:.1f} vs {mb:.1f}')
  return '\n'.join(lines)


def main(argv: Sequence[str] = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m benchmarks.ablation',
                                   description=__doc__.splitlines()[0])
  parser.add_argument('--arms', default=','.join(ablation_config.ARMS))
  parser.add_argument('--seeds', type=int, default=3)
  parser.add_argument('--root', default='workdir/demo', help="the demo's root (teacher maps)")
  parser.add_argument('--out', default='workdir/ablation')
  parser.add_argument('--steps', type=int, default=0, help="override the student's steps")
  parser.add_argument('--results', default='benchmarks/results/ablation_cpu.txt')
  parser.add_argument('--plot', default='docs/ablation_curves.png')
  parser.add_argument('--title', default='Ablation on the demo digits (mean of seeds, +-1 std)')
  args = parser.parse_args(argv)
  arms = [a for a in args.arms.split(',') if a]
  unknown = sorted(set(arms) - set(ablation_config.ARMS))
  if unknown:
    parser.error(f'--arms: unknown {unknown}; the arms are {ablation_config.ARMS}')
  maps = os.path.join(args.root, 'score_maps', 'manifest.json')
  if not os.path.exists(maps):
    print(f'{_FILE}: error: {maps} does not exist; run `make demo` first (its teacher and '
          'labelgen stages write the maps), or pass --root.', file=sys.stderr)
    return 2
  seeds = list(range(args.seeds))
  results: Dict[str, List[float]] = {}
  curves: Dict[str, List[str]] = {}
  for arm in arms:
    for seed in seeds:
      workdir = os.path.join(args.out, arm, f'seed_{seed}')
      seconds = run_arm(arm, seed, args.root, workdir, args.steps)
      results.setdefault(arm, []).append(final_top1(workdir))
      curves.setdefault(LABELS[arm], []).append(workdir)
      print(f'{arm} seed {seed}: top-1 {results[arm][-1]:.1f} % ({seconds:.0f} s)', flush=True)
  text = summary(results, seeds)
  header = (f'# python -m benchmarks.ablation --seeds {args.seeds} --arms {args.arms}'
            f'{f" --steps {args.steps}" if args.steps else ""}\n# {time.strftime("%Y-%m-%d")}, '
            'eval top-1 (%) on the 360 validation digits after the last step\n')
  print(text)
  os.makedirs(os.path.dirname(args.results) or '.', exist_ok=True)
  with open(args.results, 'w') as f:
    f.write(header + text + '\n')
  plots.plot_curves(curves, args.plot, title=args.title)
  print(f'wrote {args.results} and {args.plot}')
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
