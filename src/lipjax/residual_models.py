"""Residual networks, declared like the plain architectures (NHWC).

A residual architecture is a tuple of layer specs:

* ``("conv", features, kernel, stride, padding)`` and ``("dense",
  features)``: plain layers as in :mod:`lipjax.models`, each followed by the
  activation (but the last);
* ``("residual", features, kernel, activations, stride)``: a residual block
  ``y = S x + W_m phi(... phi(W_0 x))`` with ``m = activations`` (1 or 2)
  inner activations and ``m + 1`` square ``kernel x kernel`` convolutions
  ("same" padding, odd kernel), the first one with ``stride``. The shortcut
  ``S`` is the identity when the block keeps the shape, else a 1x1
  projection convolution with ``stride``. No activation follows the sum;
* ``("linear_residual", kernel)``: ``y = x + W x`` (one "same" convolution
  that keeps the channels, LiResNet's linear block), followed by the
  activation like a plain layer.

The first layer must be a plain conv or dense layer (the stem: the input
normalization is folded into it), the last ``("dense", None)``, and no conv
kind may follow a dense layer. Lipschitz logic lives in
:mod:`lipjax.residual_bounds`; docs/residual.md derives the bound.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from lipjax import activations, fast_conv
from lipjax import models

CONV_KINDS = ("conv", "residual", "linear_residual")


def _block(features, activations_=1, stride=1, kernel=3):
  return ("residual", features, kernel, activations_, stride)


def residual_spec(blocks_per_stage: Sequence[int], widths: Sequence[int], *,
                  inner_activations: int = 1, hidden: int = 512,
                  downsample: str = "conv") -> tuple:
  """A stem conv, residual stages, a dense head.

  Every stage halves the resolution first: with ``downsample="conv"`` by a
  plain ``4x4`` stride-2 conv to the stage's width (as 4C3F does), with
  ``"block"`` by a stride-2 residual block with a projection shortcut.

  Args:
    blocks_per_stage: number of residual blocks per stage (a ``"block"``
      downsampling counts as the stage's first).
    widths: channels per stage (the stem has ``widths[0]``).
    inner_activations: 1 or 2 activations inside each block.
    hidden: width of the hidden dense layer of the head.
    downsample: ``"conv"`` or ``"block"``.
  """
  if downsample not in ("conv", "block"):
    raise ValueError(f"downsample must be 'conv' or 'block', got "
                     f"{downsample!r}.")
  spec = [("conv", widths[0], 3, 1, 1)]
  for count, width in zip(blocks_per_stage, widths):
    if downsample == "conv":
      spec.append(("conv", width, 4, 2, 1))
      spec += [_block(width, inner_activations)] * count
    else:
      spec.append(_block(width, inner_activations, stride=2))
      spec += [_block(width, inner_activations)] * (count - 1)
  return tuple(spec) + (("dense", hidden), ("dense", None))


def linear_residual_spec(blocks_per_stage: Sequence[int],
                         widths: Sequence[int], *, hidden: int = 512
                         ) -> tuple:
  """LiResNet style: linear residual blocks between strided convs.

  A stem conv, then per stage a plain ``4x4`` stride-2 conv to the stage's
  width followed by its linear residual blocks.
  """
  spec = [("conv", widths[0], 3, 1, 1)]
  for count, width in zip(blocks_per_stage, widths):
    spec.append(("conv", width, 4, 2, 1))
    spec += [("linear_residual", 3)] * count
  return tuple(spec) + (("dense", hidden), ("dense", None))


ARCHITECTURES = {
    # 4C3F's layout (28 -> 14 -> 7 with strided convs, widths 32 and 64)
    # with two one-activation residual blocks at each resolution.
    "ResNet4": residual_spec((2, 2), (32, 64)),
    "ResNet8": residual_spec((4, 4), (32, 64)),
    # 6C2F's layout (three stride-2 stages; CIFAR-10) with two blocks each.
    "ResNet6": residual_spec((2, 2, 2), (32, 64, 64)),
    # Two activations inside every block.
    "ResNet4x2": residual_spec((2, 2), (32, 64), inner_activations=2),
    # Downsampling by stride-2 blocks with 1x1 projection shortcuts.
    "ResNet4P": residual_spec((2, 2), (32, 64), downsample="block"),
    "LiResNet4": linear_residual_spec((2, 2), (32, 64)),
}


def _is_positive_int(value) -> bool:
  return models._is_int(value) and value >= 1  # pylint: disable=protected-access


def _check_layer(k: int, layer: tuple, seen_dense: bool) -> None:
  kind = layer[0] if layer else None
  if kind in CONV_KINDS and seen_dense:
    raise ValueError(f"Layer {k}: a {kind} layer after a dense layer is not "
                     "supported (convolutional layers come first).")
  if kind == "residual":
    ok = (len(layer) == 5 and all(_is_positive_int(v) for v in layer[1:])
          and layer[2] % 2 == 1 and layer[3] in (1, 2))
    if not ok:
      raise ValueError(
          f"Layer {k}: expected ('residual', features, kernel, activations, "
          f"stride) with an odd kernel and 1 or 2 activations, got {layer}.")
  elif kind == "linear_residual":
    if len(layer) != 2 or not _is_positive_int(layer[1]) or layer[1] % 2 == 0:
      raise ValueError(f"Layer {k}: expected ('linear_residual', kernel) with "
                       f"an odd kernel, got {layer}.")
  elif kind not in ("conv", "dense"):
    raise ValueError(f"Layer {k}: unknown layer kind in {layer}; use 'conv', "
                     "'dense', 'residual' or 'linear_residual'.")


def normalize_spec(spec: Sequence) -> tuple:
  """Validates a residual architecture; returns it as a tuple of tuples."""
  spec = tuple(tuple(models._as_int(v) for v in layer) for layer in spec)  # pylint: disable=protected-access
  if not spec or spec[0][:1] not in (("conv",), ("dense",)):
    raise ValueError("A residual architecture starts with a plain 'conv' or "
                     "'dense' layer (the stem).")
  seen_dense = False
  for k, layer in enumerate(spec):
    _check_layer(k, layer, seen_dense)
    seen_dense = seen_dense or layer[:1] == ("dense",)
  # The plain layers and the last one, checked where they stand (a valid
  # conv in each block's place keeps the error messages' layer numbers).
  models.normalize_spec(tuple(
      ("conv", 1, 1, 1, 0) if layer[0] in ("residual", "linear_residual")
      else layer for layer in spec))
  return spec


def is_residual_spec(spec) -> bool:
  """True if a layer spec list holds a residual kind."""
  return any(layer and layer[0] in ("residual", "linear_residual")
             for layer in spec)


def _same_conv(c_in, features, kernel, stride, *, rngs):
  pad = (kernel - 1) // 2
  init = models._torch_default_init(kernel * kernel * c_in)  # pylint: disable=protected-access
  return nnx.Conv(c_in, features, (kernel, kernel), strides=(stride, stride),
                  padding=((pad, pad), (pad, pad)), kernel_init=init,
                  bias_init=init, rngs=rngs,
                  conv_general_dilated=fast_conv.conv_general_dilated)


def _strided_size(size: int, stride: int) -> int:
  return (size - 1) // stride + 1


class ResidualBlock(nnx.Module):
  """``y = S x + W_m phi(... phi(W_0 x))`` (see the module docstring)."""

  def __init__(self, in_shape, features: int, kernel: int, inner: int,
               stride: int, *, batch_norm: bool, rngs: nnx.Rngs):
    height, width, c_in = in_shape
    self.in_shape = tuple(in_shape)
    self.out_shape = (_strided_size(height, stride),
                      _strided_size(width, stride), features)
    self.stride = stride
    self.kernel = kernel
    convs = [_same_conv(c_in, features, kernel, stride, rngs=rngs)]
    convs += [_same_conv(features, features, kernel, 1, rngs=rngs)
              for _ in range(inner)]
    self.convs = nnx.List(convs)
    needs_projection = stride != 1 or c_in != features
    self.projection = nnx.data(
        _same_conv(c_in, features, 1, stride, rngs=rngs)
        if needs_projection else None)
    self.batch_norm = bool(batch_norm)
    count = len(convs) + (self.projection is not None)
    self.norms = nnx.List([nnx.BatchNorm(features, use_running_average=True,
                                         rngs=rngs)
                           for _ in range(count if batch_norm else 0)])

  def _conv(self, index: int, conv, x):
    y = conv(x)
    return self.norms[index](y) if self.batch_norm else y

  def __call__(self, x, act):
    h = x
    for i, conv in enumerate(self.convs):
      if i:
        h = act(h)
      h = self._conv(i, conv, h)
    shortcut = x if self.projection is None else self._conv(
        len(self.convs), self.projection, x)
    return shortcut + h


class LinearResidualBlock(nnx.Module):
  """``y = x + W x`` with one "same" convolution (LiResNet)."""

  def __init__(self, in_shape, kernel: int, *, batch_norm: bool,
               rngs: nnx.Rngs):
    self.in_shape = self.out_shape = tuple(in_shape)
    self.kernel = kernel
    self.conv = _same_conv(in_shape[-1], in_shape[-1], kernel, 1, rngs=rngs)
    self.batch_norm = bool(batch_norm)
    self.norm = nnx.data(nnx.BatchNorm(in_shape[-1], use_running_average=True,
                                       rngs=rngs) if batch_norm else None)

  def __call__(self, x):
    y = self.conv(x)
    return x + (self.norm(y) if self.batch_norm else y)


class ResidualNet(nnx.Module):
  """Plain layers and residual blocks (see the module docstring).

  Attributes (static): as :class:`lipjax.models.SequentialNet`: ``spec``,
  ``input_shape``, ``num_classes``, ``activation``, ``input_mean``,
  ``input_std``, ``batch_norm``, ``layer_input_shapes``.
  """

  def __init__(self, spec: Sequence, *, num_classes: int,
               input_shape: Sequence[int], rngs: nnx.Rngs,
               activation: str = "relu", input_mean=None, input_std=None,
               batch_norm: bool = False):
    spec = normalize_spec(spec)
    input_shape = tuple(int(d) for d in input_shape)
    if len(input_shape) != 3 or min(input_shape) < 1:
      raise ValueError(f"input_shape must be (H, W, C) with positive sizes, "
                       f"got {input_shape}.")
    if not models._is_int(num_classes) or num_classes < 2:  # pylint: disable=protected-access
      raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}.")
    activations.get_activation(activation)
    mean, std = models._input_normalization(  # pylint: disable=protected-access
        input_mean, input_std, channels=input_shape[-1])
    self.spec = spec
    self.input_shape = input_shape
    self.num_classes = int(num_classes)
    self.activation = activation
    self.input_mean, self.input_std = mean, std
    self.batch_norm = bool(batch_norm)
    layers, norms, shapes = [], [], []
    shape = input_shape
    for k, layer in enumerate(spec):
      shapes.append(shape)
      where = f"Layer {k} {layer}"
      if layer[0] == "conv":
        conv, shape = models._conv_layer(  # pylint: disable=protected-access
            layer, shape, rngs=rngs, where=where, input_shape=input_shape)
        layers.append(conv)
        norms.append(nnx.BatchNorm(shape[-1], use_running_average=True,
                                   rngs=rngs) if batch_norm else None)
      elif layer[0] == "residual":
        block = ResidualBlock(shape, *layer[1:], batch_norm=batch_norm,
                              rngs=rngs)
        layers.append(block)
        norms.append(None)
        shape = block.out_shape
      elif layer[0] == "linear_residual":
        layers.append(LinearResidualBlock(shape, layer[1],
                                          batch_norm=batch_norm, rngs=rngs))
        norms.append(None)
      else:
        fan_in = math.prod(shape)
        features = self.num_classes if layer[1] is None else layer[1]
        init = models._torch_default_init(fan_in)  # pylint: disable=protected-access
        layers.append(nnx.Linear(fan_in, features, kernel_init=init,
                                 bias_init=init, rngs=rngs))
        norms.append(None)
        shape = (features,)
    self.layer_input_shapes = tuple(shapes)
    self.layers = nnx.List(layers)
    self.batch_norms = nnx.List(norms)

  def __call__(self, x: jax.Array) -> jax.Array:
    """Logits ``[batch, num_classes]`` of ``[batch, H, W, C]`` pixels."""
    if tuple(x.shape[1:]) != self.input_shape:
      raise ValueError(f"Model expects images of shape {self.input_shape} "
                       f"(NHWC), got a batch of shape {x.shape}.")
    act = activations.get_activation(self.activation).fn
    x = (x - jnp.asarray(self.input_mean, x.dtype)) / jnp.asarray(
        self.input_std, x.dtype)
    last = len(self.layers) - 1
    for k, (layer_spec, layer) in enumerate(zip(self.spec, self.layers)):
      kind = layer_spec[0]
      if kind == "dense" and x.ndim > 2:
        x = x.reshape(x.shape[0], math.prod(x.shape[1:]))
      if kind == "residual":
        x = layer(x, act)
        continue
      x = layer(x)
      if kind == "conv" and self.batch_norm:
        x = self.batch_norms[k](x)
      if k < last:
        x = act(x)
    return x


def shapes_fit(model: ResidualNet) -> bool:
  """Whether every array of ``model`` has the shape its static attributes
  (spec, input shape, classes) give it: params merged from another network
  may have the same leaves with other shapes. Works on traced params."""
  expected = _expected_shapes(
      model.spec, model.input_shape, model.num_classes, model.activation,
      model.input_mean, model.input_std, model.batch_norm)
  return expected == jax.tree.map(jnp.shape, nnx.state(model))


@functools.lru_cache(maxsize=16)
def _expected_shapes(spec, input_shape, num_classes, activation, input_mean,
                     input_std, batch_norm):
  abstract = nnx.eval_shape(lambda: ResidualNet(
      spec, num_classes=num_classes, input_shape=input_shape,
      rngs=nnx.Rngs(0), activation=activation, input_mean=input_mean,
      input_std=input_std, batch_norm=batch_norm))
  return jax.tree.map(jnp.shape, nnx.state(abstract))
