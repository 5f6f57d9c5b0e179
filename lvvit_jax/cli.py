"""How every command-line entry fails: one line on stderr naming the problem and the fix, exit 2.

    with cli.user_errors('python -m lvvit_jax.convert', verbose=args.verbose):
      run(args)

The library raises `ValueError` (and its subclasses: `CheckpointMismatchError`,
`GenerateError`, `PtFileError`, `ScoreMapError`, ...) for a bad setting, and the file-system
errors for a missing or foreign file; their messages already name the setting or file and the
fix. At the command line they become one line, `<prog>: error: <message>`, and exit status 2;
the traceback only with `--verbose`. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import contextlib
import pickle
import sys
import zipfile
from typing import Iterator, Tuple, Type

USER_ERRORS: Tuple[Type[BaseException], ...] = (
    ValueError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError,
    PermissionError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError)
EXIT_STATUS = 2


def one_line(error: BaseException) -> str:
  """The error's message on one line (multi-line lists joined with '; ')."""
  text = str(error).strip() or type(error).__name__
  return '; '.join(line.strip() for line in text.splitlines() if line.strip())


def report(prog: str, error: BaseException) -> None:
  """Prints `<prog>: error: <message>` on stderr."""
  print(f'{prog}: error: {one_line(error)}', file=sys.stderr, flush=True)


@contextlib.contextmanager
def user_errors(prog: str, verbose: bool = False) -> Iterator[None]:
  """Turns USER_ERRORS raised inside into one stderr line and `SystemExit(2)`.

  With `verbose` the error propagates with its traceback instead.
  """
  try:
    yield
  except USER_ERRORS as e:
    if verbose:
      raise
    report(prog, e)
    raise SystemExit(EXIT_STATUS) from None
