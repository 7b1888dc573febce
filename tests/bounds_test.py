"""Bound tests: worked examples, closed forms, relations, soundness, grads.

Ground truth is independent of the code under test: hand-computed numbers
(docs/bounds.md#worked-examples) and a numpy closed form over dense SVD norms
(``tests/reference.py``). Soundness is also checked by sampling: no pair of
inputs may move a logit difference by more than ``L_ij ||x - x'||``.
"""

import functools

import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lipjax
from lipjax import activations
from lipjax import bounds
from lipjax.linear_maps import LinearOp, dense_matrix, from_ops
from tests import reference

SETTINGS = hypothesis.settings(max_examples=25, deadline=None,
                               suppress_health_check=list(
                                   hypothesis.HealthCheck))

# docs/bounds.md#two-classes.
W0 = np.diag([2.0, 1.0])
W1 = np.array([[0.0, 1.0], [1.0, 0.0]])
W2 = np.diag([3.0, 1.0])
# docs/bounds.md#three-classes.
A0 = np.array([[1.0, 2.0, 0.0], [0.0, 1.0, -1.0], [1.0, 0.0, 1.0]])
A1 = np.array([[1.0, -1.0, 2.0], [0.0, 1.0, 1.0]])
A2 = np.array([[1.0, 0.0], [-1.0, 2.0], [0.5, 1.0]])


def exact_norms(mats, method, kind):
  """Dense-SVD norms of the products a bound needs, float32 for lipjax."""
  products = lipjax.required_products(len(mats), method=method, kind=kind)
  return jnp.asarray([reference.spectral_norm(
      reference.chain_product(mats, s, e)) for s, e in products], jnp.float32)


def bound_with_exact_norms(mats, *, method, kind, slopes=(0.0, 1.0),
                           diagonal=0.0):
  chain = lipjax.from_matrices(mats, slopes=slopes)
  return np.asarray(lipjax.bound_from_norms(
      chain, exact_norms(mats, method, kind), method=method, kind=kind,
      diagonal=diagonal), np.float64)


def pair(matrix, i, j):
  return float(np.asarray(matrix)[i, j])


# ------------------------------------------------------------- two classes


@pytest.mark.parametrize("exact", [True, "auto"])
def test_two_classes_hand_computed_numbers(exact):
  mats = [W0, W1, W2]
  get = functools.partial(lipjax.bound, mats, exact=exact, safety_factor=1.0)
  np.testing.assert_allclose(get(kind="global"), 5.25, rtol=1e-6)
  np.testing.assert_allclose(get(kind="global", method="naive"), 6.0,
                             rtol=1e-6)
  np.testing.assert_allclose(pair(get(kind="pairwise"), 0, 1), 5.644804,
                             atol=1e-5)
  np.testing.assert_allclose(pair(get(kind="pairwise", method="naive"), 0, 1),
                             6.324555, atol=1e-5)
  np.testing.assert_allclose(get(kind="per_class"), [5.25, 2.0], atol=1e-5)
  # The closed forms, exactly as written in docs/bounds.md#two-classes.
  np.testing.assert_allclose(pair(get(kind="pairwise"), 0, 1),
                             (np.sqrt(13) + 6 * np.sqrt(10)) / 4, rtol=1e-6)
  np.testing.assert_allclose(pair(get(kind="pairwise", method="naive"), 0, 1),
                             2 * np.sqrt(10), rtol=1e-6)


def test_two_classes_true_lipschitz_constant_below_bounds():
  # The true constant is 3 (global) and sqrt(13) (pair); bounds must not be
  # smaller, and LipLT must beat naive.
  mats = [W0, W1, W2]
  glob = float(lipjax.bound(mats, kind="global", exact=True))
  pw = pair(lipjax.bound(mats, kind="pairwise", exact=True), 0, 1)
  assert 3.0 <= glob < 6.0
  assert np.sqrt(13) <= pw < 2 * np.sqrt(10)


# ----------------------------------------------------------- three classes


def test_three_classes_numbers():
  mats = [A0, A1, A2]
  get = functools.partial(lipjax.bound, mats, exact=True, safety_factor=1.0)
  np.testing.assert_allclose(get(kind="global"), 9.981796, atol=1e-5)
  np.testing.assert_allclose(get(kind="global", method="naive"), 14.617807,
                             atol=1e-5)
  liplt = get(kind="pairwise")
  naive = get(kind="pairwise", method="naive")
  expected_liplt = {(0, 1): 12.314913, (0, 2): 4.351278, (1, 2): 8.384958}
  expected_naive = {(0, 1): 17.378994, (0, 2): 6.869651, (1, 2): 11.076979}
  empirical = {(0, 1): 7.483315, (0, 2): 2.121320, (1, 2): 5.722762}
  for (i, j), value in expected_liplt.items():
    np.testing.assert_allclose(pair(liplt, i, j), value, atol=1e-5)
    np.testing.assert_allclose(pair(naive, i, j), expected_naive[(i, j)],
                               atol=1e-5)
    assert pair(liplt, i, j) >= empirical[(i, j)]
  np.testing.assert_allclose(get(kind="per_class"),
                             [5.247642, 8.702557, 5.088660], atol=1e-5)


def test_three_classes_product_norms_and_layer_bounds():
  mats = [A0, A1, A2]
  products = lipjax.required_products(3, method="liplt", kind="global")
  norms = exact_norms(mats, "liplt", "global")
  expected = {(0, 0): 2.460505, (1, 1): 2.497212, (2, 2): 2.379044,
              (0, 1): 4.460286, (1, 2): 3.565419, (0, 2): 5.925428}
  for p, value in zip(products, np.asarray(norms)):
    np.testing.assert_allclose(value, expected[p], atol=1e-5)
  m = bounds.liplt_layer_bounds(norms, products, (0.0, 1.0), 3)
  np.testing.assert_allclose([float(v) for v in m],
                             [2.460505, 5.302344, 9.981796], atol=1e-5)


def test_general_slopes_weights():
  # With slopes (alpha, beta) the four terms get weights (a^2, ac, ac, c^2).
  alpha, beta = -0.5, 2.0
  a, c = (alpha + beta) / 2, (beta - alpha) / 2
  mats = [A0, A1, A2]
  n = lambda s, e: reference.spectral_norm(reference.chain_product(mats, s, e))
  expected = (a * a * n(0, 2) + a * c * n(1, 2) * n(0, 0)
              + a * c * n(2, 2) * n(0, 1) + c * c * n(2, 2) * n(1, 1) * n(0, 0))
  got = bound_with_exact_norms(mats, method="liplt", kind="global",
                               slopes=(alpha, beta))
  np.testing.assert_allclose(got, expected, rtol=1e-5)


# ------------------------------------------------------- random dense chains


@st.composite
def dense_chains(draw, min_classes=1, max_depth=5):
  depth = draw(st.integers(1, max_depth))
  widths = [draw(st.integers(1, 5)) for _ in range(depth)]
  widths.append(draw(st.integers(max(min_classes, 1), 5)))
  mats = []
  for k in range(depth):
    mats.append(draw(hnp.arrays(
        np.float64, (widths[k + 1], widths[k]),
        elements=st.floats(-2, 2, allow_nan=False, width=32))))
  return mats


slope_pairs = st.sampled_from(
    [a.slopes for a in map(activations.get_activation,
                           activations.ACTIVATIONS)]
    + [(-0.3, 0.7), (0.5, 1.5), (-2.0, -1.0)])


@SETTINGS
@hypothesis.given(mats=dense_chains(min_classes=2), slopes=slope_pairs,
                  method=st.sampled_from(lipjax.bounds.METHODS),
                  kind=st.sampled_from(lipjax.bounds.KINDS))
def test_recursion_equals_closed_form(mats, slopes, method, kind):
  got = bound_with_exact_norms(mats, method=method, kind=kind, slopes=slopes)
  want = reference.reference_bound(mats, method=method, kind=kind,
                                   slopes=slopes)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-5)


@SETTINGS
@hypothesis.given(mats=dense_chains(min_classes=2), slopes=slope_pairs)
def test_pair_tails_are_the_bounds_of_the_sub_networks(mats, slopes):
  # T_s is the pairwise LipLT bound of the layers from s on, whose products
  # are the full chain's (s', e) with s' >= s: the closed form of
  # tests/reference.py on mats[s:]. T_0 is the network's own bound.
  chain = lipjax.from_matrices(mats, slopes=slopes)
  tails = np.asarray(bounds.liplt_pair_tails(
      chain, exact_norms(mats, "liplt", "pairwise")), np.float64)
  k = mats[-1].shape[0]
  assert tails.shape == (len(mats), k, k)
  for s in range(len(mats)):
    want = reference.reference_bound(mats[s:], method="liplt",
                                     kind="pairwise", slopes=slopes)
    np.testing.assert_allclose(tails[s], want, rtol=2e-5, atol=1e-5)
  np.testing.assert_allclose(tails[0], bound_with_exact_norms(
      mats, method="liplt", kind="pairwise", slopes=slopes), rtol=1e-6)


@SETTINGS
@hypothesis.given(mats=dense_chains(min_classes=2), slopes=slope_pairs,
                  kind=st.sampled_from(lipjax.bounds.KINDS))
def test_liplt_at_most_naive(mats, slopes, kind):
  liplt = bound_with_exact_norms(mats, method="liplt", kind=kind,
                                 slopes=slopes)
  naive = bound_with_exact_norms(mats, method="naive", kind=kind,
                                 slopes=slopes)
  assert np.all(liplt <= naive * (1 + 1e-5) + 1e-5)


@SETTINGS
@hypothesis.given(mats=dense_chains(min_classes=2), slopes=slope_pairs,
                  method=st.sampled_from(lipjax.bounds.METHODS))
def test_pairwise_at_most_sqrt2_global_and_sum_of_per_class(mats, slopes,
                                                             method):
  glob = bound_with_exact_norms(mats, method=method, kind="global",
                                slopes=slopes)
  per_class = bound_with_exact_norms(mats, method=method, kind="per_class",
                                     slopes=slopes)
  pw = bound_with_exact_norms(mats, method=method, kind="pairwise",
                              slopes=slopes)
  tol = lambda x: x * (1 + 1e-5) + 1e-5
  assert np.all(pw <= tol(np.sqrt(2) * glob))
  assert np.all(pw <= tol(per_class[:, None] + per_class[None, :]))
  assert np.all(per_class <= tol(glob))
  np.testing.assert_array_equal(pw, pw.T)
  np.testing.assert_array_equal(np.diag(pw), 0.0)


# ------------------------------------------------------------ conv chains


def small_conv_chain(seed, slopes=(0.0, 1.0)):
  rng = np.random.default_rng(seed)
  conv = lambda shape, cout, k, s, p: LinearOp(
      weight=jnp.asarray(rng.normal(size=(k, k, shape[-1], cout)) / k,
                         jnp.float32),
      in_scale=None, out_scale=None, kind="conv", in_shape=shape,
      strides=(s, s), padding=((p, p), (p, p)))
  op0 = conv((6, 6, 2), 3, 3, 1, 1)
  op1 = conv(op0.out_shape, 3, 4, 2, 1)
  op2 = LinearOp(weight=jnp.asarray(rng.normal(size=(op1.out_dim, 6)) / 4,
                                    jnp.float32),
                 in_scale=jnp.asarray([0.5, 2.0, 1.0], jnp.float32),
                 out_scale=None, kind="dense", in_shape=op1.out_shape)
  op3 = LinearOp(weight=jnp.asarray(rng.normal(size=(6, 4)), jnp.float32),
                 in_scale=None, out_scale=None, kind="dense", in_shape=(6,))
  return from_ops([op0, op1, op2, op3], slopes=slopes)


def chain_matrices(chain):
  return [dense_matrix(chain, k, k) for k in range(chain.num_layers)]


@pytest.mark.parametrize("method", lipjax.bounds.METHODS)
@pytest.mark.parametrize("kind", lipjax.bounds.KINDS)
@pytest.mark.parametrize("slopes", [(0.0, 1.0), (-0.5, 1.0)])
def test_conv_chain_exact_bound_matches_dense_svd(method, kind, slopes):
  chain = small_conv_chain(0, slopes)
  got = np.asarray(lipjax.bound(chain, method=method, kind=kind, exact=True,
                                safety_factor=1.0), np.float64)
  want = reference.reference_bound(chain_matrices(chain), method=method,
                                   kind=kind, slopes=slopes)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_exact_safety_factor_is_applied_and_sound():
  chain = small_conv_chain(1)
  want = reference.reference_bound(chain_matrices(chain), method="liplt",
                                   kind="pairwise")
  got = np.asarray(lipjax.bound(chain, exact=True), np.float64)
  # Never below the exact value, and at most the documented factor above.
  assert np.all(got >= want)
  factor = lipjax.EXACT_SAFETY_FACTOR**(chain.num_layers - 1)
  assert np.all(got <= want * factor * (1 + 1e-6) + 1e-7)


# ------------------------------------------------------- sampled soundness


def forward_with_biases(mats, biases, fn, x):
  for k, (m, b) in enumerate(zip(mats, biases)):
    x = x @ m.T + b
    if k < len(mats) - 1:
      x = fn(x)
  return x


@pytest.mark.parametrize("activation", activations.ACTIVATIONS)
@pytest.mark.parametrize("seed", [0, 1])
def test_sampled_soundness_dense(activation, seed):
  rng = np.random.default_rng(seed)
  widths = [4, 6, 5, 4]
  mats = [rng.normal(size=(widths[k + 1], widths[k])) for k in range(3)]
  biases = [rng.normal(size=widths[k + 1]) for k in range(3)]
  act = activations.get_activation(activation)
  lip = {kind: np.asarray(lipjax.bound(mats, kind=kind, slopes=act.slopes,
                                       exact=True), np.float64)
         for kind in lipjax.bounds.KINDS}
  f = jax.jit(functools.partial(forward_with_biases,
                                [jnp.asarray(m) for m in mats],
                                [jnp.asarray(b) for b in biases], act.fn))
  x = rng.normal(size=(4000, widths[0])) * 2
  for scale in (1e-2, 1.0, 5.0):
    xp = x + scale * rng.normal(size=x.shape)
    diff = np.asarray(f(jnp.asarray(xp, jnp.float32))
                      - f(jnp.asarray(x, jnp.float32)), np.float64)
    dist = np.linalg.norm(xp - x, axis=1)
    slack = 1e-4 * (1 + dist)
    assert np.all(np.linalg.norm(diff, axis=1) <= lip["global"] * dist + slack)
    assert np.all(np.abs(diff) <= lip["per_class"] * dist[:, None]
                  + slack[:, None])
    for i, j in zip(*np.triu_indices(widths[-1], 1)):
      assert np.all(np.abs(diff[:, i] - diff[:, j])
                    <= lip["pairwise"][i, j] * dist + slack)


def test_sampled_soundness_jacobian_of_model_with_normalization():
  # A conv model with PyTorch-style (non-zero) biases and a non-unit input
  # std: the local gain ||J(x)^T c_ij|| may never exceed L_ij (pixel units).
  from flax import nnx  # pylint: disable=import-outside-toplevel
  model = lipjax.models.build(
      [("conv", 4, 3, 1, 1), ("conv", 4, 4, 2, 1), ("dense", 12),
       ("dense", None)], num_classes=4, input_shape=(6, 6, 2),
      rngs=nnx.Rngs(3), input_mean=(0.5, 0.4), input_std=(0.25, 0.5))
  lip = np.asarray(lipjax.bound(model, exact=True), np.float64)
  glob = float(lipjax.bound(model, kind="global", exact=True))
  graphdef, params = nnx.split(model)
  single = lambda x: nnx.merge(graphdef, params)(x[None])[0]
  jac = jax.jit(jax.vmap(jax.jacrev(single)))
  x = jax.random.uniform(jax.random.key(0), (512, 6, 6, 2))
  jacobians = np.asarray(jac(x), np.float64).reshape(512, 4, -1)
  gains = np.linalg.norm(jacobians, ord=2, axis=(1, 2))
  assert np.all(gains <= glob * (1 + 1e-5))
  for i, j in zip(*np.triu_indices(4, 1)):
    local = np.linalg.norm(jacobians[:, i] - jacobians[:, j], axis=1)
    assert np.all(local <= lip[i, j] * (1 + 1e-5))
    assert local.max() > 0.05 * lip[i, j]  # the check is not vacuous


# ------------------------------------------------------- large-class path


def test_large_class_fallback_formula_and_looser_than_full_pairwise():
  rng = np.random.default_rng(0)
  mats = [rng.normal(size=(5, 4)), rng.normal(size=(6, 5)),
          rng.normal(size=(7, 6))]
  chain = lipjax.from_matrices(mats)
  norms = exact_norms(mats, "liplt", "pairwise")
  full = np.asarray(lipjax.liplt_bound(chain, norms, kind="pairwise"))
  fallback = np.asarray(lipjax.liplt_bound(chain, norms, kind="pairwise",
                                           large_class_threshold=5))
  products = lipjax.required_products(3, method="liplt", kind="pairwise")
  m = bounds.liplt_layer_bounds(norms, products, (0.0, 1.0), 2)
  for i, j in zip(*np.triu_indices(7, 1)):
    row = np.linalg.norm(mats[-1][i] - mats[-1][j])
    np.testing.assert_allclose(fallback[i, j], row * float(m[-1]), rtol=1e-5)
    assert full[i, j] <= fallback[i, j] * (1 + 1e-6)
  # Default threshold (101) keeps the full pairwise bound for 7 classes.
  assert np.any(full < fallback * (1 - 1e-3))


def test_large_class_fallback_triggers_above_threshold():
  rng = np.random.default_rng(1)
  mats = [rng.normal(size=(3, 3)), rng.normal(size=(102, 3))]
  pw = np.asarray(lipjax.bound(mats, exact=True, safety_factor=1.0,
                               diagonal=1.0))
  assert pw.shape == (102, 102)
  np.testing.assert_array_equal(np.diag(pw), 1.0)
  w = mats[-1]
  m0 = reference.spectral_norm(mats[0])
  np.testing.assert_allclose(pw[3, 70], np.linalg.norm(w[3] - w[70]) * m0,
                             rtol=1e-5)


# -------------------------------------------------- jit, grads, shapes


def test_training_mode_jit_equals_eager_and_shapes():
  chain = small_conv_chain(2)
  for kind, shape in (("pairwise", (4, 4)), ("per_class", (4,)),
                      ("global", ())):
    state = lipjax.init_power_state(chain, kind=kind,
                                    key=jax.random.key(1))
    eager, eager_state = lipjax.bound(chain, kind=kind, iterations=3,
                                      state=state, return_state=True)
    jitted, jit_state = jax.jit(
        lambda c, s, kind=kind: lipjax.bound(c, kind=kind, iterations=3,
                                             state=s, return_state=True))(
                                                 chain, state)
    assert eager.shape == shape
    np.testing.assert_allclose(jitted, eager, rtol=1e-5)
    for a, b in zip(jit_state.vectors, eager_state.vectors):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", lipjax.bounds.METHODS)
@pytest.mark.parametrize("kind", lipjax.bounds.KINDS)
def test_gradient_of_bound_matches_finite_differences(method, kind):
  with jax.enable_x64(True):
    chain = small_conv_chain(3, slopes=(0.1, 1.0)).astype(jnp.float64)
    products = lipjax.required_products(4, method=method, kind=kind)
    state = lipjax.power_iteration.init(chain, products, jax.random.key(0))
    state = lipjax.power_iteration.iterate(chain, state, 20)

    def objective(c):
      value = lipjax.bound(c, method=method, kind=kind, iterations=0,
                           state=state)
      return jnp.sum(value * jnp.arange(1.0, value.size + 1.0).reshape(
          value.shape))

    objective = jax.jit(objective)
    grads = jax.jit(jax.grad(objective))(chain)
    leaves, treedef = jax.tree.flatten(chain)
    grad_leaves = jax.tree.leaves(grads)
    rng = np.random.default_rng(0)
    for leaf, grad in zip(leaves, grad_leaves):
      direction = rng.normal(size=leaf.shape)
      eps = 1e-6
      def shifted(sign, leaf=leaf, direction=direction):
        new = [l + sign * eps * direction if l is leaf else l for l in leaves]
        return float(objective(jax.tree.unflatten(treedef, new)))
      fd = (shifted(1) - shifted(-1)) / (2 * eps)
      np.testing.assert_allclose(np.sum(np.asarray(grad) * direction), fd,
                                 rtol=1e-5, atol=1e-8)
