"""LV-ViT-T/S/M/L with token labeling on ImageNet-1k at 224 (SPEC section 6).

    python main.py --config configs/lvvit.py:variant=s --workdir W \\
        --config.data.score_maps_dir=labels/nfnet_f6 --config.data.data_dir=~/tensorflow_datasets
    python main.py --config configs/lvvit.py:variant=s,runlocal --workdir workdir/smoke   # CPU smoke run

Variants differ in drop path (T/S 0.1, M 0.2, L 0.3), peak lr at batch 1024 (1.6e-3; L 1e-3)
and RandAugment ops (L: three). L trains at 288 in the paper (`--config.img_size=288`).
"""
import ml_collections

from configs import common

VARIANTS = {
    't': {'drop_path_rate': 0.1, 'base_lr': 1.6e-3, 'randaug_num_ops': 2},
    's': {'drop_path_rate': 0.1, 'base_lr': 1.6e-3, 'randaug_num_ops': 2},
    'm': {'drop_path_rate': 0.2, 'base_lr': 1.6e-3, 'randaug_num_ops': 2},
    'l': {'drop_path_rate': 0.3, 'base_lr': 1e-3, 'randaug_num_ops': 3},
}


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, variant='s', runlocal=False)
  if arg.variant not in VARIANTS:
    raise ValueError(f'configs/lvvit.py: unknown variant {arg.variant!r}; use one of '
                     f'{sorted(VARIANTS)} (configs/lvvit.py:variant=s).')
  v = VARIANTS[arg.variant]
  c = common.get_base_config()
  c.model = f'lvvit_{arg.variant}'
  c.model_overrides.drop_path_rate = v['drop_path_rate']
  c.base_lr = v['base_lr']
  c.aug.randaug_num_ops = v['randaug_num_ops']
  if arg.runlocal:
    common.runlocal(c)
  return c
