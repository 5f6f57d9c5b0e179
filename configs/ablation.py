"""The paper's ablations in small: one arm and seed of `benchmarks/ablation.py` on the demo data.

    python main.py --config configs/ablation.py:arm=token_labeling,seed=1 \\
        --workdir workdir/ablation/token_labeling/seed_1
    python main.py --config configs/ablation.py:arm=relabel,runlocal --workdir workdir/smoke

Every arm is the demo's student (`configs/demo.py:stage=student`: the same LV-ViT, steps,
crops, augmentation, evals and no mixing) with one setting changed, on the demo's teacher maps
(`<root>/score_maps`, `make demo` writes them; root=workdir/demo by default). The demo's
student and baseline are `tl_no_mix` and `plain_dense` at seed 0.

| arm | labels | dense loss | mix |
|---|---|---|---|
| plain_cls | image label, cls only (a ViT as usually trained) | no | none |
| plain_dense | image label on the cls and every token (the demo's baseline) | 0.5 | none |
| relabel | the teacher's map pooled over the crop, cls only (ReLabel) | no | none |
| token_labeling | map pooled over the crop (cls) and over each token's cell (the paper) | 0.5 | MixToken |
| tl_cutmix | as token_labeling | 0.5 | CutMix (pixels; targets by area and coverage) |
| tl_no_mix | as token_labeling (the demo's student) | 0.5 | none |
| vit_plain | plain ViT (`vit_s`-style at demo size: patchify, no aux), image label | no | none |
| vit_tl | the same ViT with an aux head, token labels | 0.5 | none |
| online | `<root>/teacher` run on each crop: mean logits (cls), logits per token | 0.5 | none |
| online_in_place | that teacher on each crop in place (source scale, rest masked), as a map | 0.5 | none |

The students mix nothing unless the arm is about mixing: at 300 steps MixToken costs the demo's
students tens of points (README "Demo"), which would bury every other difference.
The arms with maps or the online teacher inherit the demo student's `ground_truth_blend`.
`online` is online token labeling: the targets come from the teacher on the student's own crop
(`config.online_teacher`), not from its score maps of the whole image. `online_in_place` keeps
the maps' scale and pooling but shows the teacher only the crop (`online_teacher_view`): with
`online` and `tl_no_mix` it separates what a crop's surroundings and its scale do to targets.
`seed` changes the initialisation, the data order and every augmentation draw.
"""
import ml_collections

from configs import common
from configs import demo

ARMS = ('plain_cls', 'plain_dense', 'relabel', 'token_labeling', 'tl_cutmix', 'tl_no_mix',
        'vit_plain', 'vit_tl', 'online', 'online_in_place')
_MAPS = ('relabel', 'token_labeling', 'tl_cutmix', 'tl_no_mix', 'vit_tl')


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, arm='token_labeling', seed=0, root='workdir/demo', runlocal=False)
  if arg.arm not in ARMS:
    raise ValueError(f'configs/ablation.py: arm={arg.arm!r}; use one of {ARMS}.')
  c = demo.get_config(f'stage=student,root={arg.root}')
  c.seed = arg.seed
  c.mixtoken, c.mix = arg.arm in ('token_labeling', 'tl_cutmix'), 'mixtoken'
  c.data.score_maps_dir = f'{arg.root}/score_maps' if arg.arm in _MAPS else None
  c.dense_weight = 0.0 if arg.arm in ('plain_cls', 'relabel', 'vit_plain') else 0.5
  if arg.arm.startswith('online'):  # The teacher's raw weights, as labelgen --no-ema reads them.
    c.online_teacher, c.online_teacher_ema = f'{arg.root}/teacher', False
    c.online_teacher_view = 'in_place' if arg.arm == 'online_in_place' else 'crop'
  if arg.arm == 'tl_cutmix':
    c.mix = 'cutmix'
  elif arg.arm.startswith('vit_'):
    # The ViT baseline's architecture at the demo's size: 8x8 patchify into the same 8x8 token
    # grid, unscaled residuals, the same width and depth.
    c.model = 'vit_s'
    c.model_overrides.update(conv_stem=False, skip_lam=1.0, aux_head=arg.arm == 'vit_tl')
    del c.model_overrides['stem_channels']
  if arg.runlocal:  # A smoke run of the arm: the same code path, seconds long.
    c.model_overrides.depth = 1
    c.total_steps, c.warmup_steps, c.batch_size = 4, 1, 16
    c.log_every, c.eval_every, c.checkpoint_every = 2, 4, 4
  return c
