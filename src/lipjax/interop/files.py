"""Reading the reference's checkpoint files into a flat dict of numpy arrays.

Two inputs:

* ``.npz``: the layer tensors under their state-dict keys
  (``linear.{i}.weight``, ...); numpy alone reads it, no PyTorch needed;
* ``.pth`` / ``.pt``: anything the reference's ``torch.save`` wrote, which
  needs PyTorch (the ``interop`` extra). The reference network's
  ``state_dict`` override returns ``{"original": layer state dict,
  "eigenVectors": ..., "batchEigenVectors": ...}``, and its training script
  saves that alone, under ``"stateDictionary"`` in the final file, or under
  ``"networkStateDictionary"`` in the resumable checkpoint. The last two
  also pickle the run's DataLoaders, which ``torch.load(...,
  weights_only=True)`` refuses; such files are read by an unpickler that
  builds tensors only and replaces every other pickled object by an inert
  placeholder, so no code from the file runs either way.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import types
from typing import Any, Mapping

import numpy as np

# Wrappers the reference's files put around the layer state dict, outermost
# first.
_WRAPPERS = ("stateDictionary", "networkStateDictionary", "original")

_NPZ_HINT = ("or save its layer tensors as .npz where PyTorch is "
             "installed: numpy.savez('model.npz', **{k: v.numpy() for k, v "
             "in net.state_dict()['original'].items()})")


class TorchMissingError(ImportError):
  """A ``.pth`` file was given but PyTorch is not installed."""


@dataclasses.dataclass(frozen=True)
class Checkpoint:
  """What a reference file holds that the conversion uses.

  Attributes:
    state: the layer state dict, ``{"linear.{i}.weight": array, ...}``:
      numpy arrays for tensors, other values as they are (the key check
      then names them).
    architecture: the reference architecture name the file records (its
      ``architectureToUse``), or None (``.npz``, a bare state dict).
  """
  state: dict[str, Any]
  architecture: str | None


def _recorded_architecture(obj: Any) -> str | None:
  """``architectureToUse`` of a final file or a resumable checkpoint."""
  if not isinstance(obj, Mapping):
    return None
  for holder in (obj, obj.get("checkpointDictionary")):
    if isinstance(holder, Mapping) and isinstance(
        holder.get("architectureToUse"), str):
      return holder["architectureToUse"]
  return None


def _unwrap(obj: Any, path: str) -> Mapping:
  """The layer state dict inside a reference file's nested dicts."""
  for key in _WRAPPERS:
    if isinstance(obj, Mapping) and key in obj:
      obj = obj[key]
  if not isinstance(obj, Mapping):
    raise ValueError(f"{path} holds a {type(obj).__name__}, not a state "
                     "dict (a mapping of 'linear.{i}.weight' to tensors).")
  return obj


def _read_npz(path: str) -> dict[str, np.ndarray]:
  try:
    with np.load(path, allow_pickle=False) as archive:
      return {key: archive[key] for key in archive.files}
  except (ValueError, OSError) as error:
    raise ValueError(f"{path} is not a readable .npz file ({error}).") from None


class _Placeholder:
  """Stands for any pickled object that is not a tensor; accepts anything."""

  def __new__(cls, *args, **kwargs):
    del args, kwargs
    return object.__new__(cls)

  def __init__(self, *args, **kwargs):
    del args, kwargs

  def __setstate__(self, state):
    del state

  def __setitem__(self, key, value):
    del key, value

  def append(self, value):
    del value

  def extend(self, values):
    del values

  def add(self, value):
    del value


# The only callables a tensors-only load may run: tensor and parameter
# rebuilding (storages are resolved by torch.load itself) and OrderedDict.
_ALLOWED = {
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
}


class _TensorsOnlyUnpickler(pickle.Unpickler):

  def find_class(self, module, name):
    if (module, name) in _ALLOWED:
      return super().find_class(module, name)
    return type(f"{module}.{name}", (_Placeholder,), {})


_TENSORS_ONLY = types.ModuleType("lipjax_tensors_only_pickle")
_TENSORS_ONLY.Unpickler = _TensorsOnlyUnpickler
_TENSORS_ONLY.load = lambda f, **kw: _TensorsOnlyUnpickler(f, **kw).load()


def _read_pth(path: str) -> Checkpoint:
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise TorchMissingError(
        f"Reading {path} needs PyTorch: pip install 'lipjax[interop]', "
        f"{_NPZ_HINT}.") from None
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError:
    # Python objects besides tensors (the reference's DataLoaders).
    try:
      obj = torch.load(path, map_location="cpu", weights_only=False,
                       pickle_module=_TENSORS_ONLY)
    except Exception as error:  # torch raises many types for a bad file.
      raise ValueError(f"{path} cannot be read as a PyTorch file "
                       f"({type(error).__name__}: {error}).") from None
  except Exception as error:
    raise ValueError(f"{path} cannot be read as a PyTorch file "
                     f"({type(error).__name__}: {error}).") from None
  state = {key: (value.detach().cpu().numpy()
                 if isinstance(value, torch.Tensor) else value)
           for key, value in _unwrap(obj, path).items()}
  return Checkpoint(state, _recorded_architecture(obj))


def read(path: str) -> Checkpoint:
  """The layer state dict in a ``.pth`` or ``.npz`` file, and its metadata.

  Args:
    path: a ``.npz`` of the layer tensors, or a ``.pth`` / ``.pt`` that the
      reference's ``torch.save`` wrote (needs PyTorch).

  Raises:
    FileNotFoundError: no such file.
    TorchMissingError: a ``.pth`` without PyTorch installed.
    ValueError: an unknown suffix or a file that cannot be read.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"No checkpoint file {path}.")
  suffix = os.path.splitext(path)[1].lower()
  if suffix == ".npz":
    return Checkpoint(dict(_unwrap(_read_npz(path), path)), None)
  if suffix in (".pth", ".pt"):
    return _read_pth(path)
  raise ValueError(f"{path}: unknown checkpoint type {suffix!r}; give a "
                   "PyTorch .pth / .pt file or an .npz of its tensors.")


def read_state_dict(path: str) -> dict[str, Any]:
  """Just the layer state dict of :func:`read`."""
  return read(path).state
