"""Tests for lipjax.exact: float64 spectral norms of layer products.

Ground truth is the float64 SVD of the materialized operator
``dense_matrix(chain, s, e)`` (or of the explicit matrix product for dense
chains; docs/certificates.md). The chains are tiny and include convolutions
that expand and shrink the dimension, so that both Gram sides (``P^T P`` and
``P P^T``) are exercised.
"""

import functools
import math
import re

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lipjax import exact
from lipjax.linear_maps import LinearOp
from lipjax.linear_maps import dense_matrix
from lipjax.linear_maps import from_matrices
from lipjax.linear_maps import from_ops
from tests import chains


def _dense_chain():
  # 5 -> 7 -> 3 -> 6 -> 2: products with in < out, in > out and both.
  return chains.dense_chain((5, 7, 3, 6, 2), seed=0)


def _expanding_conv_chain():
  return chains.expanding_conv_chain(seed=1)


def _shrinking_conv_chain():
  """scaled conv 7x7x3 -> 7x7x1 (shrinks), conv -> 7x7x2 (expands), dense."""
  weight = chains.weight_sampler(2)
  return from_ops([
      LinearOp(kind="conv", weight=weight(3, 3, 3, 1),
               in_scale=jnp.asarray([2.0, 0.5, 1.0], jnp.float32),
               out_scale=None, in_shape=(7, 7, 3), strides=(1, 1),
               padding=((1, 1), (1, 1))),
      LinearOp(kind="conv", weight=weight(3, 3, 1, 2), in_scale=None,
               out_scale=None, in_shape=(7, 7, 1), strides=(1, 1),
               padding=((1, 1), (1, 1))),
      LinearOp(kind="dense", weight=weight(98, 5), in_scale=None,
               out_scale=None, in_shape=(7, 7, 2)),
  ])


_CHAINS = {
    "dense": _dense_chain,
    "conv_expanding": _expanding_conv_chain,
    "conv_shrinking": _shrinking_conv_chain,
}


@functools.cache
def _chain(name):
  return _CHAINS[name]()


def _all_products(chain):
  n = chain.num_layers
  return [(s, e) for s in range(n) for e in range(s, n)]


@functools.cache
def _svd_norm(name, s, e):
  return float(np.linalg.norm(dense_matrix(_chain(name), s, e), 2))


# ------------------------------------------------------ product_norm ------


@pytest.mark.parametrize("name", sorted(_CHAINS))
def test_product_norm_matches_svd(name):
  chain = _chain(name)
  sides = set()
  for s, e in _all_products(chain):
    size = exact.gram_size(chain, (s, e))
    sides.add("input" if size.in_dim <= size.out_dim else "output")
    norm = exact.product_norm(chain, (s, e))
    assert isinstance(norm, float)
    expected = _svd_norm(name, s, e)
    assert expected > 1e-3
    assert norm == pytest.approx(expected, rel=1e-10), (s, e)
  # Every chain has products whose Gram matrix is taken on either side.
  assert sides == {"input", "output"}


def test_both_gram_sides_are_used():
  # The first conv of one chain expands (36 -> 72: P^T P, 36x36), the other
  # shrinks (147 -> 49: P P^T, 49x49). The memory limit is exactly the
  # smaller side's Gram matrix, and at that limit the norm is exact.
  for name, product, in_dim, out_dim in (("conv_expanding", (0, 0), 36, 72),
                                         ("conv_shrinking", (0, 0), 147, 49)):
    chain = _chain(name)
    size = exact.gram_size(chain, product)
    assert (size.in_dim, size.out_dim) == (in_dim, out_dim)
    side = min(in_dim, out_dim)
    norm = exact.product_norm(chain, product, max_bytes=8 * side**2)
    assert norm == pytest.approx(_svd_norm(name, *product), rel=1e-10)
    with pytest.raises(MemoryError):
      exact.product_norm(chain, product, max_bytes=8 * side**2 - 1)


@pytest.mark.parametrize("name,product", [
    ("conv_expanding", (0, 0)),  # input side, 36
    ("conv_expanding", (0, 1)),  # output side, 27
    ("conv_shrinking", (1, 1)),  # input side, 49
    ("dense", (1, 3)),           # output side, 2
])
@pytest.mark.parametrize("chunk_size", [1, 5])
def test_chunk_size_does_not_change_the_norm(name, product, chunk_size):
  chain = _chain(name)
  side = exact.gram_size(chain, product).side
  assert chunk_size < side or side == 2
  big = exact.product_norm(chain, product, chunk_size=512)
  small = exact.product_norm(chain, product, chunk_size=chunk_size)
  assert small == pytest.approx(big, rel=1e-12)
  assert small == pytest.approx(_svd_norm(name, *product), rel=1e-10)


def test_chunk_size_at_the_side_boundary():
  chain = _chain("conv_expanding")
  expected = _svd_norm("conv_expanding", 0, 1)
  side = exact.gram_size(chain, (0, 1)).side
  for chunk_size in (side - 1, side, side + 1):
    assert exact.product_norm(chain, (0, 1), chunk_size=chunk_size) == (
        pytest.approx(expected, rel=1e-10))


def test_square_product_and_exact_zero():
  # in_dim == out_dim, and a product that is exactly zero (no NaN from a
  # slightly negative eigenvalue).
  w0 = np.array([[1.0, 1.0], [2.0, 2.0]])
  w1 = np.array([[2.0, -1.0], [4.0, -2.0]])
  chain = from_matrices([w0, w1])
  assert exact.product_norm(chain, (0, 0)) == pytest.approx(
      np.linalg.norm(w0, 2), rel=1e-12)
  assert exact.product_norm(chain, (1, 1)) == pytest.approx(
      np.linalg.norm(w1, 2), rel=1e-12)
  assert np.allclose(w1 @ w0, 0.0)
  assert exact.product_norm(chain, (0, 1)) == pytest.approx(0.0, abs=1e-12)


def test_product_norm_of_a_float64_chain():
  chain = _chain("conv_shrinking")
  expected = exact.product_norm(chain, (0, 2))
  with jax.enable_x64(True):
    chain64 = chain.astype(jnp.float64)
    assert exact.product_norm(chain64, (0, 2)) == pytest.approx(expected,
                                                               rel=1e-12)


@pytest.mark.parametrize("product", [(1, 0), (-1, -1), (0, 3), (3, 3)])
def test_product_norm_rejects_products_outside_the_chain(product):
  # A 3-layer chain: (1, 0) is empty (not the identity), (-1, -1) and the
  # ends >= 3 are not layers. A silent 1.0 here would be a wrong "exact" norm.
  chain = _chain("conv_shrinking")
  with pytest.raises((ValueError, IndexError)):
    exact.product_norm(chain, product)


@pytest.mark.parametrize("chunk_size", [0, -1])
def test_product_norm_rejects_non_positive_chunk_size(chunk_size):
  # A non-positive chunk must not leave the Gram matrix uninitialized.
  chain = _chain("dense")
  with pytest.raises(ValueError):
    exact.product_norm(chain, (0, 1), chunk_size=chunk_size)


# ----------------------------------------------------- product_norms ------


def test_product_norms_order_dtype_and_progress():
  name = "conv_expanding"
  chain = _chain(name)
  products = [(2, 3), (0, 0), (1, 3), (0, 2), (3, 3)]  # not sorted
  lines = []
  norms = exact.product_norms(chain, products, progress=lines.append)
  assert isinstance(norms, np.ndarray)
  assert norms.dtype == np.float64
  assert norms.shape == (len(products),)
  expected = [_svd_norm(name, s, e) for s, e in products]
  np.testing.assert_allclose(norms, expected, rtol=1e-10)
  # The norms are distinct, so a permutation would be caught.
  assert len(set(np.round(expected, 4))) == len(products)

  assert len(lines) == len(products)
  for line, norm in zip(lines, norms):
    assert isinstance(line, str) and "\n" not in line
    numbers = [float(x) for x in re.findall(
        r"[-+]?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?", line)]
    assert any(math.isclose(x, norm, rel_tol=1e-5) for x in numbers), (
        line, norm)


def test_product_norms_without_progress():
  chain = _chain("dense")
  products = _all_products(chain)
  norms = exact.product_norms(chain, products)
  np.testing.assert_allclose(
      norms, [_svd_norm("dense", s, e) for s, e in products], rtol=1e-10)


# ------------------------------------------------------ memory limits -----


def test_too_large_raises_memory_error_with_sizes():
  chain = _chain("conv_shrinking")
  # (0, 0): R^147 -> R^49, Gram 49x49 (19208 bytes).
  with pytest.raises(MemoryError) as excinfo:
    exact.product_norm(chain, (0, 0), max_bytes=19207)
  message = str(excinfo.value)
  assert "R^147" in message
  assert "R^49" in message
  assert "49x49" in message
  assert "max_bytes" in message


def test_product_norms_checks_all_sizes_first():
  chain = _chain("conv_expanding")
  # Sides: (3, 3) -> 4, (2, 3) -> 4, (0, 1) -> 27 (too large for 8 * 10^2).
  products = [(3, 3), (2, 3), (0, 1)]
  max_bytes = 8 * 10**2
  assert exact.fits(chain, (3, 3), max_bytes)
  assert not exact.fits(chain, (0, 1), max_bytes)
  lines = []
  with pytest.raises(MemoryError) as excinfo:
    exact.product_norms(chain, products, max_bytes=max_bytes,
                        progress=lines.append)
  assert lines == []  # nothing was computed before the failure
  assert "27x27" in str(excinfo.value)
  assert "max_bytes" in str(excinfo.value)
  # Without the large product the same limit is fine.
  norms = exact.product_norms(chain, products[:2], max_bytes=max_bytes,
                              progress=lines.append)
  assert len(lines) == 2
  np.testing.assert_allclose(
      norms, [_svd_norm("conv_expanding", 3, 3),
              _svd_norm("conv_expanding", 2, 3)], rtol=1e-10)


def test_huge_conv_is_refused_without_computing():
  # 256x256x16 -> 256x256x16: a 2^20-dimensional Gram side (8 TiB).
  op = LinearOp(kind="conv", weight=jnp.zeros((3, 3, 16, 16), jnp.float32),
                in_scale=None, out_scale=None, in_shape=(256, 256, 16),
                strides=(1, 1), padding=((1, 1), (1, 1)))
  chain = from_ops([op])
  size = exact.gram_size(chain, (0, 0))
  assert size.side == 2**20
  assert size.gram_bytes == 8 * 2**40
  assert not exact.fits(chain, (0, 0))
  with pytest.raises(MemoryError, match=r"R\^1048576"):
    exact.product_norm(chain, (0, 0))
  with pytest.raises(MemoryError, match="max_bytes"):
    exact.product_norms(chain, [(0, 0)])


# ------------------------------------------------- gram_size and fits -----


@pytest.mark.parametrize("name", sorted(_CHAINS))
def test_gram_size_arithmetic(name):
  chain = _chain(name)
  for s, e in _all_products(chain):
    size = exact.gram_size(chain, (s, e))
    in_dim = math.prod(chain.ops[s].in_shape)
    out_dim = math.prod(chain.ops[e].out_shape)
    assert size.product == (s, e)
    assert (size.in_dim, size.out_dim) == (in_dim, out_dim)
    assert size.side == min(in_dim, out_dim)
    assert size.gram_bytes == 8 * min(in_dim, out_dim)**2
    assert exact.fits(chain, (s, e))
    assert exact.fits(chain, (s, e), max_bytes=size.gram_bytes)
    assert not exact.fits(chain, (s, e), max_bytes=size.gram_bytes - 1)


def test_gram_size_known_values():
  chain = _chain("conv_expanding")
  cases = {
      (0, 0): (36, 72, 36),
      (1, 1): (72, 27, 27),
      (0, 3): (36, 4, 4),
      (2, 2): (27, 6, 6),
      (1, 2): (72, 6, 6),
  }
  for product, (in_dim, out_dim, side) in cases.items():
    size = exact.gram_size(chain, product)
    assert (size.in_dim, size.out_dim, size.side) == (in_dim, out_dim, side)
    assert size.gram_bytes == 8 * side * side
  assert exact.DEFAULT_MAX_BYTES == 4 * 2**30


# ------------------------------------------------------- hypothesis -------


@st.composite
def _dense_matrices(draw):
  depth = draw(st.integers(1, 4))
  widths = draw(st.lists(st.integers(1, 6), min_size=depth + 1,
                         max_size=depth + 1))
  # float32-representable entries, so the chain's float32 weights are exact.
  entry = st.floats(-3.0, 3.0, allow_nan=False, allow_infinity=False,
                    allow_subnormal=False, width=32)
  matrices = []
  for k in range(depth):
    values = draw(st.lists(entry, min_size=widths[k + 1] * widths[k],
                           max_size=widths[k + 1] * widths[k]))
    matrices.append(
        np.asarray(values, np.float64).reshape(widths[k + 1], widths[k]))
  return matrices


@hypothesis.settings(max_examples=15, deadline=None)
@hypothesis.given(matrices=_dense_matrices(), data=st.data())
def test_product_norm_matches_explicit_product(matrices, data):
  chain = from_matrices(matrices)
  depth = len(matrices)
  s = data.draw(st.integers(0, depth - 1), label="start")
  e = data.draw(st.integers(s, depth - 1), label="end")
  for start, end in {(0, depth - 1), (s, e)}:
    product = matrices[start]
    for m in matrices[start + 1:end + 1]:
      product = m @ product
    expected = np.linalg.norm(product, 2)
    got = exact.product_norm(chain, (start, end))
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-12), (start, end)
