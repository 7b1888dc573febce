"""Checksums of a saved training state, and where a broken checkpoint broke.

Orbax checks only the index of its array files (a CRC32C per shard index),
not the array bytes: a flipped bit in a data file restores without an error.
So every checkpoint carries, as a second Orbax item beside the state, a
table with one row per leaf of the state: its path, shape, dtype and the
SHA-256 of its bytes. The table is committed with the state in the same
atomic step, and :func:`verify` recomputes it from the restored arrays, so
any corruption that changes a value is detected and named.

The state is replicated over the mesh (as :mod:`lipjax.training.loop` builds
it), so each process hashes its own copy and every process agrees.
"""

from __future__ import annotations

import hashlib
import json
import os
import re

import jax
import numpy as np

ALGORITHM = "sha256"


class CorruptCheckpointError(OSError):
  """A checkpoint's files are unreadable or fail their checksums."""


def _host_array(leaf) -> np.ndarray:
  """This process's copy of a replicated leaf (key data for PRNG keys)."""
  if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
    leaf = jax.random.key_data(leaf)
  if isinstance(leaf, jax.Array):
    leaf = leaf.addressable_data(0)
  return np.ascontiguousarray(np.asarray(leaf))


def leaf_table(tree) -> list[list]:
  """``[path, shape, dtype]`` per leaf of ``tree``, in flattening order.

  Args:
    tree: a pytree of arrays or of ``jax.ShapeDtypeStruct`` (both give the
      same rows for the same structure).
  """
  rows = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    rows.append([jax.tree_util.keystr(path).lstrip("."),
                 [int(n) for n in leaf.shape], str(leaf.dtype)])
  return rows


def checksums(state) -> dict:
  """The JSON table saved with ``state``: leaf rows plus their digests."""
  rows = leaf_table(state)
  for row, leaf in zip(rows, jax.tree.leaves(state)):
    row.append(hashlib.sha256(_host_array(leaf).tobytes()).hexdigest())
  return {"algorithm": ALGORITHM, "leaves": rows}


def first_structure_difference(saved: dict, abstract_state) -> str | None:
  """How the saved table's leaves differ from ``abstract_state``'s, or None.

  Returns:
    A phrase naming the first leaf whose path, shape or dtype differs (or
    the leaf counts), for an error message; None when they all agree.
  """
  theirs = [row[:3] for row in saved["leaves"]]
  ours = leaf_table(abstract_state)
  for old, new in zip(theirs, ours):
    if old != new:
      return (f"it holds {old[0]} {old[2]}{old[1]} where this config builds "
              f"{new[0]} {new[2]}{new[1]}")
  if len(theirs) != len(ours):
    return (f"it holds {len(theirs)} arrays where this config builds "
            f"{len(ours)}")
  return None


def verify(saved: dict, state, *, step: int, step_dir: str) -> None:
  """Raises CorruptCheckpointError unless ``state`` matches ``saved``."""
  if saved.get("algorithm") != ALGORITHM:
    raise CorruptCheckpointError(
        f"Checkpoint step {step} is corrupt: its checksum table in "
        f"{step_dir} names algorithm {saved.get('algorithm')!r}.")
  restored = checksums(state)["leaves"]
  for old, new in zip(saved["leaves"], restored):
    if old != new:
      raise CorruptCheckpointError(
          f"Checkpoint step {step} is corrupt: {new[0]} read from {step_dir} "
          f"does not match the {ALGORITHM} checksum saved with it (in "
          f"{os.path.join(step_dir, 'integrity')}).")


def _json_files(step_dir: str):
  """Orbax's JSON files in a step folder (metadata, shardings, checksums)."""
  for root, _, files in os.walk(step_dir):
    for name in sorted(files):
      if (name.startswith("_") or name == "metadata"
          or root.endswith("array_metadatas")):
        yield os.path.join(root, name)


def _chain(error: BaseException) -> list[BaseException]:
  """``error`` and the exceptions it was raised from, outermost first."""
  chain = []
  while error is not None and error not in chain:
    chain.append(error)
    error = error.__cause__ or (None if error.__suppress_context__
                                else error.__context__)
  return chain


def culprit(error: BaseException, step_dir: str) -> str:
  """The file a failed restore of ``step_dir`` points at, else the folder.

  TensorStore names the file it failed on (``local file "..."``), or the
  array it could not read from an OCDBT database folder; a broken JSON
  metadata file only raises a decoding error, so those files are parsed to
  find it (local folders only).
  """
  text = "\n".join(str(e) for e in _chain(error))
  files = [f for f in re.findall(r'file "([^"]+)"', text)
           if not f.endswith("/")]
  if files:
    return files[-1]
  arrays = re.findall(r'reading "([^"/]+)[^"]*" in OCDBT database at '
                      r'(?:local )?file "([^"]+)"', text)
  if arrays:
    return f"{arrays[-1][1]}, array {arrays[-1][0]}"
  if "://" not in step_dir:
    for path in _json_files(step_dir):
      try:
        with open(path, encoding="utf-8") as f:
          json.load(f)
      except (ValueError, OSError):
        return path
  return step_dir


def first_line(error: BaseException, limit: int = 200) -> str:
  """``Type: first line`` of the innermost cause, cut to ``limit`` chars."""
  root = _chain(error)[-1]
  line = (str(root).strip().splitlines() or [""])[0]
  line = line.split(" See full TensorStore details")[0]
  if len(line) > limit:
    line = line[:limit] + "..."
  return f"{type(root).__name__}: {line}"
