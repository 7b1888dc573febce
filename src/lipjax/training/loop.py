"""``train_and_evaluate(config, workdir)``: the training loop.

Data-parallel over every device of every process, resumable after
preemption (a restarted run with the same workdir continues from the newest
intact checkpoint and sees exactly the batches it would have seen; see
:mod:`lipjax.training.resume`), with progress bars, JSONL metrics, per-epoch
validation and a final test evaluation. One process at a time trains in a
workdir (:mod:`lipjax.training.workdir_lock`), and a checkpoint is saved only
from a healthy step (finite loss and parameters, a sane bound).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

import lipjax
from lipjax.progress import log, progress_bar
from lipjax.training import batches
from lipjax.training import checkpoints
from lipjax.training import config_checks
from lipjax.training import data
from lipjax.training import health
from lipjax.training import metrics
from lipjax.training import parallel
from lipjax.training import resume
from lipjax.training import steps
from lipjax.training import workdir_lock


NonFiniteLossError = health.NonFiniteLossError


def _default_config():
  from configs import default  # pylint: disable=import-outside-toplevel
  return default.get_config()


def _load_data(config):
  d = config.data
  datasets = data.load(d.name, data_dir=d.data_dir, download=d.download,
                       validation_fraction=d.validation_fraction,
                       split_seed=d.split_seed,
                       synthetic=d.synthetic.to_dict(),
                       max_train_examples=d.max_train_examples,
                       max_test_examples=d.max_test_examples)
  train = datasets["train"]
  input_shape = tuple(train.images.shape[1:])
  return datasets, input_shape, train.num_classes


@jax.jit
def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x))
                              for x in jax.tree.leaves(tree)]))


def evaluate(config, graphdef, state, dataset, lip, *, eval_step,
             sharding) -> dict:
  """Clean and certified accuracy of ``dataset`` under bound ``lip``."""
  eps = tuple(config.eval.eps)
  totals = None
  for batch in batches.eval_batches(dataset, batch_size=config.eval.batch_size,
                                 process_index=jax.process_index(),
                                 process_count=jax.process_count()):
    sums = eval_step(state.params, state.rest, lip,
                     parallel.to_global(batch, sharding))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  if totals is None:
    return {}
  totals = jax.device_get(totals)
  count = max(int(totals["count"]), 1)
  result = {"count": int(totals["count"]),
            "clean_accuracy": float(totals["correct"]) / count,
            "mean_radius": float(totals["radius_sum"])
                           / max(float(totals["correct"]), 1.0)}
  for e, c in zip(eps, np.asarray(totals["certified"]).reshape(-1)):
    result[f"certified_accuracy@{e:g}"] = float(c) / count
  return result


@dataclasses.dataclass
class _Run:
  """Everything a training run sets up once, before its first step.

  ``kept_records`` are the ``metrics.jsonl`` records kept from before the
  resume (process 0 only); ``last_good_step`` is the last step the
  divergence guard found healthy.
  """
  config: ml_collections.ConfigDict
  workdir: str
  datasets: dict
  steps_per_epoch: int
  total_steps: int
  batch_sharding: Any
  graphdef: Any
  checkpointer: checkpoints.Checkpointer
  train_step: Callable
  eval_lipschitz: Callable
  eval_step: Callable
  kept_records: list
  last_good_step: int = 0
  last_good_lipschitz: float | None = None


def _lock_workdir(workdir: str):
  """Process 0 locks the workdir; every process raises if it cannot."""
  lock, error = None, None
  if parallel.is_main_process() and "://" not in workdir:
    try:
      lock = workdir_lock.WorkdirLock(workdir).acquire()
    except workdir_lock.WorkdirLockedError as e:
      error = e
  if jax.process_count() > 1:
    locked = int(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
    if not locked and error is None:
      error = workdir_lock.WorkdirLockedError(
          f"Process 0 found {workdir} in use by another train.py.")
  if error is not None:
    raise error
  return lock


def _restore_or_init(config, checkpointer, init_fn, replicated, checkpoint):
  """The requested or newest intact checkpoint's state, else a fresh one."""
  abstract = checkpoints.abstract_like(jax.eval_shape(init_fn), replicated)
  state = resume.restore(checkpointer, abstract, step=checkpoint)
  if state is None:
    return jax.jit(init_fn, out_shardings=replicated)()
  log(f"Resuming from checkpoint step {int(state.step)} in "
      f"{checkpointer.directory}")
  return state


def _set_up(config, workdir: str, checkpoint: int | None,
            cleanup: contextlib.ExitStack):
  """Checks, loads data, builds the jitted steps; restores or inits.

  Nothing is written (the workdir is not even created) until the config,
  the data and the model are known to be good.

  Returns:
    ``(run, state)``: the :class:`_Run` and the initial (or restored) train
    state, replicated over the mesh. ``cleanup`` closes the checkpointer
    and releases the workdir lock.
  """
  # Read-only, so a refused resume costs no data loading.
  resume.check_config(workdir, config)
  resume.check_requested_step(workdir, checkpoint)
  parallel.check_global_batch(config.batch_size)

  datasets, input_shape, num_classes = _load_data(config)
  train = datasets["train"]
  steps_per_epoch = batches.num_steps_per_epoch(len(train.labels),
                                                config.batch_size)
  mesh = parallel.make_mesh()
  replicated = parallel.replicated(mesh)
  log(f"lipjax: {jax.process_count()} process(es), {jax.device_count()} "
      f"{jax.devices()[0].platform} device(s); {config.data.name} "
      f"{input_shape} x{len(train.labels)}, {num_classes} classes; "
      f"{config.model.architecture}, loss {config.loss.name}, bound "
      f"{config.bound.method}/{config.bound.kind}; {steps_per_epoch} "
      f"steps/epoch x {config.num_epochs} epochs")

  learning_rate = steps.make_learning_rate(config, steps_per_epoch)
  tx = steps.make_optimizer(config, learning_rate)
  init_fn = steps.make_init_fn(config, tx, input_shape=input_shape,
                               num_classes=num_classes)
  graphdef = steps.make_graphdef(config, input_shape=input_shape,
                                 num_classes=num_classes)
  checkpointer, state, kept = _open_workdir(
      config, workdir, checkpoint, cleanup, init_fn=init_fn,
      replicated=replicated, total_steps=steps_per_epoch * config.num_epochs)

  run = _Run(
      config=config, workdir=workdir, datasets=datasets,
      steps_per_epoch=steps_per_epoch,
      total_steps=steps_per_epoch * config.num_epochs,
      batch_sharding=parallel.data_sharded(mesh), graphdef=graphdef,
      checkpointer=checkpointer,
      train_step=jax.jit(
          steps.make_train_step(config, graphdef, tx, learning_rate,
                                steps_per_epoch=steps_per_epoch),
          donate_argnums=0, out_shardings=(replicated, replicated)),
      eval_lipschitz=jax.jit(steps.make_eval_lipschitz(config, graphdef),
                             out_shardings=replicated),
      eval_step=jax.jit(steps.make_eval_step(config, graphdef),
                        out_shardings=replicated),
      kept_records=kept, last_good_step=int(jax.device_get(state.step)))
  return run, state


def _open_workdir(config, workdir: str, checkpoint: int | None,
                  cleanup: contextlib.ExitStack, *, init_fn, replicated,
                  total_steps: int):
  """Creates and locks the workdir, then restores or inits the state.

  Called once the config, the data and the model are known to be good, so
  that a refused run leaves no empty workdir behind. The lock comes before
  anything else is written into the workdir, and the resume checks before
  ``config.json`` is (re)written. A run resumed at ``total_steps``
  evaluates the test split again.

  Returns:
    ``(checkpointer, state, kept metrics records)``.
  """
  os.makedirs(workdir, exist_ok=True)
  lock = _lock_workdir(workdir)
  if lock is not None:
    cleanup.callback(lock.release)
  # Again under the lock: a run that ended since the first check may have
  # written another config.json.
  resume.check_config(workdir, config)
  checkpointer = checkpoints.Checkpointer(
      workdir, every_steps=config.checkpoint.every_steps,
      keep=config.checkpoint.keep)
  cleanup.callback(checkpointer.close)
  state = _restore_or_init(config, checkpointer, init_fn, replicated,
                           checkpoint)
  start = int(jax.device_get(state.step))
  kept = []
  if parallel.is_main_process():
    checkpoints.write_config(workdir, config.to_json_best_effort(indent=2))
    kept = metrics.keep_records(workdir, resume.metrics_to_keep(
        start, redo_test=config.eval.final_test and start == total_steps))
  return checkpointer, state, kept


def _checked_values(run: _Run, step_metrics, state, *, step: int, epoch: int,
                    check_params: bool) -> dict:
  """Step metrics as floats; raises NonFiniteLossError on an unhealthy step."""
  values = {k: float(np.asarray(v))
            for k, v in jax.device_get(step_metrics).items()}
  config = run.config
  problem = health.problem(
      values, params_finite=not check_params or bool(_all_finite(state.params)),
      previous_lipschitz=run.last_good_lipschitz,
      checkpoint_config=config.checkpoint,
      bound_in_loss=config.loss.name != "ce")
  if problem:
    raise NonFiniteLossError(health.diverged_message(
        step=step, epoch=epoch, problem_text=problem,
        last_good_step=run.last_good_step,
        checkpoint_step=run.checkpointer.latest_step(),
        optimizer=config.optimizer))
  run.last_good_step = step
  run.last_good_lipschitz = values["lipschitz_max"]
  return values


class _StepClock:
  """Mean wall seconds per step between the host's waits for results.

  The host dispatches train steps ahead of the device and waits only for a
  logged step's metrics, so the time from one step's dispatch to its result
  includes every step queued before it (tens of them). The span between two
  waits divided by the steps it covers is the step time users get.
  """

  def __init__(self, step: int, clock: Callable[[], float] = time.perf_counter):
    self._clock = clock
    self._time, self._step = clock(), step

  def lap(self, step: int) -> float:
    """Seconds per step from the last lap (or the start) to ``step``."""
    now = self._clock()
    seconds = (now - self._time) / max(step - self._step, 1)
    self._time, self._step = now, step
    return seconds


def _train_epoch(run: _Run, state, epoch: int, first: int, writer):
  """Runs one epoch from its step ``first``; returns ``(state, logs)``.

  Every logged step and every step due for a checkpoint passes the
  divergence guard first, so no checkpoint holds an unhealthy state.
  """
  config = run.config
  bar = progress_bar(
      total=run.steps_per_epoch, initial=first, enabled=config.progress,
      description=f"epoch {epoch + 1}/{config.num_epochs}")
  epoch_logs = []
  clock = _StepClock(first)
  for step_in_epoch, local in batches.iterate_batches(
      run.datasets["train"], global_batch_size=config.batch_size,
      seed=config.seed, epoch=epoch, start_step=first,
      process_index=jax.process_index(), process_count=jax.process_count()):
    state, step_metrics = run.train_step(
        state, parallel.to_global(local, run.batch_sharding))
    step = epoch * run.steps_per_epoch + step_in_epoch + 1
    logged = (step % config.log_every_steps == 0
              or step_in_epoch == run.steps_per_epoch - 1)
    save = run.checkpointer.should_save(step) or step == run.total_steps
    if logged or save:
      values = _checked_values(run, step_metrics, state, step=step,
                               epoch=epoch, check_params=save)
    if logged:
      values["epoch"] = epoch + 1
      values["step_time"] = clock.lap(step_in_epoch + 1)
      writer.write("train", step, values)
      epoch_logs.append(values)
      bar.set_postfix(loss=f"{values['loss']:.3f}",
                      acc=f"{values['accuracy']:.3f}",
                      radius=f"{values['mean_radius']:.3f}")
    bar.update(1)
    if save:
      run.checkpointer.save(step, state, force=step == run.total_steps)
  bar.close()
  return state, epoch_logs


def _kept_epoch_part(run: _Run, epoch: int) -> tuple[list[dict], float]:
  """The logs and seconds of ``epoch`` kept from before the resume.

  The seconds run from the last record before the epoch (or the first
  step's start) to its last kept record.
  """
  begin_step = epoch * run.steps_per_epoch
  inside = [r for r in run.kept_records
            if r["kind"] == "train" and r["step"] > begin_step]
  if not inside:
    return [], 0.0
  before = [r["time"] for r in run.kept_records if r["step"] <= begin_step]
  first = inside[0]
  begin = before[-1] if before else (
      first["time"] - first["step_time"] * (first["step"] - begin_step))
  logs = [{k: v for k, v in r.items() if k not in ("kind", "step", "time")}
          for r in inside]
  return logs, max(inside[-1]["time"] - begin, 0.0)


def _epoch_summary(logs: list[dict], seconds: float, epoch: int) -> dict:
  keys = logs[-1] if logs else {}
  summary = {k: float(np.mean([m[k] for m in logs if k in m])) for k in keys}
  summary["epoch_time"] = seconds
  summary["epoch"] = epoch + 1
  return summary


def _validation_due(run: _Run, epoch: int) -> bool:
  return bool(len(run.datasets["validation"].labels)) and (
      (epoch + 1) % run.config.eval.every_epochs == 0
      or epoch + 1 == run.config.num_epochs)


def _first_epoch(run: _Run, start: int) -> int:
  """The epoch a run resumed at step ``start`` begins with.

  A checkpoint at the end of an epoch whose summary (or due validation)
  was not logged before the interruption makes the run finish that epoch.
  """
  epoch = start // run.steps_per_epoch
  if start == 0 or start % run.steps_per_epoch:
    return epoch
  kinds = {r["kind"] for r in run.kept_records if r["step"] == start}
  finished = "epoch" in kinds and (
      "eval" in kinds or not _validation_due(run, epoch - 1))
  if jax.process_count() > 1:  # Only process 0 has read the records.
    finished = bool(multihost_utils.broadcast_one_to_all(np.int32(finished)))
  if finished:
    return epoch
  if parallel.is_main_process():
    run.kept_records = metrics.keep_records(
        run.workdir, lambda r: r["step"] < start or r["kind"] == "train")
  return epoch - 1


def _validate(run: _Run, state, epoch: int, writer) -> dict:
  """Validation with warm power-iteration estimates; returns val/ metrics."""
  config = run.config
  lip = run.eval_lipschitz(state)
  result = evaluate(config, run.graphdef, state, run.datasets["validation"],
                    lip, eval_step=run.eval_step, sharding=run.batch_sharding)
  result["bound_mode"] = (f"warm power iteration, "
                          f"{config.eval.power_iterations} extra steps "
                          "(estimate, not a certificate)")
  writer.write("eval", (epoch + 1) * run.steps_per_epoch,
               {f"val/{k}": v for k, v in result.items()})
  log(f"epoch {epoch + 1}: validation " + _format(result))
  return {f"val/{k}": v for k, v in result.items()}


def train_and_evaluate(config, workdir: str, *,
                       checkpoint: int | None = None) -> dict:
  """Trains per ``config``, checkpointing and logging into ``workdir``.

  Args:
    config: the experiment config.
    workdir: where checkpoints, metrics and config.json go; a workdir that
      holds a run resumes it.
    checkpoint: resume from this saved step (later ones are moved to
      ``checkpoints_set_aside``); default: the newest intact checkpoint.

  Returns:
    The final metrics (last epoch's validation and the final test
    evaluation when enabled), as plain floats.

  Raises:
    ValueError: bad config, data that does not fit the model, a batch that
      does not split over devices, or a workdir holding another run
      (:class:`resume.ConfigChangedError`).
    WorkdirLockedError: another process trains in ``workdir``.
    CheckpointNotFoundError: ``checkpoint`` was not saved.
    CorruptCheckpointError: ``checkpoint``, or every checkpoint, is
      corrupt.
    NonFiniteLossError: training diverged (no unhealthy state is saved).
  """
  config_checks.validate(config, _default_config())
  if "://" not in workdir:
    # Orbax needs absolute paths; users type relative ones.
    workdir = os.path.abspath(workdir)
  with contextlib.ExitStack() as cleanup:
    run, state = _set_up(config, workdir, checkpoint, cleanup)
    return _train(run, state)


def _train(run: _Run, state) -> dict:
  """The epochs from the state's step on, then the final test."""
  config = run.config
  writer = metrics.MetricWriter(run.workdir)
  start = int(jax.device_get(state.step))
  final = {}
  try:
    for epoch in range(_first_epoch(run, start), config.num_epochs):
      first = max(start - epoch * run.steps_per_epoch, 0)
      earlier, seconds = _kept_epoch_part(run, epoch) if first else ([], 0.0)
      epoch_start = time.perf_counter()
      state, epoch_logs = _train_epoch(run, state, epoch, first, writer)
      seconds += time.perf_counter() - epoch_start
      writer.write("epoch", (epoch + 1) * run.steps_per_epoch,
                   _epoch_summary(earlier + epoch_logs, seconds, epoch))
      if _validation_due(run, epoch):
        final.update(_validate(run, state, epoch, writer))
    run.checkpointer.wait()
    if config.eval.final_test and len(run.datasets["test"].labels):
      final.update(_final_test(config, run.graphdef, state,
                               run.datasets["test"], run.eval_step,
                               run.batch_sharding, writer, run.total_steps))
  finally:
    writer.close()
  return final


def _final_test(config, graphdef, state, test, eval_step, sharding, writer,
                total_steps):
  """Test evaluation with a certified bound (Lanczos, fresh random start)."""
  model = nnx.merge(graphdef, jax.device_get(state.params),
                    jax.device_get(state.rest))
  start = time.perf_counter()
  # Every process must use the same start vectors: process 0's seed.
  seed = int(multihost_utils.broadcast_one_to_all(
      np.int64(lipjax.lanczos.fresh_seed())))
  lip, info = lipjax.bound(model, method=config.bound.method,
                           kind=config.bound.kind, return_info=True,
                           seed=seed, progress=config.progress,
                           large_class_threshold=config.bound
                           .large_class_threshold)
  result = evaluate(config, graphdef, state, test, lip, eval_step=eval_step,
                    sharding=sharding)
  result["bound_mode"] = info.guarantee
  result["bound_seconds"] = time.perf_counter() - start
  writer.write("test", total_steps, {f"test/{k}": v for k, v in
                                     result.items()})
  log("test: " + _format(result))
  log(f"test bound: {info.guarantee}")
  return {f"test/{k}": v for k, v in result.items()}


def _format(result: dict) -> str:
  parts = []
  for k, v in result.items():
    if isinstance(v, float):
      parts.append(f"{k} {v:.4f}")
  return ", ".join(parts)
