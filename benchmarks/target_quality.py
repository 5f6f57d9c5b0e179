"""What the student is taught: how often its targets name the image's label, over its crops.

    python -m benchmarks.target_quality --config configs/demo.py:stage=student \\
        --teacher workdir/demo/teacher --no-ema

Draws --batches training batches through the trainer's own path (the config's input pipeline
with its score maps, then the step's device augmentation), computes the step's targets
(`objective.batch_targets`, the ground-truth blend left out: it only mixes in the label) and
prints, for the cls target and for the token targets: how often the target's top class is the
image's label, the mean probability it gives the label, and its mean top probability.

With --teacher, the same for the teacher run on each augmented crop, the targets the trainer's
online teacher gives (`config.online_teacher`; `token_labeling.crop_targets`: its classifier
at every position on the student's token grid, the cls target from its logits averaged over
positions, the same smoothing), and how often its token targets agree with the maps'. That
separates what the stored maps lose through the crop's geometry from what the teacher itself
does not know about a crop. (These agreement figures do not predict a student's accuracy: the
online targets name the label less often than the maps' and teach far better, README "Demo".)
Accuracy figures, not timings: safe to run beside other work.
"""
import argparse
import importlib
from typing import Dict

import jax
import jax.numpy as jnp
import numpy as np

from lvvit_jax import augment as device_augment
from lvvit_jax import recipe
from lvvit_jax import train
from lvvit_jax.token_labeling import objective
from lvvit_jax.token_labeling.mixtoken import grid_shape
from lvvit_jax.token_labeling.online import crop_targets

_FILE = 'benchmarks/target_quality.py'


def load_config(spec: str):
  """`configs/<name>.py[:arg]` -> the ConfigDict its get_config(arg) returns."""
  path, _, arg = spec.partition(':')
  name = path.replace('\\', '/').split('/')[-1]
  if not name.endswith('.py'):
    raise ValueError(f'{_FILE}: --config {spec!r}: name a file of configs/, e.g. '
                     'configs/demo.py:stage=student.')
  return importlib.import_module('configs.' + name[:-3]).get_config(arg)


def target_stats(cls_t: jax.Array, tok_t: jax.Array, labels: np.ndarray) -> Dict[str, float]:
  """Label agreement of (B, K) cls and (B, gh, gw, K) token targets, each averaged."""
  cls_t, tok_t = np.asarray(cls_t), np.asarray(tok_t)
  tok = tok_t.reshape(tok_t.shape[0], -1, tok_t.shape[-1])
  lab = np.asarray(labels)
  return {
      'cls names the label': np.mean(cls_t.argmax(-1) == lab),
      'cls p(label)': np.mean(cls_t[np.arange(len(lab)), lab]),
      'cls top p': np.mean(cls_t.max(-1)),
      'tokens name the label': np.mean(tok.argmax(-1) == lab[:, None]),
      'tokens p(label)': np.mean(np.take_along_axis(tok, lab[:, None, None], -1)),
      'tokens top p': np.mean(tok.max(-1)),
  }


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog='python -m benchmarks.target_quality',
                                   description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='configs/demo.py:stage=student',
                      help="a student's recipe, configs/<name>.py[:arg]")
  parser.add_argument('--maps', default=None,
                      help="score-map directory (default: the config's data.score_maps_dir)")
  parser.add_argument('--teacher', default=None,
                      help='also run this checkpoint (trainer workdir or converted) on the crops')
  parser.add_argument('--ema', default=True, action=argparse.BooleanOptionalAction,
                      help="trainer checkpoints: the teacher's EMA weights (default) or raw ones")
  parser.add_argument('--batches', type=int, default=6)
  parser.add_argument('--batch-size', type=int, default=0, help="default: the config's")
  parser.add_argument('--workdir', default='workdir/target_quality',
                      help='where the bundled digits are written if the config reads them')
  args = parser.parse_args(argv)
  config = load_config(args.config)
  if args.maps:
    config.data.score_maps_dir = args.maps
  if args.batch_size:
    config.batch_size = args.batch_size
  if not config.data.score_maps_dir:
    parser.error(f'{args.config} trains on plain labels (no data.score_maps_dir): pass --maps '
                 'DIR, the score maps to measure.')
  train.prepare_builtin_data(config, args.workdir)
  model = recipe.build_model(config)
  grid, num_classes = model.config.grid, model.config.num_classes
  cfg = recipe.objective_config(config)
  augment = train.device_augment_config(config)
  teacher_logits = None  # images -> dense logits, as the trainer's online teacher runs it
  if args.teacher:
    from labelgen import teacher as teacher_lib  # pylint: disable=g-import-not-at-top
    teacher_logits = train.teacher_dense_logits(
        teacher_lib.load_teacher(args.teacher, ema=args.ema))
  batches = train.TrainInput(config, args.workdir, train.num_streams(config))
  dtype = getattr(model, 'dtype', jnp.float32)

  @jax.jit
  def step(batch):
    batch = dict(batch)
    image, affine = device_augment.augment_batch(
        batch.pop('image'), batch.pop('aug_seed'), batch['label_affine'], augment, dtype)
    batch['label_affine'] = affine
    maps = objective.batch_targets(batch, grid=grid, num_classes=num_classes,
                                   smoothing=cfg.smoothing, samples=cfg.samples,
                                   method=cfg.target_method)
    online = None
    if teacher_logits is not None:  # the targets the trainer's online teacher gives
      online = crop_targets(teacher_logits(image), grid=grid, smoothing=cfg.smoothing)
    return maps, online

  rows = {'maps': [], 'teacher on the crop': [], 'agree': []}
  for _ in range(args.batches):
    batch, _ = next(batches)
    (cls_t, tok_t), online = step({k: jnp.asarray(v) for k, v in batch.items()})
    rows['maps'].append(target_stats(cls_t, tok_t, batch['label']))
    if online:
      rows['teacher on the crop'].append(target_stats(*online, batch['label']))
      same = np.asarray(tok_t).argmax(-1) == np.asarray(online[1]).argmax(-1)
      rows['agree'].append(np.mean(same))
  n = args.batches * config.batch_size
  print(f'{args.config}, maps {config.data.score_maps_dir}, {n} training crops '
        f'(token grid {grid_shape(grid)})')
  names = list(rows['maps'][0])
  columns = [c for c in ('maps', 'teacher on the crop') if rows[c]]
  print(f'{"target":24s}' + ''.join(f'{c:>22s}' for c in columns))
  for name in names:
    print(f'{name:24s}' + ''.join(f'{np.mean([r[name] for r in rows[c]]):22.3f}'
                                  for c in columns))
  if rows['agree']:
    print(f'token targets: the same top class from the maps and the teacher on the crop: '
          f'{np.mean(rows["agree"]):.3f}')
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
