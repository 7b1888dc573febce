"""Process-0 JSONL training metrics.

Every process computes the same metrics; only process 0 writes them, one
JSON object per line in ``workdir/metrics.jsonl`` (step metrics with
``"kind": "train"``, epoch summaries with ``"kind": "epoch"``, validation with
``"kind": "eval"``). A resumed run first cuts the records back to its
checkpoint with :func:`keep_records`, so that no step appears twice.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Callable

import jax
import numpy as np


def _to_python(value):
  value = np.asarray(value)
  if value.ndim == 0:
    value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
      return str(value)  # JSON has no NaN/inf; keep them readable.
    return value
  return value.tolist()


def _path(workdir: str) -> str:
  return os.path.join(workdir, "metrics.jsonl")


def read_records(workdir: str) -> list[dict]:
  """The records of ``workdir/metrics.jsonl`` ([] if there is none).

  A line cut short by a killed process is skipped.
  """
  if not os.path.exists(_path(workdir)):
    return []
  records = []
  with open(_path(workdir), encoding="utf-8") as f:
    for line in f:
      try:
        records.append(json.loads(line))
      except ValueError:
        continue
  return records


def keep_records(workdir: str, keep: Callable[[dict], bool]) -> list[dict]:
  """Rewrites ``metrics.jsonl`` atomically with the records ``keep`` accepts.

  Returns:
    The kept records, in order.
  """
  records = read_records(workdir)
  kept = [r for r in records if keep(r)]
  if len(kept) < len(records):
    tmp = _path(workdir) + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      f.writelines(json.dumps(r) + "\n" for r in kept)
    os.replace(tmp, _path(workdir))
  return kept


class MetricWriter:
  """Appends metric records to ``metrics.jsonl`` (process 0 only)."""

  def __init__(self, workdir: str, *, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.path = _path(workdir)
    self._file = open(self.path, "a", encoding="utf-8") if self.enabled else None

  def write(self, kind: str, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    record = {"kind": kind, "step": int(step), "time": round(time.time(), 3)}
    record.update({k: _to_python(v) for k, v in metrics.items()})
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None
