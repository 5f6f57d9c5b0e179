"""Converts a published checkpoint (LV-ViT PyTorch, NFNet Haiku) to an Orbax checkpoint.

    python -m lvvit_jax.convert --model lvvit_s \
        --torch-checkpoint lvvit_s-26M-224-83.3.pth.tar --output ckpt/lvvit_s_224
    python -m lvvit_jax.convert --model nfnet_f6 \
        --haiku-checkpoint F6_haiku.npz --output ckpt/nfnet_f6

The source is exactly one of `--torch-checkpoint` (the LV-ViT authors' .pth files) and
`--haiku-checkpoint` (DeepMind's NFNet F0_haiku.npz .. F6_haiku.npz: read without running any
code from the file). `--num-classes` different from the checkpoint's drops the classifier
heads (fresh init). `--img-size` sets the model's image size: LV-ViT's position embedding is
resampled to it (bicubic, cls position kept); an NFNet is fully convolutional and only records
it (default: the variant's test size). Restore with `lvvit_jax.checkpoints.load_variables(DIR)`.

A bad setting or file is one line on stderr and exit status 2 (the traceback with --verbose).
"""
from __future__ import annotations

import argparse
from typing import Dict, Optional, Sequence

from lvvit_jax import checkpoints
from lvvit_jax import cli
from lvvit_jax.models import convert
from lvvit_jax.models import nfnet_convert

_FILE = 'lvvit_jax/convert.py'
PROG = 'python -m lvvit_jax.convert'


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
  parser.add_argument('--model', required=True,
                      help='lvvit_t, lvvit_s, lvvit_m or lvvit_l (--torch-checkpoint); '
                           'nfnet_f0 .. nfnet_f7 (--haiku-checkpoint)')
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument('--torch-checkpoint', help="the LV-ViT authors' .pth / .pth.tar file")
  source.add_argument('--haiku-checkpoint', help="DeepMind's NFNet file, e.g. F0_haiku.npz")
  parser.add_argument('--output', required=True, help='new folder for the Orbax checkpoint')
  parser.add_argument('--img-size', type=int, default=None,
                      help='image size of the model (LV-ViT: resamples the position embedding)')
  parser.add_argument('--num-classes', type=int, default=None,
                      help='drop the classifier heads and initialise new ones with this many '
                           'classes')
  parser.add_argument('--verbose', action='store_true',
                      help='show the traceback of an error instead of one line')
  return parser.parse_args(argv)


def convert_checkpoint(args: argparse.Namespace) -> str:
  """Reads the checkpoint of `args`, writes `args.output`; returns the output folder."""
  overrides: Dict[str, int] = {}
  if args.img_size is not None:
    overrides['img_size'] = args.img_size
  if args.num_classes is not None:
    overrides['num_classes'] = args.num_classes
  if args.haiku_checkpoint is not None:
    variables = nfnet_convert.load_haiku_checkpoint(args.haiku_checkpoint, args.model,
                                                    **overrides)
    overrides = nfnet_convert.checkpoint_overrides(variables, args.model, args.img_size)
  else:
    if nfnet_convert.is_nfnet(args.model):
      raise ValueError(f'{_FILE}: --torch-checkpoint reads the LV-ViT authors\' files; import '
                       f'{args.model} from DeepMind\'s Haiku file with --haiku-checkpoint.')
    variables = convert.load_torch_checkpoint(args.torch_checkpoint, args.model, **overrides)
    overrides = convert.checkpoint_overrides(variables, args.model)
  out = checkpoints.save_variables(args.output, variables, args.model, overrides)
  print(f'wrote {args.model} {overrides} to {out}')
  return out


def main(argv: Optional[Sequence[str]] = None) -> str:
  """Converts as the command line does, but errors raise (for callers and tests)."""
  return convert_checkpoint(parse_args(argv))


def run(argv: Optional[Sequence[str]] = None) -> None:
  """The command line: a user error is one line on stderr and exit status 2 (see cli.py)."""
  args = parse_args(argv)
  with cli.user_errors(PROG, verbose=args.verbose):
    convert_checkpoint(args)


if __name__ == '__main__':
  run()
