"""Tests for `lipjax.models` and `lipjax.activations`.

The bounds are only meaningful for the network that is really trained and
evaluated, so these tests pin down the network itself:

* the named architectures (docs/bounds.md#architectures) have the right
  layers, kernel shapes
  (dense input sizes 3136, 1024, 9216) and output shapes on their datasets;
* weights and biases use PyTorch's default U(-1/sqrt(fan_in), 1/sqrt(fan_in))
  initialization and are reproducible from the seed;
* every registered activation is usable and is the one actually applied;
* malformed specs, shapes, normalizations and class counts are rejected
  with a message that says what is wrong;
* the fixed input normalization is exactly ``(x - mean) / std``;
* each activation's slope interval (alpha, beta) contains every difference
  quotient and is tight, and the derived constants are right;
* models survive ``nnx.split``/``nnx.merge`` and ``jax.jit``.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lipjax import activations
from lipjax import models

_DATASET_SHAPES = {
    "3F": ((28, 28, 1), 10),
    "2C2F": ((28, 28, 1), 10),
    "4C3F": ((28, 28, 1), 10),
    "6C2F": ((32, 32, 3), 10),
    "8C2F": ((64, 64, 3), 200),
}

# Every weight layer's kernel shape (HWIO for convs, [in, out] for dense).
_KERNEL_SHAPES = {
    "3F": [(784, 100), (100, 100), (100, 10)],
    "2C2F": [(4, 4, 1, 16), (4, 4, 16, 32), (1568, 100), (100, 10)],
    "4C3F": [(3, 3, 1, 32), (4, 4, 32, 32), (3, 3, 32, 64), (4, 4, 64, 64),
             (3136, 512), (512, 512), (512, 10)],
    "6C2F": [(3, 3, 3, 32), (4, 4, 32, 32), (3, 3, 32, 64), (4, 4, 64, 64),
             (3, 3, 64, 64), (4, 4, 64, 64), (1024, 512), (512, 10)],
    "8C2F": [(3, 3, 3, 64), (3, 3, 64, 64), (4, 4, 64, 64), (3, 3, 64, 128),
             (3, 3, 128, 128), (4, 4, 128, 128), (3, 3, 128, 256),
             (4, 4, 256, 256), (9216, 256), (256, 200)],
}

_SMALL_SPEC = [("conv", 4, 3, 1, 1), ("conv", 3, 4, 2, 1), ("dense", 8),
               ("dense", None)]


@functools.lru_cache(maxsize=None)
def _named_model(name, seed=0):
  """A named architecture on its dataset shape; cached, never mutated."""
  shape, classes = _DATASET_SHAPES[name]
  return models.build(name, num_classes=classes, input_shape=shape,
                      rngs=nnx.Rngs(seed))


@functools.lru_cache(maxsize=None)
def _small_model():
  """_SMALL_SPEC on (8, 8, 3) with 3 classes; cached, never mutated."""
  return models.build(_SMALL_SPEC, num_classes=3, input_shape=(8, 8, 3),
                      rngs=nnx.Rngs(0))


def _images(seed, shape, batch=2):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.uniform(0.0, 1.0, (batch,) + tuple(shape)),
                     jnp.float32)


def _param_arrays(model):
  _, params = nnx.split(model, nnx.Param)
  return [np.asarray(leaf) for leaf in jax.tree.leaves(params)]


def test_dataset_table_covers_every_architecture():
  assert set(_DATASET_SHAPES) == set(models.ARCHITECTURES)
  assert set(_KERNEL_SHAPES) == set(models.ARCHITECTURES)


@pytest.mark.parametrize("name", sorted(models.ARCHITECTURES))
def test_named_architecture_layers_and_output(name):
  model = _named_model(name)
  shape, classes = _DATASET_SHAPES[name]
  kernels = [tuple(layer.kernel[...].shape) for layer in model.layers]
  assert kernels == _KERNEL_SHAPES[name]
  assert len(model.layers) == len(models.ARCHITECTURES[name])
  assert model.num_classes == classes
  assert model.layer_input_shapes[0] == shape
  logits = model(_images(0, shape))
  assert logits.shape == (2, classes)
  assert logits.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(logits)))
  # Different images give different logits (the network is not constant).
  assert float(jnp.abs(logits[0] - logits[1]).max()) > 1e-6


def test_weight_layer_counts_match_the_documented_table():
  counts = {name: len(_KERNEL_SHAPES[name]) for name in _KERNEL_SHAPES}
  assert counts == {"3F": 3, "2C2F": 4, "4C3F": 7, "6C2F": 8, "8C2F": 10}
  for name, expected in counts.items():
    assert len(models.ARCHITECTURES[name]) == expected


def test_8c2f_spatial_sizes_follow_spec():
  model = _named_model("8C2F")
  spatial = [s[0] for s in model.layer_input_shapes[:8]]
  assert spatial == [64, 64, 62, 30, 30, 30, 14, 14]
  assert model.layer_input_shapes[8] == (6, 6, 256)
  assert math.prod(model.layer_input_shapes[8]) == 9216


@pytest.mark.parametrize("name,dense_in", [("4C3F", 3136), ("6C2F", 1024),
                                           ("8C2F", 9216), ("2C2F", 1568),
                                           ("3F", 784)])
def test_first_dense_input_size(name, dense_in):
  model = _named_model(name)
  first_dense = next(k for k, layer in enumerate(models.ARCHITECTURES[name])
                     if layer[0] == "dense")
  assert model.layers[first_dense].kernel[...].shape[0] == dense_in
  assert math.prod(model.layer_input_shapes[first_dense]) == dense_in


# ---------------------------------------------------------------------------
# Initialization


@pytest.mark.parametrize("name", sorted(models.ARCHITECTURES))
def test_pytorch_default_init(name):
  model = _named_model(name)
  for k, layer in enumerate(model.layers):
    kernel = np.asarray(layer.kernel[...])
    bias = np.asarray(layer.bias[...])
    fan_in = math.prod(kernel.shape[:-1])
    bound = 1.0 / math.sqrt(fan_in)
    assert bias.shape == (kernel.shape[-1],)
    for name_, values in (("kernel", kernel), ("bias", bias)):
      assert np.abs(values).max() <= bound, (k, name_)
      assert np.any(values != 0), (k, name_)
      if values.size >= 200:
        # Uniform: fills the interval, std bound / sqrt(3), mean 0.
        assert np.abs(values).max() >= 0.95 * bound, (k, name_)
        np.testing.assert_allclose(values.std(), bound / math.sqrt(3),
                                   rtol=0.15)
        assert abs(values.mean()) <= 0.15 * bound


def test_same_seed_same_params_different_seed_different():
  spec = [("conv", 4, 3, 1, 1), ("dense", 6), ("dense", 6), ("dense", None)]
  kwargs = dict(num_classes=3, input_shape=(5, 5, 2))
  a = _param_arrays(models.build(spec, rngs=nnx.Rngs(3), **kwargs))
  b = _param_arrays(models.build(spec, rngs=nnx.Rngs(3), **kwargs))
  c = _param_arrays(models.build(spec, rngs=nnx.Rngs(4), **kwargs))
  assert len(a) == len(b) == len(c) == 8
  for x, y, z in zip(a, b, c):
    np.testing.assert_array_equal(x, y)
    assert not np.array_equal(x, z)


def test_layers_get_independent_draws():
  spec = [("dense", 6), ("dense", 6), ("dense", 6), ("dense", None)]
  model = models.build(spec, num_classes=2, input_shape=(1, 1, 6),
                       rngs=nnx.Rngs(0))
  kernels = [np.asarray(layer.kernel[...]) for layer in model.layers[:3]]
  assert not np.array_equal(kernels[0], kernels[1])
  assert not np.array_equal(kernels[1], kernels[2])
  bias = np.asarray(model.layers[1].bias[...])
  assert not np.array_equal(bias, kernels[1][0])


# ---------------------------------------------------------------------------
# Activations in the model


@pytest.mark.parametrize("activation", activations.ACTIVATIONS)
def test_every_activation_builds_and_is_applied(activation):
  spec = [("dense", 7), ("dense", 5), ("dense", None)]
  model = models.build(spec, num_classes=3, input_shape=(2, 2, 2),
                       rngs=nnx.Rngs(1), activation=activation)
  assert model.activation == activation
  x = _images(1, (2, 2, 2), batch=4) - 0.5
  logits = model(x)
  assert logits.shape == (4, 3)
  phi = activations.get_activation(activation).fn
  h = x.reshape(4, -1)
  h = phi(model.layers[0](h))
  h = phi(model.layers[1](h))
  expected = model.layers[2](h)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(expected),
                             rtol=1e-6, atol=1e-6)
  # The activation is applied between layers but not after the last one.
  linear = model.layers[2](model.layers[1](model.layers[0](x.reshape(4, -1))))
  assert float(jnp.abs(logits - linear).max()) > 1e-4


def test_activation_registry_names():
  assert set(activations.ACTIVATIONS) == {
      "relu", "leaky_relu", "tanh", "sigmoid", "softplus", "elu", "abs"}
  for name in activations.ACTIVATIONS:
    assert activations.get_activation(name).name == name
  with pytest.raises(ValueError, match=r"Unknown activation 'gelu'.*relu"):
    activations.get_activation("gelu")


# ---------------------------------------------------------------------------
# Validation


_BUILD_OK = dict(num_classes=3, input_shape=(8, 8, 3))


@pytest.mark.parametrize("architecture,kwargs,match", [
    (_SMALL_SPEC, dict(activation="gelu"), r"Unknown activation 'gelu'"),
    ("5C5F", {}, r"Unknown architecture '5C5F'.*4C3F"),
    ([("dense", 8), ("conv", 4, 3, 1, 1), ("dense", None)], {},
     r"Layer 1: a conv after a dense layer"),
    ([("conv", 4, 3, 1, 1), ("dense", 8)], {},
     r"last layer must be \('dense', None\)"),
    ([("conv", 4, 3, 1, 1), ("dense", 5), ("dense", 3)], {},
     r"last layer must be \('dense', None\)"),
    ([("conv", 4, 3, 1), ("dense", None)], {},
     r"Layer 0: expected \('conv', features, kernel, stride, padding\)"),
    ([("conv", 4, 0, 1, 1), ("dense", None)], {},
     r"Layer 0: expected \('conv'"),
    ([("conv", 4, 3, 1, -1), ("dense", None)], {},
     r"Layer 0: expected \('conv'"),
    ([("conv", 4.0, 3, 1, 1), ("dense", None)], {},
     r"Layer 0: expected \('conv'"),
    ([("dense", 0), ("dense", None)], {}, r"Layer 0: expected \('dense'"),
    ([("dense", 4, 4), ("dense", None)], {}, r"Layer 0: expected \('dense'"),
    ([("pool", 2), ("dense", None)], {}, r"Layer 0: unknown layer kind"),
    ([], {}, r"at least one layer"),
    ("8C2F", dict(input_shape=(8, 8, 3)), r"Layer 5 .*too small"),
    ([("conv", 2, 5, 1, 0), ("dense", None)], dict(input_shape=(4, 6, 1)),
     r"Layer 0 .*4x6 input, too small"),
    (_SMALL_SPEC, dict(input_mean=(0.5, 0.5)), r"one value per input channel"),
    (_SMALL_SPEC, dict(input_std=(1.0, 1.0, 1.0, 1.0)),
     r"one value per input channel \(3\)"),
    (_SMALL_SPEC, dict(input_std=(1.0, 0.0, 1.0)), r"must be positive"),
    (_SMALL_SPEC, dict(input_std=(1.0, -2.0, 1.0)), r"must be positive"),
    (_SMALL_SPEC, dict(num_classes=1), r"num_classes must be an int >= 2"),
    (_SMALL_SPEC, dict(num_classes=0), r"num_classes must be an int >= 2"),
    (_SMALL_SPEC, dict(input_shape=(8, 8)), r"input_shape must be \(H, W, C\)"),
    (_SMALL_SPEC, dict(input_shape=(8, 0, 3)), r"input_shape must be"),
], ids=["activation", "arch_name", "conv_after_dense", "last_not_dense",
        "last_not_none", "short_conv", "zero_kernel", "negative_pad",
        "float_features", "zero_dense", "long_dense", "unknown_kind", "empty",
        "8c2f_too_small", "too_small_kernel", "mean_len", "std_len",
        "std_zero", "std_negative", "one_class", "zero_classes", "shape_2d",
        "shape_zero"])
def test_build_rejects_bad_arguments(architecture, kwargs, match):
  kwargs = {**_BUILD_OK, **kwargs}
  with pytest.raises(ValueError, match=match):
    models.build(architecture, rngs=nnx.Rngs(0), **kwargs)


def test_smallest_fitting_input_is_accepted():
  # 8C2F's last conv needs a 4x4 input: 24 -> 24 -> 22 -> 10 -> 10 -> 10 ->
  # 4 -> 4 -> 1. With 23, layer 7 would get a 3x3 input.
  model = models.build("8C2F", num_classes=2, input_shape=(24, 24, 1),
                       rngs=nnx.Rngs(0))
  assert [s[0] for s in model.layer_input_shapes[:8]] == [24, 24, 22, 10, 10,
                                                           10, 4, 4]
  assert model.layer_input_shapes[8] == (1, 1, 256)
  with pytest.raises(ValueError, match=r"Layer 7 .* 3x3 input, too small"):
    models.build("8C2F", num_classes=2, input_shape=(23, 23, 1),
                 rngs=nnx.Rngs(0))


@pytest.mark.parametrize("batch_shape", [(2, 9, 8, 3), (2, 3, 8, 8),
                                         (2, 8, 8, 1), (8, 8, 3)])
def test_call_rejects_wrong_image_shape(batch_shape):
  model = _small_model()
  with pytest.raises(ValueError, match=r"expects images of shape \(8, 8, 3\)"):
    model(jnp.zeros(batch_shape))


def test_empty_batch_gives_empty_logits():
  # Flattening must not infer a size from zero elements (ZeroDivisionError).
  model = _small_model()
  assert model(jnp.zeros((0, 8, 8, 3))).shape == (0, model.num_classes)


# ---------------------------------------------------------------------------
# Input normalization


@pytest.mark.parametrize("spec", [_SMALL_SPEC, [("dense", 8), ("dense", None)]],
                         ids=["conv", "mlp"])
def test_input_normalization(spec):
  mean, std = (0.2, 0.5, 0.8), (0.5, 0.25, 2.0)
  normalized = models.build(spec, rngs=nnx.Rngs(7), input_mean=mean,
                            input_std=std, **_BUILD_OK)
  plain = models.build(spec, rngs=nnx.Rngs(7), **_BUILD_OK)
  assert normalized.input_mean == mean and normalized.input_std == std
  assert plain.input_mean == (0.0,) * 3 and plain.input_std == (1.0,) * 3
  for a, b in zip(_param_arrays(normalized), _param_arrays(plain)):
    np.testing.assert_array_equal(a, b)
  x = _images(3, (8, 8, 3), batch=3)
  expected = plain((x - jnp.asarray(mean)) / jnp.asarray(std))
  np.testing.assert_allclose(np.asarray(normalized(x)), np.asarray(expected),
                             rtol=1e-5, atol=1e-5)
  assert float(jnp.abs(normalized(x) - plain(x)).max()) > 1e-3


# ---------------------------------------------------------------------------
# Slope intervals


def _difference_quotients(fn, seed=0, n=4000):
  """Difference quotients of ``fn`` over far-apart and close pairs, float64."""
  rng = np.random.default_rng(seed)
  far_u = rng.uniform(-30.0, 30.0, n)
  far_w = rng.uniform(-30.0, 30.0, n)
  # Close pairs around centres at several scales, so that derivative extremes
  # (at 0 for tanh/sigmoid, at +-infinity for the saturating ones) are hit.
  centre = rng.standard_normal(n) * rng.choice([0.01, 0.3, 3.0, 30.0], n)
  delta = 10.0 ** rng.uniform(-4, -1, n) * rng.choice([-1.0, 1.0], n)
  u = np.concatenate([far_u, centre])
  w = np.concatenate([far_w, centre + delta])
  keep = u != w
  u, w = u[keep], w[keep]
  with jax.enable_x64(True):
    fu = np.asarray(jax.jit(fn)(jnp.asarray(u, jnp.float64)))
    fw = np.asarray(jax.jit(fn)(jnp.asarray(w, jnp.float64)))
  assert fu.dtype == np.float64
  return (fu - fw) / (u - w)


@pytest.mark.parametrize("name", activations.ACTIVATIONS)
def test_slopes_contain_all_difference_quotients_and_are_tight(name):
  act = activations.get_activation(name)
  alpha, beta = act.slopes
  assert alpha <= beta
  q = _difference_quotients(act.fn)
  assert q.size > 7000
  assert q.min() >= alpha - 1e-6
  assert q.max() <= beta + 1e-6
  assert q.min() <= alpha + 1e-2
  assert q.max() >= beta - 1e-2
  # Loop transformation: phi - a * id is c-Lipschitz.
  a, c = activations.loop_transformation(act.slopes)
  assert np.abs(q - a).max() <= c + 1e-6
  assert activations.lipschitz_constant(act.slopes) == pytest.approx(
      np.abs(q).max(), abs=1e-2)


@pytest.mark.parametrize("slopes,loop,lip", [
    ((0.0, 1.0), (0.5, 0.5), 1.0),
    ((-1.0, 1.0), (0.0, 1.0), 1.0),
    ((0.01, 1.0), (0.505, 0.495), 1.0),
    ((0.0, 0.25), (0.125, 0.125), 0.25),
    ((-3.0, 1.0), (-1.0, 2.0), 3.0),
    ((2.0, 2.0), (2.0, 0.0), 2.0),
    ((-2.0, -0.5), (-1.25, 0.75), 2.0),
])
def test_loop_transformation_and_lipschitz_constant(slopes, loop, lip):
  a, c = activations.loop_transformation(slopes)
  assert (a, c) == pytest.approx(loop, abs=1e-12)
  assert activations.lipschitz_constant(slopes) == pytest.approx(lip,
                                                                 abs=1e-12)


def test_check_slopes():
  assert activations.check_slopes((0, 1)) == (0.0, 1.0)
  assert all(type(s) is float
             for s in activations.check_slopes(np.array([0.5, 2])))
  assert activations.check_slopes((1.5, 1.5)) == (1.5, 1.5)
  with pytest.raises(ValueError, match=r"alpha <= beta, got \(1.0, 0.0\)"):
    activations.check_slopes((1.0, 0.0))
  with pytest.raises(ValueError, match="alpha <= beta"):
    activations.check_slopes((0.0, float("nan")))
  with pytest.raises(ValueError, match="pair"):
    activations.check_slopes((0.0, 1.0, 2.0))
  with pytest.raises(ValueError, match="pair"):
    activations.check_slopes(1.0)
  with pytest.raises(ValueError, match="pair"):
    activations.check_slopes(("a", "b"))
  with pytest.raises(ValueError, match="alpha <= beta"):
    activations.loop_transformation((1.0, -1.0))
  with pytest.raises(ValueError, match="alpha <= beta"):
    activations.lipschitz_constant((1.0, -1.0))


# ---------------------------------------------------------------------------
# split / merge / jit


@pytest.mark.parametrize("batch_norm", [False, True])
def test_split_merge_and_jit(batch_norm):
  model = models.build(_SMALL_SPEC, rngs=nnx.Rngs(5), batch_norm=batch_norm,
                       input_mean=(0.1, 0.2, 0.3), input_std=(0.5, 1.0, 2.0),
                       **_BUILD_OK)
  assert len(model.batch_norms) == (2 if batch_norm else 0)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  x = _images(8, (8, 8, 3), batch=3)
  expected = np.asarray(model(x))

  merged = nnx.merge(graphdef, params, rest)
  assert merged is not model
  np.testing.assert_array_equal(np.asarray(merged(x)), expected)
  assert merged.spec == model.spec
  assert merged.input_std == model.input_std

  @jax.jit
  def forward(p, r, images):
    return nnx.merge(graphdef, p, r)(images)

  np.testing.assert_allclose(np.asarray(forward(params, rest, x)), expected,
                             rtol=1e-5, atol=1e-5)
  # The params are real inputs, not constants baked into the trace.
  doubled = jax.tree.map(lambda a: 2 * a, params)
  assert float(jnp.abs(forward(doubled, rest, x) - expected).max()) > 1e-3

  def loss(p):
    return jnp.sum(forward(p, rest, x) ** 2)

  grads = jax.jit(jax.grad(loss))(params)
  for leaf in jax.tree.leaves(grads):
    assert np.all(np.isfinite(np.asarray(leaf)))
  kernel_grads = [np.asarray(g["kernel"][...])
                  for g in grads["layers"].values()]
  assert len(kernel_grads) == 4
  assert all(np.abs(g).max() > 0 for g in kernel_grads)


def test_eval_batch_norm_is_per_example():
  model = models.build(_SMALL_SPEC, rngs=nnx.Rngs(6), batch_norm=True,
                       **_BUILD_OK)
  x = _images(9, (8, 8, 3), batch=4)
  together = np.asarray(model(x))
  alone = np.asarray(model(x[:1]))
  np.testing.assert_allclose(together[:1], alone, rtol=1e-5, atol=1e-6)
