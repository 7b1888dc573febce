"""Progress bars and log lines on stderr, from process 0 only.

Training, certification and long bound computations share these so that
every phase longer than a few seconds shows a bar, and background runs' logs
say where they are.
"""

from __future__ import annotations

import sys

import jax
import tqdm


def progress_bar(*, total: int, initial: int, description: str,
                 enabled: bool = True):
  """A tqdm bar on stderr, only on process 0 and only when enabled."""
  return tqdm.tqdm(total=total, initial=initial, desc=description,
                   disable=not (enabled and jax.process_index() == 0),
                   file=sys.stderr, dynamic_ncols=True, leave=True,
                   mininterval=0.5)


def log(message: str) -> None:
  """A line on stderr from process 0 (tqdm-safe)."""
  if jax.process_index() == 0:
    tqdm.tqdm.write(message, file=sys.stderr)
