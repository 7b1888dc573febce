"""A model's logits in float64 and in float32, for the float32 margin tests.

float64: the same parameters cast to float64 (batch norm's multiplier
then computed in float64 too), a stand-in for exact arithmetic. float32:
jitted, in batches of a given size (the sums may be blocked differently).
Also the float64 network with a change ``p`` injected inside it, and its
pair Jacobians there (the error tails' test).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lipjax import activations
from lipjax import residual_models


def float64_model(model):
  """The model with every parameter cast to float64 (call under x64)."""
  graphdef, state = nnx.split(model)
  state64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), state)
  return nnx.merge(graphdef, state64)


def float64_logits(model, x) -> np.ndarray:
  with jax.enable_x64(True):
    return np.asarray(float64_model(model)(jnp.asarray(x, jnp.float64)))


# One jitted function, so that repeated calls on one model compile once.
_APPLY = jax.jit(lambda m, x: m(x))


def float32_logits(model, x, batch: int) -> np.ndarray:
  return np.concatenate([np.asarray(_APPLY(model, x[i:i + batch]),
                                    np.float64)
                         for i in range(0, len(x), batch)])


def check_covered(model, error, x, radius, rng):
  """The actual error at ``x`` and at points ``radius`` away is within the
  bound, for several batch sizes; returns the largest error seen.

  Every class pair's difference is checked against ``error.pair``; without
  Lipschitz tails, every logit against the componentwise bound too.
  """
  step = rng.standard_normal(x.shape)
  step *= radius / np.linalg.norm(step.reshape(len(x), -1), axis=1)[
      :, None, None, None]
  classes = model.num_classes
  pairs = [error.pair(np.full(len(x), y)) for y in range(classes)]
  worst = 0.0
  for point in (x, (x + step).astype(np.float32)):
    r = np.linalg.norm((point.astype(np.float64) - x).reshape(len(x), -1),
                       axis=1)[:, None]
    exact = float64_logits(model, point)
    for batch in (1, 7, len(x)):
      diff = float32_logits(model, point, batch) - exact
      if error.tails is None:
        bound = error.elementwise + error.l2[:, None] + r * error.l2_slope
        assert np.all(np.abs(diff) <= bound), np.max(np.abs(diff) / bound)
      for y, (at_r0, slope) in enumerate(pairs):
        assert np.all(np.abs(diff[:, y:y + 1] - diff) <= at_r0 + r * slope)
      worst = max(worst, float(np.abs(diff).max()))
  return worst


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


def hooked(model, *, node=None, block=None):
  """``(x, p) -> logits`` in float64 with ``p`` added to node ``node``'s
  activation output (the ``node``-th activation the network applies) or to
  residual block ``block``'s output (``p=None``: nothing added; the shape
  of that point is recorded in ``.shape``)."""
  model64 = float64_model(model)
  spec = activations.get_activation(model.activation)
  block_call = residual_models.ResidualBlock.__call__

  def apply(x, p):
    count = {"node": 0, "block": 0}

    def add(h, kind, target):
      if count[kind] == target:
        apply.shape = h.shape
        h = h if p is None else h + p
      count[kind] += 1
      return h

    act = lambda h: add(spec.fn(h), "node", node)
    with_hook = dataclasses.replace(spec, fn=act)
    blocks = lambda self, h, fn: add(block_call(self, h, fn), "block", block)
    with Patched(activations, "get_activation", lambda name: with_hook), \
        Patched(residual_models.ResidualBlock, "__call__", blocks):
      return model64(x)
  return apply


class Patched:
  """Sets ``owner.name = value`` inside a ``with``."""

  def __init__(self, owner, name, value):
    self.owner, self.name, self.value = owner, name, value

  def __enter__(self):
    self.saved = getattr(self.owner, self.name)
    setattr(self.owner, self.name, self.value)

  def __exit__(self, *exc):
    setattr(self.owner, self.name, self.saved)


def pair_gradient_norms(apply, x):
  """``[K, K]``: ``||d (z_y - z_i) / dp||`` at ``p = 0`` for ``apply``."""
  apply(x, None)  # Records the shape of p.
  p0 = jnp.zeros(apply.shape, jnp.float64)
  jac = jax.jacrev(lambda p: apply(x, p)[0])(p0).reshape(-1, p0.size)
  diff = jac[:, None, :] - jac[None, :, :]
  return np.linalg.norm(np.asarray(diff), axis=-1)


class Shaped:
  """A function ``(x, p)`` with a fixed ``shape`` for ``p``."""

  def __init__(self, fn, shape):
    self.fn, self.shape = fn, shape

  def __call__(self, x, p):
    return self.fn(x, p)


def normalized_input(model, x) -> Shaped:
  """``(x, p) -> logits`` in float64 with ``p`` added to the normalized
  input: ``x + std p`` in pixels."""
  plain = hooked(model)
  std = np.asarray(model.input_std, np.float64)
  return Shaped(lambda x, p: plain(x if p is None else x + std * p, None),
                x.shape)
