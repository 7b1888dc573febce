"""Flax NNX networks built from a declarative architecture.

An architecture is a tuple of layer specs, NHWC throughout:

* ``("conv", features, kernel, stride, padding)``: a 2-D convolution with a
  square kernel and symmetric zero padding;
* ``("dense", features)``: a dense layer (``features=None`` means
  ``num_classes``; the last layer must be dense with ``None``);

followed, for every layer but the last, by the model's activation. A flatten
is inserted before the first dense layer. The named architectures are those of
the reference code (docs/bounds.md#architectures); dense input sizes are
derived from the input shape, and a shape that does not fit (a spatial size
that shrinks below 1) raises an error naming the layer.

The model holds a fixed input normalization ``(x - mean) / std`` per channel,
so that it takes raw ``[0, 1]`` pixels and Lipschitz bounds are in pixel
units. Lipschitz logic lives in :mod:`lipjax.linear_maps`, not here.
"""

from __future__ import annotations

import math
import numbers
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from lipjax import activations, fast_conv


def _conv(features, kernel, stride, padding):
  return ("conv", features, kernel, stride, padding)


ARCHITECTURES = {
    # MNIST MLP of the reference code.
    "3F": (("dense", 100), ("dense", 100), ("dense", None)),
    "2C2F": (_conv(16, 4, 2, 1), _conv(32, 4, 2, 1), ("dense", 100),
             ("dense", None)),
    "4C3F": (_conv(32, 3, 1, 1), _conv(32, 4, 2, 1), _conv(64, 3, 1, 1),
             _conv(64, 4, 2, 1), ("dense", 512), ("dense", 512),
             ("dense", None)),
    "6C2F": (_conv(32, 3, 1, 1), _conv(32, 4, 2, 1), _conv(64, 3, 1, 1),
             _conv(64, 4, 2, 1), _conv(64, 3, 1, 1), _conv(64, 4, 2, 1),
             ("dense", 512), ("dense", None)),
    "8C2F": (_conv(64, 3, 1, 1), _conv(64, 3, 1, 0), _conv(64, 4, 2, 0),
             _conv(128, 3, 1, 1), _conv(128, 3, 1, 1), _conv(128, 4, 2, 0),
             _conv(256, 3, 1, 1), _conv(256, 4, 2, 0), ("dense", 256),
             ("dense", None)),
}


def _torch_default_init(fan_in: int):
  """PyTorch's default U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (docs/bounds.md)."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def _is_int(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _as_int(value):
  return int(value) if _is_int(value) else value


def normalize_spec(spec: Sequence) -> tuple:
  """Validates a layer spec list; returns it as a tuple of tuples."""
  spec = tuple(tuple(_as_int(v) for v in layer) for layer in spec)
  if not spec:
    raise ValueError("An architecture needs at least one layer.")
  seen_dense = False
  for k, layer in enumerate(spec):
    kind = layer[0] if layer else None
    if kind == "conv":
      if seen_dense:
        raise ValueError(f"Layer {k}: a conv after a dense layer is not "
                         "supported (the network is conv* then dense+).")
      if len(layer) != 5 or not all(_is_int(v) and v >= 0
                                    for v in layer[1:]) or min(layer[1:4]) < 1:
        raise ValueError(f"Layer {k}: expected ('conv', features, kernel, "
                         f"stride, padding) with positive ints, got {layer}.")
    elif kind == "dense":
      seen_dense = True
      if len(layer) != 2 or not (layer[1] is None or (
          _is_int(layer[1]) and layer[1] > 0)):
        raise ValueError(f"Layer {k}: expected ('dense', features or None), "
                         f"got {layer}.")
    else:
      raise ValueError(f"Layer {k}: unknown layer kind in {layer}; use "
                       "'conv' or 'dense'.")
  if spec[-1] != ("dense", None):
    raise ValueError("The last layer must be ('dense', None), the logits.")
  return spec


def _input_normalization(input_mean, input_std, *, channels: int
                         ) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Per-channel ``(mean, std)``, defaults 0 and 1, checked."""
  mean = (0.0,) * channels if input_mean is None else tuple(
      float(m) for m in input_mean)
  std = (1.0,) * channels if input_std is None else tuple(
      float(s) for s in input_std)
  if len(mean) != channels or len(std) != channels:
    raise ValueError(f"input_mean and input_std need one value per input "
                     f"channel ({channels}), got {mean} and {std}.")
  if min(std) <= 0:
    raise ValueError(f"input_std must be positive, got {std}.")
  return mean, std


def _conv_layer(layer, shape, *, rngs: nnx.Rngs, where: str, input_shape):
  """An ``nnx.Conv`` for a ``("conv", ...)`` spec on an ``(H, W, C)`` input.

  Its convolution is :func:`lipjax.fast_conv.conv_general_dilated`: the
  same function, with faster gradients on XLA:CPU.

  Returns:
    ``(conv, output_shape)``.
  """
  _, features, kernel, stride, pad = layer
  height, width, c_in = shape
  out_h = (height + 2 * pad - kernel) // stride + 1
  out_w = (width + 2 * pad - kernel) // stride + 1
  if out_h < 1 or out_w < 1:
    raise ValueError(
        f"{where} gets a {height}x{width} input, too small "
        f"for a {kernel}x{kernel} kernel with padding {pad}: the "
        f"architecture does not fit input_shape {input_shape}.")
  init = _torch_default_init(kernel * kernel * c_in)
  conv = nnx.Conv(c_in, features, (kernel, kernel), strides=(stride, stride),
                  padding=((pad, pad), (pad, pad)), kernel_init=init,
                  bias_init=init, rngs=rngs,
                  conv_general_dilated=fast_conv.conv_general_dilated)
  return conv, (out_h, out_w, features)


class SequentialNet(nnx.Module):
  """Conv layers, then dense layers, with one activation between layers.

  Attributes (static, part of the graphdef):
    spec: the normalized architecture.
    input_shape: ``(H, W, C)`` of one image.
    num_classes: K.
    activation: activation name (see :mod:`lipjax.activations`).
    input_mean, input_std: per-channel normalization, length C.
    layer_input_shapes: input shape of each weight layer, as it sees it.
    batch_norm: whether each conv is followed by batch norm.
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
    if not _is_int(num_classes) or num_classes < 2:
      raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}.")
    num_classes = int(num_classes)
    activations.get_activation(activation)  # validates the name
    mean, std = _input_normalization(input_mean, input_std,
                                     channels=input_shape[-1])

    self.spec = spec
    self.input_shape = input_shape
    self.num_classes = num_classes
    self.activation = activation
    self.input_mean = mean
    self.input_std = std
    self.batch_norm = bool(batch_norm)

    layers, norms, shapes = [], [], []
    shape = input_shape
    for k, layer in enumerate(spec):
      shapes.append(shape)
      if layer[0] == "conv":
        conv, shape = _conv_layer(layer, shape, rngs=rngs,
                                  where=f"Layer {k} {layer}",
                                  input_shape=input_shape)
        layers.append(conv)
        if self.batch_norm:
          norms.append(nnx.BatchNorm(shape[-1], use_running_average=True,
                                     rngs=rngs))
      else:
        fan_in = math.prod(shape)
        features = num_classes if layer[1] is None else layer[1]
        init = _torch_default_init(fan_in)
        layers.append(nnx.Linear(fan_in, features, kernel_init=init,
                                 bias_init=init, rngs=rngs))
        shape = (features,)
    self.layer_input_shapes = tuple(shapes)
    self.layers = nnx.List(layers)
    self.batch_norms = nnx.List(norms)

  def __call__(self, x: jax.Array) -> jax.Array:
    """Logits of a batch of images.

    Args:
      x: ``[batch, H, W, C]`` images in pixel units (e.g. ``[0, 1]``).

    Returns:
      ``[batch, num_classes]`` logits.
    """
    if tuple(x.shape[1:]) != self.input_shape:
      raise ValueError(f"Model expects images of shape {self.input_shape} "
                       f"(NHWC), got a batch of shape {x.shape}.")
    act = activations.get_activation(self.activation).fn
    x = (x - jnp.asarray(self.input_mean, x.dtype)) / jnp.asarray(
        self.input_std, x.dtype)
    conv_index = 0
    for k, (layer_spec, layer) in enumerate(zip(self.spec, self.layers)):
      if layer_spec[0] == "dense" and x.ndim > 2:
        # The size, not -1: -1 cannot be inferred for an empty batch.
        x = x.reshape(x.shape[0], math.prod(x.shape[1:]))
      x = layer(x)
      if layer_spec[0] == "conv" and self.batch_norm:
        x = self.batch_norms[conv_index](x)
        conv_index += 1
      if k < len(self.layers) - 1:
        x = act(x)
    return x


def build(architecture: str | Sequence, *, num_classes: int,
          input_shape: Sequence[int], rngs: nnx.Rngs, activation="relu",
          input_mean=None, input_std=None,
          batch_norm: bool = False) -> SequentialNet:
  """Builds a network by name (``ARCHITECTURES``) or from a layer spec.

  Args:
    architecture: ``"3F"``, ``"2C2F"``, ``"4C3F"``, ``"6C2F"``, ``"8C2F"``,
      a residual name (:data:`lipjax.residual_models.ARCHITECTURES`) or a
      sequence of layer specs (see the module docstring; residual kinds in
      :mod:`lipjax.residual_models`).
    num_classes: number of classes K (the last layer's width).
    input_shape: ``(H, W, C)``.
    rngs: ``nnx.Rngs`` for the PyTorch-style uniform initialization.
    activation: one of :data:`lipjax.activations.ACTIVATIONS`.
    input_mean, input_std: per-channel input normalization (default none:
      mean 0, std 1). Its scale ``1/std`` is folded into the bounds.
    batch_norm: add eval-mode batch norm after every conv. Its running
      variance is folded into the bounds, which therefore describe the model
      in eval mode (``model.eval()``), not in training mode.

  Returns:
    A :class:`SequentialNet`, or a
    :class:`lipjax.residual_models.ResidualNet` for a residual spec.

  Raises:
    ValueError: for an unknown name, a malformed spec, or a spec that does not
      fit ``input_shape``.
  """
  # Imported here: residual_models builds on this module.
  from lipjax import residual_models  # pylint: disable=import-outside-toplevel
  if isinstance(architecture, str):
    names = {**ARCHITECTURES, **residual_models.ARCHITECTURES}
    try:
      spec = names[architecture]
    except KeyError:
      raise ValueError(
          f"Unknown architecture {architecture!r}; choose one of "
          f"{', '.join(names)} or pass a list of layer specs."
      ) from None
  else:
    spec = architecture
  if residual_models.is_residual_spec(spec):
    return residual_models.ResidualNet(
        spec, num_classes=num_classes, input_shape=input_shape, rngs=rngs,
        activation=activation, input_mean=input_mean, input_std=input_std,
        batch_norm=batch_norm)
  return SequentialNet(spec, num_classes=num_classes, input_shape=input_shape,
                       rngs=rngs, activation=activation, input_mean=input_mean,
                       input_std=input_std, batch_norm=batch_norm)


def merge(graphdef, *states) -> nnx.Module:
  """``nnx.merge(graphdef, *states)``, refusing params of another network.

  Params restored for another architecture, input shape or number of
  classes than the graphdef's would fail deep inside nnx ("Incorrect number
  of leaves") or in the first layer whose shapes clash; here they raise a
  ValueError that describes both networks. Works on traced params too (only
  shapes are compared).

  Raises:
    ValueError: the states do not fit the graphdef.
  """
  try:
    model = nnx.merge(graphdef, *states)
  except ValueError as error:  # nnx: a different number or kind of leaves.
    raise ValueError(_mismatch_message(graphdef, states)) from error
  if isinstance(model, SequentialNet):
    expected = [_kernel_shape(layer, shape, model.num_classes)
                for layer, shape in zip(model.spec, model.layer_input_shapes)]
    if expected != [tuple(layer.kernel.shape) for layer in model.layers]:
      raise ValueError(_mismatch_message(graphdef, states))
  else:
    # Imported here: residual_models builds on this module.
    from lipjax import residual_models  # pylint: disable=import-outside-toplevel
    if (isinstance(model, residual_models.ResidualNet)
        and not residual_models.shapes_fit(model)):
      raise ValueError(_mismatch_message(graphdef, states))
  return model


def _kernel_shape(layer: tuple, shape: tuple, num_classes: int) -> tuple:
  """The kernel shape a layer spec gets for an input of ``shape``."""
  if layer[0] == "conv":
    return (layer[2], layer[2], shape[-1], layer[1])
  return (math.prod(shape), num_classes if layer[1] is None else layer[1])


def _describe_graphdef(graphdef) -> str:
  """E.g. ``2C2F [conv 16, conv 32, dense 100, dense 3] on (8, 8, 1)``."""
  static = {key: getattr(value, "value", None)
            for key, value in getattr(graphdef, "attributes", ())
            if key in ("spec", "input_shape", "num_classes")}
  spec = static.get("spec")
  if spec is None:  # Not a SequentialNet (or a graphdef layout we do not know).
    return f"a graphdef with {getattr(graphdef, 'num_leaves', '?')} leaves"
  from lipjax import residual_models  # pylint: disable=import-outside-toplevel
  names = {**ARCHITECTURES, **residual_models.ARCHITECTURES}
  name = next((n for n, s in names.items() if s == spec), "custom")
  classes = static.get("num_classes")
  layers = ", ".join(f"{layer[0]} {classes if layer[1] is None else layer[1]}"
                     for layer in spec)
  return f"{name} [{layers}] on {static.get('input_shape')} inputs"


def _describe_states(states) -> str:
  """The kernel shapes found in the states, e.g. ``kernels (64, 100), ...``."""
  kernels = [tuple(leaf.shape) for path, leaf in
             jax.tree_util.tree_flatten_with_path(states)[0]
             if any(getattr(k, "key", None) == "kernel" for k in path)]
  leaves = len(jax.tree.leaves(states))
  if not kernels:
    return f"{leaves} arrays and no layer kernels"
  return (f"{len(kernels)} layers with kernels "
          + ", ".join(str(k) for k in kernels) + f" ({leaves} arrays)")


def _mismatch_message(graphdef, states) -> str:
  return (f"The params do not fit the model: the graphdef describes "
          f"{_describe_graphdef(graphdef)}, but the params hold "
          f"{_describe_states(states)}. Merge params with the graphdef of "
          "the model that produced them (same architecture, input shape "
          "and number of classes).")
