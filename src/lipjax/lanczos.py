"""Batched float64 Lanczos for the norms of layer products, random starts.

For every product ``P = W_e ... W_s`` of a set, Lanczos on ``A = P^T P``
builds an orthonormal basis ``q_1 .. q_m`` of the Krylov space of a start
vector drawn uniformly from the unit sphere, and the tridiagonal
``T_m = Q^T A Q``; its largest eigenvalue (the largest Ritz value) is a lower
bound of ``||P||^2`` that :mod:`lipjax.guarantee` turns into an upper bound
holding with a stated probability.

* **Batched like power iteration**: one step for *all* products is one
  forward and one adjoint sweep over the layers (the batched sweeps of
  :mod:`lipjax.power_iteration`), so a step costs ``O(L)`` batched layer
  calls however many products there are.
* **float64** throughout, with **full reorthogonalization** (twice, against
  every stored basis vector), so the computed basis stays orthonormal and
  ``T_m`` is the Rayleigh quotient of ``A`` on it to float64 accuracy.
* **Fresh starts**: drawn with numpy from ``seed`` (OS entropy unless given),
  never from training's warm vectors; the seed is returned so that a report
  can state it and anyone can replay the computation bit for bit.
* **Scale-safe**: norms are computed as ``max|x| * ||x / max|x|||``, so no
  finite weights over- or underflow the vectors.
* **Breakdown**: when the new residual is below ``1e-12`` of the running
  scale, the Krylov space is invariant; that product's later basis vectors are
  zero and ``T_m`` decouples, which leaves its largest eigenvalue unchanged.

Steps run as jitted chunks of :data:`CHUNK` unrolled steps driven from the
host (XLA:CPU runs convolutions inside while-loop bodies several times
slower); after each chunk a ``done`` callback may stop the run (the
certificate of :mod:`lipjax.guarantee` holds at every step at once, so the
stopping rule may look at the data). The stored bases start with room for
``4 * CHUNK`` steps and double when full.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lipjax import power_iteration
from lipjax.linear_maps import LinearChain
from lipjax.linear_maps import LinearOp
from lipjax.progress import progress_bar

Product = tuple[int, int]

CHUNK = 8
BREAKDOWN = 1e-12
DEFAULT_MAX_BYTES = 2 * 2**30


@dataclasses.dataclass(frozen=True)
class LanczosRun:
  """The Lanczos coefficients of every product (arrays in product order).

  Attributes:
    products: the ``(s, e)`` pairs, sorted.
    alphas: per product, float64 ``[m]`` diagonal of ``T_m``.
    betas: per product, float64 ``[m]``: the off-diagonal of ``T_m`` and,
      last, the norm of the next residual (raw, before the breakdown test).
    dims: ``[P]``, the dimension of the Gram matrix Lanczos ran on: the
      smaller of the product's input and output sizes (``P^T P`` or
      ``P P^T``, which share their nonzero eigenvalues).
    seed: the seed of the start vectors.
  """
  products: tuple[Product, ...]
  alphas: tuple[np.ndarray, ...]
  betas: tuple[np.ndarray, ...]
  dims: np.ndarray
  seed: int


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _AdjointOp:
  """``W^T`` as an op: calling it applies the adjoint, and vice versa."""
  op: LinearOp

  @property
  def in_shape(self):
    return self.op.out_shape

  @property
  def weight(self):
    return self.op.weight

  def __call__(self, x):
    return self.op.transpose(x)

  def transpose(self, y):
    return self.op(y)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _AdjointChain:
  """The chain of ``W_{N-1}^T, ..., W_0^T``: product ``(s, e)`` of the chain
  is the adjoint of product ``(N-1-e, N-1-s)`` here."""
  ops: tuple

  @property
  def num_layers(self) -> int:
    return len(self.ops)


def _adjoint_chain(chain) -> _AdjointChain:
  return _AdjointChain(ops=tuple(_AdjointOp(op) for op in reversed(chain.ops)))


def fresh_seed() -> int:
  """A 63-bit seed from the operating system's entropy."""
  return secrets.randbits(63)


def _scaled_row_norms(x: jax.Array) -> jax.Array:
  """Row norms computed as ``max|x| * ||x / max|x|||`` (no over/underflow)."""
  axes = tuple(range(1, x.ndim))
  scale = jnp.max(jnp.abs(x), axis=axes)
  safe = jnp.where(scale > 0, scale, 1.0)
  shape = (-1,) + (1,) * (x.ndim - 1)
  inner = jnp.sqrt(jnp.sum(jnp.square(x / safe.reshape(shape)), axis=axes))
  return jnp.where(scale > 0, scale * inner, 0.0)


def _rows(x, shape):
  return x.reshape((-1,) + (1,) * (len(shape) - 1))


def _reorthogonalize(w, basis):
  """``w - Q (Q^T w)`` per row, against every stored vector (zeros too)."""
  coef = jnp.einsum("mc...,c...->mc", basis, w)
  return w - jnp.einsum("mc,mc...->c...", coef, basis)


def _step(chain, products, carry, j):
  """One Lanczos step ``j`` (0-based) for every product at once."""
  basis, alpha, beta, scale = carry
  q = tuple(jax.lax.dynamic_index_in_dim(b, j, keepdims=False)
            for b in basis)
  q_prev = tuple(jax.lax.dynamic_index_in_dim(b, jnp.maximum(j - 1, 0),
                                              keepdims=False) for b in basis)
  aq = power_iteration._adjoint(  # pylint: disable=protected-access
      chain, products,
      power_iteration._forward(chain, products, q))  # pylint: disable=protected-access
  new_basis, new_alpha, new_beta, new_scale = [], [], [], []
  for g, (b, w, qj, qp) in enumerate(zip(basis, aq, q, q_prev)):
    a = jnp.sum((qj * w).reshape(qj.shape[0], -1), axis=1)
    b_prev = jnp.where(j > 0, jax.lax.dynamic_index_in_dim(
        beta[g], jnp.maximum(j - 1, 0), keepdims=False), 0.0)
    w = w - _rows(a, w.shape) * qj - _rows(b_prev, w.shape) * qp
    w = _reorthogonalize(_reorthogonalize(w, b), b)  # Twice is enough.
    b_j = _scaled_row_norms(w)
    s = jnp.maximum(scale[g], jnp.abs(a) + b_j)
    # Once broken down (here or before: q_j = 0), the next vector is 0.
    alive = (b_j > BREAKDOWN * s) & (jnp.abs(a) + b_j > 0)
    q_next = jnp.where(_rows(alive, w.shape),
                       w / _rows(jnp.where(alive, b_j, 1.0), w.shape), 0.0)
    new_basis.append(jax.lax.dynamic_update_index_in_dim(b, q_next, j + 1, 0))
    new_alpha.append(jax.lax.dynamic_update_index_in_dim(alpha[g], a, j, 0))
    new_beta.append(jax.lax.dynamic_update_index_in_dim(beta[g], b_j, j, 0))
    new_scale.append(s)
  return (tuple(new_basis), tuple(new_alpha), tuple(new_beta),
          tuple(new_scale))


def _chunk(chain, products, carry, j0):
  for i in range(CHUNK):
    carry = _step(chain, products, carry, j0 + i)
  return carry


_chunk_jit = jax.jit(_chunk, static_argnums=(1,), donate_argnums=(2,))


def _start_vectors(chain, products, seed: int) -> tuple[np.ndarray, ...]:
  """Uniform unit vectors per product (numpy, float64), grouped by start.

  Each product's vector comes from its own stream, ``(seed, s, e)`` in the
  chain it is run on, so batching never changes which vector it gets.
  """
  groups = []
  for start in power_iteration._starts(products):  # pylint: disable=protected-access
    shape = tuple(chain.ops[start].in_shape)
    rows = [np.random.default_rng((seed, s, e)).standard_normal(shape)
            for s, e in products if s == start]
    v = np.stack(rows)
    norms = np.linalg.norm(v.reshape(len(rows), -1), axis=1)
    groups.append(v / norms.reshape((-1,) + (1,) * len(shape)))
  return tuple(groups)


def _zeros(*shape):
  return jnp.zeros(shape, jnp.float64)


def _grow(carry, rows: int):
  """The carry with room for ``rows`` steps (bases get ``rows + 1``)."""
  basis, alpha, beta, scale = carry
  pad = lambda x, n: jnp.concatenate([x, _zeros(n - x.shape[0],
                                                *x.shape[1:])])
  return (tuple(pad(b, rows + 1) for b in basis),
          tuple(pad(a, rows) for a in alpha),
          tuple(pad(b, rows) for b in beta), scale)


def _by_product(products, groups) -> list[np.ndarray]:
  """Per-group ``[m, count]`` arrays -> per-product ``[m]``, product order."""
  out = [None] * len(products)
  for g, start in enumerate(power_iteration._starts(products)):  # pylint: disable=protected-access
    ids = [p for p, (s, _) in enumerate(products) if s == start]
    for r, p in enumerate(ids):
      out[p] = np.asarray(groups[g][:, r])
  return out


def _run_batch(chain64, products, *, seed: int, max_steps: int, done, bar):
  """Lanczos for one batch, in chunks, until ``done`` or ``max_steps``.

  Returns:
    ``(alphas, betas)``: per product, float64 ``[m]``.
  """
  starts = _start_vectors(chain64, products, seed)
  rows = min(4 * CHUNK, max_steps)
  carry = _grow((tuple(jnp.asarray(v)[None] for v in starts),
                 tuple(_zeros(0, v.shape[0]) for v in starts),
                 tuple(_zeros(0, v.shape[0]) for v in starts),
                 tuple(_zeros(v.shape[0]) for v in starts)), rows)
  steps = 0
  while steps < max_steps:
    if steps + CHUNK > rows:  # Double the room (one compile per size).
      rows = min(2 * rows, max_steps)
      carry = _grow(carry, rows)
    carry = _chunk_jit(chain64, products, carry, jnp.asarray(steps))
    steps += CHUNK
    bar.update(CHUNK)
    alphas = _by_product(products,
                         [a[:steps] for a in jax.device_get(carry[1])])
    betas = _by_product(products,
                        [b[:steps] for b in jax.device_get(carry[2])])
    if done(products, alphas, betas):
      bar.update(max_steps - steps)  # Stopped early: the batch is done.
      break
  return alphas, betas


def _batches(chain, products, steps: int, max_bytes: int):
  """Splits products so that each batch's basis fits ``max_bytes``."""
  batch, size = [], 0
  for p in products:
    need = (steps + 1) * math.prod(chain.ops[p[0]].in_shape) * 8
    if batch and size + need > max_bytes:
      yield tuple(batch)
      batch, size = [], 0
    batch.append(p)
    size += need
  if batch:
    yield tuple(batch)


def _flip(chain, product: Product) -> Product:
  """``(s, e)`` of the chain <-> ``(N-1-e, N-1-s)`` of its adjoint chain."""
  n = chain.num_layers
  return (n - 1 - product[1], n - 1 - product[0])


def gram_dim(chain, product: Product) -> int:
  """The side Lanczos works on: ``min(in_dim, out_dim)`` of the product."""
  s, e = product
  return min(math.prod(chain.ops[s].in_shape), chain.ops[e].out_dim)


def _sided_batches(chain, products, steps: int, max_bytes: int):
  """``[(side, batch)]``: ``P^T P`` on the input side when it is the smaller
  one, else ``P P^T`` as the adjoint chain's product (its output side).

  The smaller side needs fewer steps to fill, and a product of low rank
  on its larger side would break down early (which costs tightness).
  """
  inputs = [p for p in products
            if math.prod(chain.ops[p[0]].in_shape) <= chain.ops[p[1]].out_dim]
  outputs = sorted(_flip(chain, p) for p in products if p not in inputs)
  adjoint = _adjoint_chain(chain)
  return ([("input", b) for b in _batches(chain, inputs, steps, max_bytes)]
          + [("output", b)
             for b in _batches(adjoint, outputs, steps, max_bytes)])


def run(chain: LinearChain, products: Sequence[Product], *,
        max_steps: int, done=None, seed: int | None = None,
        max_bytes: int = DEFAULT_MAX_BYTES,
        progress: bool = False) -> LanczosRun:
  """Float64 Lanczos from uniform random starts for every product.

  Args:
    chain: the network's linear chain (any dtype; computed in float64). Its
      arrays must be concrete (not traced).
    products: the ``(s, e)`` pairs.
    max_steps: cap on the Krylov dimension; rounded up to a multiple of
      :data:`CHUNK`.
    done: ``(products, alphas, betas) -> bool``, asked after every chunk of a
      batch: True stops that batch early. None runs ``max_steps``.
    seed: seed of the start vectors; None draws one from OS entropy.
    max_bytes: memory for the stored bases of one batch of products.
    progress: a progress bar over the steps.

  Returns:
    A :class:`LanczosRun` (with the seed actually used).
  """
  products = power_iteration._check_products(chain, products)  # pylint: disable=protected-access
  if max_steps < 1:
    raise ValueError(f"max_steps must be >= 1, got {max_steps}.")
  max_steps = -(-int(max_steps) // CHUNK) * CHUNK
  seed = fresh_seed() if seed is None else int(seed)
  done = done or (lambda *_: False)
  batches = _sided_batches(chain, products, max_steps, max_bytes)
  bar = progress_bar(total=max_steps * len(batches), initial=0,
                     description="lanczos", enabled=progress)
  alphas, betas = [None] * len(products), [None] * len(products)
  with jax.enable_x64(True):
    chain64 = jax.device_put(chain.astype(jnp.float64))
    for side, batch in batches:
      original = (batch if side == "input"
                  else tuple(_flip(chain, q) for q in batch))
      a, bt = _run_batch(
          chain64 if side == "input" else _adjoint_chain(chain64), batch,
          seed=seed, max_steps=max_steps, bar=bar,
          done=lambda _, al, be, o=original: done(o, al, be))
      for p, ap, bp in zip(original, a, bt):
        alphas[products.index(p)], betas[products.index(p)] = ap, bp
  bar.close()
  dims = np.asarray([gram_dim(chain, p) for p in products])
  return LanczosRun(products=products, alphas=tuple(alphas),
                    betas=tuple(betas), dims=dims, seed=seed)
