"""Exact (float64) spectral norms of layer products via Gram matrices.

For a product ``P = W_e ... W_s : R^n -> R^m`` the Gram matrix on the smaller
side (``P^T P`` if ``n <= m``, else ``P P^T``) is materialized column by
column by pushing basis vectors through the map and its adjoint (vmapped, in
chunks), in float64, and ``||P|| = sqrt(lambda_max)`` comes from
``numpy.linalg.eigvalsh``. This is the ground truth for tests and the sound
norm for certification where it fits in memory (docs/certificates.md):
memory grows as ``8 d^2`` bytes with ``d = min(n, m)``.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lipjax import per_op
from lipjax.linear_maps import LinearChain
from lipjax.power_iteration import Product, _check_products

DEFAULT_MAX_BYTES = 4 * 2**30


@dataclasses.dataclass(frozen=True)
class GramSize:
  """The size of the exact computation of one product's norm."""
  product: Product
  in_dim: int
  out_dim: int

  @property
  def side(self) -> int:
    return min(self.in_dim, self.out_dim)

  @property
  def gram_bytes(self) -> int:
    return 8 * self.side**2


def gram_size(chain: LinearChain, product: Product) -> GramSize:
  ((s, e),) = _check_products(chain, [product])  # raises for a bad product
  return GramSize(product=(s, e), in_dim=chain.ops[s].in_dim,
                  out_dim=chain.ops[e].out_dim)


def fits(chain: LinearChain, product: Product,
         max_bytes: int = DEFAULT_MAX_BYTES) -> bool:
  """Whether the product's Gram matrix fits in ``max_bytes``."""
  return gram_size(chain, product).gram_bytes <= max_bytes


def _gram_columns_fn(chain: LinearChain, start: int, end: int,
                     input_side: bool, basis_rows: jax.Array) -> jax.Array:
  """``P^T P E`` (input side) or ``P P^T E`` (output side) for basis rows E."""
  if input_side:
    out = chain.transpose_product(start, end,
                                  chain.apply_product(start, end, basis_rows))
  else:
    out = chain.apply_product(start, end,
                              chain.transpose_product(start, end, basis_rows))
  return out.reshape(out.shape[0], -1)


_gram_columns = jax.jit(_gram_columns_fn, static_argnums=(1, 2, 3))


def product_norm(chain: LinearChain, product: Product, *,
                 max_bytes: int = DEFAULT_MAX_BYTES,
                 chunk_size: int = 512, sweeps: str = "fused") -> float:
  """``||W_e ... W_s||`` in float64 from the Gram matrix on the smaller side.

  Args:
    chain: the network (any dtype; computed in float64).
    product: ``(s, e)``.
    max_bytes: refuse Gram matrices larger than this.
    chunk_size: basis vectors pushed through the map at once.
    sweeps: ``"fused"``: one compiled program per product and chain
      structure; ``"per_op"``: per op, shared across chains
      (:mod:`lipjax.per_op`; for many chains of distinct structures).

  Returns:
    The spectral norm, a Python float.

  Raises:
    MemoryError: if the Gram matrix would exceed ``max_bytes``; the message
      gives the sizes.
  """
  if not (isinstance(chunk_size, int) and chunk_size >= 1):
    raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}.")
  per_op.check_sweeps(sweeps)
  size = gram_size(chain, product)
  s, e = size.product
  if size.gram_bytes > max_bytes:
    raise MemoryError(
        f"Exact norm of W_{e}...W_{s} (R^{size.in_dim} -> R^{size.out_dim}) "
        f"needs a {size.side}x{size.side} float64 Gram matrix "
        f"({size.gram_bytes / 2**30:.2f} GiB), more than max_bytes="
        f"{max_bytes / 2**30:.2f} GiB. Raise max_bytes if the machine has "
        "the memory, or let Lanczos bound it (exact='auto' or False; a "
        "randomized certificate with a stated failure probability).")
  input_side = size.in_dim <= size.out_dim
  shape = (chain.ops[s].in_shape if input_side else chain.ops[e].out_shape)
  side = size.side
  gram = np.empty((side, side), np.float64)
  with jax.enable_x64(True):
    chain64 = chain.astype(jnp.float64)
    columns = _gram_columns
    if sweeps == "per_op":
      chain64, columns = per_op.compiled_ops(chain64), _gram_columns_fn
    for lo in range(0, side, chunk_size):
      hi = min(side, lo + chunk_size)
      basis = np.zeros((hi - lo, side), np.float64)
      basis[np.arange(hi - lo), np.arange(lo, hi)] = 1.0
      basis = jnp.asarray(basis).reshape((hi - lo,) + tuple(shape))
      gram[lo:hi] = np.asarray(
          columns(chain64, s, e, input_side, basis))
  gram = 0.5 * (gram + gram.T)
  top = float(np.linalg.eigvalsh(gram)[-1])
  return math.sqrt(max(top, 0.0))


def product_norms(chain: LinearChain, products: Sequence[Product], *,
                  max_bytes: int = DEFAULT_MAX_BYTES,
                  progress: Callable[[str], None] | None = None) -> np.ndarray:
  """Exact norms of several products, float64 ``[len(products)]``.

  Checks every size before computing anything, so an infeasible request
  fails at once.

  Args:
    chain: the network.
    products: ``(s, e)`` pairs.
    max_bytes: per-product Gram matrix limit.
    progress: optional callback that receives one line per product.
  """
  sizes = [gram_size(chain, product) for product in products]
  for size in sizes:
    if size.gram_bytes > max_bytes:
      product_norm(chain, size.product, max_bytes=max_bytes)  # raises
  norms = []
  for i, (product, size) in enumerate(zip(products, sizes)):
    norms.append(product_norm(chain, product, max_bytes=max_bytes))
    if progress is not None:
      progress(f"exact norm {i + 1}/{len(products)}: W_{product[1]}..."
               f"W_{product[0]} ({size.side}x{size.side} Gram) = "
               f"{norms[-1]:.6g}")
  return np.asarray(norms, np.float64)


def print_progress(line: str) -> None:
  print(line, file=sys.stderr, flush=True)
