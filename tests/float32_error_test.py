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
from lipjax import linear_maps
from lipjax.certification import float32_error
from lipjax.certification import sound_bound
from tests import evaluation


def _model(activation="relu", batch_norm=False, seed=0, std=(0.25, 0.3)):
  model = lipjax.models.build(
      [("conv", 4, 3, 2, 1), ("conv", 6, 3, 1, 1), ("dense", 20),
       ("dense", None)], num_classes=5, input_shape=(8, 8, 2),
      rngs=nnx.Rngs(seed), activation=activation, batch_norm=batch_norm,
      input_mean=(0.4, 0.5), input_std=std)
  if batch_norm:
    rng = np.random.default_rng(seed)
    for bn in model.batch_norms:
      c = bn.var[...].shape[0]
      bn.var[...] = jnp.asarray(rng.uniform(0.05, 3.0, c), jnp.float32)
      bn.mean[...] = jnp.asarray(rng.normal(size=c), jnp.float32)
      bn.scale[...] = jnp.asarray(rng.normal(size=c) * 3, jnp.float32)
      bn.bias[...] = jnp.asarray(rng.normal(size=c), jnp.float32)
  return model


def _error(model, x, tails=False):
  """The margin with sound_bound's numbers; ``tails``: with its tails."""
  bounds, _ = sound_bound.sound_bound(model, method="liplt", kind="pairwise",
                                      exact=True)
  return float32_error.logit_error_bounds(
      model, x, bounds["layer_norms"], bounds["lipschitz_to"],
      bounds["error_tails"] if tails else None)


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


@pytest.mark.parametrize("tails", [False, True])
def test_point_a_few_ulps_from_the_boundary_is_not_certified(tails):
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
      model, point, bounds["layer_norms"], bounds["lipschitz_to"],
      bounds["error_tails"] if tails else None)
  assert (error.tails is not None) == tails
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


@pytest.mark.parametrize("tails", [False, True])
def test_large_batch_norm_multiplier_is_covered(tails):
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
  error = _error(model, x, tails)
  assert (error.tails is not None) == tails
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


@pytest.mark.parametrize("activation,batch_norm", [
    ("relu", False), ("leaky_relu", True), ("tanh", True)])
def test_error_bound_with_tails_covers_float32_evaluation(activation,
                                                          batch_norm):
  # Every class as the reference, at the points and in their ball, several
  # batch sizes; the input's rounding, every layer's and every activation's
  # reach the logits through the tails.
  model = _model(activation, batch_norm, seed=2)
  rng = np.random.default_rng(4)
  x = rng.uniform(0, 1, (24, 8, 8, 2)).astype(np.float32)
  error = _error(model, x, tails=True)
  assert error.tails.shape == (len(model.layers), 5, 5)
  assert error.tail_terms.shape == (24, len(model.layers))
  assert evaluation.check_covered(model, error, x, 0.7, rng) > 0
  top = np.max(np.abs(evaluation.float64_logits(model, x)))
  at_r0, _ = error.pair(np.zeros(len(x), int))
  assert np.max(at_r0) < 1e-3 * top  # Not vacuous.


@pytest.mark.parametrize("activation,batch_norm", [
    ("relu", True), ("leaky_relu", False)])
def test_tails_bound_the_jacobians_from_where_errors_are_made(activation,
                                                              batch_norm):
  # From the normalized input and from every layer's activation output,
  # the pair Jacobians of the exact network are within the tails the margin
  # uses at random points (the tails are Lipschitz bounds), and the layers'
  # tails not far above them. Every layer after the first is 10x larger, so
  # a tail that skipped one would be far too small; the stds are above 1,
  # so one that forgot them too.
  model = _model(activation, batch_norm, seed=5, std=(2.0, 4.0))
  for layer in model.layers[1:]:
    layer.kernel[...] = layer.kernel[...] * 10.0
  rng = np.random.default_rng(6)
  x = rng.uniform(0, 1, (1, 8, 8, 2))
  tails = _error(model, x.astype(np.float32), tails=True).tails
  off = ~np.eye(model.num_classes, dtype=bool)
  with jax.enable_x64(True):
    for _ in range(2):
      point = jnp.asarray(rng.uniform(0, 1, x.shape))
      cases = [evaluation.normalized_input(model, point)] + [
          evaluation.hooked(model, node=k)
          for k in range(len(model.layers) - 1)]
      for k, (apply, tail) in enumerate(zip(cases, tails, strict=True)):
        got = evaluation.pair_gradient_norms(apply, point)
        assert np.all(got <= tail), np.max(got / np.where(off, tail, 1))
        assert np.max(got[off] / tail[off]) > (0.05 if k else 1e-3)


def test_the_input_tail_of_a_linear_classifier_is_its_jacobian():
  # One layer: from the normalized input the logits are W h + b, whose pair
  # Jacobians are the tails up to the rounding allowances (std 2: pixels
  # move the normalized input by half as much).
  model = lipjax.models.build([("dense", None)], num_classes=4,
                              input_shape=(3, 3, 2), rngs=nnx.Rngs(0),
                              input_mean=(0.5, 0.5), input_std=(2.0, 2.0))
  x = np.zeros((1, 3, 3, 2))
  error = _error(model, x.astype(np.float32), tails=True)
  assert error.tails.shape == (1, 4, 4)
  with jax.enable_x64(True):
    got = evaluation.pair_gradient_norms(
        evaluation.normalized_input(model, jnp.asarray(x)), jnp.asarray(x))
  np.testing.assert_allclose(error.tails[0], got, rtol=1e-5)
  assert np.all(error.tails[0] >= got)


def _stem_rounding_model():
  """A network whose only sizeable rounding is its first layer's: 16 terms
  of about +-500 that cancel to about 10 (inputs come in equal pairs,
  ``_paired_inputs``); the logits read four channels exactly."""
  model = lipjax.models.build([("conv", 4, 1, 1, 0), ("dense", None)],
                              num_classes=5, input_shape=(1, 1, 16),
                              rngs=nnx.Rngs(0))
  rng = np.random.default_rng(6)
  signs = np.where(np.arange(16) % 2, -1.0, 1.0)[:, None]
  model.layers[0].kernel[...] = jnp.asarray((1e3 * signs * (
      1 + 1e-3 * rng.normal(size=(16, 4))))[None, None], jnp.float32)
  model.layers[0].bias[...] = jnp.full(4, 10.0, jnp.float32)
  model.layers[1].kernel[...] = jnp.eye(4, 5, dtype=jnp.float32)
  model.layers[1].bias[...] = jnp.zeros(5, jnp.float32)
  return model


@pytest.mark.parametrize("tails", [False, True])
def test_a_rounding_made_inside_the_network_is_covered(tails):
  # Elsewhere the observed error is ~1e3 times below the bound; here the
  # first layer's rounding (~1e-5) is far above every other rounding, and
  # reaches the logits through its activation and the logits layer.
  model = _stem_rounding_model()
  rng = np.random.default_rng(7)
  x = np.repeat(rng.uniform(0.4, 0.6, (64, 1, 1, 8)), 2, axis=-1).astype(
      np.float32)
  error = _error(model, x, tails)
  assert evaluation.check_covered(model, error, x, 0.0, rng) > 1e-6


def _worst_rounding(layer, bn, h):
  """``(output, worst rounding)`` of a layer (and batch norm) on ``h`` in
  the standard model, float64: ``gamma_{n+1} (|W| |h| + |b|)`` (times
  batch norm's multiplier), and batch norm's own ``u |D (z - mean)|``."""
  w, b = (np.asarray(a[...], np.float64) for a in (layer.kernel, layer.bias))
  if w.ndim == 2:
    apply = lambda v, k: v.reshape(len(v), -1) @ k
  else:
    apply = lambda v, k: np.asarray(jax.lax.conv_general_dilated(
        v, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
  g = float32_error.gamma(int(np.prod(w.shape[:-1])) + 1)
  z = apply(h, w) + b
  rounding = g * (apply(np.abs(h), np.abs(w)) + np.abs(b))
  if bn is None:
    return z, rounding
  mul = np.asarray(bn.scale[...], np.float64) / np.sqrt(
      np.asarray(bn.var[...], np.float64) + bn.epsilon)
  centred = mul * (z - np.asarray(bn.mean[...], np.float64))
  return (centred + np.asarray(bn.bias[...], np.float64),
          np.abs(mul) * rounding + float32_error.U32 * np.abs(centred))


def test_each_operations_worst_rounding_reaches_its_tail():
  # In the standard model the normalization may err by 2u |h|, a layer by
  # gamma_{n+1} (|W| |h| + |b|) (times batch norm's multiplier, which also
  # rounds) and tanh by 8 ulps of its output; each (in L2) is within the
  # term its tail multiplies. Over the ball a dense layer's input moves by
  # up to R M (M the LipLT bound up to it), so its rounding by up to
  # gamma_{n+1} ||W|| R M more: within the slopes.
  model = lipjax.models.build(
      [("conv", 3, 3, 1, 1), ("dense", 8), ("dense", None)], num_classes=3,
      input_shape=(2, 2, 2), rngs=nnx.Rngs(1), activation="tanh",
      input_mean=(0.5, 0.25), input_std=(0.5, 2.0), batch_norm=True)
  bn = model.batch_norms[0]
  bn.scale[...] = jnp.asarray([300.0, -2.0, 0.5], jnp.float32)
  bn.mean[...] = jnp.asarray([0.5, -0.25, 1.0], jnp.float32)
  x = np.random.default_rng(8).uniform(0, 1, (6, 2, 2, 2)).astype(
      np.float32)
  bounds, _ = sound_bound.sound_bound(model, method="liplt", kind="pairwise",
                                      exact=True)
  error = float32_error.logit_error_bounds(
      model, x, bounds["layer_norms"], bounds["lipschitz_to"],
      bounds["error_tails"])
  h = (x.astype(np.float64) - np.array([0.5, 0.25])) / np.array([0.5, 2.0])
  norm = lambda v: np.linalg.norm(v.reshape(len(v), -1), axis=1)
  assert np.all(error.tail_terms[:, 0] >= 2 * float32_error.U32 * norm(h))
  ulps = float32_error.activation_rounding("tanh")
  moves = [2.0] + list(bounds["lipschitz_to"])  # max 1/std, then M_k.
  slopes = list(error.tail_slopes[1:]) + [error.l2_slope]
  for k, layer in enumerate(model.layers):
    if k:  # The dense layers (a matrix).
      w = np.asarray(layer.kernel[...], np.float64)
      g = float32_error.gamma(len(w) + 1)
      assert slopes[k] >= g * np.linalg.norm(w, 2) * moves[k]
    if k < len(model.layers) - 1:
      z, rounding = _worst_rounding(layer, bn if k == 0 else None, h)
      h = np.tanh(z)
      assert np.all(error.tail_terms[:, k + 1]
                    >= norm(rounding + ulps * np.abs(h)))


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


def _batch_norm_model(spec, input_shape, scales):
  """A ReLU network with batch norm (mean 0, var 1, bias 0, the given
  scales), ``[B]`` multipliers as the margin computes them (float32)."""
  model = lipjax.models.build(spec, num_classes=3, input_shape=input_shape,
                              rngs=nnx.Rngs(0), batch_norm=True)
  muls = []
  for bn, scale in zip(model.batch_norms, scales):
    c = bn.mean[...].shape[0]
    bn.mean[...], bn.bias[...] = jnp.zeros(c), jnp.zeros(c)
    bn.var[...], bn.scale[...] = jnp.ones(c), jnp.full(c, scale, jnp.float32)
    muls.append(float(jax.lax.rsqrt(jnp.float32(1.0 + bn.epsilon))
                      * jnp.float32(scale)))
  return model, muls


def test_batch_norm_rounds_the_error_its_input_carries():
  # Layer 0 cancels 16 terms of +-1000 to exactly 0, so its output's
  # rounding error e (up to gamma_17 sum |w x|) is all its next layer
  # sees: layer 1 (w = [1, -2, 3], batch norm x5, all else 0) is exact at
  # 0, but on the computed input e it rounds its product, batch norm's
  # subtraction, product and sum: (1 + gamma_2)(1 + u)^3 - 1 of D w e. The
  # error made there (its node's tail term) must hold that; its own
  # rounding alone (gamma_2 D |w| e) does not: batch norm's rounding of
  # the carried error W e is needed too.
  model, (mul0, mul1) = _batch_norm_model(
      [("conv", 1, 1, 1, 0), ("conv", 3, 1, 1, 0), ("dense", None)],
      (1, 1, 16), (1.0, 5.0))
  signs = np.where(np.arange(16) % 2, -1.0, 1.0)
  model.layers[0].kernel[...] = jnp.asarray(
      1e3 * signs[None, None, :, None], jnp.float32)
  w = np.array([1.0, -2.0, 3.0])
  model.layers[1].kernel[...] = jnp.asarray(w[None, None, None], jnp.float32)
  for layer in model.layers[:2]:
    layer.bias[...] = jnp.zeros_like(layer.bias[...])
  x = np.repeat(np.random.default_rng(0).uniform(0.2, 1.0, (4, 1, 1, 8)),
                2, axis=-1).astype(np.float32)
  error = _error(model, x, tails=True)
  e = (float32_error.gamma(17) * 1e3 * mul0
       * np.abs(x.astype(np.float64)).reshape(len(x), -1).sum(axis=1))
  worst = ((1.0 + float32_error.gamma(2)) * (1.0 + float32_error.U32)**3
           - 1.0) * mul1 * np.linalg.norm(w) * e
  assert np.all(error.tail_terms[:, 2] >= worst)


def test_batch_norm_multiplier_error_compounds_with_its_roundings():
  # Batch norm rounds 3 times and its multiplier may differ from the
  # device's by 4u: |D (z - mean)| may err by (1 + u)^3 (1 + 4u) - 1 of
  # itself, 15 u^2 above first order (gamma_3 + 4u has 9 u^2). With a
  # negligible conv and means of +-1000 that is nearly all layer 0 rounds
  # (relative gap ~5e-8, far above the bound's 1e-9 slack for its own
  # arithmetic).
  model, (mul,) = _batch_norm_model([("conv", 2, 1, 1, 0), ("dense", None)],
                                    (1, 1, 2), (3.0,))
  model.batch_norms[0].mean[...] = jnp.asarray([1e3, -1e3], jnp.float32)
  model.layers[0].kernel[...] = jnp.full((1, 1, 2, 2), 1e-12, jnp.float32)
  model.layers[0].bias[...] = jnp.zeros(2)
  error = _error(model, np.full((1, 1, 1, 2), 0.5, np.float32), tails=True)
  u = float32_error.U32
  worst = ((1.0 + u)**3 * (1.0 + 4.0 * u) - 1.0) * mul * np.sqrt(2.0) * 1e3
  assert error.tail_terms[0, 1] >= worst


def _exact_layer_matrices(model) -> list[np.ndarray]:
  """``[out, in]`` matrices of the float64 network's layers (batch norm's
  multiplier computed in float64), the first from the normalized input
  (without ``1/std``)."""
  with jax.enable_x64(True):
    chain = linear_maps.to_chain(evaluation.float64_model(model))
  first = dataclasses.replace(chain.ops[0], in_scale=None)
  chain = linear_maps.from_ops((first,) + chain.ops[1:], slopes=chain.slopes)
  return [linear_maps.dense_matrix(chain, k, k)
          for k in range(chain.num_layers)]


def _flip_ascent(up, lam, down, slopes):
  """Flips entries of ``lam`` between the slopes while that lengthens
  ``up @ (lam * down)`` (a convex function of each entry, so its maximum
  over ``[alpha, beta]`` is at an end); returns whether any flipped."""
  v = up @ (lam * down)
  flipped = False
  for j in range(len(lam)):
    step = (sum(slopes) - 2.0 * lam[j]) * down[j] * up[:, j]
    if 2.0 * v @ step + step @ step > 1e-12 * (v @ v):
      lam[j], v, flipped = sum(slopes) - lam[j], v + step, True
  return flipped


def _searched_pair_jacobian(mats, s, row, slopes, rng, starts=3):
  """The largest ``||row^T W_{N-1} D_{N-2} W_{N-2} ... D_s W_s||`` found
  over diagonal ``D_k`` with entries in ``[alpha, beta]``: local search
  over their vertices (every slope an activation may take at some point;
  ``mats``: ``[W_0, ..., W_{N-1}]``), from all-``beta`` and random
  starts."""
  if s == len(mats) - 1:
    return float(np.linalg.norm(mats[-1].T @ row))
  widths = [len(m) for m in mats[s:-1]]
  best = 0.0
  for start in range(starts):
    lams = [np.full(w, slopes[1]) if start == 0 else
            rng.choice(np.asarray(slopes), w) for w in widths]
    flipped = True
    while flipped:
      flipped = False
      for b in range(len(lams)):
        up = mats[s].T  # W_s^T D_s ... W_{s+b}^T
        for k in range(b):
          up = (up * lams[k]) @ mats[s + k + 1].T
        down = mats[-1].T @ row  # W_{s+b+1}^T D_{s+b+1} ... W_{N-1}^T row
        for k in range(len(lams) - 1, b, -1):
          down = mats[s + k].T @ (lams[k] * down)
        flipped |= _flip_ascent(up, lams[b], down, slopes)
      best = max(best, float(np.linalg.norm(up @ (lams[b] * down))))
  return best


def _tail_model(spec, input_shape, activation, std, scales, bn_seed=None):
  """3 classes, layer ``k``'s weights times ``scales[k]``; ``bn_seed``:
  batch norm with variances 1e-3..1e3 and multipliers up to 1e3."""
  model = lipjax.models.build(
      spec, num_classes=3, input_shape=input_shape, rngs=nnx.Rngs(0),
      activation=activation, batch_norm=bn_seed is not None,
      input_mean=(0.3, 0.6), input_std=std)
  for layer, scale in zip(model.layers, scales, strict=True):
    layer.kernel[...] = layer.kernel[...] * scale
  rng = np.random.default_rng(bn_seed)
  for bn in model.batch_norms:
    c = bn.var[...].shape[0]
    bn.var[...] = jnp.asarray(10**rng.uniform(-3, 3, c), jnp.float32)
    bn.scale[...] = jnp.asarray(rng.normal(size=c) * 10**rng.uniform(-3, 3),
                                jnp.float32)
    bn.mean[...] = jnp.asarray(rng.normal(size=c), jnp.float32)
  return model


_DENSE = [("dense", 7), ("dense", 6), ("dense", 5), ("dense", None)]
_CONV = [("conv", 3, 3, 1, 1), ("conv", 2, 3, 2, 1), ("dense", None)]


@pytest.mark.parametrize("spec,activation,std,scales,bn_seed", [
    (_DENSE, "relu", (1.9, 1.9), (1e-6, 1e5, 30.0, 1e-2), None),
    (_DENSE, "abs", (0.03, 30.0), (1e3, 1e-4, 1.0, 1e6), None),
    (_CONV, "leaky_relu", (1.0, 0.4), (3e-5, 1e4, 1e-3), 1),
    (_CONV, "leaky_relu", (0.06, 5.0), (1e6, 1e-6, 1.0), 2)])
def test_tails_bound_the_pair_jacobians_for_every_slope(spec, activation,
                                                        std, scales,
                                                        bn_seed):
  # Stronger than sampling points: for every class pair, from the
  # normalized input and from every activation's output, the exact
  # network's pair Jacobian maximized over the slopes each activation may
  # take (local search over their vertices) is within the tail the margin
  # uses, up to float64 rounding; weights scaled 1e-6..1e6, stds far from
  # 1 and unequal, batch norm far from identity. The logits layer's tail
  # is its pair rows' norm ||w_y - w_i|| times the class-row factor (which
  # covers rows computed in float64: near 1, but ~1e-4 above it when
  # batch norm's multipliers span 1e-6..1e4); the others are not far above
  # what the search reaches (from the input: up to max(std) / min(std)).
  shape = (2, 2, 2) if spec is _DENSE else (4, 4, 2)
  model = _tail_model(spec, shape, activation, std, scales, bn_seed)
  tails = _error(model, np.zeros((1,) + shape, np.float32), tails=True).tails
  mats = _exact_layer_matrices(model)
  slopes = lipjax.activations.get_activation(activation).slopes
  rng = np.random.default_rng(0)
  reach = np.zeros(len(mats))
  for s in range(len(mats)):
    for y, i in zip(*np.triu_indices(3, k=1)):
      row = np.eye(3)[y] - np.eye(3)[i]
      got = _searched_pair_jacobian(mats, s, row, slopes, rng)
      assert got <= tails[s, y, i] * (1 + 1e-10), (s, got / tails[s, y, i])
      assert tails[s, i, y] == tails[s, y, i]
      reach[s] = max(reach[s], got / tails[s, y, i])
  kernel = np.asarray(model.layers[-1].kernel[...], np.float64)
  rows = np.linalg.norm(kernel.T[:, None] - kernel.T[None], axis=-1)
  off = ~np.eye(3, dtype=bool)
  factor = tails[-1][off] / rows[off]
  np.testing.assert_allclose(factor, factor[0], rtol=1e-12)
  assert 1.0 <= factor[0] <= 1.0 + (1e-9 if bn_seed is None else 1e-3)
  assert reach[0] >= 0.5 * min(std) / max(std) and np.all(reach[1:] >= 0.5)
