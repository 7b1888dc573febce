"""Tests of the public entry point ``lipjax.bound`` and its modes.

Checks the calls the README documents, the three norm modes (training
iterations, the randomized Lanczos certificate, exact) against dense-SVD
ground truth, the restored-params path, batch-norm folding, and the error
messages.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lipjax
from tests import reference


def small_model(seed=0, **kwargs):
  return lipjax.models.build(
      [("conv", 3, 3, 1, 1), ("conv", 4, 4, 2, 1), ("dense", 10),
       ("dense", None)], num_classes=5, input_shape=(6, 6, 1),
      rngs=nnx.Rngs(seed), **kwargs)


def dense_reference(model, method="liplt", kind="pairwise"):
  chain = lipjax.from_model(model)
  mats = [lipjax.linear_maps.dense_matrix(chain, k, k)
          for k in range(chain.num_layers)]
  return reference.reference_bound(mats, method=method, kind=kind,
                                   slopes=chain.slopes)


def test_readme_dense_example():
  rng = np.random.default_rng(0)
  mats = [rng.normal(size=(8, 6)), rng.normal(size=(8, 8)),
          rng.normal(size=(4, 8))]
  lip = lipjax.bound(mats, method="liplt", kind="pairwise")
  assert lip.shape == (4, 4)
  np.testing.assert_array_equal(lip, lip.T)
  np.testing.assert_array_equal(np.diag(lip), 0.0)
  want = reference.reference_bound(mats, method="liplt", kind="pairwise")
  # Converged iteration times the 1.01 safety factor: above the exact value.
  assert np.all(np.asarray(lip) >= want)
  assert np.all(np.asarray(lip) <= want * 1.01**2 * (1 + 1e-5) + 1e-6)


def test_readme_model_examples_shapes():
  model = lipjax.models.build("4C3F", num_classes=10, input_shape=(28, 28, 1),
                              rngs=nnx.Rngs(0))
  state = lipjax.init_power_state(model)
  assert state.products == lipjax.required_products(7, method="liplt",
                                                    kind="pairwise")
  assert len(state.products) == 21  # docs/bounds.md#products-and-cost
  lip, state2 = lipjax.bound(model, iterations=1, state=state,
                             return_state=True)
  assert lip.shape == (10, 10)
  assert jax.tree.structure(state2) == jax.tree.structure(state)
  assert np.all(np.isfinite(lip)) and np.all(np.asarray(lip)[~np.eye(
      10, dtype=bool)] > 0)


@pytest.mark.parametrize("kind", lipjax.bounds.KINDS)
def test_randomized_and_exact_modes_match_dense_svd(kind):
  model = small_model()
  want = dense_reference(model, kind=kind)
  exact, info = lipjax.bound(model, kind=kind, exact=True, return_info=True)
  assert set(info.sources) == {"exact"}
  assert info.guarantee.startswith("deterministic")
  assert np.all(np.asarray(exact) >= want)
  np.testing.assert_allclose(exact, want, rtol=1e-4, atol=1e-7)
  raw = lipjax.bound(model, kind=kind, exact=True, safety_factor=1.0)
  np.testing.assert_allclose(raw, want, rtol=1e-5, atol=1e-7)
  randomized, info = lipjax.bound(model, kind=kind, return_info=True)
  assert np.all(np.asarray(randomized) >= want)
  assert np.all(np.asarray(randomized) <= want * 1.003 + 1e-7)
  assert set(info.sources) == {"lanczos"}
  assert info.guarantee.startswith("randomized: holds with probability >= "
                                   "1 - 1e-09")
  assert f"seed {info.seed}" in info.guarantee
  assert np.all(info.safety_factor >= 1.0)
  assert "guarantee: randomized" in info.summary()


def test_exact_auto_mixes_sources_and_reports_them():
  model = small_model()
  chain = lipjax.from_model(model)
  products = lipjax.required_products(4, method="liplt", kind="pairwise")
  sides = [lipjax.exact.gram_size(chain, p).side for p in products]
  assert min(sides) < max(sides)
  limit = 8 * min(sides)**2
  lip, info = lipjax.bound(model, exact="auto", max_exact_bytes=limit,
                           return_info=True)
  sources = dict(zip(info.products, info.sources))
  for p, side in zip(products, sides):
    assert sources[p] == ("exact" if 8 * side**2 <= limit else "lanczos")
  assert {"exact", "lanczos"} == set(info.sources)
  assert np.all(np.asarray(lip) >= dense_reference(model))
  with pytest.raises(MemoryError, match="max_bytes"):
    lipjax.bound(model, exact=True, max_exact_bytes=limit)


def test_restored_params_give_the_same_bound():
  model = small_model(seed=1)
  graphdef, params = nnx.split(model)
  direct = lipjax.bound(model, exact=True)
  via_graphdef = lipjax.bound(params, graphdef=graphdef, exact=True)
  np.testing.assert_array_equal(direct, via_graphdef)
  # A notebook user restoring params into a freshly built model.
  fresh = small_model(seed=7)
  assert not np.allclose(lipjax.bound(fresh, exact=True), direct)
  nnx.update(fresh, params)
  np.testing.assert_array_equal(lipjax.bound(fresh, exact=True), direct)


@pytest.mark.parametrize("other", [
    dict(architecture="3F", num_classes=5),     # other layers: other leaves
    dict(architecture=None, num_classes=7),     # same leaves, other shapes
], ids=["architecture", "num_classes"])
def test_params_of_another_network_name_both(other):
  # Not nnx's "Incorrect number of leaves", nor a shape error deep inside
  # the first matmul: both networks are described.
  graphdef, _ = nnx.split(small_model())
  architecture = other.pop("architecture") or [
      ("conv", 3, 3, 1, 1), ("conv", 4, 4, 2, 1), ("dense", 10),
      ("dense", None)]
  _, params = nnx.split(lipjax.models.build(
      architecture, input_shape=(6, 6, 1), rngs=nnx.Rngs(0), **other))
  with pytest.raises(ValueError, match=(
      r"graphdef describes custom \[conv 3, conv 4, dense 10, dense 5\] on "
      r"\(6, 6, 1\) inputs, but the params hold \d layers with kernels")):
    lipjax.bound(params, graphdef=graphdef, exact=True)


def test_training_mode_inside_jit_with_params():
  model = small_model(seed=2)
  graphdef, params = nnx.split(model)
  state = lipjax.init_power_state(model, key=jax.random.key(3))

  @jax.jit
  def step(params, state):
    def loss(p):
      lip, new_state = lipjax.bound(p, graphdef=graphdef, iterations=2,
                                    state=state, return_state=True)
      return jnp.sum(lip), new_state
    (value, new_state), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return value, new_state, grads

  value, new_state, grads = step(params, state)
  assert np.isfinite(value)
  grad_norms = [float(jnp.linalg.norm(g)) for g in jax.tree.leaves(grads)]
  assert all(np.isfinite(grad_norms)) and max(grad_norms) > 0
  # Warm start: the estimate grows towards the norm as iterations accumulate.
  for _ in range(30):
    value2, new_state, _ = step(params, new_state)
  assert float(value2) >= float(value) * (1 - 1e-5)
  assert float(value2) <= float(jnp.sum(lipjax.bound(model, exact=True)))


def test_batch_norm_running_stats_are_folded_in():
  model = small_model(seed=4, batch_norm=True)
  rng = np.random.default_rng(0)
  for bn in model.batch_norms:
    features = bn.var[...].shape[0]
    bn.var[...] = jnp.asarray(rng.uniform(0.2, 3.0, features), jnp.float32)
    bn.mean[...] = jnp.asarray(rng.normal(size=features), jnp.float32)
    bn.scale[...] = jnp.asarray(rng.normal(size=features), jnp.float32)
    bn.bias[...] = jnp.asarray(rng.normal(size=features), jnp.float32)
  model.eval()
  lip = np.asarray(lipjax.bound(model, exact=True), np.float64)
  reference = dense_reference(model)
  # Batch-norm scales sit between layers, where rounding them up does not
  # bound a norm: the certificate adds an allowance for them (a few 1e-4
  # here), never less than the dense reference.
  assert np.all(lip >= reference * (1 - 1e-6))
  np.testing.assert_allclose(lip, reference, rtol=1e-3)
  graphdef, state = nnx.split(model)
  single = lambda x: nnx.merge(graphdef, state)(x[None])[0]
  x = jax.random.uniform(jax.random.key(0), (256, 6, 6, 1))
  jac = np.asarray(jax.jit(jax.vmap(jax.jacrev(single)))(x),
                   np.float64).reshape(256, 5, -1)
  for i, j in zip(*np.triu_indices(5, 1)):
    local = np.linalg.norm(jac[:, i] - jac[:, j], axis=1)
    assert np.all(local <= lip[i, j] * (1 + 1e-5))


def test_errors_name_the_fix():
  model = small_model()
  with pytest.raises(ValueError, match="method"):
    lipjax.bound(model, method="fast")
  with pytest.raises(ValueError, match="kind"):
    lipjax.bound(model, kind="pairs")
  state = lipjax.init_power_state(model, kind="global")
  with pytest.raises(ValueError, match="init_power_state"):
    lipjax.bound(model, kind="pairwise", iterations=1, state=state)
  with pytest.raises(ValueError, match="training mode"):
    lipjax.bound(model, iterations=1, exact=True)
  with pytest.raises(ValueError, match="exact must be"):
    lipjax.bound(model, exact="yes")
  with pytest.raises(ValueError, match="delta"):
    lipjax.bound(model, delta=0.0)
  with pytest.raises(ValueError, match="target_factor"):
    lipjax.bound(model, target_factor=1.0)
  with pytest.raises(ValueError, match="safety_factor"):
    lipjax.bound(model, safety_factor=1.0)
  with pytest.raises(TypeError, match="SequentialNet"):
    lipjax.bound({"not": "a model"})
  other = lipjax.models.build("3F", num_classes=5, input_shape=(6, 6, 1),
                              rngs=nnx.Rngs(0))
  wrong_state = lipjax.init_power_state(other, kind="per_class")
  with pytest.raises(ValueError, match="architecture"):
    lipjax.power_iteration.estimate(lipjax.from_model(model), wrong_state)


def test_one_layer_network_needs_no_power_iteration():
  w = np.array([[1.0, 2.0], [3.0, -1.0], [0.0, 1.0]])
  lip = np.asarray(lipjax.bound([w], kind="pairwise", iterations=0))
  np.testing.assert_allclose(lip[0, 1], np.linalg.norm(w[0] - w[1]),
                             rtol=1e-6)
  np.testing.assert_allclose(lipjax.bound([w], kind="global", exact=True,
                                          safety_factor=1.0),
                             np.linalg.norm(w, 2), rtol=1e-6)
