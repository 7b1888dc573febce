"""Config validation: unknown keys, names and values get errors naming the fix.

:func:`validate` runs before a training run touches its workdir, so that a
value that could only fail later (a zero logging interval, a zero
temperature, a radius that is not a number) is refused in the first second,
not minutes in.
"""

from __future__ import annotations

import difflib
import math
import numbers

import ml_collections

from lipjax import activations
from lipjax import bounds
from lipjax import models
from lipjax import residual_models

_CHOICES = {
    "model.architecture": (tuple(models.ARCHITECTURES)
                           + tuple(residual_models.ARCHITECTURES)),
    "model.activation": activations.ACTIVATIONS,
    "bound.method": bounds.METHODS,
    "bound.kind": bounds.KINDS,
    "loss.name": ("crm", "gloro", "lmt", "ce"),
    "loss.form": ("softmax", "max"),
    "optimizer.schedule": ("exponential_with_stopping", "cosine", "constant"),
    "data.name": ("mnist", "fashion_mnist", "cifar10", "cifar100",
                  "tiny_imagenet", "synthetic"),
}


def flatten(config, prefix="") -> dict:
  """``{"a.b": value}`` for every leaf of a (nested) config."""
  out = {}
  for key, value in config.items():
    name = f"{prefix}{key}"
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      out.update(flatten(value, name + "."))
    else:
      out[name] = value
  return out


def _is_number(value, *, integer: bool = False) -> bool:
  kind = numbers.Integral if integer else numbers.Real
  return (isinstance(value, kind) and not isinstance(value, bool)
          and math.isfinite(value))


def _range(low, high=None, *, integer=False, above=False, optional=False):
  """A check ``value -> bool`` and what it requires, e.g. "an integer >= 1".

  ``low`` is inclusive unless ``above``; ``high`` is exclusive.
  """
  def ok(value):
    if value is None:
      return optional
    return (_is_number(value, integer=integer)
            and (value > low if above else value >= low)
            and (high is None or value < high))
  text = ("an integer" if integer else "a finite number") + (
      f" > {low}" if above else f" >= {low}") + (
          "" if high is None else f" and < {high}") + (
              " (or None)" if optional else "")
  return ok, text


# Values that would only fail later (many only minutes into a run), as
# ``key: (check, requirement)``.
_COUNT, _FRACTION = _range(1, integer=True), _range(0, 1)
_NON_NEGATIVE, _POSITIVE = _range(0), _range(0, above=True)
RANGES = {
    "seed": _range(0, integer=True), "batch_size": _COUNT,
    "num_epochs": _COUNT, "log_every_steps": _COUNT,
    "data.validation_fraction": _FRACTION,
    "data.split_seed": _range(0, integer=True),
    "data.max_train_examples": _range(1, integer=True, optional=True),
    "data.max_test_examples": _range(1, integer=True, optional=True),
    "data.augment.rotation_degrees": _NON_NEGATIVE,
    "data.augment.translate": _FRACTION,
    "data.synthetic.num_train": _COUNT,
    "data.synthetic.num_test": _range(0, integer=True),
    "data.synthetic.num_classes": _range(2, integer=True),
    "data.synthetic.seed": _range(0, integer=True),
    "bound.power_iterations": _range(0, integer=True),
    "bound.large_class_threshold": _range(2, integer=True),
    "loss.t": _POSITIVE, "loss.lam": _NON_NEGATIVE,
    "loss.lam_multiplier": _POSITIVE, "loss.lam_max": _NON_NEGATIVE,
    "loss.r0": _NON_NEGATIVE, "loss.r0_multiplier": _POSITIVE,
    "loss.r0_max": _NON_NEGATIVE,
    "loss.robust_start_epoch": _range(0, integer=True),
    "loss.train_eps": _NON_NEGATIVE,
    "loss.gloro_lam_initial": _NON_NEGATIVE,
    "loss.gloro_lam_final": _NON_NEGATIVE,
    "loss.lmt_mu_initial": _NON_NEGATIVE, "loss.lmt_mu_growth": _POSITIVE,
    "loss.lmt_mu_max": _NON_NEGATIVE,
    "optimizer.learning_rate": _POSITIVE,
    "optimizer.end_learning_rate": _NON_NEGATIVE,
    "optimizer.decay_start_epoch": _range(0, integer=True),
    "optimizer.warmup_epochs": _range(0, integer=True),
    "optimizer.b1": _FRACTION, "optimizer.b2": _FRACTION,
    "optimizer.eps": _POSITIVE,
    "eval.every_epochs": _COUNT, "eval.batch_size": _COUNT,
    "eval.power_iterations": _range(0, integer=True),
    "checkpoint.every_steps": _COUNT, "checkpoint.keep": _COUNT,
    # The divergence guard: a growth factor <= 1 would stop a healthy run
    # at its first step whose bound grows at all.
    "checkpoint.max_lipschitz": _POSITIVE,
    "checkpoint.max_lipschitz_growth": _range(1, above=True),
}


def unknown_key_message(key: str, known) -> str:
  """``Unknown config key ...``, with the closest known key if there is one.

  A close full path wins (``optimizer.lerning_rate``); otherwise a key
  whose last part is close (``learning_rate`` -> ``optimizer.learning_rate``).
  """
  known = sorted(known)
  close = difflib.get_close_matches(key, known, n=1)
  if not close:
    by_name = {k.rsplit(".", 1)[-1]: k for k in known}
    names = difflib.get_close_matches(key.rsplit(".", 1)[-1], by_name, n=1)
    close = [by_name[n] for n in names]
  hint = f" Did you mean {close[0]!r}?" if close else ""
  return (f"Unknown config key {key!r}.{hint} Every key is listed, with its "
          "meaning, in configs/default.py.")


def _check_values(given: dict, defaults: dict) -> None:
  """Raises ValueError naming the first value outside its range."""
  for key, (ok, requirement) in RANGES.items():
    if key in given and not ok(given[key]):
      raise ValueError(
          f"config.{key} = {given[key]!r} must be {requirement} (the "
          f"default is {defaults.get(key)!r}; --config.{key}=VALUE).")
  eps = given.get("eval.eps", ())
  if not all(_is_number(e) and e >= 0 for e in eps):
    raise ValueError(f"config.eval.eps = {eps!r} must be finite radii >= 0 "
                     "(pixel units), e.g. --config.eval.eps=0.1,0.5.")
  shape = given.get("data.synthetic.image_shape", (1, 1, 1))
  if len(shape) != 3 or not all(_is_number(d, integer=True) and d >= 1
                                for d in shape):
    raise ValueError(f"config.data.synthetic.image_shape = {shape!r} must be "
                     "(H, W, C) with positive integers, e.g. (8, 8, 1).")


def validate(config, reference) -> None:
  """Raises ValueError for unknown keys or names and values out of range.

  Args:
    config: the experiment config.
    reference: ``configs/default.py``'s config, which lists every key.
  """
  known = flatten(reference)
  given = flatten(config)
  for key in given:
    if key not in known:
      raise ValueError(unknown_key_message(key, known))
  for key, choices in _CHOICES.items():
    value = given.get(key)
    if value is not None and value not in choices:
      raise ValueError(f"config.{key} = {value!r} is not one of "
                       f"{', '.join(map(str, choices))}.")
  _check_values(given, known)
