"""The demo: a tiny LV-ViT trained by the real trainer on the bundled digits, on a laptop CPU.

    python main.py --config configs/demo.py --workdir workdir/demo      # what `make demo` runs
    python main.py --config configs/demo.py:runlocal --workdir /tmp/smoke

scikit-learn's 1,797 handwritten digits, each pasted at a random position and scale on a
64x64 canvas (`lvvit_jax/data/digits.py`), are written once into an ImageFolder of PNGs and
shards under WORKDIR/data, then go through the whole path: the tf.data train and eval
iterators (random-resized crop, flip, RandAugment, erasing), the sharded update step with
MixToken and the token-labeling loss, Orbax checkpoints (a rerun resumes), and the eval.
The model is LV-ViT-T's stem and blocks at patch 8 (an 8x8 token grid), 4 blocks of dim 192.
"""
import ml_collections

from configs import common


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, runlocal=False)
  c = common.get_base_config()
  c.model = 'lvvit_t'
  c.model_overrides = ml_collections.ConfigDict({
      'depth': 4, 'dim': 192, 'num_heads': 3, 'mlp_hidden': 576, 'stem_channels': 32,
      'patch_size': 8, 'drop_path_rate': 0.0})
  c.img_size = 64
  c.num_classes = 10
  c.dtype = 'float32'
  c.data.source = 'digits:64'
  c.data.shuffle_buffer = 2048
  c.data.cycle_length = 8
  c.evals = ml_collections.ConfigDict()
  c.evals.val = {'source': 'digits:64', 'split': 'validation'}
  c.batch_size = 64
  c.lr = 2e-3
  c.total_steps = 1200
  c.warmup_steps = 100
  c.end_lr = 1e-5
  c.ema_decay = 0.998
  c.log_every = 100
  c.eval_every = 400
  c.checkpoint_every = 400
  if arg.runlocal:
    common.runlocal(c, steps=24)
    c.img_size = 64
    c.data.source = 'digits:64'
    c.evals.val = {'source': 'digits:64', 'split': 'validation'}
    c.model_overrides.depth = 2
  return c
