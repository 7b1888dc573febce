"""A model evaluated over a dataset in fixed-shape batches: logits and PGD.

Batches have a fixed size (the last one padded and masked), so each jitted
function compiles once per batch size.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from lipjax import models
from lipjax.certification import attacks
from lipjax.progress import progress_bar
from lipjax.training import augment
from lipjax.training import data

BOX = (0.0, 1.0)  # The pixel box every input and adversarial point lies in.


def make_apply_fn(graphdef) -> Callable:
  """``(variables, images) -> logits`` for ``variables = (params, rest)``.

  Build it once per model: :func:`lipjax.pgd_l2` treats it as static.
  """
  return functools.partial(_apply, graphdef)


def _apply(graphdef, variables, images):
  return models.merge(graphdef, *variables)(images)


def index_batches(indices: np.ndarray, batch_size: int):
  """Yields ``(idx [batch_size], mask [batch_size])``, the last one padded."""
  for start in range(0, len(indices), batch_size):
    chunk = indices[start:start + batch_size]
    mask = np.zeros(batch_size, bool)
    mask[:len(chunk)] = True
    idx = np.zeros(batch_size, np.int64)
    idx[:len(chunk)] = chunk
    yield idx, mask


@functools.partial(jax.jit, static_argnums=0)
def _logits(apply_fn, variables, images):
  return apply_fn(variables, images)


def compute_logits(apply_fn, variables, dataset: data.Dataset, *,
                   batch_size: int, progress: bool = False) -> np.ndarray:
  """Logits of every example, ``[N, K]`` float32, in fixed-shape batches."""
  out = np.zeros((len(dataset), dataset.num_classes), np.float32)
  indices = np.arange(len(dataset))
  bar = progress_bar(total=len(dataset), initial=0,
                                   description="logits", enabled=progress)
  for idx, mask in index_batches(indices, batch_size):
    # Full float32 matmuls (never TF32/bfloat16): the evaluation error bound
    # of the certificates assumes them.
    with jax.default_matmul_precision("highest"):
      logits = _logits(apply_fn, variables,
                       augment.to_float(dataset.images[idx]))
    out[idx[mask]] = np.asarray(logits)[mask]
    bar.update(int(mask.sum()))
  bar.close()
  return out


@functools.partial(jax.jit, static_argnums=0)
def _predict(apply_fn, variables, images):
  return jnp.argmax(apply_fn(variables, images), axis=-1)


def attack(apply_fn, variables, dataset: data.Dataset, indices: np.ndarray,
           eps: np.ndarray, *, key: jax.Array, batch_size: int,
           pgd: dict, description: str = "pgd",
           progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """PGD on ``dataset[indices]`` with per-example radii ``eps``.

  Returns:
    ``(fooled [n] bool, norms [n])``: whether the prediction of the best
    adversarial point differs from the label, and its distance to the clean
    point (pixel units).
  """
  fooled = np.zeros(len(indices), bool)
  norms = np.zeros(len(indices), np.float32)
  positions = np.arange(len(indices))
  # Few points (e.g. the uncertified ones): a smaller power-of-two batch
  # wastes less padding and compiles at most log2(batch_size) shapes.
  batch_size = min(batch_size,
                   1 << max(len(indices) - 1, 1).bit_length())
  bar = progress_bar(total=len(indices), initial=0,
                                   description=description, enabled=progress)
  for b, (pos, mask) in enumerate(index_batches(positions, batch_size)):
    idx = indices[pos]
    x = augment.to_float(dataset.images[idx])
    labels = jnp.asarray(dataset.labels[idx])
    radius = jnp.asarray(np.where(mask, eps[pos], 0.0), jnp.float32)
    adv = attacks.pgd_l2(apply_fn, variables, x, labels, radius,
                         key=jax.random.fold_in(key, b), box=BOX, **pgd)
    wrong = np.asarray(_predict(apply_fn, variables, adv) != labels)
    dist = np.linalg.norm(np.asarray(adv - x).reshape(batch_size, -1),
                          axis=1)
    fooled[pos[mask]] = wrong[mask]
    norms[pos[mask]] = dist[mask]
    bar.update(int(mask.sum()))
  bar.close()
  return fooled, norms
