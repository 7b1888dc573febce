"""Checkpoints: the only module that imports Orbax.

A :class:`Checkpointer` wraps an Orbax ``CheckpointManager`` under
``workdir/checkpoints``: it saves every ``every_steps`` steps (and when
forced, at the end), keeps the latest ``keep``, and restores the latest step
into an abstract target of the right shapes and shardings. A checkpoint that
cannot be read into that target raises :class:`IncompatibleCheckpointError`
and nothing on disk is touched.
"""

from __future__ import annotations

import json
import os

import jax
import orbax.checkpoint as ocp
from etils import epath


class IncompatibleCheckpointError(RuntimeError):
  """The checkpoint on disk does not match the state this config builds."""


class Checkpointer:
  """Save/restore of the training state in ``workdir/checkpoints``."""

  def __init__(self, workdir: str, *, every_steps: int, keep: int):
    if every_steps < 1 or keep < 1:
      raise ValueError("checkpoint.every_steps and checkpoint.keep must be "
                       f">= 1, got {every_steps} and {keep}.")
    workdir = str(workdir)
    if "://" not in workdir:
      workdir = os.path.abspath(workdir)  # Orbax rejects relative paths.
    self.directory = epath.Path(workdir) / "checkpoints"
    policies = ocp.checkpoint_managers
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=policies.FixedIntervalPolicy(every_steps),
        preservation_policy=policies.LatestN(keep),
        create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def should_save(self, step: int) -> bool:
    """Whether the save policy would write ``step``."""
    return self._manager.should_save(int(step))

  def save(self, step: int, state, *, force: bool = False) -> bool:
    """Saves if the policy (or ``force``) says so; returns whether it did."""
    return self._manager.save(int(step), args=ocp.args.StandardSave(state),
                              force=force)

  def restore(self, abstract_state, step: int | None = None):
    """Restores ``step`` (default latest) into ``abstract_state``'s structure.

    Args:
      abstract_state: a pytree of ``jax.ShapeDtypeStruct`` with shardings.
      step: which step; the latest if None.

    Raises:
      FileNotFoundError: no checkpoint (or not that step).
      IncompatibleCheckpointError: it exists but does not fit the target.
    """
    step = self.latest_step() if step is None else int(step)
    if step is None or step not in self.all_steps():
      raise FileNotFoundError(
          f"No checkpoint{'' if step is None else f' for step {step}'} in "
          f"{self.directory} (available: {self.all_steps()}).")
    try:
      return self._manager.restore(
          step, args=ocp.args.StandardRestore(abstract_state))
    except Exception as error:  # Orbax raises many types for a bad tree.
      raise IncompatibleCheckpointError(
          f"The checkpoint {self.directory / str(step)} cannot be restored "
          f"into the state this config builds ({type(error).__name__}: "
          f"{error}). It was probably written with another architecture, "
          "dataset or bound setting: use the config.json saved in the same "
          "workdir, or a new --workdir. Nothing was changed on disk."
      ) from error

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def abstract_like(tree, sharding):
  """ShapeDtypeStructs with ``sharding`` for every array leaf of ``tree``."""
  return jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
      tree)


def write_config(workdir: str, config_json: str) -> None:
  """Writes ``workdir/config.json`` atomically (process 0 calls this)."""
  path = os.path.join(workdir, "config.json")
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(config_json)
  os.replace(tmp, path)


def read_config(workdir: str) -> dict | None:
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)
