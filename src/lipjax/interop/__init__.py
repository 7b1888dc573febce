"""Importing models trained with the reference PyTorch code (o4lc/CRM-LipLT).

The reference's architectures 3F, 2C2F, 4C3F, 6C2F and 8C2F are declared in
:data:`lipjax.models.ARCHITECTURES` under the same names. A checkpoint of one
(a ``.pth`` the reference's ``torch.save`` wrote, or an ``.npz`` of its
tensors) converts into a lipjax model with the same logits::

  from lipjax import interop
  model = interop.convert_file("model.pth", "6C2F", dataset="cifar10")

and, from the command line, into a workdir that ``certify.py`` certifies::

  python -m lipjax.interop convert model.pth --arch 6C2F --dataset cifar10 \\
      --workdir runs/ref6c2f
  python certify.py --workdir runs/ref6c2f

Modules: :mod:`~lipjax.interop.layout` (the reference's keys and the layout
conversion), :mod:`~lipjax.interop.files` (reading ``.pth`` / ``.npz``),
:mod:`~lipjax.interop.workdir` (writing a workdir).
"""

from __future__ import annotations

from typing import Sequence

from lipjax import models
from lipjax.interop import files
from lipjax.interop import layout
from lipjax.interop.files import TorchMissingError
from lipjax.interop.files import read_state_dict
from lipjax.interop.layout import REFERENCE_ALIASES
from lipjax.interop.layout import REFERENCE_NORMALIZATION
from lipjax.interop.layout import convert
from lipjax.interop.layout import expected_shapes

__all__ = (
    "REFERENCE_ALIASES",
    "REFERENCE_NORMALIZATION",
    "TorchMissingError",
    "convert",
    "convert_file",
    "dataset_shape",
    "expected_shapes",
    "files",
    "layout",
    "read_state_dict",
)


def dataset_shape(dataset: str) -> tuple[tuple[int, int, int], int]:
  """``(input_shape, num_classes)`` of a dataset the reference trains on.

  Raises:
    ValueError: not one of :data:`REFERENCE_NORMALIZATION`'s datasets.
  """
  if dataset not in REFERENCE_NORMALIZATION:
    raise ValueError(f"Unknown dataset {dataset!r}; choose one of "
                     f"{', '.join(REFERENCE_NORMALIZATION)}.")
  from lipjax.training import data  # pylint: disable=import-outside-toplevel
  info = data.dataset_info(dataset)
  return info.image_shape, info.num_classes


def convert_file(path: str, architecture: str, *, dataset: str,
                 input_mean: Sequence[float] | None = None,
                 input_std: Sequence[float] | None = None,
                 activation: str = "relu") -> models.SequentialNet:
  """Reads a reference checkpoint and converts it for ``dataset``.

  Args:
    path: ``.pth`` / ``.pt`` (needs PyTorch) or ``.npz``.
    architecture: one of :data:`lipjax.models.ARCHITECTURES`.
    dataset: fixes the input shape, the number of classes and, unless
      ``input_mean`` / ``input_std`` are given, the reference's input
      normalization (:data:`REFERENCE_NORMALIZATION`).
    input_mean, input_std: override the normalization (both or neither).
    activation: the reference network's activation.

  Returns:
    The converted :class:`lipjax.models.SequentialNet` (pixel inputs).

  Raises:
    FileNotFoundError, TorchMissingError, ValueError: one line each, before
      any conversion work; ValueError also for a file whose recorded
      reference architecture (``architectureToUse``) is not
      ``architecture`` or one of its :data:`REFERENCE_ALIASES`.
  """
  layout.check_architecture(architecture)
  input_shape, num_classes = dataset_shape(dataset)
  if (input_mean is None) != (input_std is None):
    raise ValueError("Give both input_mean and input_std, or neither (then "
                     f"the reference's {dataset} normalization is used).")
  if input_mean is None and REFERENCE_NORMALIZATION[dataset] is not None:
    input_mean, input_std = REFERENCE_NORMALIZATION[dataset]
  checkpoint = files.read(path)
  layout.check_recorded(checkpoint.architecture, architecture, path)
  return convert(checkpoint.state, architecture, input_shape=input_shape,
                 num_classes=num_classes, input_mean=input_mean,
                 input_std=input_std, activation=activation)
