"""Converts an official PyTorch LV-ViT checkpoint to an Orbax checkpoint of Flax variables.

    python -m lvvit_jax.convert --model lvvit_s \
        --torch-checkpoint lvvit_s-26M-224-83.3.pth.tar --output ckpt/lvvit_s_224

`--img-size` different from the checkpoint's resamples the position embedding (bicubic, cls
position kept); `--num-classes` different drops both heads (fresh init). Restore with
`lvvit_jax.checkpoints.load_variables(DIR)`.
"""
from __future__ import annotations

import argparse
from typing import Optional, Sequence

from lvvit_jax import checkpoints
from lvvit_jax.models import convert


def main(argv: Optional[Sequence[str]] = None) -> str:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--model', required=True, help='lvvit_t, lvvit_s, lvvit_m or lvvit_l')
  parser.add_argument('--torch-checkpoint', required=True, help='.pth / .pth.tar file')
  parser.add_argument('--output', required=True, help='new folder for the Orbax checkpoint')
  parser.add_argument('--img-size', type=int, default=None,
                      help='resample the position embedding to this image size')
  parser.add_argument('--num-classes', type=int, default=None,
                      help='drop both heads and initialise new ones with this many classes')
  args = parser.parse_args(argv)
  overrides = {}
  if args.img_size is not None:
    overrides['img_size'] = args.img_size
  if args.num_classes is not None:
    overrides['num_classes'] = args.num_classes
  variables = convert.load_torch_checkpoint(args.torch_checkpoint, args.model, **overrides)
  overrides = convert.checkpoint_overrides(variables, args.model)
  out = checkpoints.save_variables(args.output, variables, args.model, overrides)
  print(f'wrote {args.model} {overrides} to {out}')
  return out


if __name__ == '__main__':
  main()
