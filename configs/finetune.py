"""Fine-tune LV-ViT-S/M/L at a higher resolution from a checkpoint (SPEC section 6).

    python main.py --config configs/finetune.py:variant=s,size=384 --workdir W \\
        --config.init_from=CKPT_224 --config.data.score_maps_dir=labels/nfnet_f6
    python main.py --config configs/finetune.py:variant=s,runlocal --workdir workdir/smoke

The position embedding of the 224 checkpoint is resampled to the new grid (bicubic), the
token-label grid follows the image (size / 16: 24 at 384, 28 at 448), and training runs at a
constant lr of 5e-6 (at batch 1024, linearly scaled) with weight decay 1e-8 for 30 epochs.
`init_from` is required (a converted official checkpoint or a trainer workdir).
"""
import ml_collections

from configs import common
from configs import lvvit


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, variant='s', size=384, runlocal=False)
  if arg.variant not in ('s', 'm', 'l'):
    raise ValueError(f'configs/finetune.py: variant {arg.variant!r}: fine-tuning recipes exist '
                     'for s, m and l.')
  if arg.size not in (384, 448, 512):
    raise ValueError(f'configs/finetune.py: size={arg.size}: use 384, 448 or 512.')
  c = lvvit.get_config(f'variant={arg.variant}')
  c.img_size = arg.size
  c.base_lr = 5e-6
  c.init_lr = c.end_lr = 5e-6        # constant
  c.weight_decay = 1e-8
  c.num_epochs = 30
  c.warmup_epochs = c.cooldown_epochs = 0
  c.init_from_required = True
  if arg.runlocal:
    common.runlocal(c)
    c.img_size = 96                  # fine-tunes a 64 px checkpoint (or a fresh model) at 96
    c.lr = 5e-4
    c.init_from_required = False
  return c
