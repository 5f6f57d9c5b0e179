"""The common base of every recipe: LV-ViT on ImageNet-1k with token labeling (SPEC section 6).

Recipes (`lvvit.py`, `finetune.py`, `transfer.py`, `demo.py`, `nfnet.py`) are short diffs on
`get_base_config()`. Any field can be overridden on the command line
(`--config.batch_size=256`); the peak learning rate follows the linear-scaling rule
`lr = base_lr * batch_size / 1024` unless `--config.lr` is set. `runlocal` shrinks a recipe to
a run of a few steps on CPU with the bundled digits, to smoke-test it on a laptop.
"""
from typing import Any, Dict

import ml_collections
from ml_collections import config_dict


def parse_arg(arg: str, **defaults: Any) -> ml_collections.ConfigDict:
  """'variant=s,runlocal' -> {'variant': 's', 'runlocal': True} over `defaults`.

  A bare word is a True flag; values are typed like their default. Unknown keys are errors.
  """
  out: Dict[str, Any] = dict(defaults)
  for item in filter(None, (arg or '').split(',')):
    key, eq, value = item.partition('=')
    if key not in defaults:
      raise ValueError(f'configs: unknown config argument {key!r} in {arg!r}; the arguments '
                       f'are {sorted(defaults)}.')
    default = defaults[key]
    if not eq:
      out[key] = True
    elif isinstance(default, bool):
      out[key] = value.lower() in ('1', 'true', 'yes')
    elif isinstance(default, int):
      out[key] = int(value)
    else:
      out[key] = value
  return ml_collections.ConfigDict(out)


def get_base_config() -> ml_collections.ConfigDict:
  """LV-ViT-S/224 with token labeling on ImageNet-1k; every recipe starts here."""
  c = ml_collections.ConfigDict()
  c.mode = 'train'                   # 'train' (and evaluate) or 'eval' (config.init_from)
  c.seed = 0

  # Model (lvvit_jax.models): any LVViTConfig field can go into model_overrides.
  c.model = 'lvvit_s'
  c.img_size = 224                   # the training size
  c.eval_img_size = config_dict.placeholder(int)  # default img_size (NFNets: the test size)
  c.num_classes = 1000
  c.model_overrides = ml_collections.ConfigDict({'drop_path_rate': 0.1})
  c.dtype = 'auto'                   # bfloat16 on accelerators, float32 on CPU

  # Data: 'tfds:<name>' (prepared in data_dir), an ImageFolder-shards directory, or 'digits'.
  c.data = ml_collections.ConfigDict()
  c.data.source = 'tfds:imagenet2012'
  c.data.data_dir = config_dict.placeholder(str)
  c.data.train_split = 'train'
  c.data.score_maps_dir = config_dict.placeholder(str)   # labelgen output; None: plain labels
  c.data.score_maps_grid = config_dict.placeholder(tuple)  # e.g. (18, 18) to insist on a map size
  c.data.num_streams = config_dict.placeholder(int)      # default: the process count
  c.data.eval_batch_size = config_dict.placeholder(int)  # default: batch_size
  c.data.crop_pct = config_dict.placeholder(float)       # default: the model's (SPEC table)
  c.data.shuffle_buffer = 10_000
  c.data.cycle_length = 16
  c.data.num_parallel_calls = -1
  c.data.threadpool_size = config_dict.placeholder(int)
  c.data.prefetch = 2
  c.data.autotune = True             # tf.data autotuning; off in short runs (up to 60 s at exit)
  c.data.on_corrupt = 'skip'
  c.data.log_keys = False            # debugging: WORKDIR/keys/process_<i>.txt, every example read

  # Augmentation (SPEC section 6): random-resized crop, flip, RandAugment m9-mstd0.5, erasing.
  c.aug = ml_collections.ConfigDict()
  c.aug.scale = (0.08, 1.0)
  c.aug.ratio = (3 / 4, 4 / 3)
  # The crop's resize on the host: 'area' (antialiased area filter where the crop shrinks), 'pil'
  # (PIL's bilinear/bicubic to one grey level, as the PyTorch loader; ~5x the resize cost),
  # 'plain' (no antialiasing). README "Input pipeline".
  c.aug.resize = 'area'
  c.aug.hflip = 0.5
  c.aug.randaug_num_ops = 2
  c.aug.randaug_magnitude = 9.0
  c.aug.randaug_mstd = 0.5
  c.aug.randaug_prob = 0.5
  c.aug.erase_prob = 0.25

  # Evaluation: ImageNet val, plus ReaL and V2 when they are prepared in data_dir.
  c.evals = ml_collections.ConfigDict()
  c.evals.val = {'source': c.data.get_ref('source'), 'split': 'validation'}
  c.evals.real = {'source': 'tfds:imagenet2012_real', 'split': 'validation',
                  'label_feature': 'real_label', 'optional': True}
  c.evals.v2 = {'source': 'tfds:imagenet_v2', 'split': 'test', 'optional': True}
  c.eval_ema = True                  # evaluate the EMA weights (the reported model)

  # Token labeling (SPEC sections 3-5).
  c.cls_weight = 1.0
  c.dense_weight = 0.5               # the paper's beta; the released script uses 1.0
  c.smoothing = 0.1
  c.mixtoken = True
  c.mix = 'mixtoken'                 # with mixtoken: 'mixtoken', 'cutmix' (ablation) or 'none'
  c.ground_truth_blend = False
  # Online token labeling: a teacher (workdir or converted checkpoint) run on each augmented
  # crop gives the targets in the step instead of stored score maps (small teachers only:
  # lvvit_jax/train.py, make_online_teacher). The EMA or raw weights of a trainer workdir.
  c.online_teacher = config_dict.placeholder(str)
  c.online_teacher_ema = True
  # What it sees: 'crop' (the student's crop, resized to its input) or 'in_place' (the crop at
  # its place and the source's scale, the rest masked; an ablation of a crop's context).
  c.online_teacher_view = 'crop'

  # Optimisation: AdamW with the decay mask, warm-up + cosine + cool-down, EMA.
  c.optimizer = 'adamw'              # or 'sgd' (momentum, nesterov): lvvit_jax/optim.py
  c.decay_mask = 'lvvit'             # which parameters decay: optim.DECAY_MASKS
  c.batch_size = 1024                # global
  c.base_lr = 1.6e-3                 # peak lr at batch 1024
  c.lr = c.get_ref('base_lr') * c.get_ref('batch_size') / 1024   # linear scaling
  c.init_lr = 1e-6
  c.end_lr = 1e-5
  c.num_epochs = 310                 # 300 cosine + 10 at end_lr
  c.warmup_epochs = 5
  c.cooldown_epochs = 10
  c.total_steps = config_dict.placeholder(int)    # set to override the epoch recipe
  c.warmup_steps = config_dict.placeholder(int)
  c.weight_decay = 0.05
  c.b1 = 0.9
  c.b2 = 0.999
  c.eps = 1e-8
  c.momentum = 0.9                   # sgd only
  c.nesterov = True                  # sgd only
  c.grad_clip_norm = config_dict.placeholder(float)   # the recipe does not clip
  c.agc_clip = config_dict.placeholder(float)    # adaptive gradient clipping (NFNets: 0.01)
  c.agc_eps = 1e-3
  c.grad_accum_steps = 1
  c.ema_decay = 0.99992
  c.ema_warmup = False               # True: decay min(ema_decay, (1 + step) / (10 + step))

  # Mesh: all devices on 'data' (data parallel); fsdp > 1 shards tensors >= fsdp_min_size.
  c.mesh = ml_collections.ConfigDict({'data': -1, 'fsdp': 1, 'fsdp_min_size': 2**18})

  # Loop, checkpoints, init.
  c.log_every = 100
  c.eval_every = config_dict.placeholder(int)     # default: once per epoch
  c.checkpoint_every = 1000
  c.keep = 3                          # last N checkpoints, plus the best by eval top-1
  c.keep_best = True
  c.init_from = config_dict.placeholder(str)      # converted checkpoint, workdir or step dir
  c.init_from_required = False        # fine-tune and transfer recipes need init_from
  c.init_ema = True                   # from a trainer checkpoint: its EMA weights
  c.profile = False
  return c


def runlocal(c: ml_collections.ConfigDict, steps: int = 24) -> ml_collections.ConfigDict:
  """Shrinks a recipe to `steps` CPU steps on the bundled digits (64 px, batch 8; LV-ViT: 2
  blocks, NFNet: one block a stage). Call it after setting `c.model`."""
  c.data.source = 'digits'
  c.data.score_maps_dir = None
  c.data.shuffle_buffer = 256
  c.data.cycle_length = 4
  c.data.autotune = False  # a finished iterator would wait for the autotuner (PipelineConfig)
  c.evals = ml_collections.ConfigDict()
  c.evals.val = {'source': 'digits', 'split': 'validation'}
  c.img_size = 64
  c.num_classes = 10
  if c.model.startswith('nfnet_'):
    c.model_overrides.depths = (1, 1, 1, 1)   # an F variant keeps its widths
  else:
    c.model_overrides.depth = 2
  c.dtype = 'float32'
  c.batch_size = 8
  c.lr = 1e-3
  c.total_steps = steps
  c.warmup_steps = 2
  c.ema_decay = 0.9
  c.log_every = 4
  c.eval_every = steps
  c.checkpoint_every = steps // 2
  return c
