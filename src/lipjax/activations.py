"""Elementwise activations and the slope intervals that the bounds need.

An activation phi is *slope-restricted* on [alpha, beta] when
alpha <= (phi(u) - phi(w)) / (u - w) <= beta for all u != w. The LipLT bound
(docs/bounds.md#splitting-the-activation) only needs (alpha, beta); the naive
bound needs the Lipschitz constant max(|alpha|, |beta|).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Activation:
  """An elementwise activation with its slope interval.

  Attributes:
    name: registry name.
    fn: the elementwise function.
    slopes: (alpha, beta), the tightest interval containing every difference
      quotient of ``fn``.
  """
  name: str
  fn: Callable[[jax.Array], jax.Array]
  slopes: tuple[float, float]


LEAKY_RELU_NEGATIVE_SLOPE = 0.01

_REGISTRY = {
    "relu": Activation("relu", jax.nn.relu, (0.0, 1.0)),
    "leaky_relu": Activation(
        "leaky_relu",
        lambda x: jax.nn.leaky_relu(x, LEAKY_RELU_NEGATIVE_SLOPE),
        (LEAKY_RELU_NEGATIVE_SLOPE, 1.0)),
    "tanh": Activation("tanh", jnp.tanh, (0.0, 1.0)),
    # sigmoid' = s(1 - s) <= 1/4, attained at 0.
    "sigmoid": Activation("sigmoid", jax.nn.sigmoid, (0.0, 0.25)),
    # softplus' = sigmoid in (0, 1).
    "softplus": Activation("softplus", jax.nn.softplus, (0.0, 1.0)),
    # elu (alpha=1) has derivative exp(x) in (0, 1] for x < 0, and 1 above.
    "elu": Activation("elu", jax.nn.elu, (0.0, 1.0)),
    # |x| has slopes in [-1, 1]: the simplest activation with alpha < 0.
    "abs": Activation("abs", jnp.abs, (-1.0, 1.0)),
}

ACTIVATIONS = tuple(_REGISTRY)


def get_activation(name: str) -> Activation:
  """Returns the registered activation called ``name``.

  Raises:
    ValueError: if ``name`` is unknown; the message lists the known names.
  """
  try:
    return _REGISTRY[name]
  except KeyError:
    raise ValueError(
        f"Unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)}."
    ) from None


def check_slopes(slopes) -> tuple[float, float]:
  """Validates a slope interval and returns it as a pair of Python floats."""
  try:
    alpha, beta = (float(s) for s in slopes)
  except (TypeError, ValueError):
    raise ValueError(
        f"slopes must be a pair (alpha, beta) of numbers, got {slopes!r}."
    ) from None
  if not alpha <= beta:
    raise ValueError(f"slopes need alpha <= beta, got ({alpha}, {beta}).")
  return alpha, beta


def loop_transformation(slopes) -> tuple[float, float]:
  """Splits phi = a*id + c*psi with psi 1-Lipschitz.

  See docs/bounds.md#splitting-the-activation.

  Returns:
    (a, c) = ((alpha + beta) / 2, (beta - alpha) / 2).
  """
  alpha, beta = check_slopes(slopes)
  return (alpha + beta) / 2.0, (beta - alpha) / 2.0


def lipschitz_constant(slopes) -> float:
  """max(|alpha|, |beta|), the activation's Lipschitz constant."""
  alpha, beta = check_slopes(slopes)
  return max(abs(alpha), abs(beta))
