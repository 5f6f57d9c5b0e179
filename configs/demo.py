"""Demo: LV-ViT-T (small patches) with MixToken and the token-labeling loss on sklearn digits.

    python main.py --config configs/demo.py --workdir workdir/demo      # what `make demo` runs
    python main.py --config configs/demo.py:runlocal --workdir workdir/smoke   # seconds-long smoke run

Digits are 8x8; they are upsampled to 16x16 and cut into 4x4 patches (a 4x4 token grid), so the
whole method runs on a laptop CPU in about a minute.
"""
import ml_collections


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.job = 'demo'
  c.seed = 0
  c.model = 'lvvit_t'
  c.model_overrides = {'depth': 4, 'drop_path_rate': 0.0}
  c.img_size = 16
  c.patch_size = 4
  c.dtype = 'float32'
  c.batch_size = 64
  c.total_steps = 300
  c.warmup_steps = 30
  c.lr = 1e-3
  c.weight_decay = 0.05
  c.smoothing = 0.1
  c.dense_weight = 0.5
  c.log_every = 50
  if 'runlocal' in arg.split(','):
    c.total_steps, c.warmup_steps, c.log_every = 10, 2, 5
  return c
