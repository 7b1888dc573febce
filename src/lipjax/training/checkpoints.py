"""Checkpoints: the only module that imports Orbax.

A :class:`Checkpointer` wraps an Orbax ``CheckpointManager`` under
``workdir/checkpoints``: it saves every ``every_steps`` steps (and when
forced, at the end), keeps the latest ``keep``, and restores a step into an
abstract target of the right shapes and shardings. Each checkpoint holds two
Orbax items: ``default`` (the state) and ``integrity`` (its checksums, see
:mod:`lipjax.training.checkpoint_integrity`), verified on every restore.

A checkpoint written for another state raises
:class:`IncompatibleCheckpointError`; one whose files are unreadable or fail
their checksums raises :class:`CorruptCheckpointError`. Restoring never
changes anything on disk; :meth:`Checkpointer.set_aside` moves a checkpoint
out of the way (it never deletes one).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys

import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from lipjax.training import checkpoint_integrity as integrity

CorruptCheckpointError = integrity.CorruptCheckpointError
_STATE, _CHECKSUMS = "default", "integrity"  # Orbax item names
SET_ASIDE = "checkpoints_set_aside"  # beside checkpoints/, in the workdir


class IncompatibleCheckpointError(RuntimeError):
  """The checkpoint on disk does not match the state this config builds."""


class CheckpointNotFoundError(FileNotFoundError):
  """No checkpoint at all, or not for the step asked for."""


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
    self._manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=(_STATE, _CHECKSUMS))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def should_save(self, step: int) -> bool:
    """Whether the save policy would write ``step``."""
    return self._manager.should_save(int(step))

  def save(self, step: int, state, *, force: bool = False) -> bool:
    """Saves if the policy (or ``force``) says so; returns whether it did.

    The state's checksums are computed here, from the arrays being saved,
    and committed in the same checkpoint.
    """
    if not (force or self.should_save(step)):
      return False
    args = ocp.args.Composite(**{
        _STATE: ocp.args.StandardSave(state),
        _CHECKSUMS: ocp.args.JsonSave(integrity.checksums(state))})
    return self._manager.save(int(step), args=args, force=force)

  def step_dir(self, step: int) -> str:
    return str(self.directory / str(int(step)))

  def restore(self, abstract_state, step: int | None = None):
    """Restores and verifies ``step`` (default latest) into ``abstract_state``.

    Args:
      abstract_state: a pytree of ``jax.ShapeDtypeStruct`` with shardings.
      step: which step; the latest if None.

    Raises:
      CheckpointNotFoundError: no checkpoint (or not that step).
      IncompatibleCheckpointError: it exists but holds another state.
      CorruptCheckpointError: its files are unreadable or the restored
        arrays do not match the checksums saved with them.
    """
    step = self.latest_step() if step is None else int(step)
    if step is None or step not in self.all_steps():
      raise CheckpointNotFoundError(
          f"No checkpoint{'' if step is None else f' for step {step}'} in "
          f"{self.directory} (saved steps: {self.all_steps() or 'none'}).")
    saved = self._read_checksums(step)
    if saved is not None:
      difference = integrity.first_structure_difference(saved, abstract_state)
      if difference:
        raise self._incompatible(step, difference)
    try:
      with _unraisable_dropped():
        state = self._manager.restore(step, args=ocp.args.Composite(**{
            _STATE: ocp.args.StandardRestore(abstract_state)}))[_STATE]
    except Exception as error:  # Orbax and TensorStore raise many types.
      if saved is None:  # Written before checksums: the tree is unchecked.
        raise self._incompatible(
            step, integrity.first_line(error)) from error
      raise self._unreadable(step, error) from error
    if saved is not None:
      integrity.verify(saved, state, step=step, step_dir=self.step_dir(step))
    return state

  def _read_checksums(self, step: int) -> dict | None:
    """The checksum table of ``step``; None for a checkpoint without one."""
    if not (self.directory / str(step) / _CHECKSUMS).exists():
      return None
    try:
      saved = self._manager.restore(step, args=ocp.args.Composite(**{
          _CHECKSUMS: ocp.args.JsonRestore()}))[_CHECKSUMS]
      if not isinstance(saved, dict) or "leaves" not in saved:
        raise ValueError(f"not a checksum table: {str(saved)[:80]}")
    except Exception as error:  # A corrupt JSON file raises many types.
      raise self._unreadable(step, error) from error
    return saved

  def _unreadable(self, step: int, error: Exception) -> CorruptCheckpointError:
    where = integrity.culprit(error, self.step_dir(step))
    return CorruptCheckpointError(
        f"Checkpoint step {step} is unreadable ({where}): "
        f"{integrity.first_line(error)}")

  def _incompatible(self, step: int, why: str) -> IncompatibleCheckpointError:
    return IncompatibleCheckpointError(
        f"The checkpoint {self.step_dir(step)} cannot be restored into the "
        f"state this config builds: {why}. It was probably written with "
        "another architecture, dataset or bound setting: use the config.json "
        "saved in the same workdir, or a new --workdir. Nothing was changed "
        "on disk.")

  def set_aside(self, step: int, reason: str) -> str:
    """Moves checkpoint ``step`` to ``workdir/checkpoints_set_aside``.

    Nothing is deleted: the folder is renamed to ``<step>.<reason>`` there
    (with a counter if that name is taken), so that training can save that
    step again. Process 0 moves it; every process then rereads the steps.

    Returns:
      The new path.
    """
    folder = self.directory.parent / SET_ASIDE
    target = folder / f"{step}.{reason}"
    count = 1
    while target.exists():
      count += 1
      target = folder / f"{step}.{reason}.{count}"
    if jax.process_index() == 0:
      folder.mkdir(parents=True, exist_ok=True)
      (self.directory / str(step)).rename(target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"lipjax set aside {step}")
    self._manager.reload()
    return str(target)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


@contextlib.contextmanager
def _unraisable_dropped():
  """Silences "Exception ignored in" reports while restoring.

  When arrays of a checkpoint cannot be read, Orbax raises the first error
  and Python reports each other failed read coroutine with a 60-line
  TensorStore spec; the raised error already says what is wrong.
  """
  previous = sys.unraisablehook
  sys.unraisablehook = lambda unraisable: None
  try:
    yield
  finally:
    sys.unraisablehook = previous


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
