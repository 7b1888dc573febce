"""What ``train.py`` and ``certify.py`` share: flag parsing and exit codes.

A user's mistake on the command line gets one line on stderr, never a
traceback, and a distinct exit status:

* ``OK`` (0): done (``--help`` too);
* ``VIOLATION`` (1): certify.py's audit broke a certified point; train.py's
  run diverged (a non-finite loss or parameters, a wild bound);
* ``USAGE`` (2): a bad flag, value, config, path or dataset, reported before
  any work and before anything is written;
* ``FAILURE`` (3): anything else, e.g. results that cannot be written or a
  checkpoint to restore that is corrupt.

absl's own handling would exit 1 for ``--help`` and for a bad flag (with
several lines), which a script could not tell from a soundness violation.
"""

from __future__ import annotations

import re
import sys
from typing import Callable, NoReturn, Sequence

from absl import flags

OK, VIOLATION, USAGE, FAILURE = 0, 1, 2, 3


def one_line(error) -> str:
  """An error's message on one line (absl and ml_collections wrap theirs)."""
  return " ".join(str(error).split())


def error_exit(program: str, message, code: int = USAGE) -> NoReturn:
  """Prints ``PROGRAM: error: MESSAGE`` as one line on stderr and exits."""
  print(f"{program}: error: {one_line(message)}", file=sys.stderr, flush=True)
  sys.exit(code)


def flags_parser(program: str, check: Callable[[Sequence[str]], None] | None
                 = None) -> Callable[[list[str]], list[str]]:
  """An ``absl.app.run`` flags parser with exit codes that mean something.

  Args:
    program: the name in error messages, e.g. ``"certify.py"``.
    check: called with ``argv`` before absl parses it; a ValueError it
      raises is a usage error (its message is printed as is).

  Returns:
    ``parse(argv) -> remaining argv``: ``--help`` (and ``--helpfull``)
    print the usage and exit 0; a flag absl refuses, a missing required
    flag or an unexpected positional argument exit 2 with one line.
  """

  def parse(argv: list[str]) -> list[str]:
    if check is not None:
      try:
        check(argv)
      except ValueError as error:
        error_exit(program, error)
    try:
      remaining = flags.FLAGS(argv)
    except SystemExit as done:  # absl's help flags print usage, then exit 1.
      raise SystemExit(OK if done.code == 1 else done.code) from None
    except flags.Error as error:
      # absl: "flag --x=None: Flag --x must have a value other than None."
      message = re.sub(r"flag --(\w+)=None: Flag --\1 must have a value "
                       r"other than None\.", r"--\1 is required.",
                       one_line(error))
      error_exit(program, f"{message} (see {program} --help)")
    if len(remaining) > 1:
      error_exit(program, f"unexpected argument(s) {remaining[1:]}: every "
                 f"setting is a --flag (see {program} --help)")
    return remaining

  return parse
