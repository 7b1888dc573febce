"""Batched, warm-started power iteration for the norms of layer products.

A bound needs the spectral norms of products ``P_{s,e} = W_e ... W_s`` for a
static set of ``(s, e)`` pairs (SPEC §3.5). Each product keeps a persistent
vector ``v_{s,e}`` shaped like the input of layer ``s``. One iteration for
*all* products is one forward sweep and one adjoint sweep over the layers
(SPEC §3.6): at layer ``i`` every row whose product contains ``i`` (``s <= i
<= e``) is stacked into one batch and ``W_i`` (or ``W_i^T``) is applied once,
so an iteration costs ``O(L)`` batched layer calls however many products
there are.

The vectors live in a :class:`PowerState` pytree that training carries from
step to step (warm start) and checkpoints. Iterations run under
``stop_gradient``; :func:`estimate` then returns the differentiable
``||P sg(v)||``. Because ``||P v|| <= ||P||`` for a unit ``v``, every estimate
is a *lower* bound of the norm: :func:`converge` iterates to a tolerance from
the warm vectors and from fresh random restarts and keeps the max, but even
that is not a proof; certification multiplies by a safety factor or uses
:mod:`lipjax.exact`.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lipjax.linear_maps import LinearChain

Product = tuple[int, int]

# iterate() unrolls up to this many steps; converge() runs jitted chunks of
# CONVERGE_CHUNK unrolled steps from a host loop. Both avoid XLA while loops,
# whose bodies run the convolutions several times slower on CPU.
UNROLL_LIMIT = 32
CONVERGE_CHUNK = 8


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
  """Euclidean norm over ``axes`` with a zero (not NaN) gradient at 0."""
  sumsq = jnp.sum(jnp.square(x), axis=axes)
  positive = sumsq > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, sumsq, 1.0)), 0.0)


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

  Returns:
    (new unit vectors, ``||P v||`` for the *input* vectors ``[P]``, relative
    residual ``||P^T P v - sigma^2 v|| / sigma^2`` for the input vectors
    ``[P]``).
  """
  finished = _forward(chain, products, vectors)
  sigma = _norms_from_forward(products, finished)
  gram_v = _adjoint(chain, products, finished)
  # Residual per product, in the same product order as sigma.
  starts = _starts(products)
  residual_parts, order = [], []
  for s, v, w in zip(starts, vectors, gram_v):
    ids = [p for p, (ps, _) in enumerate(products) if ps == s]
    sig2 = sigma[np.asarray(ids)] ** 2
    shape = (-1,) + (1,) * (v.ndim - 1)
    residual = _row_norms(w - sig2.reshape(shape) * v)
    residual_parts.append(residual / jnp.where(sig2 > 0, sig2, 1.0))
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


@dataclasses.dataclass(frozen=True)
class ConvergenceInfo:
  """What :func:`converge` did, per product (arrays of shape ``[P]``).

  Attributes:
    products: the ``(s, e)`` pairs.
    norms: the max over starts of the final estimates (a lower bound).
    per_start: ``[restarts + 1, P]`` final estimates; row 0 is the warm start.
    residuals: relative residual ``||P^T P v - s^2 v|| / s^2`` of the best
      start's vector.
    relative_change: last relative change of the best start's estimate.
    iterations: number of iterations run.
    converged: whether, for every product, the winning start's last
      relative change is <= rtol.
  """
  products: tuple[Product, ...]
  norms: np.ndarray
  per_start: np.ndarray
  residuals: np.ndarray
  relative_change: np.ndarray
  iterations: int
  converged: bool


def _converge_init(chain, state, key, restarts):
  # Candidates [restarts + 1, ...] per start group; row 0 is the warm start.
  candidates = tuple(
      jnp.concatenate([v[None]] + ([jax.random.normal(
          k, (restarts,) + v.shape, v.dtype)] if restarts else []))
      for v, k in zip(state.vectors, jax.random.split(
          key, len(state.vectors))))
  candidates = jax.vmap(lambda vs: tuple(_normalize_rows(v) for v in vs))(
      candidates)
  sigma0 = jnp.zeros((restarts + 1, len(state.products)),
                     candidates[0].dtype)
  return candidates, sigma0, sigma0, jnp.asarray(0)


def _converge_chunk(chain, products, carry, rtol, max_iterations, steps):
  """``steps`` unrolled iterations of the convergence loop.

  Each step runs only while the loop condition holds (a masked update), so
  the result is exactly that of a ``while_loop`` stopped at the same point.
  Returns the new carry and whether the loop should go on.
  """
  step = jax.vmap(lambda vs: _step(chain, products, vs))

  def cond(carry):
    _, prev, sigma, it = carry
    change = jnp.abs(sigma - prev) / jnp.where(sigma > 0, sigma, 1.0)
    return (it < max_iterations) & ((it < 2) | (jnp.max(change) > rtol))

  for _ in range(steps):
    vecs, _, sigma, it = carry
    active = cond(carry)
    new_vecs, new_sigma, _ = step(vecs)
    new = (new_vecs, sigma, new_sigma, it + 1)
    carry = jax.tree_util.tree_map(
        lambda n, o, a=active: jnp.where(a, n, o), new, carry)
  return carry, cond(carry)


def _converge_finish(chain, products, vecs, prev):
  step = jax.vmap(lambda vs: _step(chain, products, vs))
  # One more step measures the final vectors' norms and residuals.
  _, sigma, residual = step(vecs)
  change = jnp.abs(sigma - prev) / jnp.where(sigma > 0, sigma, 1.0)
  best = jnp.argmax(sigma, axis=0)  # [P]
  pick = lambda a: jnp.take_along_axis(a, best[None], axis=0)[0]
  starts = _starts(products)
  new_vectors = []
  for s, v in zip(starts, vecs):
    ids = np.asarray([p for p, (ps, _) in enumerate(products) if ps == s])
    new_vectors.append(v[best[ids], np.arange(len(ids))])
  return tuple(new_vectors), sigma, pick(residual), change


_converge_init_jit = jax.jit(_converge_init, static_argnums=(3,))
_converge_chunk_jit = jax.jit(_converge_chunk, static_argnums=(1, 3, 4, 5))
_converge_finish_jit = jax.jit(_converge_finish, static_argnums=(1,))


def _converge_impl(chain, state, key, rtol, max_iterations, restarts):
  """The convergence loop, as jitted chunks driven from the host."""
  products = state.products
  carry = _converge_init_jit(chain, state, key, restarts)
  steps = min(CONVERGE_CHUNK, max_iterations)
  going = True
  while going:
    carry, going = _converge_chunk_jit(chain, products, carry, rtol,
                                       max_iterations, steps)
    going = bool(going)
  vecs, _, prev, iterations = carry
  vectors, sigma, residual, change = _converge_finish_jit(
      chain, products, vecs, prev)
  return vectors, sigma, residual, change, iterations


def converge(chain: LinearChain, state: PowerState, *, key: jax.Array,
             rtol: float = 1e-6, max_iterations: int = 2000,
             restarts: int = 2) -> tuple[PowerState, ConvergenceInfo]:
  """Iterates to a relative tolerance from the warm and fresh vectors.

  All ``restarts + 1`` starts run together (vmapped) until the largest
  relative change of any estimate drops below ``rtol`` or ``max_iterations``
  is reached. Per product the largest final estimate wins. The result is still
  a lower bound of each norm; see the module docstring.

  Args:
    chain: the network's linear chain.
    state: warm-start vectors (e.g. from training).
    key: ``jax.random.key`` for the fresh restarts.
    rtol: relative tolerance on the change of the estimates.
    max_iterations: iteration cap.
    restarts: number of fresh random starts besides the warm one.

  Returns:
    ``(state, info)``: the best vectors per product, and a
    :class:`ConvergenceInfo` whose ``norms`` are the estimates.
  """
  _check_state(chain, state)
  if restarts < 0 or max_iterations < 1 or not rtol > 0:
    raise ValueError("Need restarts >= 0, max_iterations >= 1 and rtol > 0.")
  chain = jax.lax.stop_gradient(chain)
  vectors, sigma, residual, change, iterations = _converge_impl(
      chain, state, key, float(rtol), int(max_iterations), int(restarts))
  sigma, change = np.asarray(sigma), np.asarray(change)
  best = sigma.argmax(axis=0)
  info = ConvergenceInfo(
      products=state.products, norms=sigma.max(axis=0), per_start=sigma,
      residuals=np.asarray(residual),
      relative_change=change[best, np.arange(change.shape[1])],
      iterations=int(iterations),
      converged=bool(np.all(change[best, np.arange(change.shape[1])] <= rtol)))
  return dataclasses.replace(state, vectors=vectors), info
