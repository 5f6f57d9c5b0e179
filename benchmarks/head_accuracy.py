"""Top-1 of each head of a trained LV-ViT: the cls head alone, the aux head alone, and both.

    python -m benchmarks.head_accuracy --config configs/demo.py:stage=student \\
        --checkpoint workdir/demo/student --no-ema

LV-ViT predicts `cls + 0.5 * max over tokens of aux` (lvvit_jax/models/lvvit.py); this prints,
on each eval split of the config, the top-1 of that rule (the trainer's eval figure), of the cls
logits alone and of the aux head's max over tokens alone: which head a run's accuracy comes
from. The checkpoint is a trainer workdir (its last step), a step folder or a converted
checkpoint; the eval pipeline and metric are the trainer's.
"""
import argparse
from typing import Dict

import jax
import jax.numpy as jnp

from benchmarks.target_quality import load_config
from lvvit_jax import augment as device_augment
from lvvit_jax import checkpoints
from lvvit_jax import evaluate as evaluate_lib
from lvvit_jax import recipe
from lvvit_jax import sharding
from lvvit_jax import train
from lvvit_jax.models.lvvit import AUX_WEIGHT_AT_INFERENCE

_FILE = 'benchmarks/head_accuracy.py'
HEADS = ('cls + 0.5 * max aux (inference)', 'cls head alone', 'aux head alone (max over tokens)')


def head_logits(model, variables, images: jax.Array) -> Dict[str, jax.Array]:
  """(B, K) logits of each head choice in HEADS, from one forward pass."""
  def heads(module, x):  # the two heads on the eval-mode features, as LVViT.__call__ applies them
    x = module.features(x)
    return module.head(x[:, 0]), module.aux_head(x[:, 1:])

  cls_logits, aux = model.apply(variables, images, method=heads)
  cls_logits = cls_logits.astype(jnp.float32)
  aux_max = jnp.max(aux.astype(jnp.float32), axis=1)
  return dict(zip(HEADS, (cls_logits + AUX_WEIGHT_AT_INFERENCE * aux_max, cls_logits, aux_max)))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog='python -m benchmarks.head_accuracy',
                                   description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='configs/demo.py:stage=student',
                      help='the recipe the checkpoint was trained with, configs/<name>.py[:arg]')
  parser.add_argument('--checkpoint', required=True,
                      help='trainer workdir, checkpoints/<step> folder or converted checkpoint')
  parser.add_argument('--ema', default=True, action=argparse.BooleanOptionalAction,
                      help='trainer checkpoints: the EMA weights (default) or the raw ones')
  parser.add_argument('--workdir', default='workdir/demo',
                      help='where the bundled digits are (or are written) if the config reads them')
  args = parser.parse_args(argv)
  config = load_config(args.config)
  model = recipe.build_eval_model(config)
  if not getattr(model.config, 'aux_head', False):
    parser.error(f'{args.config}: {config.model} has no aux head; nothing to split.')
  variables, _ = checkpoints.load_model_variables(args.checkpoint, ema=args.ema)
  variables = {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}
  train.prepare_builtin_data(config, args.workdir)
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
  splits = train.make_eval_splits(config, args.workdir, model)
  print(f'{args.checkpoint} ({"EMA" if args.ema else "raw"} weights), {args.config}')
  # One pass of the trainer's eval (`train.run_evals`) per head: its pipeline and metric exactly,
  # at three forward passes over the eval splits (seconds for the demo's 360 images).
  for head in HEADS:
    def predict(v, images, head=head):
      images = device_augment.normalize(images, dtype=getattr(model, 'dtype', jnp.float32))
      return head_logits(model, recipe.at_eval_size(v, model), images)[head]
    result = train.run_evals(jax.jit(evaluate_lib.make_eval_step(predict)), variables, splits,
                             mesh)
    for split in splits:
      print(f'{split.name:10s} {head:36s} top-1 {100 * result[f"eval/{split.name}/top1"]:5.1f} %'
            f'  ({int(result[f"eval/{split.name}/count"])} examples)')
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
