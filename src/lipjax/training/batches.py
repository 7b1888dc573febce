"""Deterministic batches: pure functions of ``(seed, epoch, step)``.

A run resumed at step ``k`` sees exactly the batches an uninterrupted run
would, and each process takes its contiguous slice of the global batch.
"""

from __future__ import annotations

import functools
from typing import Iterator

import numpy as np

from lipjax.training.data import Dataset


@functools.lru_cache(maxsize=4)
def _permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  # Cached (read-only, callers copy): every step of an epoch slices the same
  # permutation.
  perm = np.random.default_rng([seed, epoch]).permutation(num_examples)
  perm = perm.astype(np.int64)
  perm.flags.writeable = False
  return perm


def epoch_permutation(num_examples: int, *, seed: int, epoch: int
                      ) -> np.ndarray:
  """The example order of an epoch: int64 [N], a function of (seed, epoch)."""
  return np.array(_permutation(num_examples, seed, epoch))


def num_steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
  """Full global batches per epoch (the remainder is dropped)."""
  if global_batch_size < 1:
    raise ValueError(f"global_batch_size must be positive, got "
                     f"{global_batch_size}.")
  steps = num_examples // global_batch_size
  if steps == 0:
    raise ValueError(f"The global batch size {global_batch_size} is larger "
                     f"than the dataset ({num_examples} examples).")
  return steps


def _local_size(global_batch_size: int, process_index: int,
                process_count: int) -> int:
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in "
                     f"[0, {process_count}).")
  if global_batch_size % process_count:
    raise ValueError(f"The global batch size {global_batch_size} is not "
                     f"divisible by process_count={process_count}.")
  return global_batch_size // process_count


def batch_indices(num_examples: int, *, global_batch_size: int, seed: int,
                  epoch: int, step: int, process_index: int = 0,
                  process_count: int = 1) -> np.ndarray:
  """This process's example indices for global batch ``step`` of ``epoch``.

  Returns:
    int64 [global_batch_size // process_count]: a contiguous slice of the
    global batch, which is itself a contiguous slice of the epoch's
    permutation; so no example repeats within an epoch.
  """
  local = _local_size(global_batch_size, process_index, process_count)
  steps = num_steps_per_epoch(num_examples, global_batch_size)
  if not 0 <= step < steps:
    raise ValueError(f"step {step} is not in [0, {steps}).")
  start = step * global_batch_size + process_index * local
  return np.array(_permutation(num_examples, seed, epoch)[start:start + local])


def get_batch(dataset: Dataset, indices) -> dict[str, np.ndarray]:
  """``{"image": uint8 [B, H, W, C], "label": int32 [B]}`` at indices."""
  return {"image": dataset.images[indices], "label": dataset.labels[indices]}


def iterate_batches(dataset: Dataset, *, global_batch_size: int, seed: int,
                    epoch: int, start_step: int = 0, process_index: int = 0,
                    process_count: int = 1
                    ) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
  """Yields ``(step, batch)`` for steps ``start_step .. steps_per_epoch-1``."""
  steps = num_steps_per_epoch(len(dataset), global_batch_size)
  for step in range(start_step, steps):
    yield step, get_batch(dataset, batch_indices(
        len(dataset), global_batch_size=global_batch_size, seed=seed,
        epoch=epoch, step=step, process_index=process_index,
        process_count=process_count))


def eval_batches(dataset: Dataset, *, batch_size: int, process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """In-order batches that cover every example exactly once.

  ``batch_size`` is global: global batch ``b`` holds examples
  ``[b * batch_size, (b + 1) * batch_size)`` and each process yields its
  contiguous slice, so every process yields the same number of batches (as
  SPMD requires). Slots past the end are zero images with ``mask`` False.

  Yields:
    ``{"image": uint8 [B, H, W, C], "label": int32 [B], "mask": bool [B]}``
    with ``B = batch_size // process_count``.
  """
  local = _local_size(batch_size, process_index, process_count)
  num = len(dataset)
  for start in range(0, num, batch_size):
    idx = start + process_index * local + np.arange(local)
    mask = idx < num
    safe = np.where(mask, idx, 0)
    yield {"image": np.where(mask[:, None, None, None],
                             dataset.images[safe], 0).astype(np.uint8),
           "label": np.where(mask, dataset.labels[safe], 0).astype(np.int32),
           "mask": mask}
