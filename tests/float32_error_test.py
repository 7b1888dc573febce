"""The float32 evaluation margin (lipjax.certification.float32_error).

The bound must cover the difference between the float32 network (jitted,
any batch size) and the same network in float64, at the point and at
points inside the ball; a point a few ulps from the decision boundary must
not be certified; and the float64 certificate test must fail closed.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lipjax
from lipjax.certification import float32_error
from lipjax.certification import sound_bound
from tests import evaluation


def _model(activation="relu", batch_norm=False, seed=0):
  model = lipjax.models.build(
      [("conv", 4, 3, 2, 1), ("conv", 6, 3, 1, 1), ("dense", 20),
       ("dense", None)], num_classes=5, input_shape=(8, 8, 2),
      rngs=nnx.Rngs(seed), activation=activation, batch_norm=batch_norm,
      input_mean=(0.4, 0.5), input_std=(0.25, 0.3))
  if batch_norm:
    rng = np.random.default_rng(seed)
    for bn in model.batch_norms:
      c = bn.var[...].shape[0]
      bn.var[...] = jnp.asarray(rng.uniform(0.05, 3.0, c), jnp.float32)
      bn.mean[...] = jnp.asarray(rng.normal(size=c), jnp.float32)
      bn.scale[...] = jnp.asarray(rng.normal(size=c) * 3, jnp.float32)
      bn.bias[...] = jnp.asarray(rng.normal(size=c), jnp.float32)
  return model


def _error(model, x):
  bounds, _ = sound_bound.sound_bound(model, method="liplt", kind="pairwise",
                                      exact=True)
  return float32_error.logit_error_bounds(model, x, bounds["layer_norms"],
                                          bounds["lipschitz_to"])


@pytest.mark.parametrize("activation,batch_norm", [
    ("relu", False), ("tanh", True), ("leaky_relu", True), ("sigmoid", False)])
def test_error_bound_covers_float32_evaluation_in_the_ball(activation,
                                                           batch_norm):
  model = _model(activation, batch_norm)
  rng = np.random.default_rng(1)
  x = rng.uniform(0, 1, (48, 8, 8, 2)).astype(np.float32)
  error = _error(model, x)
  radius = 0.7
  step = rng.standard_normal(x.shape)
  step *= radius / np.linalg.norm(step.reshape(48, -1), axis=1)[
      :, None, None, None]
  for point, r in ((x, 0.0), ((x + step).astype(np.float32), radius)):
    exact = evaluation.float64_logits(model, point)
    for batch in (1, 7, 48):
      got = np.abs(evaluation.float32_logits(model, point, batch) - exact)
      bound = (error.elementwise + error.l2[:, None]
               + r * error.l2_slope)
      assert np.all(got <= bound)
      # Pairs: the difference of two classes, as certification uses it.
      at_r0, slope = error.pair(np.zeros(48, int))
      pair_err = np.abs(got[:, :1] - got)
      assert np.all(pair_err <= at_r0 + r * slope)


def test_point_a_few_ulps_from_the_boundary_is_not_certified():
  model = _model()
  rng = np.random.default_rng(3)
  a, b = rng.uniform(0, 1, (2, 1, 8, 8, 2)).astype(np.float32)
  la, lb = (np.argmax(evaluation.float32_logits(model, p, 1)) for p in (a, b))
  for _ in range(40):  # Find two inputs that the network classifies apart.
    if la != lb:
      break
    b = rng.uniform(0, 1, (1, 8, 8, 2)).astype(np.float32)
    lb = np.argmax(evaluation.float32_logits(model, b, 1))
  assert la != lb
  point = evaluation.boundary_point(model, a, b)
  logits = evaluation.float32_logits(model, point, 1)
  labels = np.array([la])
  bounds, _ = sound_bound.sound_bound(model, method="liplt", kind="pairwise",
                                      exact=True)
  lip = bounds["bound"]
  top2 = np.sort(logits[0])[-2:]
  assert top2[1] - top2[0] < 1e-4 * np.abs(top2).max()  # At the boundary.
  error = float32_error.logit_error_bounds(
      model, point, bounds["layer_norms"], bounds["lipschitz_to"])
  radius, certified = float32_error.certify_float64(
      logits, labels, lip, error, np.array([0.0, 1e-7]))
  assert radius[0] <= 0 and not certified.any()
  # Without the margin the exact-arithmetic test would take the float32
  # logits at their word.
  naive_radius, _ = float32_error.certify_float64(logits, labels, lip, None,
                                                  np.array([0.0]))
  assert naive_radius[0] > 0


def test_certify_float64_matches_radii_without_error_and_fails_closed():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(30, 4)).astype(np.float32)
  labels = rng.integers(0, 4, 30)
  lip = np.abs(rng.normal(size=(4, 4))) + 0.5
  lip = (lip + lip.T) / 2
  eps = np.array([0.0, 0.1, 0.5])
  radius, certified = float32_error.certify_float64(logits, labels, lip,
                                                    None, eps)
  np.testing.assert_allclose(
      radius, lipjax.certified_radius(logits, labels, lip), rtol=1e-5)
  np.testing.assert_array_equal(
      certified, lipjax.is_certified(logits, labels, lip, eps))
  for bad in (0.0, -1.0, np.nan, np.inf):
    broken = lip.copy()
    broken[0, 1] = broken[1, 0] = bad
    _, cert = float32_error.certify_float64(logits, labels, broken, None, eps)
    assert not cert[:, np.isin(labels, [0, 1])].any()
  nan_logits = logits.copy()
  nan_logits[0, 2] = np.nan
  r, cert = float32_error.certify_float64(nan_logits, labels, lip, None, eps)
  assert r[0] <= 0 and not cert[:, 0].any()


def test_large_batch_norm_multiplier_is_covered():
  # The reviewer's case: conv weights 1e-6 then batch norm x 1e6. The conv's
  # rounding is multiplied by the BN scale; the bound was 2.4x too small.
  h, c = 16, 3
  model = lipjax.models.build([("conv", 1, h, 1, 0), ("dense", None)],
                              num_classes=2, input_shape=(h, h, c),
                              rngs=nnx.Rngs(0), batch_norm=True)
  model.layers[0].kernel[...] = jnp.full((h, h, c, 1), 1e-6, jnp.float32)
  model.layers[0].bias[...] = jnp.zeros(1)
  bn = model.batch_norms[0]
  bn.mean[...] = jnp.zeros(1)
  bn.var[...] = jnp.ones(1) - bn.epsilon
  bn.scale[...] = jnp.full(1, 1e6, jnp.float32)
  bn.bias[...] = jnp.zeros(1)
  model.layers[1].kernel[...] = jnp.asarray([[1.0, -1.0]], jnp.float32)
  model.layers[1].bias[...] = jnp.zeros(2)
  x = np.zeros((1, h, h, c), np.float32)
  error = _error(model, x)
  at_r0, slope = error.pair(np.array([0]))
  rng = np.random.default_rng(1)
  for _ in range(100):
    point = (np.ones(x.shape) * rng.uniform(1, 1.001, size=x.shape)
             * 10**rng.uniform(-3, 0)).astype(np.float32)
    radius = np.linalg.norm(point.astype(np.float64))
    z = evaluation.float32_logits(model, point, 1)[0]
    exact = evaluation.float64_logits(model, point)[0]
    actual = abs((z[0] - z[1]) - (exact[0] - exact[1]))
    assert actual <= at_r0[0, 1] + radius * slope[0, 1]


@pytest.mark.parametrize("name", lipjax.activations.ACTIVATIONS)
def test_activation_rounding_holds_for_xla_float32(name):
  # The assumption the margin rests on, measured: float32 activations vs
  # float64 over tiny to large inputs (leaky ReLU's slope 0.01 is not a
  # float32, so it rounds twice).
  rng = np.random.default_rng(0)
  x = np.concatenate([rng.normal(size=20000) * s for s in (
      1e-6, 1e-3, 0.1, 1.0, 3.0, 10.0, 30.0, 100.0)]).astype(np.float32)
  fn = lipjax.activations.get_activation(name).fn
  y32 = np.asarray(jax.jit(fn)(jnp.asarray(x)), np.float64)
  with jax.enable_x64(True):
    y64 = np.asarray(fn(jnp.asarray(x, jnp.float64)))
  allowed = (float32_error.activation_rounding(name) * np.abs(y64)
             + float32_error.UNDERFLOW)
  assert np.all(np.abs(y32 - y64) <= allowed)


def _tailed_error():
  # Two examples, three classes; two tails (one per place an error is made).
  tails = np.zeros((2, 3, 3))
  tails[0] = [[0, 1, 2], [1, 0, 3], [2, 3, 0]]
  tails[1] = [[0, 10, 10], [10, 0, 10], [10, 10, 0]]
  return float32_error.EvaluationError(
      elementwise=np.array([[1e-3, 2e-3, 3e-3], [0, 0, 0]]),
      l2=np.array([1e-2, 0.0]), l2_slope=0.5, tails=tails,
      tail_terms=np.array([[1.0, 0.1], [2.0, 0.0]]),
      tail_slopes=np.array([0.25, 0.01]))


def test_pair_with_tails_is_hand_computed():
  at_r0, slope = _tailed_error().pair(np.array([0, 2]))
  root2 = np.sqrt(2.0)
  # Example 0, label 0: e_0 + e_i + sqrt(2) 0.01 + T0[0, i] 1 + T1[0, i] 0.1.
  np.testing.assert_allclose(at_r0[0], [
      2e-3 + root2 * 1e-2 + 0.0,
      3e-3 + root2 * 1e-2 + 1.0 + 1.0,
      4e-3 + root2 * 1e-2 + 2.0 + 1.0], rtol=1e-12)
  # Example 1, label 2: T0[2, i] 2.
  np.testing.assert_allclose(at_r0[1], [4.0, 6.0, 0.0], rtol=1e-12)
  # Slope: sqrt(2) 0.5 + T0[y, i] 0.25 + T1[y, i] 0.01.
  np.testing.assert_allclose(slope[0], [root2 * 0.5, root2 * 0.5 + 0.35,
                                        root2 * 0.5 + 0.6], rtol=1e-12)
  np.testing.assert_allclose(slope[1], [root2 * 0.5 + 0.6,
                                        root2 * 0.5 + 0.85, root2 * 0.5],
                             rtol=1e-12)


def test_concatenate_keeps_every_example_and_the_largest_slopes():
  first = _tailed_error()
  second = dataclasses.replace(first, l2_slope=0.1,
                               tail_slopes=np.array([0.5, 0.0]))
  both = float32_error.EvaluationError.concatenate([first, second])
  assert both.elementwise.shape == (4, 3) and both.tail_terms.shape == (4, 2)
  assert both.l2_slope == 0.5
  np.testing.assert_array_equal(both.tail_slopes, [0.5, 0.01])
  labels = np.array([0, 2, 1, 1])
  at_r0, _ = both.pair(labels)
  np.testing.assert_array_equal(at_r0[:2], first.pair(labels[:2])[0])
  plain = float32_error.EvaluationError.concatenate([
      dataclasses.replace(first, tails=None, tail_terms=None,
                          tail_slopes=None)] * 2)
  assert plain.tails is None and plain.l2.shape == (4,)
