"""Resuming a training workdir: what may change, and from which checkpoint.

* :func:`check_config` refuses a config that would change the run's data,
  batches or model (it runs before anything in the workdir is written).
* :func:`check_requested_step` refuses ``--checkpoint`` where nothing was
  saved, before the workdir is created.
* :func:`restore` restores the requested step, or else the newest intact
  checkpoint: a corrupt one is named, moved aside (never deleted) and the
  run falls back to the one before.
* :func:`metrics_to_keep` says which ``metrics.jsonl`` records a run
  resumed at a step keeps, so that no step is logged twice.
"""

from __future__ import annotations

import os

from lipjax.progress import log
from lipjax.training import checkpoints
from lipjax.training import config_checks

# Config keys (and subtrees) a resumed run must share with the saved
# config.json: they fix the examples, their order and augmentation, and the
# model. Everything else (epochs, loss, optimizer, evaluation...) may change.
FIXED_ON_RESUME = ("seed", "batch_size", "data", "model", "bound.method",
                   "bound.kind")
# Where the data is read from, not which data.
FREE_ON_RESUME = ("data.data_dir", "data.download")


class ConfigChangedError(ValueError):
  """The config changes the data, batches or model of the saved run."""


def json_normalize(value):
  """Tuples and lists compare equal after a JSON round trip."""
  if isinstance(value, (list, tuple)):
    return [json_normalize(v) for v in value]
  if isinstance(value, dict):
    return {k: json_normalize(v) for k, v in value.items()}
  return value


def _is_fixed(key: str) -> bool:
  return key not in FREE_ON_RESUME and any(
      key == fixed or key.startswith(fixed + ".") for fixed in FIXED_ON_RESUME)


def check_config(workdir: str, config) -> None:
  """Raises ConfigChangedError if ``config`` changes a fixed key.

  Keys missing from the saved config.json (added to lipjax since that run
  started) are not compared.
  """
  saved = checkpoints.read_config(workdir)
  if saved is None:
    return
  old = config_checks.flatten(saved)
  new = config_checks.flatten(config.to_dict())
  for key in sorted(set(old) | set(new)):
    if not _is_fixed(key) or key not in old:
      continue
    if json_normalize(old[key]) != json_normalize(new.get(key)):
      raise ConfigChangedError(
          f"{workdir} holds a run with {key} = {old[key]!r}, but this config "
          f"has {key} = {new.get(key)!r}, which changes the run's data, "
          f"batches or model. Resume with the saved value (see "
          f"{workdir}/config.json) or use a new --workdir. Nothing was "
          "changed on disk.")


def check_requested_step(workdir: str, step: int | None) -> None:
  """Refuses ``--checkpoint`` for a workdir that holds no checkpoints.

  Checked before the workdir is created, which would leave it behind
  (``gs://``-style workdirs are left to :func:`restore`).
  """
  if (step is not None and "://" not in workdir
      and not os.path.isdir(os.path.join(workdir, "checkpoints"))):
    raise checkpoints.CheckpointNotFoundError(
        f"--checkpoint {step}: {workdir} holds no checkpoints (saved steps: "
        "none); drop --checkpoint to start a new run there.")


def _restore_requested(checkpointer, abstract_state, step: int):
  saved = sorted(checkpointer.all_steps())
  if step not in saved:
    raise checkpoints.CheckpointNotFoundError(
        f"--checkpoint {step}: there is no such checkpoint in "
        f"{checkpointer.directory} (saved steps: "
        f"{', '.join(map(str, saved)) or 'none'}).")
  try:
    state = checkpointer.restore(abstract_state, step)
  except checkpoints.CorruptCheckpointError as error:
    others = ", ".join(str(s) for s in saved if s != step) or "none"
    raise checkpoints.CorruptCheckpointError(
        f"{error} Nothing was changed on disk; resume from another step "
        f"with --checkpoint (saved: {others}), or drop --checkpoint to fall "
        "back to the newest intact one.") from error
  for later in (s for s in saved if s > step):
    path = checkpointer.set_aside(later, "superseded")
    log(f"Checkpoint step {later} is after --checkpoint {step}: moved to "
        f"{path} (kept, not deleted).")
  return state


def restore(checkpointer, abstract_state, *, step: int | None = None):
  """Restores ``step``, or the newest intact checkpoint; None if none.

  With ``step``, the checkpoints after it are moved aside (training saves
  those steps again). Without, a corrupt checkpoint is reported in one
  line, moved to ``checkpoints_set_aside/<step>.corrupt`` once an older
  intact one restored, and the run goes on from that one.

  Raises:
    CheckpointNotFoundError: ``step`` was not saved (the message lists the
      saved steps).
    CorruptCheckpointError: ``step`` is corrupt, or every checkpoint is
      (then nothing is moved).
    IncompatibleCheckpointError: a checkpoint holds another state.
  """
  if step is not None:
    return _restore_requested(checkpointer, abstract_state, int(step))
  corrupt = []
  for saved in sorted(checkpointer.all_steps(), reverse=True):
    try:
      state = checkpointer.restore(abstract_state, saved)
    except checkpoints.CorruptCheckpointError as error:
      log(f"warning: {error}")
      corrupt.append(saved)
      continue
    for bad in corrupt:
      path = checkpointer.set_aside(bad, "corrupt")
      log(f"Falling back to checkpoint step {saved}, the newest intact one; "
          f"the corrupt step {bad} is kept in {path}.")
    return state
  if corrupt:
    raise checkpoints.CorruptCheckpointError(
        f"Every checkpoint in {checkpointer.directory} is corrupt (steps "
        f"{', '.join(map(str, corrupt))}; see above) and was left in place: "
        "train again in a new --workdir.")
  return None


def metrics_to_keep(step: int, *, redo_test: bool):
  """Which records a run resumed at ``step`` keeps in ``metrics.jsonl``.

  Everything logged after the checkpoint goes: the resumed run logs those
  steps again. So does a final test record at ``step`` when the run will
  evaluate the test split again (``redo_test``).
  """

  def keep(record: dict) -> bool:
    if record.get("step", 0) > step:
      return False
    return not (redo_test and record.get("kind") == "test"
                and record.get("step") == step)

  return keep
