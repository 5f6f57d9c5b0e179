"""Transfer an ImageNet LV-ViT to another dataset and class count (heads re-initialised).

    python main.py --config configs/transfer.py:variant=s --workdir W \\
        --config.init_from=CKPT --config.data.source=tfds:oxford_flowers102 \\
        --config.num_classes=102 --config.data.data_dir=~/tensorflow_datasets
    python main.py --config configs/transfer.py:variant=s,runlocal --workdir workdir/smoke

Both heads are dropped and freshly initialised when the class count differs; everything else
comes from `init_from` (required). Without score maps for the new dataset the token term is
off (`dense_weight` None = 0.5 with score maps, 0 without); MixToken stays on.
"""
import ml_collections
from ml_collections import config_dict

from configs import common
from configs import lvvit


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, variant='s', runlocal=False)
  c = lvvit.get_config(f'variant={arg.variant}')
  c.data.source = 'tfds:oxford_flowers102'
  c.data.train_split = 'train'
  c.evals = ml_collections.ConfigDict()
  c.evals.val = {'source': c.data.get_ref('source'), 'split': 'test'}
  c.num_classes = 102
  c.dense_weight = config_dict.placeholder(float)   # None: 0.5 with score maps, else 0
  c.batch_size = 512
  c.base_lr = 1e-3                   # at batch 1024, linearly scaled
  c.num_epochs = 100
  c.warmup_epochs = 5
  c.cooldown_epochs = 0
  c.ema_decay = 0.999                # short runs: a slower EMA would lag the weights
  c.init_from_required = True
  if arg.runlocal:
    common.runlocal(c)
    c.init_from_required = False
  return c
