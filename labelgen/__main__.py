r"""`python -m labelgen <command>`: make or inspect token-label score maps.

    python -m labelgen generate --teacher CKPT --source tfds:imagenet2012 --out maps/teacher \
        [--size 384 --crop centre --k 5 --batch 64]
    python -m labelgen import --labels label_top5_train_nfnet.zip --source tfds:imagenet2012 \
        --out maps/nfnet_f6
    python -m labelgen show --source tfds:imagenet2012 --shards maps/nfnet_f6 --index 0 \
        --out labels.png [--augment --seed 1]

Each command is a module with `add_arguments(parser)` and `run(args) -> 0`; adding one is
adding a module and a line to `_COMMANDS`. A bad setting, a missing or foreign file or a refused
pickle is one line on stderr naming it and the fix, exit status 2 (`lvvit_jax/cli.py`);
`--verbose` after the command shows the traceback instead.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

# command -> (module, one-line help).
_COMMANDS = {
    'generate': ('labelgen.generate',
                 'run a teacher densely over a dataset and write its top-k score-map shards'),
    'import': ('labelgen.import_maps',
               'convert published .pt label maps (NFNet-F6, ReLabel) into score-map shards'),
    'show': ('labelgen.show', "draw an example's image with its token labels (PNG)"),
}


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Parses `argv` (default: sys.argv[1:]) and runs the chosen command; returns its status."""
  parser = argparse.ArgumentParser(prog='python -m labelgen', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  commands = parser.add_subparsers(dest='command', required=True, metavar='command')
  modules = {}
  for name, (module_name, help_text) in _COMMANDS.items():
    module = importlib.import_module(module_name)  # to build its parser
    sub = commands.add_parser(name, help=help_text, description=module.__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(sub)
    modules[name] = module
  args = parser.parse_args(argv)
  return modules[args.command].run(args)


if __name__ == '__main__':
  sys.exit(main())
