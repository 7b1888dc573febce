"""Learning-rate and per-epoch hyperparameter schedules.

* :func:`exponential_with_stopping` and :func:`cosine` are per-step
  ``optax.Schedule`` s for the optimizer.
* :func:`epoch_schedule` maps an epoch to a hyperparameter value (CRM
  ``lam``/``r0``, GloRo ``lam``, LMT ``mu``). It is a closed form, so the
  epoch may be a traced integer inside a jitted train step.

All functions validate their arguments eagerly and raise ``ValueError`` with
the offending value.

References:
  Fazlyab et al., NeurIPS 2023, official code ``Utilities/Schedulers.py``
  and ``schedulerStep``; docs/training.md#schedules.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import optax


def _check_positive(**values) -> None:
  for name, value in values.items():
    if not value > 0:
      raise ValueError(f"{name} must be positive; got {value!r}.")


def _check_int(minimum: int, **values) -> None:
  for name, value in values.items():
    if isinstance(value, bool) or int(value) != value or value < minimum:
      raise ValueError(
          f"{name} must be an integer >= {minimum}; got {value!r}.")


def exponential_with_stopping(*, init_value: float, end_value: float,
                              decay_start_epoch: int, total_epochs: int,
                              steps_per_epoch: int) -> optax.Schedule:
  """The reference ``exponentialWithStopping`` learning rate, per step.

  With ``n = step // steps_per_epoch`` (0-based epoch), ``S =
  decay_start_epoch`` and ``E = total_epochs``::

    eta(n) = init * gamma ** clip(n - S + 1, 0, E - S),
    gamma  = (end / init) ** (1 / (E - S)).

  So ``eta = init`` for epochs ``0 .. S-1``, ``init * gamma`` at epoch ``S``,
  and ``end`` at the last epoch ``E - 1``; it stays at ``end`` for any epoch
  ``>= E - 1`` (the "stopping"). The value is constant within an epoch.

  Args:
    init_value: ``eta_0 > 0``.
    end_value: ``eta_min > 0``.
    decay_start_epoch: ``S``, ``0 <= S < E``. ``S = 0`` decays already in
      epoch 0.
    total_epochs: ``E >= 1``.
    steps_per_epoch: optimizer steps per epoch, ``>= 1``.

  Returns:
    A schedule ``step -> learning rate`` (float32).

  Raises:
    ValueError: for non-positive values or ``S`` outside ``[0, E)``.
  """
  _check_positive(init_value=init_value, end_value=end_value)
  _check_int(1, total_epochs=total_epochs, steps_per_epoch=steps_per_epoch)
  _check_int(0, decay_start_epoch=decay_start_epoch)
  if decay_start_epoch >= total_epochs:
    raise ValueError(
        f"decay_start_epoch ({decay_start_epoch}) must be < total_epochs "
        f"({total_epochs}).")
  decay_epochs = total_epochs - decay_start_epoch
  # gamma ** k as exp(k log gamma): log gamma is formed in float64 here, so
  # float32 only rounds the final exponent (a ~1e-7 relative error at k =
  # E - S instead of ~k * 1e-7 for a float32 power).
  log_gamma = math.log(end_value / init_value) / decay_epochs

  def schedule(count):
    epoch = jnp.asarray(count) // steps_per_epoch
    k = jnp.clip(epoch - decay_start_epoch + 1, 0, decay_epochs)
    return init_value * jnp.exp(k.astype(jnp.float32) * log_gamma)

  return schedule


def cosine(*, init_value: float, end_value: float, total_epochs: int,
           steps_per_epoch: int, warmup_epochs: int = 0) -> optax.Schedule:
  """Per-step cosine decay from ``init_value`` to ``end_value``.

  With warm-up the rate rises linearly from 0 to ``init_value`` over
  ``warmup_epochs`` and the cosine spans the remaining steps; the decay ends
  at step ``total_epochs * steps_per_epoch`` and stays at ``end_value``.

  Args:
    init_value: peak rate, > 0.
    end_value: final rate, ``>= 0``.
    total_epochs: length of the whole schedule in epochs (warm-up included).
    steps_per_epoch: optimizer steps per epoch.
    warmup_epochs: linear warm-up epochs, ``0 <= warmup < total``.

  Returns:
    A schedule ``step -> learning rate``.

  Raises:
    ValueError: for invalid values.
  """
  _check_positive(init_value=init_value)
  if not end_value >= 0:
    raise ValueError(f"end_value must be >= 0; got {end_value!r}.")
  _check_int(1, total_epochs=total_epochs, steps_per_epoch=steps_per_epoch)
  _check_int(0, warmup_epochs=warmup_epochs)
  if warmup_epochs >= total_epochs:
    raise ValueError(f"warmup_epochs ({warmup_epochs}) must be < "
                     f"total_epochs ({total_epochs}).")
  total_steps = total_epochs * steps_per_epoch
  if warmup_epochs == 0:
    return optax.cosine_decay_schedule(
        init_value=init_value, decay_steps=total_steps,
        alpha=end_value / init_value)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=init_value,
      warmup_steps=warmup_epochs * steps_per_epoch, decay_steps=total_steps,
      end_value=end_value)


def epoch_schedule(*, initial: float, start_epoch: int,
                   multiplier: float = 1.0, increment: float = 0.0,
                   minimum: float = -math.inf, maximum: float = math.inf,
                   total_epochs: int | None = None
                   ) -> Callable[[jax.typing.ArrayLike], jax.Array]:
  """A per-epoch hyperparameter ``v(epoch)`` with affine growth and clipping.

  ``v`` is ``initial`` up to ``start_epoch``; every later epoch applies
  ``v <- clip(multiplier * v + increment, minimum, maximum)``. That is the
  reference ``schedulerStep``, which runs once after every epoch and updates
  once its counter exceeds ``E0``, so in (0-based) epoch ``n`` it has been
  applied ``k = max(n - E0, 0)`` times. Evaluated in closed form::

    v_k = m^k initial + increment (m^k - 1) / (m - 1)   (m != 1)
    v_k = initial + increment k                          (m == 1)

  and clipped once at the end. For ``m > 0`` the affine map is increasing, so
  the iterates are monotone and clipping once equals clipping every step.
  With ``total_epochs`` set, ``k`` stops growing at ``total_epochs -
  start_epoch``.

  Examples (docs/training.md#per-epoch-hyperparameters), ``E0 = 10``,
  ``E = 400``::

    epoch_schedule(initial=15.0, start_epoch=10)               # CRM lambda
    epoch_schedule(initial=0.1, start_epoch=10,                 # GloRo lambda
                   increment=(3.0 - 0.1) / (400 - 10), total_epochs=400)
    epoch_schedule(initial=1e-3, start_epoch=10, multiplier=1.03,
                   maximum=2.0)                                 # LMT mu

  Args:
    initial: value before and at ``start_epoch``.
    start_epoch: ``E0 >= 0``.
    multiplier: ``m > 0``.
    increment: added after the multiplication.
    minimum: lower clip, ``<= initial``.
    maximum: upper clip, ``>= initial``.
    total_epochs: optional epoch after which the value is frozen,
      ``>= start_epoch``.

  Returns:
    ``epoch -> value`` (float32 array), jit-able in a traced integer epoch.

  Raises:
    ValueError: for ``m <= 0``, ``initial`` outside ``[minimum, maximum]``
      or bad epochs.
  """
  _check_positive(multiplier=multiplier)
  _check_int(0, start_epoch=start_epoch)
  if not minimum <= initial <= maximum:
    # The reference clips only from the first update on; an initial value
    # outside the range would make "clip once" differ from "clip each step".
    raise ValueError(f"Need minimum <= initial <= maximum; got {minimum}, "
                     f"{initial}, {maximum}.")
  if total_epochs is not None:
    _check_int(start_epoch, total_epochs=total_epochs)
  initial, multiplier = float(initial), float(multiplier)
  increment, minimum, maximum = float(increment), float(minimum), float(maximum)
  max_steps = None if total_epochs is None else total_epochs - start_epoch
  log_m = math.log(multiplier)

  def schedule(epoch):
    k = jnp.maximum(jnp.asarray(epoch) - start_epoch, 0)
    if max_steps is not None:
      k = jnp.minimum(k, max_steps)
    k = k.astype(jnp.float32)
    if multiplier == 1.0:
      value = initial + increment * k
    else:
      # expm1 keeps (m^k - 1) / (m - 1) accurate for m close to 1.
      growth = jnp.expm1(k * log_m)
      value = initial * (1.0 + growth) + increment * growth / (multiplier - 1.0)
    return jnp.clip(value, minimum, maximum)

  return schedule
