"""A model's logits in float64 and in float32, for the float32 margin tests.

float64: the same parameters cast to float64 (batch norm's multiplier
then computed in float64 too), a stand-in for exact arithmetic. float32:
jitted, in batches of a given size (the sums may be blocked differently).
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def float64_logits(model, x) -> np.ndarray:
  with jax.enable_x64(True):
    graphdef, state = nnx.split(model)
    state64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), state)
    return np.asarray(nnx.merge(graphdef, state64)(jnp.asarray(
        x, jnp.float64)))


# One jitted function, so that repeated calls on one model compile once.
_APPLY = jax.jit(lambda m, x: m(x))


def float32_logits(model, x, batch: int) -> np.ndarray:
  return np.concatenate([np.asarray(_APPLY(model, x[i:i + batch]),
                                    np.float64)
                         for i in range(0, len(x), batch)])


def boundary_point(model, a, b) -> np.ndarray:
  """The last float32 point on the segment from ``a`` to ``b`` (``[1, H, W,
  C]`` each, classified apart) that keeps ``a``'s class, by bisection: a
  point a few ulps from the decision boundary."""
  label = np.argmax(float32_logits(model, a, 1))
  lo, hi = 0.0, 1.0
  for _ in range(60):
    mid = (lo + hi) / 2
    point = (a + np.float32(mid) * (b - a)).astype(np.float32)
    if np.argmax(float32_logits(model, point, 1)) == label:
      lo = mid
    else:
      hi = mid
  return (a + np.float32(lo) * (b - a)).astype(np.float32)
