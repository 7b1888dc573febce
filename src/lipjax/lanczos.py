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

Steps are jitted :data:`STEPS_PER_CALL` at a time (unrolled) and driven
from the host: XLA:CPU runs convolutions inside while-loop bodies several
times slower, and compiling one step is several times faster than compiling
an unrolled chunk. After every :data:`CHUNK` steps a ``done`` callback may
stop the run (the certificate of :mod:`lipjax.guarantee` holds at every step
at once, so the stopping rule may look at the data). The stored bases have
room for ``max_steps`` from the start (the step compiles once); the
reorthogonalization reads only their filled blocks.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lipjax import per_op
from lipjax import power_iteration
from lipjax.linear_maps import LinearChain
from lipjax.linear_maps import LinearOp
from lipjax.progress import progress_bar

Product = tuple[int, int]

# Steps between two stopping checks (each check reads the coefficients back).
CHUNK = 8
# Steps per compiled call; divides CHUNK.
STEPS_PER_CALL = 1
# Rows per block of the stored basis read by the reorthogonalization.
BLOCK = 32
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


def _reorthogonalize(w, basis, filled):
  """``w - Q (Q^T w)`` per product, against the first ``filled`` vectors.

  Classical Gram-Schmidt, block by block: only the blocks of
  :data:`BLOCK` rows that hold a stored vector are read, so a basis
  allocated for ``max_steps`` costs what its filled part costs (and the
  step compiles once, whatever the Krylov dimension).

  Args:
    w: ``[c, d]``, one vector per product.
    basis: ``[c, rows, d]``, ``rows`` a multiple of :data:`BLOCK`;
      product-major, so that both contractions are batched matrix products
      without a transpose of the basis (stored step-major, XLA:CPU copied
      the whole basis four times a step).
    filled: the number of stored vectors (rows past it are zero).
  """
  def correction(k, total):
    block = jax.lax.dynamic_slice_in_dim(basis, k * BLOCK, BLOCK, axis=1)
    coef = jnp.einsum("cmd,cd->cm", block, w)
    return total + jnp.einsum("cm,cmd->cd", coef, block)

  blocks = (filled + BLOCK - 1) // BLOCK
  return w - jax.lax.fori_loop(0, blocks, correction, jnp.zeros_like(w))


def _matvec(chain, products, q):
  """``P^T P q`` for every product: one batched forward and adjoint sweep.

  Args:
    q: per group of products sharing a start layer, ``[c, d]`` rows.

  Returns:
    Per group, ``[c, *in_shape]``.
  """
  shapes = [tuple(chain.ops[s].in_shape)
            for s in power_iteration._starts(products)]  # pylint: disable=protected-access
  return power_iteration._adjoint(  # pylint: disable=protected-access
      chain, products,
      power_iteration._forward(  # pylint: disable=protected-access
          chain, products,
          tuple(v.reshape((-1,) + shape) for v, shape in zip(q, shapes))))


def _rows(basis, j):
  """Row ``j`` of every group's stored basis."""
  return tuple(jax.lax.dynamic_index_in_dim(b, j, axis=1, keepdims=False)
               for b in basis)


def _update(carry, aq, j):
  """Step ``j`` (0-based) of every product from ``aq = A q_j``.

  ``carry`` holds, per group of products sharing a start layer, the basis
  ``[c, rows, d]`` (flattened vectors, ``rows > max_steps``), ``alpha`` and
  ``beta`` ``[max_steps, c]`` and the running scale ``[c]`` (see
  :func:`_initial_carry`).
  """
  basis, alpha, beta, scale = carry
  q = _rows(basis, j)
  q_prev = _rows(basis, jnp.maximum(j - 1, 0))
  new_basis, new_alpha, new_beta, new_scale = [], [], [], []
  for g, (b, w, qj, qp) in enumerate(zip(basis, aq, q, q_prev)):
    w = w.reshape(qj.shape)
    a = jnp.sum(qj * w, axis=1)
    b_prev = jnp.where(j > 0, jax.lax.dynamic_index_in_dim(
        beta[g], jnp.maximum(j - 1, 0), keepdims=False), 0.0)
    w = w - a[:, None] * qj - b_prev[:, None] * qp
    # Twice is enough; rows 0..j hold vectors.
    w = _reorthogonalize(_reorthogonalize(w, b, j + 1), b, j + 1)
    b_j = _scaled_row_norms(w)
    s = jnp.maximum(scale[g], jnp.abs(a) + b_j)
    # Once broken down (here or before: q_j = 0), the next vector is 0.
    alive = (b_j > BREAKDOWN * s) & (jnp.abs(a) + b_j > 0)
    q_next = jnp.where(alive[:, None],
                       w / jnp.where(alive, b_j, 1.0)[:, None], 0.0)
    new_basis.append(jax.lax.dynamic_update_index_in_dim(
        b, q_next, j + 1, axis=1))
    new_alpha.append(jax.lax.dynamic_update_index_in_dim(alpha[g], a, j, 0))
    new_beta.append(jax.lax.dynamic_update_index_in_dim(beta[g], b_j, j, 0))
    new_scale.append(s)
  return (tuple(new_basis), tuple(new_alpha), tuple(new_beta),
          tuple(new_scale))


def _step(chain, products, carry, j):
  """One Lanczos step ``j`` (0-based) for every product at once."""
  return _update(carry, _matvec(chain, products, _rows(carry[0], j)), j)


def _steps(chain, products, carry, j0, count):
  for i in range(count):
    carry = _step(chain, products, carry, j0 + i)
  return carry


_steps_jit = jax.jit(_steps, static_argnums=(1, 4), donate_argnums=(2,))
_rows_jit = jax.jit(_rows)
_update_jit = jax.jit(_update, donate_argnums=(0,))


def _single_matvec(chain, product, q):
  """:func:`_matvec` for one product: its ops in turn, no batching glue
  (whose eager gathers would cost more than the ops' calls)."""
  s, e = product
  (rows,) = q
  x = rows.reshape((-1,) + tuple(chain.ops[s].in_shape))
  for op in chain.ops[s:e + 1]:
    x = op(x)
  for op in reversed(chain.ops[s:e + 1]):
    x = op.transpose(x)
  return (x,)


def _per_op_steps(chain, products, carry, j0, count):
  """:func:`_steps` with the sweep run op by op from the host.

  ``chain`` is :func:`lipjax.per_op.compiled_ops` of the chain: every op
  call is a compiled program shared with other chains that hold such an
  op, and the update compiles once per basis shape, so a run on a new
  chain structure compiles nothing new unless its ops' shapes are new.
  """
  for i in range(count):
    j = j0 + i
    q = _rows_jit(carry[0], j)
    aq = (_single_matvec(chain, products[0], q) if len(products) == 1
          else _matvec(chain, products, q))
    carry = _update_jit(carry, aq, j)
  return carry


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


def _basis_rows(max_steps: int) -> int:
  """Rows of a stored basis: ``max_steps + 1``, rounded up to a block."""
  return -(-(max_steps + 1) // BLOCK) * BLOCK


def _initial_carry(starts, max_steps: int):
  """Room for ``max_steps`` steps: bases ``[c, rows, d]`` with the start
  vectors in row 0 (``rows > max_steps``, a multiple of :data:`BLOCK`),
  ``alpha`` and ``beta`` ``[max_steps, c]``, scales ``[c]``."""
  rows = _basis_rows(max_steps)
  basis = tuple(_zeros(v.shape[0], rows, v[0].size).at[:, 0].set(
      v.reshape(v.shape[0], -1)) for v in starts)
  return (basis,
          tuple(_zeros(max_steps, v.shape[0]) for v in starts),
          tuple(_zeros(max_steps, v.shape[0]) for v in starts),
          tuple(_zeros(v.shape[0]) for v in starts))


def _by_product(products, groups) -> list[np.ndarray]:
  """Per-group ``[m, count]`` arrays -> per-product ``[m]``, product order."""
  out = [None] * len(products)
  for g, start in enumerate(power_iteration._starts(products)):  # pylint: disable=protected-access
    ids = [p for p, (s, _) in enumerate(products) if s == start]
    for r, p in enumerate(ids):
      out[p] = np.asarray(groups[g][:, r])
  return out


def _run_batch(chain64, products, *, seed: int, max_steps: int, done, bar,
               sweeps: str):
  """Lanczos for one batch, in chunks, until ``done`` or ``max_steps``.

  Returns:
    ``(alphas, betas)``: per product, float64 ``[m]``.
  """
  starts = _start_vectors(chain64, products, seed)
  carry = _initial_carry(starts, max_steps)
  steps_fn, chain = _steps_jit, chain64
  if sweeps == "per_op":
    steps_fn, chain = _per_op_steps, per_op.compiled_ops(chain64)
  steps = 0
  while steps < max_steps:
    for j in range(steps, steps + CHUNK, STEPS_PER_CALL):
      carry = steps_fn(chain, products, carry, jnp.asarray(j),
                       STEPS_PER_CALL)
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
    need = _basis_rows(steps) * math.prod(chain.ops[p[0]].in_shape) * 8
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
        progress: bool = False, sweeps: str = "fused") -> LanczosRun:
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
    sweeps: ``"fused"``: each step is one compiled program (per chain
      structure); ``"per_op"``: each op call is its own compiled program,
      shared across chains (:mod:`lipjax.per_op`): for many chains of
      different structures built from few distinct ops, such as the maps of
      a residual network, where compiling dominates.

  Returns:
    A :class:`LanczosRun` (with the seed actually used).
  """
  products = power_iteration._check_products(chain, products)  # pylint: disable=protected-access
  per_op.check_sweeps(sweeps)
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
          seed=seed, max_steps=max_steps, bar=bar, sweeps=sweeps,
          done=lambda _, al, be, o=original: done(o, al, be))
      for p, ap, bp in zip(original, a, bt):
        alphas[products.index(p)], betas[products.index(p)] = ap, bp
  bar.close()
  dims = np.asarray([gram_dim(chain, p) for p in products])
  return LanczosRun(products=products, alphas=tuple(alphas),
                    betas=tuple(betas), dims=dims, seed=seed)
