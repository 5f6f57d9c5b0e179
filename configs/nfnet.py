"""NFNet-F0..F7 on ImageNet-1k with DeepMind's reference recipe (plain labels; the teachers).

    python main.py --config configs/nfnet.py:variant=f0 --workdir W \\
        --config.data.data_dir=~/tensorflow_datasets                                # train F0
    python main.py --config configs/nfnet.py:variant=f0 --config.mode=eval \\
        --config.init_from=ckpt/nfnet_f0 --workdir W           # evaluate an imported NFNet-F0
    python main.py --config configs/nfnet.py:variant=demo --workdir workdir/nfnet_demo  # digits
    python main.py --config configs/nfnet.py:variant=f0,runlocal --workdir workdir/smoke  # CPU

The recipe of `deepmind-research/nfnets/experiment_nfnets.py` (with `optim.py`, `utils.py`):
SGD with Nesterov momentum 0.9 at lr 0.1 per 256 images (linear scaling; batch 4096 -> 1.6),
5 epochs of linear warm-up from 0, cosine to 0 over 360 epochs; adaptive gradient clipping
0.01 (eps 1e-3) on every parameter but the classifier's weight (`linear/kernel`; its bias is
clipped); weight decay 2e-5 added to the gradient (L2), on every weight but gains, skip gains
and biases; label smoothing 0.1; EMA 0.99999 with TF1's warm-up min(d, (1 + t) / (10 + t)),
the reported model; stochastic depth 0.25 and the variant's head dropout (F0 0.2 .. F7 0.5);
no MixToken, no aux head. Training runs at the variant's train size (`img_size`), evaluation at
its test size (`eval_img_size`): the net is fully convolutional, so the eval model is the same
variables at the other size; the eval crop is the model's crop_pct = test / (test + 32).

Augmentation, as far as the trainer's pieces map it: the random-resized crop and flip as the
base; RandAugment with 4 ops, each always applied, at a fixed magnitude (the reference's
'405' F0, '410' F1-F2, '415' F3-F7; 15 is above the 0..10 scale of our timm-style ops, so F3+
use 10), no random erasing. Not reproduced: the reference's MixUp + CutMix on every batch (the
trainer has neither), and its TF RandAugment op set (Cutout; unsigned enhance ops).
"""
import ml_collections

from configs import common

# (train size, test size, RandAugment magnitude): `nfnets/base.py::nfnet_params` and the
# reference's RandAugment levels; the sizes are the registry's (`lvvit_jax/models/nfnet.py`).
VARIANTS = {
    'f0': (192, 256, 5), 'f1': (224, 320, 10), 'f2': (256, 352, 10), 'f3': (320, 416, 15),
    'f4': (384, 512, 15), 'f5': (416, 544, 15), 'f6': (448, 576, 15), 'f7': (480, 608, 15),
    # nfnet_demo on the bundled digits (CPU, minutes). It learns slowly: zero-init skip gains
    # and AGC let the body move little in a short run (300 steps: loss 2.30 -> 2.26, 15 %).
    # The demo's teacher is configs/demo.py:stage=teacher (AdamW, measured: 96.7 %).
    'demo': (64, 64, 5),
}
MAX_MAGNITUDE = 10.0  # lvvit_jax/augment/config.py MAX_LEVEL


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, variant='f0', runlocal=False)
  if arg.variant not in VARIANTS:
    raise ValueError(f'configs/nfnet.py: unknown variant {arg.variant!r}; use one of '
                     f'{sorted(VARIANTS)} (configs/nfnet.py:variant=f0).')
  train_size, test_size, magnitude = VARIANTS[arg.variant]
  c = common.get_base_config()
  c.model = f'nfnet_{arg.variant}'
  c.img_size, c.eval_img_size = train_size, test_size
  c.model_overrides = ml_collections.ConfigDict({'drop_path_rate': 0.25})
  c.mixtoken = False
  c.dense_weight = 0.0
  c.aug.randaug_num_ops = 4
  c.aug.randaug_magnitude = min(float(magnitude), MAX_MAGNITUDE)
  c.aug.randaug_mstd = 0.0
  c.aug.randaug_prob = 1.0
  c.aug.erase_prob = 0.0
  c.optimizer, c.decay_mask = 'sgd', 'nfnet'
  c.momentum, c.nesterov = 0.9, True
  c.agc_clip, c.agc_eps = 0.01, 1e-3
  c.weight_decay = 2e-5
  c.batch_size = 4096
  c.base_lr = 0.4                    # at batch 1024: 0.1 per 256 images
  c.init_lr = c.end_lr = 0.0
  c.num_epochs, c.warmup_epochs, c.cooldown_epochs = 360, 5, 0
  c.ema_decay, c.ema_warmup = 0.99999, True
  if arg.variant == 'demo':          # configs/demo.py's data and length
    c.num_classes = 10
    c.data.source = 'digits:64'
    c.evals = ml_collections.ConfigDict({'val': {'source': 'digits:64', 'split': 'validation'}})
    c.aug.hflip, c.aug.randaug_num_ops, c.aug.erase_prob = 0.0, 1, 0.0
    c.dtype = 'float32'
    c.batch_size, c.lr = 64, 0.2     # 8x the linear-scaling lr: a run of minutes
    c.total_steps, c.warmup_steps = 300, 30
    c.ema_decay = 0.99
    c.log_every, c.eval_every, c.checkpoint_every = 50, 300, 100
  if arg.runlocal:
    common.runlocal(c)
    c.eval_img_size = 80             # trains at 64, evaluates at another size
    c.lr = 0.2                       # (linear scaling: 0.003 at batch 8)
  return c
