"""Tests for `lipjax.fast_conv`: the models' conv and its custom VJP.

The faster gradient forms must be the same linear maps as XLA's: for every
conv configuration the named plain and residual architectures use, the
forward pass and both gradients (in every applicable form, and in the form
:func:`fast_conv.plan` picks) match ``jax.vjp`` of the plain
``lax.conv_general_dilated`` to float32 rounding; the models really use it,
and a train step's loss and gradients match those of the plain-conv model.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import default
from lipjax import fast_conv
from lipjax import models
from lipjax import residual_models
from lipjax.training import steps

_SHAPES = {"2C2F": (28, 28, 1), "4C3F": (28, 28, 1), "6C2F": (32, 32, 3),
           "8C2F": (64, 64, 3), **{name: (32, 32, 3)
                                   for name in residual_models.ARCHITECTURES}}


def _used_configs():
  """``(H, W, C, O, k, stride, pad)`` of every conv the architectures call."""
  seen = set()
  real_conv = fast_conv.conv

  def record(x, w, stride, pad, forms=None):
    seen.add((*x.shape[1:], w.shape[-1], w.shape[0], stride, pad))
    return real_conv(x, w, stride, pad, forms)

  fast_conv.conv = record
  try:
    for name, shape in _SHAPES.items():
      # Built and called abstractly: shapes only, no weights drawn.
      jax.eval_shape(lambda x, name=name, shape=shape: models.build(
          name, num_classes=10, input_shape=shape, rngs=nnx.Rngs(0))(x),
                     jax.ShapeDtypeStruct((1, *shape), jnp.float32))
  finally:
    fast_conv.conv = real_conv
  return sorted(seen)


_CONFIGS = _used_configs()


def test_every_layer_kind_is_covered():
  # Strides 1 and 2, kernels 1, 3 and 4, paddings 0 and 1, 1-256 channels.
  assert {c[5] for c in _CONFIGS} == {1, 2}
  assert {c[4] for c in _CONFIGS} == {1, 3, 4}
  assert {c[6] for c in _CONFIGS} == {0, 1}
  assert {1, 3, 32, 64, 128, 256} <= {c[2] for c in _CONFIGS}


def _close(actual, expected, magnitude):
  """Equal to float32 rounding of a sum whose absolute terms add up to
  ``magnitude`` (elementwise)."""
  np.testing.assert_array_less(jnp.abs(actual - expected),
                               1e-5 * magnitude + 1e-30)


def _plain_conv(x, w, stride, pad):
  return jax.lax.conv_general_dilated(
      x, w, (stride, stride), ((pad, pad), (pad, pad)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"))


# Odd padded sizes (space-to-depth pads one more row and column, then crops)
# and both gradient forms on a strided first layer.
_EXTRA = [((13, 13, 8, 8, 4, 2, 0), None), ((15, 11, 4, 8, 4, 2, 1), None),
          ((9, 9, 3, 8, 4, 2, 1), ("s2d", "lax")),
          ((9, 9, 3, 8, 4, 2, 1), ("lax", "patches")),
          ((9, 9, 16, 8, 3, 1, 1), ("lax", "patches"))]


@pytest.mark.parametrize("config,forms",
                         [(c, None) for c in _CONFIGS] + _EXTRA, ids=str)
def test_forward_and_gradients_match_plain_conv(config, forms):
  """Every conv of the architectures, in the forms :func:`plan` picks."""
  height, width, c_in, c_out, kernel, stride, pad = config
  kx, kw, kg = jax.random.split(jax.random.key(sum(config)), 3)
  x = jax.random.normal(kx, (1, height, width, c_in))
  w = jax.random.normal(kw, (kernel, kernel, c_in, c_out))
  g = jax.random.normal(kg, _plain_conv(x, w, stride, pad).shape)

  @jax.jit  # one compile for all of it
  def compare(x, w, g):
    plain = functools.partial(_plain_conv, stride=stride, pad=pad)
    fast = functools.partial(fast_conv.conv, stride=stride, pad=pad,
                             forms=forms)
    y, plain_vjp = jax.vjp(plain, x, w)
    y_fast, fast_vjp = jax.vjp(fast, x, w)
    magnitudes = jax.vjp(plain, jnp.abs(x), jnp.abs(w))[1](jnp.abs(g))
    return (y, y_fast), plain_vjp(g), fast_vjp(g), magnitudes

  (y, y_fast), plain_grads, fast_grads, magnitudes = compare(x, w, g)
  np.testing.assert_array_equal(y_fast, y)  # the same lax conv
  for fast, plain, magnitude in zip(fast_grads, plain_grads, magnitudes):
    _close(fast, plain, magnitude)


def test_plan_picks_the_fast_forms():
  # First layers (1 or 3 channels): patches for the kernel gradient.
  assert fast_conv.plan((3, 3, 1, 32), 1) == ("lax", "patches")
  assert fast_conv.plan((3, 3, 3, 32), 1) == ("lax", "patches")
  # Stride 2, even kernel: space-to-depth for the input gradient.
  assert fast_conv.plan((4, 4, 32, 64), 2) == ("s2d", "lax")
  assert fast_conv.plan((3, 3, 32, 64), 2) == ("lax", "lax")
  assert fast_conv.plan((3, 3, 64, 64), 1) == ("lax", "lax")


def test_unusual_convs_fall_back_to_lax():
  x = jax.random.normal(jax.random.key(0), (2, 9, 9, 4))
  w = jax.random.normal(jax.random.key(1), (3, 3, 4, 6))
  numbers = jax.lax.conv_dimension_numbers(x.shape, w.shape,
                                           ("NHWC", "HWIO", "NHWC"))
  for strides, padding, groups in (((1, 2), ((1, 1), (1, 1)), 1),
                                   ((1, 1), ((1, 0), (1, 0)), 1),
                                   ((1, 1), "SAME", 1),
                                   ((1, 1), ((1, 1), (1, 1)), 2)):
    conv = functools.partial(
        fast_conv.conv_general_dilated, window_strides=strides,
        padding=padding, dimension_numbers=numbers,
        feature_group_count=groups)
    plain = functools.partial(
        jax.lax.conv_general_dilated, window_strides=strides,
        padding=padding, dimension_numbers=numbers,
        feature_group_count=groups)
    np.testing.assert_array_equal(conv(x, w[..., :4 // groups, :]),
                                  plain(x, w[..., :4 // groups, :]))
    assert "custom_vjp" not in str(jax.make_jaxpr(conv)(
        x, w[..., :4 // groups, :]))


def _train_step(config, state, tx, lr, *, plain: bool, monkeypatch):
  """A train step's metrics and the CE gradients, fast or plain convs."""
  if plain:
    monkeypatch.setattr(fast_conv, "conv_general_dilated",
                        jax.lax.conv_general_dilated)
  graphdef = steps.make_graphdef(config, input_shape=_STEP_SHAPE,
                                 num_classes=10)
  step = jax.jit(steps.make_train_step(config, graphdef, tx, lr,
                                       steps_per_epoch=10))
  monkeypatch.undo()
  batch = {"image": jax.random.randint(jax.random.key(1), (8, *_STEP_SHAPE),
                                       0, 256, jnp.uint8),
           "label": jnp.arange(8) % 10}

  def ce(params):
    logits = nnx.merge(graphdef, params, state.rest)(
        batch["image"] / 255.0)
    return jnp.mean(jax.nn.logsumexp(logits, -1)
                    - logits[jnp.arange(8), batch["label"]])

  grads = jax.jit(jax.grad(ce))(state.params)
  _, metrics = step(state, batch)
  return metrics, grads, str(jax.make_jaxpr(jax.grad(ce))(state.params))


_STEP_SHAPE = (8, 8, 3)


def test_train_step_uses_fast_conv_and_matches_plain_convs(monkeypatch):
  config = default.get_config()
  config.model.architecture = "2C2F"  # first layer, stride 2: both forms
  config.bound.power_iterations = 1
  # The CE step: its logits and gradients go through the same model convs as
  # the CRM step's, at a fraction of the compile time (the bound's gradient
  # does not touch the model's convs).
  config.loss.name = "ce"
  lr = steps.make_learning_rate(config, 10)
  tx = steps.make_optimizer(config, lr)
  # One state for both (the params do not depend on the conv function).
  state = jax.jit(steps.make_init_fn(config, tx, input_shape=_STEP_SHAPE,
                                     num_classes=10))()
  metrics, grads, jaxpr = _train_step(config, state, tx, lr, plain=False,
                                      monkeypatch=monkeypatch)
  plain_metrics, plain_grads, plain_jaxpr = _train_step(
      config, state, tx, lr, plain=True, monkeypatch=monkeypatch)
  assert "custom_vjp" in jaxpr and "custom_vjp" not in plain_jaxpr
  # The same forward convs: the same logits and loss.
  np.testing.assert_array_equal(metrics["loss"], plain_metrics["loss"])
  np.testing.assert_allclose(metrics["grad_norm"], plain_metrics["grad_norm"],
                             rtol=1e-5)
  for fast, plain in zip(jax.tree.leaves(grads), jax.tree.leaves(plain_grads)):
    np.testing.assert_allclose(fast, plain, rtol=1e-4,
                               atol=1e-5 * float(jnp.max(jnp.abs(plain))))
