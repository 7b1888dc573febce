"""Tests for lipjax.power_iteration: batched, warm-started power iteration.

Ground truth is the float64 SVD of the materialized product
``dense_matrix(chain, s, e)`` and, for the batching, a plain numpy
per-product power iteration from the state's own initial vectors
(docs/bounds.md#power-iteration-training). The chains are tiny so that
every file runs in seconds on a CPU.
"""

import dataclasses
import functools

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lipjax import power_iteration
from lipjax.linear_maps import dense_matrix
from lipjax.linear_maps import from_matrices
from tests import chains

# Seeds chosen (deterministically, by scanning) so that every product of the
# chain has a relative gap 1 - sigma_2 / sigma_1 of at least 0.04: 400
# iterations then reach float32 accuracy.
_DENSE_SEED = 3
_CONV_SEED = 7
_DENSE_WIDTHS = (5, 7, 6, 4, 3)


def _dense_chain(widths=_DENSE_WIDTHS, seed=_DENSE_SEED):
  return chains.dense_chain(widths, seed)


def _conv_chain(seed=_CONV_SEED):
  return chains.expanding_conv_chain(seed)


_CHAINS = {"dense": _dense_chain, "conv": _conv_chain}


@functools.cache
def _chain(name):
  return _CHAINS[name]()


def _liplt(top):
  return tuple((s, e) for s in range(top) for e in range(s, top))


def _naive(top):
  return tuple((k, k) for k in range(top))


_SPARSE = ((0, 2), (1, 1), (1, 3), (3, 3))

# Product sets for the 4-layer chains above: LipLT global (s <= e < N) and
# pairwise (s <= e < N - 1), naive global, and an arbitrary sparse set.
_PRODUCT_SETS = {
    "liplt_global": _liplt(4),
    "liplt_pairwise": _liplt(3),
    "naive_global": _naive(4),
    "sparse": _SPARSE,
}

# Jitted once here so that repeated calls on one chain reuse the compilation
# (eager calls compile every time); eager == jit is tested separately.
_iterate = jax.jit(power_iteration.iterate, static_argnums=2)
_estimate = jax.jit(power_iteration.estimate)


@functools.cache
def _matrix(name, s, e):
  """The float64 dense matrix of W_e ... W_s of a named chain."""
  return dense_matrix(_chain(name), s, e)


def _exact(name, products):
  return np.asarray(
      [np.linalg.norm(_matrix(name, s, e), 2) for s, e in products])


def _rows(state):
  """``{(s, e): float64 flattened row}`` of a state."""
  rows = {}
  for start, group in zip(state.starts, state.vectors):
    ends = sorted(e for s, e in state.products if s == start)
    group = np.asarray(group, np.float64).reshape(len(ends), -1)
    for end, row in zip(ends, group):
      rows[(start, end)] = row
  return rows


def _key(seed=0):
  return jax.random.key(seed)


# ---------------------------------------------------------------- init ----


@pytest.mark.parametrize("chain_name", sorted(_CHAINS))
@pytest.mark.parametrize("set_name", sorted(_PRODUCT_SETS))
def test_init_groups_unit_rows_by_start(chain_name, set_name):
  chain = _chain(chain_name)
  products = _PRODUCT_SETS[set_name]
  state = power_iteration.init(chain, products, _key())

  assert state.products == tuple(sorted(products))
  expected_starts = tuple(sorted({s for s, _ in products}))
  assert state.starts == expected_starts
  assert len(state.vectors) == len(expected_starts)
  for start, group in zip(state.starts, state.vectors):
    count = sum(1 for s, _ in products if s == start)
    assert group.shape == (count,) + tuple(chain.ops[start].in_shape)
    assert group.dtype == jnp.float32
    norms = np.linalg.norm(np.asarray(group).reshape(count, -1), axis=1)
    np.testing.assert_allclose(norms, 1.0, rtol=1e-6)


def test_init_liplt_group_sizes():
  # Start s holds N' - s rows for the LipLT product set (one per end e >= s).
  state = power_iteration.init(_chain("dense"), _liplt(4), _key())
  assert [g.shape for g in state.vectors] == [(4, 5), (3, 7), (2, 6), (1, 4)]


def test_init_same_key_same_state_other_key_other_state():
  chain = _chain("conv")
  a = power_iteration.init(chain, _liplt(4), _key(3))
  b = power_iteration.init(chain, _liplt(4), _key(3))
  c = power_iteration.init(chain, _liplt(4), _key(4))
  for va, vb, vc in zip(a.vectors, b.vectors, c.vectors):
    np.testing.assert_array_equal(np.asarray(va), np.asarray(vb))
    assert np.max(np.abs(np.asarray(va) - np.asarray(vc))) > 1e-2
  # Rows within a group are distinct random vectors.
  first = np.asarray(a.vectors[0]).reshape(4, -1)
  assert np.max(np.abs(first[0] - first[1])) > 1e-2


@pytest.mark.parametrize("products", [
    ((0, 4),),
    ((2, 1),),
    ((-1, 0),),
    (),
    ((0, 0), (1, 1), (0, 0)),
])
def test_init_rejects_bad_products(products):
  with pytest.raises(ValueError):
    power_iteration.init(_chain("dense"), products, _key())


# ------------------------------------------------ lower bound, convergence --


@pytest.mark.parametrize("chain_name", sorted(_CHAINS))
def test_estimate_is_monotone_lower_bound_and_converges(chain_name):
  chain = _chain(chain_name)
  products = _liplt(4)
  exact = _exact(chain_name, products)
  state = power_iteration.init(chain, products, _key(1))
  prev = np.zeros(len(products))
  for k in range(401):
    est = np.asarray(_estimate(chain, state))
    assert est.shape == (len(products),)
    # A lower bound at every iteration, and non-decreasing (the Rayleigh
    # quotient of power iteration on the PSD P^T P never decreases).
    assert np.all(est <= exact * (1 + 1e-5)), (k, est, exact)
    assert np.all(est >= prev * (1 - 1e-6)), (k, est, prev)
    prev = est
    state = _iterate(chain, state, 1)
  np.testing.assert_allclose(est, exact, rtol=1e-4)
  # From a random start the first estimates were clearly below the norm.
  first = np.asarray(_estimate(chain, power_iteration.init(chain, products,
                                                            _key(1))))
  assert np.min(first / exact) < 0.9


def _matrix_product(matrices, s, e):
  """``W_e ... W_s`` in float64 from ``[out, in]`` matrices."""
  p = np.asarray(matrices[s], np.float64)
  for m in matrices[s + 1:e + 1]:
    p = np.asarray(m, np.float64) @ p
  return p


@hypothesis.settings(max_examples=10, deadline=None)
@hypothesis.given(
    widths=st.lists(st.integers(2, 8), min_size=2, max_size=5),
    seed=st.integers(0, 2**32 - 1),
    num_iterations=st.integers(0, 25),
)
def test_estimate_is_lower_bound_random_chains(widths, seed, num_iterations):
  rng = np.random.default_rng(seed)
  depth = len(widths) - 1
  matrices = [
      rng.standard_normal((widths[k + 1], widths[k])).astype(np.float32)
      for k in range(depth)
  ]
  chain = from_matrices(matrices)
  products = _liplt(depth)
  exact = np.asarray([
      np.linalg.norm(_matrix_product(matrices, s, e), 2) for s, e in products
  ])

  # Arbitrary (not init's) unit start vectors.
  def unit_rows(rows):
    return jnp.asarray(rows / np.linalg.norm(rows, axis=1, keepdims=True),
                       jnp.float32)

  state = power_iteration.PowerState(
      vectors=tuple(
          unit_rows(rng.standard_normal((depth - s, widths[s])))
          for s in range(depth)),
      products=products)
  est = np.asarray(_estimate(chain, _iterate(chain, state, num_iterations)))
  assert np.all(est <= exact * (1 + 1e-5)), (est, exact)

  # With the top right singular vectors as rows the bound is attained.
  top = []
  for s in range(depth):
    top.append(unit_rows(np.stack([
        np.linalg.svd(_matrix_product(matrices, s, e))[2][0]
        for e in range(s, depth)
    ])))
  est_top = np.asarray(
      _estimate(chain, dataclasses.replace(state, vectors=tuple(top))))
  np.testing.assert_allclose(est_top, exact, rtol=1e-5)


# ---------------------------------------------- batched == per-product -----


def _reference_iteration(chain_name, state, num_iterations):
  """Independent float64 power iteration per product on the dense matrices."""
  vectors, norms = {}, {}
  for (s, e), v in _rows(state).items():
    p = _matrix(chain_name, s, e)
    for _ in range(num_iterations):
      w = p.T @ (p @ v)
      v = w / np.linalg.norm(w)
    vectors[(s, e)] = v
    norms[(s, e)] = np.linalg.norm(p @ v)
  return vectors, norms


@pytest.mark.parametrize("chain_name", sorted(_CHAINS))
@pytest.mark.parametrize("set_name", sorted(_PRODUCT_SETS))
def test_batched_equals_per_product_iteration(chain_name, set_name):
  chain = _chain(chain_name)
  products = _PRODUCT_SETS[set_name]
  state0 = power_iteration.init(chain, products, _key(5))

  # Before iterating: the estimate is ||P v0|| of each product's own row.
  _, ref0 = _reference_iteration(chain_name, state0, 0)
  est0 = np.asarray(_estimate(chain, state0))
  np.testing.assert_allclose(est0, [ref0[p] for p in state0.products],
                             rtol=1e-5)

  state = _iterate(chain, state0, 7)
  assert state.products == state0.products
  ref_vectors, ref_norms = _reference_iteration(chain_name, state0, 7)
  got = _rows(state)
  assert set(got) == set(ref_vectors)
  for p in state.products:
    np.testing.assert_allclose(got[p], ref_vectors[p], atol=1e-4,
                               err_msg=str(p))
    assert np.linalg.norm(got[p]) == pytest.approx(1.0, rel=1e-5)
  # The vectors moved: the test would notice a no-op iteration.
  start = _rows(state0)
  assert max(np.max(np.abs(got[p] - start[p])) for p in got) > 1e-2
  est = np.asarray(_estimate(chain, state))
  np.testing.assert_allclose(est, [ref_norms[p] for p in state.products],
                             rtol=1e-4)


def test_estimate_order_follows_sorted_products():
  chain = _chain("dense")
  unsorted = ((2, 3), (0, 1), (3, 3), (1, 2), (0, 0))
  state = power_iteration.init(chain, unsorted, _key(7))
  assert state.products == tuple(sorted(unsorted))
  state = _iterate(chain, state, 400)
  est = np.asarray(_estimate(chain, state))
  exact = _exact("dense", state.products)
  # The norms are distinct, so a permutation would be caught.
  assert np.min(np.diff(np.sort(exact))) > 0.1
  np.testing.assert_allclose(est, exact, rtol=1e-4)


# ---------------------------------------------------------- iterate -------


def test_iterate_jit_equals_eager():
  chain = _chain("conv")
  state = power_iteration.init(chain, _SPARSE, _key(8))
  eager = power_iteration.iterate(chain, state, 6)
  jitted = _iterate(chain, state, 6)
  assert jitted.products == eager.products
  for a, b in zip(eager.vectors, jitted.vectors):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
  np.testing.assert_allclose(power_iteration.estimate(chain, eager),
                             _estimate(chain, jitted), rtol=1e-6)


def test_iterate_zero_is_identity_and_negative_raises():
  chain = _chain("dense")
  state = power_iteration.init(chain, _liplt(4), _key(9))
  same = power_iteration.iterate(chain, state, 0)
  for a, b in zip(state.vectors, same.vectors):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(ValueError):
    power_iteration.iterate(chain, state, -1)


def test_iterate_warm_starts_from_the_state():
  # k single steps carried through the state == one call with k steps.
  chain = _chain("conv")
  state = power_iteration.init(chain, _liplt(4), _key(10))
  stepped = state
  for _ in range(7):
    stepped = _iterate(chain, stepped, 1)
  at_once = _iterate(chain, state, 7)
  for a, b in zip(stepped.vectors, at_once.vectors):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


# -------------------------------------------------------- gradients -------


def _finite_difference_grad(f, chain, h=1e-6):
  leaves, treedef = jax.tree_util.tree_flatten(chain)
  grads = []
  for i, leaf in enumerate(leaves):
    leaf = np.asarray(leaf)
    grad = np.zeros_like(leaf)
    for j in range(leaf.size):
      step = np.zeros_like(leaf)
      step.flat[j] = h
      plus, minus = list(leaves), list(leaves)
      plus[i] = jnp.asarray(leaf + step)
      minus[i] = jnp.asarray(leaf - step)
      grad.flat[j] = (
          float(f(jax.tree_util.tree_unflatten(treedef, plus))) -
          float(f(jax.tree_util.tree_unflatten(treedef, minus)))) / (2 * h)
    grads.append(grad)
  return grads


def test_estimate_gradient_matches_finite_differences():
  with jax.enable_x64(True):
    chain = _dense_chain((3, 4, 3, 2), seed=12).astype(jnp.float64)
    state = power_iteration.init(chain, _liplt(3), _key(12))
    # A float64 chain gets float64 vectors.
    assert [v.dtype for v in state.vectors] == [jnp.float64] * 3
    state = power_iteration.iterate(chain, state, 2)
    f = jax.jit(lambda c: jnp.sum(power_iteration.estimate(c, state)))
    analytic = jax.tree_util.tree_leaves(jax.jit(jax.grad(f))(chain))
    numeric = _finite_difference_grad(f, chain)
    assert len(analytic) == len(numeric) == 3
    for a, n in zip(analytic, numeric):
      assert a.dtype == jnp.float64
      assert np.max(np.abs(n)) > 1e-2
      np.testing.assert_allclose(np.asarray(a), n, rtol=1e-6, atol=1e-9)


def test_estimate_gradient_single_product_closed_form():
  # d||W v|| / dW = (W v) v^T / ||W v|| for one dense layer (math [out, in]).
  with jax.enable_x64(True):
    chain = _dense_chain((4, 3), seed=13).astype(jnp.float64)
    state = power_iteration.init(chain, ((0, 0),), _key(13))
    v = np.asarray(state.vectors[0][0])
    w_math = np.asarray(chain.ops[0].weight).T
    u = w_math @ v
    expected = np.outer(u, v) / np.linalg.norm(u)
    grad = jax.grad(
        lambda c: jnp.sum(power_iteration.estimate(c, state)))(chain)
    np.testing.assert_allclose(np.asarray(grad.ops[0].weight).T, expected,
                               rtol=1e-10)


def test_no_gradient_to_vectors():
  chain = _chain("conv")
  state = power_iteration.init(chain, _liplt(4), _key(14))
  # Unconverged vectors: without stop_gradient this gradient is not zero.
  grad = jax.jit(jax.grad(
      lambda st: jnp.sum(power_iteration.estimate(chain, st))))(state)
  assert grad.products == state.products
  assert len(grad.vectors) == 4
  for g, v in zip(grad.vectors, state.vectors):
    assert g.shape == v.shape
    np.testing.assert_array_equal(np.asarray(g), 0.0)


def test_no_gradient_through_iterate():
  chain = _chain("dense")
  state = power_iteration.init(chain, _SPARSE, _key(15))
  fixed = _iterate(chain, state, 3)

  def through(c):
    return jnp.sum(power_iteration.estimate(
        c, power_iteration.iterate(c, state, 3)))

  def stopped(c):
    return jnp.sum(power_iteration.estimate(c, fixed))

  g_through = jax.tree_util.tree_leaves(jax.jit(jax.grad(through))(chain))
  g_stopped = jax.tree_util.tree_leaves(jax.jit(jax.grad(stopped))(chain))
  assert len(g_through) == len(g_stopped) == 4
  for a, b in zip(g_through, g_stopped):
    assert np.max(np.abs(np.asarray(b))) > 1e-3
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                               atol=1e-6)


# ------------------------------------------------ state/chain mismatch ----


def test_mismatched_state_raises_architecture_error():
  chain = _chain("dense")
  # Same depth, different first width.
  other = _dense_chain((6, 7, 6, 4, 3))
  state = power_iteration.init(other, _liplt(4), _key())
  with pytest.raises(ValueError, match="architecture"):
    power_iteration.estimate(chain, state)
  with pytest.raises(ValueError, match="architecture"):
    power_iteration.iterate(chain, state, 1)


def test_conv_state_on_dense_chain_raises_architecture_error():
  state = power_iteration.init(_chain("conv"), _naive(4), _key())
  with pytest.raises(ValueError, match="architecture"):
    power_iteration.estimate(_chain("dense"), state)


def test_state_with_wrong_row_count_raises_architecture_error():
  chain = _chain("dense")
  state = power_iteration.init(chain, _liplt(4), _key())
  # Claim fewer products than there are rows.
  bad = dataclasses.replace(state, products=_naive(4))
  with pytest.raises(ValueError, match="architecture"):
    power_iteration.estimate(chain, bad)


def test_state_products_out_of_range_raise():
  shallow = _dense_chain((5, 7, 6))
  state = power_iteration.init(_chain("dense"), ((0, 0), (1, 3)), _key())
  with pytest.raises(ValueError, match="not within"):
    power_iteration.estimate(shallow, state)
  with pytest.raises(ValueError, match="not within"):
    power_iteration.iterate(shallow, state, 1)
