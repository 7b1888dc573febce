"""The reference's parameter layout and its conversion into lipjax models.

The reference PyTorch code (o4lc/CRM-LipLT) builds every network as one
``nn.Sequential`` attribute called ``linear`` whose children are, in order:
each conv followed by its ReLU, an ``nn.Flatten`` before the first linear
layer, then the linear layers with a ReLU between two of them. Only convs and
linears hold parameters, but the ReLUs and the flatten take indices too, so
its layer state dict holds ``linear.{i}.weight`` and ``linear.{i}.bias`` with
gaps: 2C2F has ``linear.0``, ``linear.2`` (convs), ``linear.5``,
``linear.7`` (linears), and 3F, which starts with the flatten, ``linear.1``,
``linear.3``, ``linear.5``.

The conversion changes the layout, never the function:

* conv weights ``[out, in, kh, kw]`` (OIHW) become ``[kh, kw, in, out]``
  (HWIO); both are cross-correlations with the same symmetric zero padding;
* linear weights ``[out, in]`` become ``[in, out]``;
* the first linear layer reads a ``[C, H, W]`` activation flattened in the
  reference (NCHW) and an ``[H, W, C]`` one here (NHWC), so its input rows
  are permuted to the NHWC order;
* the reference normalizes images in its data loader, lipjax in the model:
  :data:`REFERENCE_NORMALIZATION` gives the reference's per-dataset
  ``Normalize(mean, std)``, which the converted model holds as its
  ``input_mean`` and ``input_std``, so that it takes ``[0, 1]`` pixels.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from lipjax import models

# The reference's data loaders: CIFAR gets transforms.Normalize((0.5,) * 3,
# (0.5,) * 3); MNIST and Tiny-ImageNet only ToTensor(), i.e. [0, 1] pixels.
# It has no Fashion-MNIST loader; a Fashion-MNIST model trained with its
# MNIST pipeline sees [0, 1] pixels as well.
REFERENCE_NORMALIZATION = {
    "mnist": None,
    "fashion_mnist": None,
    "cifar10": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "cifar100": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "tiny_imagenet": None,
}


# Reference names whose layers are a lipjax architecture's on another
# dataset (the reference fixes linear input sizes, lipjax derives them).
REFERENCE_ALIASES = {"6C2FTinyImagenet": "6C2F", "8C2FCIFAR100": "8C2F"}


def layer_keys(spec: Sequence) -> list[str]:
  """The reference's ``nn.Sequential`` prefix of every weight layer.

  Args:
    spec: a lipjax layer spec (see :mod:`lipjax.models`), conv* then dense+.

  Returns:
    One ``"linear.{i}"`` per layer of ``spec``, in order.
  """
  keys, index, flattened = [], 0, False
  for layer in models.normalize_spec(spec):
    if layer[0] == "dense" and not flattened:
      index += 1  # nn.Flatten() takes an index before the first linear.
      flattened = True
    keys.append(f"linear.{index}")
    index += 2  # The layer, then its ReLU (popped after the last layer).
  return keys


def check_architecture(name: str) -> None:
  """One-line ValueError unless ``name`` is a reference architecture."""
  if name in REFERENCE_ALIASES:
    raise ValueError(f"The reference's {name!r} is lipjax's "
                     f"{REFERENCE_ALIASES[name]!r} on another dataset: use "
                     f"{REFERENCE_ALIASES[name]!r} with that dataset.")
  if name not in models.ARCHITECTURES:
    raise ValueError(
        f"Unknown architecture {name!r}; the reference architectures lipjax "
        f"declares are {', '.join(models.ARCHITECTURES)}.")


def check_recorded(recorded: str | None, architecture: str,
                   path: str) -> None:
  """One-line ValueError if a file records another reference architecture.

  Shapes alone cannot tell some apart: the reference's 8C2FOriginal pads its
  second conv where 8C2F does not, with the same weight shapes on 64x64
  inputs.
  """
  if recorded is None or REFERENCE_ALIASES.get(recorded,
                                               recorded) == architecture:
    return
  known = REFERENCE_ALIASES.get(recorded, recorded)
  fix = (f"convert it with --arch {known}" if known in models.ARCHITECTURES
         else "lipjax does not declare that architecture")
  raise ValueError(f"{path} records the reference architecture "
                   f"{recorded!r}, not {architecture!r}: {fix}.")


def _torch_shapes(layer) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """Reference shapes of ``(weight, bias)`` of an nnx Conv or Linear."""
  shape = tuple(layer.kernel.shape)  # Also on an abstract model.
  if len(shape) == 4:  # HWIO -> OIHW
    weight = (shape[3], shape[2], shape[0], shape[1])
  else:  # [in, out] -> [out, in]
    weight = (shape[1], shape[0])
  return weight, (shape[-1],)


def expected_shapes(model: models.SequentialNet) -> dict[str, tuple]:
  """Every reference state-dict key of ``model`` with its torch shape.

  Returns:
    ``{"linear.{i}.weight": shape, "linear.{i}.bias": shape, ...}`` in layer
    order, shapes in the reference's layout (OIHW, ``[out, in]``).
  """
  if model.batch_norm:
    raise ValueError("Reference checkpoints of batch-norm models are not "
                     "supported; convert a model built without batch_norm.")
  shapes = {}
  for key, layer in zip(layer_keys(model.spec), model.layers):
    shapes[f"{key}.weight"], shapes[f"{key}.bias"] = _torch_shapes(layer)
  return shapes


def _listing(names) -> str:
  return ", ".join(names)


def check_state_dict(state: Mapping[str, np.ndarray],
                     expected: Mapping[str, tuple], *, what: str) -> None:
  """One-line ValueError naming every missing, extra and misshaped key.

  Args:
    state: the reference's layer state dict (numpy arrays).
    expected: :func:`expected_shapes` of the target model.
    what: how the message names the target (architecture, input, classes).
  """
  missing = [k for k in expected if k not in state]
  extra = [k for k in state if k not in expected]
  misshaped = [f"{k} {tuple(np.shape(state[k]))} (expected {expected[k]})"
               for k in expected
               if k in state and tuple(np.shape(state[k])) != expected[k]]
  problems = []
  if missing:
    problems.append(f"missing keys {_listing(missing)}")
  if extra:
    problems.append(f"unexpected keys {_listing(extra)}")
  if misshaped:
    problems.append(f"misshaped {_listing(misshaped)}")
  if problems:
    raise ValueError(
        f"The state dict does not fit {what}: {'; '.join(problems)}. Check "
        "the architecture and the dataset (its input shape and number of "
        "classes fix the shapes); `python -m lipjax.interop keys` lists the "
        "expected keys.")
  bad = [k for k in expected if not np.all(np.isfinite(state[k]))]
  if bad:
    raise ValueError(f"Non-finite values in {_listing(bad)}: the checkpoint "
                     "is corrupt or diverged.")


def _nhwc_rows(weight: np.ndarray, chw: tuple[int, int, int]) -> np.ndarray:
  """A ``[out, C*H*W]`` weight (NCHW rows) as ``[H*W*C, out]`` (NHWC rows)."""
  c, h, w = chw
  return weight.reshape(-1, c, h, w).transpose(2, 3, 1, 0).reshape(
      h * w * c, -1)


def load_into(model: models.SequentialNet,
              state: Mapping[str, np.ndarray]) -> None:
  """Sets ``model``'s params to a checked reference layer state dict.

  Args:
    model: the target, built with the reference's architecture (possibly
      abstract, from ``nnx.eval_shape``: every param gets a value).
    state: passed :func:`check_state_dict` against ``model``.
  """
  flattened = False
  for key, spec, layer, shape in zip(layer_keys(model.spec), model.spec,
                                     model.layers, model.layer_input_shapes):
    weight = np.asarray(state[f"{key}.weight"], np.float32)
    if spec[0] == "conv":
      kernel = weight.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    elif not flattened:
      height, width, channels = shape  # The image or the last conv's.
      kernel = _nhwc_rows(weight, (channels, height, width))
      flattened = True
    else:
      kernel = weight.T
    layer.kernel.set_value(jnp.asarray(kernel))
    layer.bias.set_value(jnp.asarray(state[f"{key}.bias"], jnp.float32))


def convert(state: Mapping[str, np.ndarray], architecture: str, *,
            input_shape: Sequence[int], num_classes: int,
            input_mean=None, input_std=None,
            activation: str = "relu") -> models.SequentialNet:
  """A lipjax model computing the same logits as a reference network.

  Args:
    state: the reference's layer state dict, ``linear.{i}.weight`` /
      ``linear.{i}.bias`` as numpy arrays (see :mod:`lipjax.interop.files`
      for reading ``.pth`` and ``.npz`` files).
    architecture: a name in :data:`lipjax.models.ARCHITECTURES`.
    input_shape: ``(H, W, C)`` of one image.
    num_classes: K.
    input_mean, input_std: the reference's per-channel input normalization
      (see :data:`REFERENCE_NORMALIZATION`); default none.
    activation: the reference's activation (its training script uses ReLU).

  Returns:
    A :class:`lipjax.models.SequentialNet` that maps ``[N, H, W, C]`` pixels
    to the logits the reference gives for the same images normalized and in
    NCHW.

  Raises:
    ValueError: an unknown architecture, or keys that do not fit it (one
      line naming every missing, extra and misshaped key).
  """
  check_architecture(architecture)

  def build():
    return models.build(architecture, num_classes=num_classes,
                        input_shape=input_shape, rngs=nnx.Rngs(0),
                        activation=activation, input_mean=input_mean,
                        input_std=input_std)

  # Abstract: no random initialization (seconds for the larger models) of
  # params that load_into replaces anyway.
  model = nnx.eval_shape(build)
  check_state_dict(state, expected_shapes(model),
                   what=f"the reference {architecture} on "
                        f"{tuple(input_shape)} inputs with {num_classes} "
                        "classes")
  load_into(model, state)
  return model
