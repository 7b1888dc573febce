"""Writing a converted model as a workdir that ``certify.py`` restores.

A workdir is what ``train.py`` writes: ``config.json`` and an Orbax
checkpoint of the whole training state under ``checkpoints/``. A converted
model gets a step-0 checkpoint of a fresh training state whose params are
the converted ones (Adam moments zero, power-iteration vectors random, which
certification never uses), and the dataset's config with ``model`` set to
the converted architecture and normalization. ``certify.py`` then restores
it like any trained run, and ``train.py`` on the same workdir would
fine-tune it with the config's recipe.

The workdir appears whole or not at all: everything is written to a
temporary sibling folder that is renamed at the end.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import shutil
import uuid

import jax
import ml_collections
from flax import nnx

from lipjax import models
from lipjax.training import checkpoints
from lipjax.training import config_checks
from lipjax.training import data
from lipjax.training import steps


def recipe(name: str) -> ml_collections.ConfigDict:
  """The config ``configs/<name>.py``: a dataset's recipe, or ``default``.

  Raises:
    ValueError: ``configs/`` is not importable (run from the repository
      root) or has no such file.
  """
  try:
    module = importlib.import_module(f"configs.{name}")
  except ModuleNotFoundError as error:
    raise ValueError(f"Cannot import configs.{name} ({error}): run from "
                     "the lipjax repository root, where configs/ is.") from None
  return module.get_config()


def check_empty(workdir: str) -> None:
  """Refuses a workdir that exists and holds anything (nothing is lost)."""
  if os.path.exists(workdir) and (not os.path.isdir(workdir)
                                  or os.listdir(workdir)):
    raise FileExistsError(f"{workdir} already exists and is not empty; "
                          "choose a new --workdir (nothing was written).")


def _model_config(config, architecture: str, model: models.SequentialNet):
  """A copy of ``config`` whose ``model`` section builds ``model``."""
  if models.ARCHITECTURES.get(architecture) != model.spec:
    raise ValueError(f"The model is not lipjax's {architecture!r}.")
  config = config.copy_and_resolve_references()
  config.model.architecture = architecture
  config.model.activation = model.activation
  config.model.input_mean = tuple(model.input_mean)
  config.model.input_std = tuple(model.input_std)
  config.model.batch_norm = model.batch_norm
  return config


def _check_data(config, model: models.SequentialNet) -> None:
  """The config's dataset has the model's input shape and class count."""
  if config.data.name == "synthetic":
    s = config.data.synthetic
    shape, classes = tuple(s.image_shape), s.num_classes
  else:
    info = data.dataset_info(config.data.name)
    shape, classes = info.image_shape, info.num_classes
  if (tuple(shape), classes) != (model.input_shape, model.num_classes):
    raise ValueError(
        f"{config.data.name} has {tuple(shape)} images and {classes} classes, "
        f"the model takes {model.input_shape} and gives {model.num_classes}.")


def _train_state(config, model: models.SequentialNet):
  """A fresh training state built as ``train.py`` builds it, with
  ``model``'s params and other state."""
  # The schedule's length does not change the optimizer state's structure.
  tx = steps.make_optimizer(config, steps.make_learning_rate(config, 1))
  init_fn = steps.make_init_fn(config, tx, input_shape=model.input_shape,
                               num_classes=model.num_classes)
  state = jax.jit(init_fn)()
  _, params, rest = nnx.split(model, nnx.Param, ...)
  if (jax.tree.structure(params) != jax.tree.structure(state.params)
      or jax.tree.structure(rest) != jax.tree.structure(state.rest)):
    raise ValueError("The converted model's state does not have the "
                     "structure the config builds.")
  return dataclasses.replace(state, params=params, rest=rest)


def write(model: models.SequentialNet, architecture: str, config,
          workdir: str) -> str:
  """Writes ``model`` as a workdir that ``certify.py`` can restore.

  Args:
    model: e.g. from :func:`lipjax.interop.convert`.
    architecture: its name in :data:`lipjax.models.ARCHITECTURES`.
    config: the recipe (e.g. :func:`recipe`); its ``model`` section
      is replaced by the model's architecture, activation and
      normalization, the rest is kept.
    workdir: a new (or empty) folder.

  Returns:
    The absolute workdir path.

  Raises:
    FileExistsError: ``workdir`` holds files (nothing is written).
    ValueError: the config is invalid or its dataset does not fit the model.
  """
  workdir = os.path.abspath(workdir)  # Orbax needs absolute paths.
  check_empty(workdir)
  config = _model_config(config, architecture, model)
  config_checks.validate(config, recipe("default"))
  _check_data(config, model)
  state = _train_state(config, model)
  parent = os.path.dirname(workdir)
  os.makedirs(parent, exist_ok=True)
  partial = os.path.join(
      parent, f".{os.path.basename(workdir)}.partial-{uuid.uuid4().hex[:8]}")
  os.makedirs(partial)  # With the umask's permissions, unlike mkdtemp.
  try:
    with checkpoints.Checkpointer(
        partial, every_steps=config.checkpoint.every_steps,
        keep=config.checkpoint.keep) as checkpointer:
      checkpointer.save(0, state, force=True)
    checkpoints.write_config(partial, config.to_json_best_effort(indent=2))
    os.replace(partial, workdir)  # Fails if workdir was filled meanwhile.
  except BaseException:
    shutil.rmtree(partial, ignore_errors=True)
    raise
  return workdir
