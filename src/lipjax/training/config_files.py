"""Config files on train.py's command line: ``--config FILE[:VARIANT]``.

ml_collections' config flag reports a mistyped path only when the config is
first used, and a bad variant or an unknown ``--config.key=value`` as chained
tracebacks. :func:`check_command_line` runs before it parses the command
line and turns each of these into a one-line ValueError that names the fix;
:func:`describe` lists the shipped configs and their variants for
``train.py --help``.

A config file defines ``get_config()``, or ``get_config(variant)`` when it
has variants; it lists them in a module-level ``VARIANTS`` tuple.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import os
import pkgutil
import re
from typing import Sequence

from lipjax.training import config_checks

# --config=FILE, --config FILE (also with one dash).
_CONFIG = re.compile(r"^--?config(?:=(.*))?$")
# --config.a.b=V, --config.a.b V, --config.flag, --noconfig.flag.
_OVERRIDE = re.compile(r"^--?(?:no)?config\.([^=]+)(?:=.*)?$")


def _config_argument(argv: Sequence[str]) -> str | None:
  """The value of the last ``--config`` in ``argv`` (absl's rule), or None."""
  value = None
  for i, arg in enumerate(argv):
    if arg == "--":
      break
    match = _CONFIG.match(arg)
    if match:
      value = match.group(1) if match.group(1) is not None else (
          argv[i + 1] if i + 1 < len(argv) else None)
  return value


def _overrides(argv: Sequence[str]) -> list[str]:
  """The keys of every ``--config.KEY`` override in ``argv``."""
  keys = []
  for arg in argv:
    if arg == "--":
      break
    match = _OVERRIDE.match(arg)
    if match:
      keys.append(match.group(1))
  return keys


def _missing_file_message(path: str) -> str:
  folder = os.path.dirname(path) or "."
  names = (sorted(n for n in os.listdir(folder) if n.endswith(".py"))
           if os.path.isdir(folder) else [])
  close = difflib.get_close_matches(os.path.basename(path), names, n=1)
  hint = (f" Did you mean {os.path.join(os.path.dirname(path), close[0])}?"
          if close else "")
  return (f"--config: no config file {path} (relative to "
          f"{os.getcwd()}).{hint} The shipped configs are configs/*.py; "
          "see train.py --help.")


def load(argument: str):
  """The config that ``--config ARGUMENT`` (``FILE[:VARIANT]``) names.

  Raises:
    ValueError: a missing file, a file that fails to load, a variant for a
      file without variants, or a variant the file refuses.
  """
  path, _, variant = argument.partition(":")
  if not os.path.isfile(path):
    raise ValueError(_missing_file_message(path))
  spec = importlib.util.spec_from_file_location("_lipjax_checked_config", path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except Exception as error:  # A user's file: any error is theirs to fix.
    raise ValueError(f"--config: {path} fails to load: "
                     f"{type(error).__name__}: {error}") from error
  get_config = getattr(module, "get_config", None)
  if get_config is None:
    raise ValueError(f"--config: {path} defines no get_config().")
  if variant and not inspect.signature(get_config).parameters:
    raise ValueError(f"--config: {path} has no variants; use --config "
                     f"{path} without ':{variant}'.")
  try:
    return get_config(variant) if variant else get_config()
  except ValueError as error:  # E.g. an unknown variant.
    raise ValueError(f"--config {argument}: {error}") from error


def check_command_line(argv: Sequence[str]) -> None:
  """Refuses a bad ``--config`` file or variant or an unknown override key.

  A missing ``--config`` is left to absl (a required flag).

  Raises:
    ValueError: one line naming the fix.
  """
  argument = _config_argument(argv)
  if argument is None:
    return
  config = load(argument)
  flat = config_checks.flatten(config)
  # A whole sub-config may be overridden too (--config.data.synthetic=...).
  known = set(flat) | {k.rsplit(".", n)[0] for k in flat
                       for n in range(1, k.count(".") + 1)}
  for key in _overrides(argv):
    if key not in known:
      raise ValueError(f"--config.{key}: "
                       + config_checks.unknown_key_message(key, flat))


def describe(package: str = "configs") -> str:
  """The shipped configs, one per line, with their variants (for --help)."""
  lines = []
  folder = importlib.import_module(package).__path__
  for info in sorted(pkgutil.iter_modules(folder), key=lambda i: i.name):
    if info.name in ("__init__", "default"):
      continue
    module = importlib.import_module(f"{package}.{info.name}")
    summary = (module.__doc__ or "").strip().splitlines()[:1] or [""]
    variants = getattr(module, "VARIANTS", ())
    lines.append(f"  {package}/{info.name}.py: {summary[0]}"
                 + (f" Variants: {', '.join(variants)}." if variants else ""))
  return "\n".join(lines)
