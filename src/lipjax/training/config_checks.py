"""Config validation: unknown keys and names get errors that name the fix."""

from __future__ import annotations

import difflib

import ml_collections

from lipjax import activations
from lipjax import bounds
from lipjax import models

_CHOICES = {
    "model.architecture": tuple(models.ARCHITECTURES),
    "model.activation": activations.ACTIVATIONS,
    "bound.method": bounds.METHODS,
    "bound.kind": bounds.KINDS,
    "loss.name": ("crm", "gloro", "lmt", "ce"),
    "loss.form": ("softmax", "max"),
    "optimizer.schedule": ("exponential_with_stopping", "cosine", "constant"),
    "data.name": ("mnist", "fashion_mnist", "cifar10", "cifar100",
                  "tiny_imagenet", "synthetic"),
}


def _flatten(config, prefix=""):
  out = {}
  for key, value in config.items():
    name = f"{prefix}{key}"
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      out.update(_flatten(value, name + "."))
    else:
      out[name] = value
  return out


def validate(config, reference) -> None:
  """Raises ValueError for keys not in ``reference`` or unknown names.

  Args:
    config: the experiment config.
    reference: ``configs/default.py``'s config, which lists every key.
  """
  known = _flatten(reference)
  given = _flatten(config)
  for key in given:
    if key not in known:
      close = difflib.get_close_matches(key, known, n=1)
      hint = f" Did you mean {close[0]!r}?" if close else ""
      raise ValueError(f"Unknown config key {key!r}.{hint} Every key is "
                       "listed, with its meaning, in configs/default.py.")
  for key, choices in _CHOICES.items():
    value = given.get(key)
    if value is not None and value not in choices:
      raise ValueError(f"config.{key} = {value!r} is not one of "
                       f"{', '.join(map(str, choices))}.")
  if given.get("batch_size", 1) < 1 or given.get("num_epochs", 1) < 1:
    raise ValueError("batch_size and num_epochs must be >= 1.")
  eps = given.get("eval.eps", ())
  if any(e < 0 for e in eps):
    raise ValueError(f"eval.eps must be non-negative (pixel units), got {eps}.")


def flatten(config) -> dict:
  """``{"a.b.c": value}`` for a ConfigDict or a plain (JSON) dict."""
  return _flatten(config)
