"""Dense score maps from a teacher (`labelgen generate`) as main.py's mode 'labelgen'.

    python main.py --config configs/labelgen.py --workdir W --config.teacher=CKPT \\
        --config.out=DIR [--config.size=384 --config.crop=centre --config.data.source=...]
    python main.py --config configs/labelgen.py:runlocal --workdir workdir/labelgen \\
        --config.teacher=workdir/demo                      # the demo's model on the digits

The same run as `python -m labelgen generate --teacher CKPT --source ... --out DIR` (what is
written and how a rerun resumes: labelgen/generate.py). `teacher` is a converted checkpoint, a
trainer workdir or one of its step folders; `out` defaults to WORKDIR/score_maps and the
bundled digits are written under WORKDIR/data. Multi-process runs start like the trainer's.
"""
import ml_collections
from ml_collections import config_dict

from configs import common


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, runlocal=False)
  c = ml_collections.ConfigDict()
  c.mode = 'labelgen'
  c.teacher = config_dict.placeholder(str)   # checkpoint, trainer workdir or step folder
  c.ema = True                               # trainer checkpoints: EMA weights (else raw)
  c.out = config_dict.placeholder(str)       # default: WORKDIR/score_maps

  # Data: 'tfds:<name>' (prepared in data_dir), an ImageFolder-shards directory, or 'digits'.
  c.data = ml_collections.ConfigDict()
  c.data.source = 'tfds:imagenet2012'
  c.data.split = 'train'
  c.data.data_dir = config_dict.placeholder(str)
  c.data.num_parallel_calls = -1             # decoding threads; -1: tf.data AUTOTUNE

  # Teacher input and what is kept.
  c.size = config_dict.placeholder(int)      # default: the checkpoint's img_size
  c.crop = 'resize'                          # 'resize' (whole image) or 'centre'
  c.k = 5
  c.batch_size = 64                          # per process; a multiple of its devices
  c.dtype = 'auto'                           # bfloat16 on accelerators, float32 on CPU
  c.stitch = 1                               # n: maps n times finer (n x n shifted passes)
  if arg.runlocal:
    c.data.source = 'digits:64'
    c.data.split = 'validation'
    c.batch_size = 16
  return c
