"""Certified radii and certified accuracy from logits and Lipschitz bounds.

For logits ``z = f(x)``, a reference class ``p`` and pairwise bounds
``L_pi >= Lip(f_p - f_i)``, the margin ``z_p - z_i`` can shrink by at most
``L_pi ||delta||`` under a perturbation ``delta``, so the prediction ``p`` is
constant on the open ball of radius (docs/training.md#certified-radius)::

  R_p(x) = min_{i != p} (z_p - z_i) / L_pi.

Every function accepts the Lipschitz information in the three forms
:mod:`lipjax.bounds` produces:

* ``[K, K]`` pairwise ``L_ij = Lip(f_i - f_j)``, used as is (diagonal
  ignored);
* ``[K]`` per-class ``L_i = Lip(f_i)``, turned into ``L_i + L_j`` (triangle
  inequality);
* a scalar global ``L``, turned into ``sqrt(2) L`` (``||e_i - e_j|| =
  sqrt(2)``).

All functions are pure and jit-able, and never produce NaN: the self entry
``i == p`` is masked out before any division, and a zero off-diagonal bound
(the difference ``f_p - f_i`` is constant) gives a radius of ``+inf``,
``-inf`` or ``0`` by the sign of the margin. Labels outside ``[0, K)`` are
refused with a ValueError when they are concrete (inside ``jax.jit`` such a
point is never certified), and so is an accuracy over an empty batch.

References:
  Fazlyab et al., Certified Robustness via Dynamic Margin Maximization and
  Improved Lipschitz Regularization, NeurIPS 2023
  (docs/bounds.md#what-is-bounded, docs/training.md#certified-radius).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def pairwise_lipschitz(lipschitz: jax.typing.ArrayLike,
                       num_classes: int) -> jax.Array:
  """Converts a global, per-class or pairwise bound to a ``[K, K]`` matrix.

  The conversion is differentiable. Its diagonal is meaningless (``2 L_i`` or
  ``sqrt(2) L``, or whatever a pairwise input holds): callers mask it.

  Args:
    lipschitz: a scalar global bound, ``[K]`` per-class bounds, or a ``[K, K]``
      pairwise matrix.
    num_classes: K.

  Returns:
    ``[K, K]`` pairwise bounds.

  Raises:
    ValueError: if the shape does not match ``num_classes``.
  """
  lipschitz = jnp.asarray(lipschitz)
  k = num_classes
  if lipschitz.ndim == 0:
    # ||(e_i - e_j)^T (f(x) - f(x'))|| <= ||e_i - e_j|| ||f(x) - f(x')||.
    return jnp.full((k, k), math.sqrt(2.0), lipschitz.dtype) * lipschitz
  if lipschitz.shape == (k,):
    return lipschitz[:, None] + lipschitz[None, :]
  if lipschitz.shape == (k, k):
    return lipschitz
  raise ValueError(
      f"lipschitz must be a scalar, [K] or [K, K] with K={k}; got shape "
      f"{lipschitz.shape}.")


def check_logits(logits: jax.Array, reference: jax.Array) -> None:
  """Raises ValueError unless logits are ``[B, K >= 2]`` and classes ``[B]``.

  Class indices must be integers in ``[0, K)``. Their values are checked
  only when they are concrete: inside ``jax.jit`` they are tracers, and
  an out-of-range index there makes the point fail closed (never
  certified) instead.
  """
  if logits.ndim != 2:
    raise ValueError(f"logits must be [batch, K]; got shape {logits.shape}.")
  if logits.shape[1] < 2:
    raise ValueError(f"Need at least 2 classes; got {logits.shape[1]}.")
  if reference.shape != logits.shape[:1]:
    raise ValueError(
        f"Class indices must be [batch]={logits.shape[:1]}; got "
        f"{reference.shape}.")
  check_labels(reference, logits.shape[1])


def check_labels(labels, num_classes: int) -> None:
  """Raises ValueError unless concrete ``labels`` are integers in ``[0, K)``.

  A negative index would silently wrap around to another class, and one
  past ``K - 1`` has no logit: both would give a meaningless radius.
  Traced labels (inside ``jax.jit``) cannot be read and are not checked.
  """
  if isinstance(labels, jax.core.Tracer):
    return
  labels = np.asarray(labels)
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"Class labels must be integers; got dtype "
                     f"{labels.dtype}.")
  if labels.size and not 0 <= labels.min() <= labels.max() < num_classes:
    bad = labels[(labels < 0) | (labels >= num_classes)]
    raise ValueError(
        f"Class labels must lie in [0, {num_classes}) for {num_classes} "
        f"logits; got {bad.size} outside, e.g. {int(bad[0])}.")


def _check_not_empty(values: jax.Array, mask) -> None:
  """An accuracy needs at least one example (unless a mask says 0 are real)."""
  if mask is None and values.shape[-1] == 0:
    raise ValueError("An accuracy over an empty batch is undefined: pass at "
                     "least one example (or a mask, which gives 0 when it "
                     "selects none).")


def _masked_mean(values: jax.Array, mask) -> jax.Array:
  """Mean over the last axis, restricted to ``mask``; 0 for an empty mask."""
  values = values.astype(jnp.float32)
  _check_not_empty(values, mask)
  if mask is None:
    return jnp.mean(values, axis=-1)
  mask = jnp.asarray(mask, bool)
  if mask.shape != values.shape[-1:]:
    raise ValueError(f"mask must be [batch]={values.shape[-1:]}; got "
                     f"{mask.shape}.")
  count = jnp.sum(mask)
  total = jnp.sum(jnp.where(mask, values, 0.0), axis=-1)
  return total / jnp.maximum(count, 1)


def margins_over_lipschitz(logits: jax.typing.ArrayLike,
                           reference: jax.typing.ArrayLike,
                           lipschitz: jax.typing.ArrayLike) -> jax.Array:
  """Per-class radii ``(z_p - z_i) / L_pi`` relative to a reference class.

  Gradients flow through ``logits`` and ``lipschitz`` and are finite
  everywhere: the division uses a denominator of 1 wherever the result is
  replaced by a constant (the self entry, and zero bounds).

  Args:
    logits: ``[batch, K]``.
    reference: ``[batch]`` integer class ``p`` per example (the true label for
      certification, the prediction during CRM training).
    lipschitz: scalar global, ``[K]`` per-class or ``[K, K]`` pairwise bound.

  Returns:
    ``[batch, K]`` radii, ``+inf`` at ``i == p``. A zero bound ``L_pi`` gives
    ``+inf`` / ``-inf`` / ``0`` for a positive / negative / zero margin.
  """
  logits = jnp.asarray(logits)
  reference = jnp.asarray(reference)
  check_logits(logits, reference)
  num_classes = logits.shape[1]
  pair = pairwise_lipschitz(lipschitz, num_classes)[reference]  # [B, K]
  z_ref = jnp.take_along_axis(logits, reference[:, None], axis=1)
  margin = z_ref - logits
  is_self = jnp.arange(num_classes)[None, :] == reference[:, None]
  # A negative "bound" can only come from a bug upstream; treating it like 0
  # (a constant difference) is the choice that never divides by it.
  positive = (pair > 0) & ~is_self
  safe = jnp.where(positive, pair, jnp.ones_like(pair))
  radius = margin / safe
  degenerate = jnp.where(margin > 0, jnp.inf,
                         jnp.where(margin < 0, -jnp.inf, 0.0))
  radius = jnp.where(positive, radius, degenerate.astype(radius.dtype))
  return jnp.where(is_self, jnp.inf, radius)


def certified_radius(logits: jax.typing.ArrayLike,
                     labels: jax.typing.ArrayLike,
                     lipschitz: jax.typing.ArrayLike) -> jax.Array:
  """Certified L2 radius ``R_y(x) = min_{i != y} (z_y - z_i) / L_yi``.

  The sign is kept: a misclassified point has ``R_y <= 0`` (0 for a tie with
  the top logit), so ``radius > eps`` with ``eps >= 0`` implies correct.

  Args:
    logits: ``[batch, K]``.
    labels: ``[batch]`` integer true labels.
    lipschitz: scalar global, ``[K]`` per-class or ``[K, K]`` pairwise bound.

  Returns:
    ``[batch]`` radii, in the units of the network input. Fail-closed: a
    point with a non-finite logit, or with some ``L_yi`` that is not a
    positive finite number, gets a radius of at most 0 (never certified).

  Raises:
    ValueError: bad shapes, or (outside ``jax.jit``) a label outside
      ``[0, K)``.
  """
  logits = jnp.asarray(logits)
  labels = jnp.asarray(labels)
  radius = jnp.min(margins_over_lipschitz(logits, labels, lipschitz), axis=1)
  # Fail closed: a point whose bounds or logits are not all valid is never
  # certified (its radius is at most 0; NaN becomes 0).
  trusted = _trusted_rows(logits, labels, lipschitz)
  radius = jnp.where(jnp.isnan(radius), 0.0, radius)
  return jnp.where(trusted, radius, jnp.minimum(radius, 0.0))


def _trusted_rows(logits: jax.Array, labels: jax.Array,
                  lipschitz) -> jax.Array:
  """``[batch]``: a valid label, every logit finite, every ``L_yi`` > 0 finite.

  A bound that is 0, negative or non-finite can only come from a broken
  computation upstream (or a degenerate network), so certification treats
  the point as uncertified rather than dividing by it.
  """
  num_classes = logits.shape[1]
  pair = pairwise_lipschitz(lipschitz, num_classes)[labels]  # [B, K]
  is_self = jnp.arange(num_classes)[None, :] == labels[:, None]
  valid_pair = is_self | (jnp.isfinite(pair) & (pair > 0))
  trusted = jnp.all(valid_pair, axis=1) & jnp.all(jnp.isfinite(logits),
                                                  axis=1)
  # Traced labels are not range-checked (check_labels): one outside [0, K)
  # (which indexing would wrap or fill) is never trusted.
  trusted = trusted & (labels >= 0) & (labels < num_classes)
  lipschitz = jnp.asarray(lipschitz)
  if lipschitz.ndim < 2:  # Every global / per-class entry enters each row.
    trusted = trusted & jnp.all(jnp.isfinite(lipschitz) & (lipschitz > 0))
  return trusted


def certified_accuracy(logits: jax.typing.ArrayLike,
                       labels: jax.typing.ArrayLike,
                       lipschitz: jax.typing.ArrayLike,
                       eps: jax.typing.ArrayLike,
                       *, mask: jax.typing.ArrayLike | None = None
                       ) -> jax.Array:
  """Fraction of examples certified at radius ``eps``.

  An example is certified iff ``z_y > z_i + eps L_yi`` for every ``i != y``
  (equivalently ``R_y(x) > eps`` when every ``L_yi > 0``). The inequality is
  strict for all ``i``: the reference code's ``argmax`` breaks ties towards
  the lower index, which would certify a tie with a class ``i > y``; a tie
  means a point on the decision boundary, so we never certify it. The test is
  written without division, so it is exact at the boundary.

  Args:
    logits: ``[batch, K]``.
    labels: ``[batch]`` integer true labels.
    lipschitz: scalar global, ``[K]`` per-class or ``[K, K]`` pairwise bound.
    eps: a scalar or ``[E]`` radii.
    mask: optional ``[batch]`` bool; False rows (padding) are excluded from
      both the count and the total.

  Returns:
    A scalar, or ``[E]`` for ``[E]`` radii: certified / ``mask.sum()`` (0 if
    the mask is empty).

  Raises:
    ValueError: bad shapes, an empty batch without a mask, or (outside
      ``jax.jit``) a label outside ``[0, K)``.
  """
  eps = jnp.asarray(eps)
  certified = is_certified(logits, labels, lipschitz, eps.reshape(-1))
  return _masked_mean(certified, mask).reshape(eps.shape)


def is_certified(logits: jax.typing.ArrayLike, labels: jax.typing.ArrayLike,
                 lipschitz: jax.typing.ArrayLike,
                 eps: jax.typing.ArrayLike) -> jax.Array:
  """Per-example certificates: ``z_y > z_i + eps L_yi`` for all ``i != y``.

  Args:
    logits: ``[batch, K]``.
    labels: ``[batch]`` integer true labels.
    lipschitz: scalar global, ``[K]`` per-class or ``[K, K]`` pairwise bound.
    eps: ``[E]`` radii.

  Returns:
    ``[E, batch]`` bool (see :func:`certified_accuracy` for the semantics).
    Fail-closed: False wherever a logit or ``eps`` is non-finite or some
    ``L_yi`` is not a positive finite number.
  """
  logits = jnp.asarray(logits)
  labels = jnp.asarray(labels)
  check_logits(logits, labels)
  num_classes = logits.shape[1]
  eps = jnp.asarray(eps)
  if eps.ndim != 1:
    raise ValueError(f"eps must be [E] here; got shape {eps.shape}.")
  pair = pairwise_lipschitz(lipschitz, num_classes)[labels]  # [B, K]
  z_y = jnp.take_along_axis(logits, labels[:, None], axis=1)
  is_self = jnp.arange(num_classes)[None, :] == labels[:, None]
  slack = (z_y - logits)[None] - eps.reshape(-1, 1, 1) * pair[None]
  certified = jnp.all(is_self[None] | (slack > 0), axis=-1)
  trusted = _trusted_rows(logits, labels, lipschitz) & jnp.all(
      jnp.isfinite(eps))
  return certified & trusted[None]


def clean_accuracy(logits: jax.typing.ArrayLike,
                   labels: jax.typing.ArrayLike,
                   *, mask: jax.typing.ArrayLike | None = None) -> jax.Array:
  """Fraction with ``argmax z == y`` (ties to the lowest index).

  Args:
    logits: ``[batch, K]``.
    labels: ``[batch]`` integer labels.
    mask: optional ``[batch]`` bool of real (non-padding) examples.

  Returns:
    A scalar; 0 if the mask is empty.

  Raises:
    ValueError: as :func:`certified_accuracy`.
  """
  logits = jnp.asarray(logits)
  labels = jnp.asarray(labels)
  check_logits(logits, labels)
  return _masked_mean(jnp.argmax(logits, axis=1) == labels, mask)
