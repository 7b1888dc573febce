"""Restoring a training workdir for certification, without writing to it.

:func:`restore` reads ``config.json`` and an Orbax checkpoint of a workdir
that ``train.py`` wrote, and returns the model (graphdef, params and the rest
of its state), the saved power-iteration vectors and the datasets. The
abstract state is built exactly as training builds it, so a checkpoint that
does not match its ``config.json`` is refused.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import ml_collections
from flax import nnx

from lipjax import power_iteration
from lipjax.training import batches
from lipjax.training import checkpoints
from lipjax.training import data
from lipjax.training import parallel
from lipjax.training import steps


@dataclasses.dataclass(frozen=True)
class Restored:
  """A restored training run (host arrays)."""
  workdir: str
  config: ml_collections.ConfigDict
  step: int
  graphdef: Any
  params: nnx.State
  rest: nnx.State
  power: power_iteration.PowerState
  datasets: dict[str, data.Dataset]

  @property
  def model(self):
    return nnx.merge(self.graphdef, self.params, self.rest)


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """``workdir/config.json`` as a ConfigDict (JSON lists stand for tuples).

  Raises:
    FileNotFoundError: no such workdir, or no config.json in it.
  """
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"The workdir {workdir} does not exist.")
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"{path} not found: {workdir} is not a lipjax training workdir "
        "(train.py writes config.json when it starts).")
  with open(path, encoding="utf-8") as f:
    return ml_collections.ConfigDict(json.load(f))


def restore(workdir: str, *, checkpoint: int | None = None,
            data_dir: str | None = None) -> Restored:
  """Restores config, model, power state and datasets of a workdir.

  The abstract state is built exactly as training builds it, so a
  checkpoint that does not match its config.json fails with
  :class:`lipjax.training.checkpoints.IncompatibleCheckpointError`, and one
  whose files are unreadable or fail their checksums with
  :class:`lipjax.training.checkpoints.CorruptCheckpointError`. Nothing is
  written to the workdir.

  Args:
    workdir: a training workdir (absolute or relative).
    checkpoint: the step to restore; the latest if None.
    data_dir: TFDS data_dir overriding the saved config's.

  Raises:
    FileNotFoundError: the workdir, config.json or the checkpoint is missing
      (the message names the path and the available steps).
  """
  workdir = os.path.abspath(workdir)  # Orbax needs absolute paths.
  config = load_config(workdir)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(ckpt_dir):
    # Checked here: Checkpointer() would create the folder.
    raise FileNotFoundError(f"No checkpoints folder {ckpt_dir}: the run "
                            "has not saved a checkpoint yet.")
  checkpointer = checkpoints.Checkpointer(
      workdir, every_steps=config.checkpoint.every_steps,
      keep=config.checkpoint.keep)
  try:
    saved_steps = checkpointer.all_steps()
    step = checkpointer.latest_step() if checkpoint is None else checkpoint
    if step is None or step not in saved_steps:  # Before the long data load.
      raise FileNotFoundError(
          f"No checkpoint{'' if step is None else f' for step {step}'} in "
          f"{ckpt_dir} (available: {sorted(saved_steps)}).")
    d = config.data
    datasets = data.load(
        d.name, data_dir=data_dir or d.data_dir, download=False,
        validation_fraction=d.validation_fraction, split_seed=d.split_seed,
        synthetic=d.synthetic.to_dict() if "synthetic" in d else None,
        max_train_examples=d.max_train_examples,
        max_test_examples=d.max_test_examples)
    train = datasets["train"]
    input_shape = tuple(train.images.shape[1:])
    # The learning-rate schedule does not change the optimizer state's
    # structure, but it is built exactly as training builds it anyway.
    steps_per_epoch = batches.num_steps_per_epoch(len(train), config.batch_size)
    tx = steps.make_optimizer(config, steps.make_learning_rate(config,
                                                         steps_per_epoch))
    init_fn = steps.make_init_fn(config, tx, input_shape=input_shape,
                              num_classes=train.num_classes)
    replicated = parallel.replicated(parallel.make_mesh())
    abstract = checkpoints.abstract_like(jax.eval_shape(init_fn),
                                           replicated)
    try:
      state = checkpointer.restore(abstract, step)
    except checkpoints.CorruptCheckpointError as error:
      others = ", ".join(str(s) for s in sorted(saved_steps) if s != step)
      raise checkpoints.CorruptCheckpointError(
          f"{error} Nothing was certified; certify another step with "
          f"--checkpoint (saved: {others or 'none'}).") from error
  finally:
    checkpointer.close()
  graphdef = steps.make_graphdef(config, input_shape=input_shape,
                              num_classes=train.num_classes)
  return Restored(workdir=workdir, config=config,
                  step=int(jax.device_get(state.step)), graphdef=graphdef,
                  params=jax.device_get(state.params),
                  rest=jax.device_get(state.rest),
                  power=jax.device_get(state.power), datasets=datasets)
