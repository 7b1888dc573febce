"""Tests for `lipjax.linear_maps`: bias-free weight layers and their adjoints.

Every bound in lipjax is computed from the `LinearOp`s of a `LinearChain`
and their transposes, so these tests check that:

* the adjoint is exact, ``<W v, u> == <v, W^T u>`` in float64, for every conv
  configuration used by the named architectures, for sizes where
  ``H + 2p - k`` is not divisible by the stride (the ``output_padding`` trap
  of docs/bounds.md#the-network-as-a-chain-of-linear-maps), for non-square
  images, with per-channel input/output scales,
  and for a dense layer that flattens an image;
* ``out_shape`` is the shape ``__call__`` really produces;
* ``dense_matrix`` is the Jacobian of the op (and its transpose that of the
  adjoint);
* ``from_matrices`` uses the math convention ``[out, in]`` and rejects
  malformed input with a helpful message;
* ``from_model`` reproduces the network it came from when biases and the
  input mean are zero (input ``1/std`` and eval-mode batch-norm scales
  folded in), so the bounds describe the real model;
* ``to_chain`` dispatches on what the user holds;
* a ``LinearChain`` is a pytree that survives ``jax.jit`` and carries
  gradients to its weights.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lipjax import activations
from lipjax import linear_maps
from lipjax import models

# (kernel, stride, padding) of every conv in the named architectures.
_ARCH_CONV_CONFIGS = ((3, 1, 1), (4, 2, 1), (3, 1, 0), (4, 2, 0))

# (height, width, kernel, stride, padding, expected out (H', W')).
_CONV_CASES = (
    # The architectures' configs on a square image.
    (8, 8, 3, 1, 1, (8, 8)),
    (8, 8, 4, 2, 1, (4, 4)),
    (8, 8, 3, 1, 0, (6, 6)),
    (8, 8, 4, 2, 0, (3, 3)),
    # Non-square images.
    (6, 9, 3, 1, 1, (6, 9)),
    (6, 9, 4, 2, 1, (3, 4)),
    (10, 7, 3, 1, 0, (8, 5)),
    (10, 7, 4, 2, 0, (4, 2)),
    # (H + 2p - k) not divisible by the stride.
    (7, 7, 4, 2, 1, (3, 3)),
    (10, 10, 3, 2, 0, (4, 4)),
    (9, 9, 3, 2, 0, (4, 4)),  # Divisible: 9 - 3 = 6.
    (9, 6, 4, 2, 0, (3, 2)),
    (7, 10, 3, 2, 1, (4, 5)),
)


def _conv_op(seed, height, width, kernel, stride, pad, *, c_in=3, c_out=2,
             scales=False, dtype=jnp.float32):
  # NumPy randomness: jax.random would compile per shape, which is slow.
  rng = np.random.default_rng(seed)
  weight = jnp.asarray(rng.standard_normal((kernel, kernel, c_in, c_out)),
                       dtype)
  in_scale = out_scale = None
  if scales:
    in_scale = jnp.asarray(rng.uniform(0.2, 3.0, (c_in,)), dtype)
    out_scale = jnp.asarray(rng.uniform(-2.0, 2.0, (c_out,)), dtype)
  return linear_maps.LinearOp(
      weight=weight, in_scale=in_scale, out_scale=out_scale, kind="conv",
      in_shape=(height, width, c_in), strides=(stride, stride),
      padding=((pad, pad), (pad, pad)))


def _dense_op(seed, in_shape, out_features, *, scales=False,
              dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  weight = jnp.asarray(
      rng.standard_normal((math.prod(in_shape), out_features)), dtype)
  in_scale = None
  if scales:
    in_scale = jnp.asarray(rng.uniform(0.2, 3.0, (in_shape[-1],)), dtype)
  return linear_maps.LinearOp(weight=weight, in_scale=in_scale,
                              out_scale=None, kind="dense",
                              in_shape=tuple(in_shape))


@jax.jit
def _adjoint_terms(op, v, u):
  wv = op(v)
  wtu = op.transpose(u)
  return jnp.sum(wv * u), jnp.sum(v * wtu), jnp.sum(jnp.abs(wv * u))


def _adjoint_gap(op, seed, batch=2):
  """Returns (|<W v, u> - <v, W^T u>|, scale) computed in float64."""
  rng = np.random.default_rng(seed)
  v = jnp.asarray(rng.standard_normal((batch,) + tuple(op.in_shape)),
                  jnp.float64)
  u = jnp.asarray(rng.standard_normal((batch,) + tuple(op.out_shape)),
                  jnp.float64)
  wv_shape = jax.eval_shape(op, v)
  wtu_shape = jax.eval_shape(op.transpose, u)
  assert wv_shape.shape == u.shape and wv_shape.dtype == jnp.float64
  assert wtu_shape.shape == v.shape and wtu_shape.dtype == jnp.float64
  lhs, rhs, scale = _adjoint_terms(op, v, u)
  return float(jnp.abs(lhs - rhs)), float(scale)


def test_conv_cases_cover_every_architecture_config():
  used = {layer[2:] for spec in models.ARCHITECTURES.values()
          for layer in spec if layer[0] == "conv"}
  assert used == set(_ARCH_CONV_CONFIGS)
  covered = {case[2:5] for case in _CONV_CASES}
  assert used <= covered
  # Several cases hit the non-divisible (output_padding) situation, in one
  # or both spatial dimensions.
  def remainders(case):
    height, width, kernel, stride, pad, _ = case
    return ((height + 2 * pad - kernel) % stride,
            (width + 2 * pad - kernel) % stride)
  assert sum(all(remainders(c)) for c in _CONV_CASES) >= 2
  assert sum(any(remainders(c)) for c in _CONV_CASES) >= 5


@pytest.mark.parametrize("case", _CONV_CASES)
def test_conv_adjoint_identity_float64(case):
  height, width, kernel, stride, pad, _ = case
  with jax.enable_x64(True):
    op = _conv_op(1, height, width, kernel, stride, pad,
                  scales=True).astype(jnp.float64)
    assert op.weight.dtype == jnp.float64
    assert op.in_scale.dtype == jnp.float64
    assert op.out_scale.dtype == jnp.float64
    gap, scale = _adjoint_gap(op, seed=2)
  assert scale > 1.0
  assert gap <= 1e-10 * scale


@pytest.mark.parametrize("case", _CONV_CASES)
def test_float64_conv_by_patches_is_lax_conv(case):
  # float64 convs run as slices + a matmul (faster on XLA:CPU); the map
  # must be exactly lax.conv_general_dilated's, for every configuration.
  height, width, kernel, stride, pad, _ = case
  with jax.enable_x64(True):
    op = _conv_op(3, height, width, kernel, stride, pad, c_in=3,
                  c_out=4).astype(jnp.float64)
    x = jnp.asarray(np.random.default_rng(4).standard_normal(
        (2, height, width, 3)), jnp.float64)
    expected = jax.lax.conv_general_dilated(
        x, op.weight, window_strides=op.strides, padding=op.padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    got = op(x)
  assert got.dtype == jnp.float64 and got.shape == expected.shape
  np.testing.assert_allclose(np.asarray(got), np.asarray(expected),
                             rtol=0, atol=1e-12 * float(np.max(np.abs(
                                 np.asarray(expected)))))


@pytest.mark.parametrize("case", _CONV_CASES)
def test_conv_out_shape_matches_call(case):
  height, width, kernel, stride, pad, (out_h, out_w) = case
  op = _conv_op(0, height, width, kernel, stride, pad, c_in=3, c_out=5)
  assert op.out_shape == (out_h, out_w, 5)
  y = jax.eval_shape(op, jnp.ones((3, height, width, 3)))
  assert y.shape == (3,) + op.out_shape
  assert op.in_dim == height * width * 3
  assert op.out_dim == out_h * out_w * 5
  # The transpose maps back onto the input shape.
  assert jax.eval_shape(op.transpose, y).shape == (3, height, width, 3)


@pytest.mark.parametrize("in_shape", [(7,), (3, 4, 2), (5, 3, 1)])
@pytest.mark.parametrize("scales", [False, True])
def test_dense_adjoint_identity_and_shapes(in_shape, scales):
  with jax.enable_x64(True):
    op = _dense_op(3, in_shape, 6, scales=scales).astype(jnp.float64)
    assert op.out_shape == (6,)
    assert op.in_dim == math.prod(in_shape)
    gap, scale = _adjoint_gap(op, seed=4, batch=3)
  assert scale > 1.0
  assert gap <= 1e-10 * scale


def test_dense_flatten_is_row_major_hwc():
  op = _dense_op(5, (2, 3, 4), 5)
  x = jnp.asarray(np.random.default_rng(6).standard_normal((2, 2, 3, 4)),
                  jnp.float32)
  expected = np.asarray(x).reshape(2, 24) @ np.asarray(op.weight)
  np.testing.assert_allclose(np.asarray(op(x)), expected, rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_allclose(linear_maps.dense_matrix(op),
                             np.asarray(op.weight, np.float64).T, rtol=1e-7)


def _jacobian(fn, in_shape):
  """The Jacobian of a batched linear map as an [out_dim, in_dim] matrix."""
  x0 = jnp.zeros(tuple(in_shape), jnp.float64)
  jac = jax.jit(jax.jacfwd(lambda x: fn(x[None])[0]))(x0)
  n_in = math.prod(in_shape)
  return np.asarray(jac).reshape(-1, n_in)


@pytest.mark.parametrize("op_factory", [
    lambda: _conv_op(7, 7, 6, 4, 2, 1, scales=True),
    lambda: _conv_op(8, 6, 6, 3, 1, 0, c_in=2, c_out=3),
    lambda: _conv_op(9, 9, 9, 3, 2, 0, c_in=1, c_out=2, scales=True),
    lambda: _dense_op(10, (2, 3, 2), 4, scales=True),
    lambda: _dense_op(11, (5,), 3),
], ids=["conv_scaled", "conv_valid", "conv_stride2_nondiv", "dense_flatten",
        "dense"])
def test_dense_matrix_is_jacobian(op_factory):
  op = op_factory()
  matrix = linear_maps.dense_matrix(op)
  assert matrix.dtype == np.float64
  assert matrix.shape == (op.out_dim, op.in_dim)
  assert np.abs(matrix).max() > 0.1
  with jax.enable_x64(True):
    op64 = op.astype(jnp.float64)
    forward = _jacobian(op64, op.in_shape)
    backward = _jacobian(op64.transpose, op.out_shape)
  np.testing.assert_allclose(matrix, forward, rtol=0, atol=1e-12)
  np.testing.assert_allclose(matrix.T, backward, rtol=0, atol=1e-12)


def test_scales_are_diagonal_factors_on_channels():
  op = _conv_op(12, 5, 4, 3, 1, 1, c_in=3, c_out=2, scales=True)
  plain = linear_maps.LinearOp(
      weight=op.weight, in_scale=None, out_scale=None, kind="conv",
      in_shape=op.in_shape, strides=op.strides, padding=op.padding)
  in_diag = np.tile(np.asarray(op.in_scale, np.float64), 5 * 4)
  out_diag = np.tile(np.asarray(op.out_scale, np.float64), 5 * 4)
  expected = (out_diag[:, None] * linear_maps.dense_matrix(plain)
              * in_diag[None, :])
  np.testing.assert_allclose(linear_maps.dense_matrix(op), expected,
                             rtol=1e-6, atol=1e-6)


def test_dense_matrix_of_chain_slice():
  rng = np.random.default_rng(0)
  mats = [rng.standard_normal(s) for s in [(5, 4), (6, 5), (3, 6)]]
  chain = linear_maps.from_matrices(mats)
  np.testing.assert_allclose(linear_maps.dense_matrix(chain, 1, 2),
                             mats[2] @ mats[1], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(linear_maps.dense_matrix(chain),
                             mats[2] @ mats[1] @ mats[0], rtol=1e-5,
                             atol=1e-5)


# ---------------------------------------------------------------------------
# from_matrices / from_ops


def test_from_matrices_math_convention():
  rng = np.random.default_rng(1)
  mats = [rng.standard_normal(s) for s in [(5, 4), (6, 5), (2, 6)]]
  x = rng.standard_normal((3, 4))
  y = rng.standard_normal((3, 2))
  with jax.enable_x64(True):
    chain = linear_maps.from_matrices(mats)
    assert chain.num_layers == 3
    assert chain.num_classes == 2
    assert chain.slopes == (0.0, 1.0)
    assert [op.in_shape for op in chain.ops] == [(4,), (5,), (6,)]
    full = np.asarray(chain.apply_product(0, 2, jnp.asarray(x)))
    tail = np.asarray(chain.apply_product(1, 2, jnp.asarray(x @ mats[0].T)))
    back = np.asarray(chain.transpose_product(0, 2, jnp.asarray(y)))
  product = mats[2] @ mats[1] @ mats[0]
  np.testing.assert_allclose(full, (product @ x.T).T, rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(tail, (product @ x.T).T, rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(back, (product.T @ y.T).T, rtol=1e-12,
                             atol=1e-12)


def test_from_matrices_single_and_integer_matrix():
  chain = linear_maps.from_matrices([np.array([[1, 2], [3, 4], [5, 6]])],
                                    slopes=(-1, 1))
  assert jnp.issubdtype(chain.ops[0].weight.dtype, jnp.floating)
  assert chain.slopes == (-1.0, 1.0)
  out = chain.apply_product(0, 0, jnp.array([[1.0, -1.0]]))
  np.testing.assert_allclose(np.asarray(out), [[-1.0, -1.0, -1.0]])


def test_from_matrices_shape_mismatch_is_explained():
  with pytest.raises(ValueError,
                     match=r"Layer 0 outputs shape \(5,\) but layer 1 expects "
                     r"\(6,\)"):
    linear_maps.from_matrices([np.ones((5, 4)), np.ones((3, 6))])
  with pytest.raises(ValueError, match=r"Layer 1 outputs shape \(3,\)"):
    linear_maps.from_matrices(
        [np.ones((5, 4)), np.ones((3, 5)), np.ones((2, 4))])


@pytest.mark.parametrize("bad", [np.ones(3), np.ones((2, 3, 4)), 5.0])
def test_from_matrices_rejects_non_2d(bad):
  with pytest.raises(ValueError, match=r"Weight matrix 1 has shape .*2-D"):
    linear_maps.from_matrices([np.ones((3, 2)), bad])


def test_from_matrices_and_from_ops_reject_empty():
  with pytest.raises(ValueError, match="at least one"):
    linear_maps.from_matrices([])
  with pytest.raises(ValueError, match="at least one"):
    linear_maps.from_ops([])


def test_from_matrices_rejects_bad_slopes():
  with pytest.raises(ValueError, match="alpha <= beta"):
    linear_maps.from_matrices([np.ones((2, 2))], slopes=(1.0, 0.0))


def test_from_ops_checks_conv_to_conv_shapes():
  first = _conv_op(0, 8, 8, 4, 2, 1, c_in=3, c_out=2)  # -> (4, 4, 2)
  good = _conv_op(1, 4, 4, 3, 1, 1, c_in=2, c_out=2)
  bad = _conv_op(1, 5, 5, 3, 1, 1, c_in=2, c_out=2)
  assert linear_maps.from_ops([first, good]).num_layers == 2
  with pytest.raises(ValueError, match="do not form a chain"):
    linear_maps.from_ops([first, bad])
  # A non-flattening dense layer after a conv is not a chain either.
  with pytest.raises(ValueError, match="do not form a chain"):
    linear_maps.from_ops([first, _dense_op(2, (32,), 3)])


def test_accepted_chain_has_exact_adjoint():
  """What from_ops accepts has a working, exact transpose_product."""
  first = _conv_op(0, 8, 8, 4, 2, 1, c_in=3, c_out=2)  # -> (4, 4, 2)
  chain = linear_maps.from_ops([first, _dense_op(2, (4, 4, 2), 3)])
  with jax.enable_x64(True):
    chain = chain.astype(jnp.float64)
    rng = np.random.default_rng(3)
    v = jnp.asarray(rng.standard_normal((2, 8, 8, 3)), jnp.float64)
    u = jnp.asarray(rng.standard_normal((2, 3)), jnp.float64)
    pv = chain.apply_product(0, 1, v)
    ptu = chain.transpose_product(0, 1, u)
    assert ptu.shape == v.shape
    lhs = float(jnp.sum(pv * u))
    rhs = float(jnp.sum(v * ptu))
    scale = float(jnp.sum(jnp.abs(pv * u)))
  assert abs(lhs - rhs) <= 1e-10 * scale


@pytest.mark.parametrize("dense_in_shape", [(2, 4, 4), (16, 2), (32,)])
def test_flattening_dense_must_declare_the_exact_input_shape(dense_in_shape):
  # Same size but another shape: the forward pass would flatten happily, but
  # the adjoint would return the wrong shape, so from_ops refuses it.
  first = _conv_op(0, 8, 8, 4, 2, 1, c_in=3, c_out=2)  # -> (4, 4, 2)
  with pytest.raises(ValueError, match="do not form a chain"):
    linear_maps.from_ops([first, _dense_op(2, dense_in_shape, 3)])


# ---------------------------------------------------------------------------
# from_model

_CONV_SPEC = [("conv", 4, 3, 1, 1), ("conv", 4, 4, 2, 1), ("dense", 16),
              ("dense", None)]
_MLP_SPEC = [("dense", 16), ("dense", None)]
_STD = (0.5, 0.25, 2.0)


def _zero_biases(model):
  for layer in model.layers:
    layer.bias[...] = jnp.zeros_like(layer.bias[...])


def _run_chain(chain, activation, x):
  act = activations.get_activation(activation).fn
  for k, op in enumerate(chain.ops):
    x = op(x)
    if k < chain.num_layers - 1:
      x = act(x)
  return x


def _images(seed, shape=(8, 8, 3), batch=4):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.uniform(0.0, 1.0, (batch,) + shape), jnp.float32)


@pytest.mark.parametrize("spec,input_std,activation", [
    (_CONV_SPEC, _STD, "relu"),
    (_CONV_SPEC, None, "relu"),
    (_CONV_SPEC, _STD, "abs"),
    (_MLP_SPEC, _STD, "relu"),
    (_MLP_SPEC, None, "tanh"),
], ids=["conv-std-relu", "conv-relu", "conv-std-abs", "mlp-std-relu",
        "mlp-tanh"])
def test_from_model_reproduces_bias_free_model(spec, input_std, activation):
  model = models.build(spec, num_classes=5, input_shape=(8, 8, 3),
                       rngs=nnx.Rngs(0), activation=activation,
                       input_std=input_std)
  _zero_biases(model)
  chain = linear_maps.from_model(model)
  assert chain.num_layers == len(spec)
  assert chain.num_classes == 5
  assert chain.slopes == activations.get_activation(activation).slopes
  assert [op.kind for op in chain.ops] == [layer[0] for layer in spec]
  x = _images(1)
  expected = model(x)
  assert float(jnp.abs(expected).max()) > 1e-2
  np.testing.assert_allclose(np.asarray(_run_chain(chain, activation, x)),
                             np.asarray(expected), rtol=1e-5, atol=1e-5)


def test_from_model_drops_input_mean_keeps_std():
  mean = (0.3, 0.6, -0.2)
  model = models.build(_CONV_SPEC, num_classes=4, input_shape=(8, 8, 3),
                       rngs=nnx.Rngs(1), input_mean=mean, input_std=_STD)
  _zero_biases(model)
  chain = linear_maps.from_model(model)
  np.testing.assert_allclose(np.asarray(chain.ops[0].in_scale),
                             1.0 / np.asarray(_STD), rtol=1e-6)
  assert all(op.in_scale is None for op in chain.ops[1:])
  x = _images(2)
  shifted = x - jnp.asarray(mean)
  np.testing.assert_allclose(np.asarray(_run_chain(chain, "relu", shifted)),
                             np.asarray(model(x)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("input_std", [None, _STD])
def test_from_model_folds_eval_batch_norm(input_std):
  model = models.build(_CONV_SPEC, num_classes=5, input_shape=(8, 8, 3),
                       rngs=nnx.Rngs(2), input_std=input_std, batch_norm=True)
  _zero_biases(model)
  assert len(model.batch_norms) == 2
  rng = np.random.default_rng(3)
  for bn in model.batch_norms:
    n = bn.mean[...].shape[0]
    bn.mean[...] = jnp.zeros((n,))
    bn.bias[...] = jnp.zeros((n,))
    bn.var[...] = jnp.asarray(rng.uniform(0.05, 4.0, (n,)), jnp.float32)
    bn.scale[...] = jnp.asarray(rng.uniform(-2.0, 2.0, (n,)), jnp.float32)
  model.eval()
  chain = linear_maps.from_model(model)
  assert chain.ops[0].out_scale is not None
  assert chain.ops[1].out_scale is not None
  assert chain.ops[2].out_scale is None
  bn0 = model.batch_norms[0]
  np.testing.assert_allclose(
      np.asarray(chain.ops[0].out_scale),
      np.asarray(bn0.scale[...] / jnp.sqrt(bn0.var[...] + bn0.epsilon)),
      rtol=1e-5)
  x = _images(4)
  expected = model(x)
  # Without the batch-norm scales the chain would not match.
  plain = linear_maps.LinearChain(
      ops=tuple(linear_maps.LinearOp(
          weight=op.weight, in_scale=op.in_scale, out_scale=None,
          kind=op.kind, in_shape=op.in_shape, strides=op.strides,
          padding=op.padding) for op in chain.ops), slopes=chain.slopes)
  assert float(jnp.abs(_run_chain(plain, "relu", x) - expected).max()) > 1e-3
  np.testing.assert_allclose(np.asarray(_run_chain(chain, "relu", x)),
                             np.asarray(expected), rtol=1e-5, atol=1e-5)


def test_from_model_rejects_other_objects():
  with pytest.raises(TypeError, match="SequentialNet"):
    linear_maps.from_model({"params": 1})


def test_from_model_under_jit_and_grad_of_merged_params():
  model = models.build(_CONV_SPEC, num_classes=3, input_shape=(8, 8, 3),
                       rngs=nnx.Rngs(4), input_std=_STD)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  x = _images(5, batch=2)

  def loss(p):
    chain = linear_maps.from_model(nnx.merge(graphdef, p, rest))
    return jnp.sum(chain.apply_product(0, chain.num_layers - 1, x) ** 2)

  grads = jax.jit(jax.grad(loss))(params)
  np.testing.assert_allclose(float(jax.jit(loss)(params)),
                             float(loss(params)), rtol=1e-5)
  for layer_grads in grads["layers"].values():
    kernel_grad = np.asarray(layer_grads["kernel"][...])
    assert np.all(np.isfinite(kernel_grad))
    assert np.abs(kernel_grad).max() > 0
    # Biases never enter the chain.
    np.testing.assert_array_equal(np.asarray(layer_grads["bias"][...]), 0.0)


# ---------------------------------------------------------------------------
# to_chain


def test_to_chain_dispatch():
  rng = np.random.default_rng(2)
  mats = [rng.standard_normal((4, 3)), rng.standard_normal((2, 4))]
  x = jnp.asarray(rng.standard_normal((2, 3)), jnp.float32)
  expected = (mats[1] @ mats[0] @ np.asarray(x, np.float64).T).T

  from_list = linear_maps.to_chain(mats)
  from_tuple = linear_maps.to_chain(tuple(mats))
  for chain in (from_list, from_tuple):
    assert isinstance(chain, linear_maps.LinearChain)
    assert chain.slopes == (0.0, 1.0)
    np.testing.assert_allclose(np.asarray(chain.apply_product(0, 1, x)),
                               expected, rtol=1e-5, atol=1e-5)

  from_op_list = linear_maps.to_chain(list(from_list.ops))
  assert isinstance(from_op_list, linear_maps.LinearChain)
  np.testing.assert_allclose(np.asarray(from_op_list.apply_product(0, 1, x)),
                             expected, rtol=1e-5, atol=1e-5)

  assert linear_maps.to_chain(from_list) is from_list

  overridden = linear_maps.to_chain(from_list, slopes=(-0.5, 2))
  assert overridden.slopes == (-0.5, 2.0)
  assert from_list.slopes == (0.0, 1.0)  # The original is untouched.
  assert overridden.ops is from_list.ops
  assert linear_maps.to_chain(mats, slopes=(0.25, 0.5)).slopes == (0.25, 0.5)


def test_to_chain_from_model_uses_activation_slopes():
  model = models.build(_MLP_SPEC, num_classes=3, input_shape=(4, 4, 1),
                       rngs=nnx.Rngs(0), activation="leaky_relu")
  chain = linear_maps.to_chain(model)
  assert chain.slopes == (activations.LEAKY_RELU_NEGATIVE_SLOPE, 1.0)
  assert chain.ops[0].in_shape == (4, 4, 1)
  np.testing.assert_array_equal(np.asarray(chain.ops[0].weight),
                                np.asarray(model.layers[0].kernel[...]))
  assert linear_maps.to_chain(model, slopes=(0, 1)).slopes == (0.0, 1.0)


@pytest.mark.parametrize("bad", [42, "3F", {"w": np.ones((2, 2))}, None])
def test_to_chain_rejects_unsupported_objects(bad):
  with pytest.raises(TypeError, match="Expected a lipjax.models.SequentialNet"):
    linear_maps.to_chain(bad)


def test_to_chain_rejects_bad_slopes():
  with pytest.raises(ValueError, match="alpha <= beta"):
    linear_maps.to_chain([np.ones((2, 2))], slopes=(2.0, 1.0))
  with pytest.raises(ValueError, match="pair"):
    linear_maps.to_chain([np.ones((2, 2))], slopes=(1.0,))


# ---------------------------------------------------------------------------
# Pytree behaviour


def _small_conv_chain():
  ops = (_conv_op(0, 6, 6, 4, 2, 1, c_in=2, c_out=3, scales=True),  # (3,3,3)
         _dense_op(1, (3, 3, 3), 5),
         _dense_op(2, (5,), 4))
  return linear_maps.from_ops(ops, slopes=(0.0, 1.0))


def test_chain_is_a_pytree():
  chain = _small_conv_chain()
  leaves, treedef = jax.tree_util.tree_flatten(chain)
  # conv: weight, in_scale, out_scale; each dense: weight.
  assert len(leaves) == 5
  rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
  assert rebuilt.slopes == chain.slopes
  assert [op.in_shape for op in rebuilt.ops] == [op.in_shape
                                                 for op in chain.ops]
  doubled = jax.tree.map(lambda a: 2 * a, chain)
  x = _images(0, shape=(6, 6, 2), batch=2)
  np.testing.assert_allclose(
      np.asarray(doubled.apply_product(0, 2, x)),
      2**5 * np.asarray(chain.apply_product(0, 2, x)), rtol=1e-4, atol=1e-4)


def test_chain_under_jit_matches_eager():
  chain = _small_conv_chain()
  x = _images(1, shape=(6, 6, 2), batch=3)
  y = jnp.asarray(np.random.default_rng(2).standard_normal((3, 4)),
                  jnp.float32)

  @jax.jit
  def both(c, x, y):
    return c.apply_product(0, 2, x), c.transpose_product(0, 2, y)

  fwd, back = both(chain, x, y)
  np.testing.assert_allclose(np.asarray(fwd),
                             np.asarray(chain.apply_product(0, 2, x)),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(back),
                             np.asarray(chain.transpose_product(0, 2, y)),
                             rtol=1e-5, atol=1e-5)
  assert float(jnp.abs(fwd).max()) > 0.1


def test_grad_flows_to_chain_weights():
  chain = _small_conv_chain()
  x = _images(3, shape=(6, 6, 2), batch=2)

  def loss(c):
    return jnp.sum(c.apply_product(0, c.num_layers - 1, x) ** 2)

  grads = jax.jit(jax.grad(loss))(chain)
  assert isinstance(grads, linear_maps.LinearChain)
  for leaf in jax.tree.leaves(grads):
    assert np.all(np.isfinite(np.asarray(leaf)))
    assert float(jnp.abs(leaf).max()) > 0
  # The loss is homogeneous of degree 2 in each weight: <grad, W> = 2 loss.
  for op, g in zip(chain.ops, grads.ops):
    np.testing.assert_allclose(float(jnp.sum(g.weight * op.weight)),
                               2 * float(loss(chain)), rtol=1e-4)


def test_grad_matches_closed_form_for_matrices():
  rng = np.random.default_rng(3)
  w0, w1 = rng.standard_normal((4, 3)), rng.standard_normal((2, 4))
  x = rng.standard_normal((1, 3))
  with jax.enable_x64(True):
    chain = linear_maps.from_matrices([w0, w1])
    grads = jax.grad(lambda c: jnp.sum(c.apply_product(0, 1, x) ** 2))(chain)
    g1 = np.asarray(grads.ops[1].weight)
  # d/dW1 ||W1 W0 x||^2 = 2 (W1 W0 x)(W0 x)^T; ops store W^T.
  h = w0 @ x[0]
  np.testing.assert_allclose(g1.T, 2 * np.outer(w1 @ h, h), rtol=1e-10)
