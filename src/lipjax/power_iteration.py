"""Batched, warm-started power iteration for the norms of layer products.

A bound needs the spectral norms of products ``P_{s,e} = W_e ... W_s`` for a
static set of ``(s, e)`` pairs. Each product keeps a persistent vector
``v_{s,e}`` shaped like the input of layer ``s``. One iteration for *all*
products is one forward sweep and one adjoint sweep over the layers: at
layer ``i`` every row whose product contains ``i`` (``s <= i <= e``) is
stacked into one batch and ``W_i`` (or ``W_i^T``) is applied once,
so an iteration costs ``O(L)`` batched layer calls however many products
there are.

The vectors live in a :class:`PowerState` pytree that training carries from
step to step (warm start) and checkpoints. Iterations run under
``stop_gradient``; :func:`estimate` then returns the differentiable
``||P sg(v)||``. Because ``||P v|| <= ||P||`` for a unit ``v``, every estimate
is a *lower* bound of the norm: this module is for training only.
Certification uses :mod:`lipjax.lanczos` (fresh random starts, a stated
failure probability) or :mod:`lipjax.exact`.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lipjax.linear_maps import LinearChain

Product = tuple[int, int]

# iterate() unrolls up to this many steps: XLA:CPU runs the convolutions of a
# while-loop body several times slower than the same ops at the top level.
UNROLL_LIMIT = 32


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PowerState:
  """Warm-start vectors of a set of products, grouped by start layer.

  Attributes:
    vectors: one array per start layer ``s`` in ``starts``, of shape
      ``[len(ends of s), *in_shape(s)]``; row ``r`` is ``v_{s, ends[r]}``,
      ends ascending. Rows are unit vectors.
    products: the ``(s, e)`` pairs, sorted (static).
  """
  vectors: tuple[jax.Array, ...]
  products: tuple[Product, ...] = dataclasses.field(
      metadata=dict(static=True))

  @property
  def starts(self) -> tuple[int, ...]:
    return _starts(self.products)


def _starts(products: Sequence[Product]) -> tuple[int, ...]:
  return tuple(sorted({s for s, _ in products}))


def _check_products(chain: LinearChain, products: Sequence[Product]):
  products = tuple(sorted((int(s), int(e)) for s, e in products))
  if not products:
    raise ValueError("No products to estimate.")
  if len(set(products)) != len(products):
    raise ValueError(f"Duplicate products in {products}.")
  for s, e in products:
    if not 0 <= s <= e < chain.num_layers:
      raise ValueError(f"Product ({s}, {e}) is not within the chain's "
                       f"{chain.num_layers} layers.")
  return products


def _safe_norm(x: jax.Array, axes) -> jax.Array:
  """Euclidean norm over ``axes``: scale-safe, zero (not NaN) gradient at 0.

  Computed as ``m ||x / m||`` with ``m = max |x|`` (held constant for the
  gradient), so squaring never over- or underflows: any finite ``x`` whose
  norm is representable gets it.
  """
  scale = jax.lax.stop_gradient(jnp.max(jnp.abs(x), axis=axes,
                                        keepdims=True))
  positive = scale > 0
  scaled = x / jnp.where(positive, scale, 1.0)
  sumsq = jnp.sum(jnp.square(scaled), axis=axes)
  scale = jnp.squeeze(scale, axis=axes)
  nonzero = sumsq > 0
  return jnp.where(nonzero, scale * jnp.sqrt(jnp.where(nonzero, sumsq, 1.0)),
                   0.0)


def _row_norms(x: jax.Array) -> jax.Array:
  return _safe_norm(x, tuple(range(1, x.ndim)))


def _normalize_rows(x: jax.Array) -> jax.Array:
  norms = _row_norms(x)
  shape = (-1,) + (1,) * (x.ndim - 1)
  return x / jnp.where(norms > 0, norms, 1.0).reshape(shape)


def init(chain: LinearChain, products: Sequence[Product],
         key: jax.Array) -> PowerState:
  """Fresh unit vectors ``v_{s,e} ~ N(0, I) / ||.||`` for every product.

  Args:
    chain: the network's linear chain.
    products: the ``(s, e)`` pairs to estimate.
    key: a ``jax.random.key``.

  Returns:
    A :class:`PowerState`.
  """
  products = _check_products(chain, products)
  starts = _starts(products)
  keys = jax.random.split(key, len(starts))
  vectors = []
  for start, k in zip(starts, keys):
    count = sum(1 for s, _ in products if s == start)
    shape = (count,) + tuple(chain.ops[start].in_shape)
    dtype = chain.ops[start].weight.dtype
    vectors.append(_normalize_rows(jax.random.normal(k, shape, dtype)))
  return PowerState(vectors=tuple(vectors), products=products)


def _forward(chain: LinearChain, products, vectors):
  """``P_{s,e} v_{s,e}`` for all products, batched per layer.

  Returns:
    ``{e: (rows [n, *out_shape(e)], product indices)}`` for each end layer.
  """
  starts = _starts(products)
  finished = {}
  rows, labels = None, []
  for i in range(starts[0], max(e for _, e in products) + 1):
    parts, new_labels = [], []
    if labels:
      parts.append(rows)
      new_labels += labels
    if i in starts:
      parts.append(vectors[starts.index(i)])
      new_labels += [p for p, (s, _) in enumerate(products) if s == i]
    if not new_labels:
      continue
    y = chain.ops[i](jnp.concatenate(parts) if len(parts) > 1 else parts[0])
    done = [k for k, p in enumerate(new_labels) if products[p][1] == i]
    keep = [k for k, p in enumerate(new_labels) if products[p][1] > i]
    if done:
      finished[i] = (y[np.asarray(done)], [new_labels[k] for k in done])
    rows = y[np.asarray(keep)] if keep else None
    labels = [new_labels[k] for k in keep]
  return finished


def _adjoint(chain: LinearChain, products, finished):
  """``P_{s,e}^T u_{s,e}`` for the forward outputs ``u``, grouped by start."""
  starts = _starts(products)
  grouped = {}
  rows, labels = None, []
  for i in range(max(e for _, e in products), starts[0] - 1, -1):
    parts, new_labels = [], []
    if labels:
      parts.append(rows)
      new_labels += labels
    if i in finished:
      parts.append(finished[i][0])
      new_labels += finished[i][1]
    if not new_labels:
      continue
    y = chain.ops[i].transpose(
        jnp.concatenate(parts) if len(parts) > 1 else parts[0])
    # Rows that start here are done; order them by product (ends ascending).
    done = sorted((p, k) for k, p in enumerate(new_labels)
                  if products[p][0] == i)
    keep = [k for k, p in enumerate(new_labels) if products[p][0] < i]
    if done:
      grouped[i] = y[np.asarray([k for _, k in done])]
    rows = y[np.asarray(keep)] if keep else None
    labels = [new_labels[k] for k in keep]
  return tuple(grouped[s] for s in starts)


def _norms_from_forward(products, finished) -> jax.Array:
  """Assembles ``[num_products]`` row norms from the forward outputs."""
  norms, order = [], []
  for _, (y, labels) in sorted(finished.items()):
    norms.append(_row_norms(y))
    order += labels
  inverse = np.argsort(np.asarray(order))
  return jnp.concatenate(norms)[inverse]


def _step(chain: LinearChain, products, vectors):
  """One power-iteration step: ``v <- P^T P v / ||P^T P v||``.

  The forward outputs ``P v`` are normalized before the adjoint sweep, so the
  vectors stay of the size of ``||P||`` (never ``||P||^2``): no finite
  weights over- or underflow them.

  Returns:
    (new unit vectors, ``||P v||`` for the *input* vectors ``[P]``, relative
    residual ``||P^T P v - sigma^2 v|| / sigma^2`` for the input vectors
    ``[P]``).
  """
  finished = _forward(chain, products, vectors)
  sigma = _norms_from_forward(products, finished)
  unit = {e: (_normalize_rows(y), labels)
          for e, (y, labels) in finished.items()}
  gram_v = _adjoint(chain, products, unit)  # P^T P v / sigma.
  # Residual per product, in the same product order as sigma.
  starts = _starts(products)
  residual_parts, order = [], []
  for s, v, w in zip(starts, vectors, gram_v):
    ids = [p for p, (ps, _) in enumerate(products) if ps == s]
    sig = sigma[np.asarray(ids)]
    shape = (-1,) + (1,) * (v.ndim - 1)
    residual = _row_norms(w - sig.reshape(shape) * v)
    residual_parts.append(residual / jnp.where(sig > 0, sig, 1.0))
    order += ids
  residual = jnp.concatenate(residual_parts)[np.argsort(np.asarray(order))]
  return tuple(_normalize_rows(w) for w in gram_v), sigma, residual


def iterate(chain: LinearChain, state: PowerState,
            num_iterations: int) -> PowerState:
  """Runs ``num_iterations`` warm-started steps, under ``stop_gradient``.

  Args:
    chain: the network's linear chain (its gradient is stopped here).
    state: vectors from :func:`init` or a previous call.
    num_iterations: a static, non-negative int.

  Returns:
    The updated :class:`PowerState`.
  """
  _check_state(chain, state)
  if num_iterations < 0:
    raise ValueError(f"num_iterations must be >= 0, got {num_iterations}.")
  chain = jax.lax.stop_gradient(chain)
  vectors = jax.lax.stop_gradient(state.vectors)
  products = state.products
  if num_iterations <= UNROLL_LIMIT:
    # Unrolled: XLA:CPU runs the convolutions of a while-loop body several
    # times slower than the same ops at the top level (BENCHMARKS.md).
    for _ in range(num_iterations):
      vectors = _step(chain, products, vectors)[0]
  else:
    vectors = jax.lax.fori_loop(
        0, num_iterations,
        lambda _, vecs: _step(chain, products, vecs)[0], vectors)
  return dataclasses.replace(state, vectors=vectors)


def estimate(chain: LinearChain, state: PowerState) -> jax.Array:
  """Differentiable lower-bound estimates ``||P_{s,e} sg(v_{s,e})||``.

  Returns:
    ``[num_products]`` norms in the order of ``state.products``. Gradients
    flow to the chain's weights, not to the vectors.
  """
  _check_state(chain, state)
  vectors = tuple(_normalize_rows(jax.lax.stop_gradient(v))
                  for v in state.vectors)
  finished = _forward(chain, state.products, vectors)
  return _norms_from_forward(state.products, finished)


def _check_state(chain: LinearChain, state: PowerState) -> None:
  _check_products(chain, state.products)
  for s, v in zip(state.starts, state.vectors):
    count = sum(1 for ps, _ in state.products if ps == s)
    expected = (count,) + tuple(chain.ops[s].in_shape)
    if tuple(v.shape) != expected:
      raise ValueError(
          f"Power-iteration vectors for start layer {s} have shape "
          f"{tuple(v.shape)}, but this network needs {expected}: the state "
          "belongs to another architecture or bound kind.")
