"""``train_and_evaluate(config, workdir)``: the training loop.

Data-parallel over every device of every process, resumable after
preemption (a restarted run with the same workdir continues from the latest
checkpoint and sees exactly the batches it would have seen), with progress
bars, JSONL metrics, per-epoch validation and a final test evaluation.
"""

from __future__ import annotations

import dataclasses
import math
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
from lipjax.training import metrics
from lipjax.training import parallel
from lipjax.training import steps


class NonFiniteLossError(FloatingPointError):
  """The loss or the parameters stopped being finite."""


# Keys that must not change when a run resumes (they change the state's
# shapes or the meaning of the checkpoint).
_FIXED_ON_RESUME = ("data.name", "model", "bound.method", "bound.kind",
                    "seed")


def _default_config():
  from configs import default  # pylint: disable=import-outside-toplevel
  return default.get_config()


def _check_resume_compatible(workdir, config) -> None:
  saved = checkpoints.read_config(workdir)
  if saved is None:
    return
  current = config.to_dict()
  for path in _FIXED_ON_RESUME:
    keys = path.split(".")
    old, new = saved, current
    for k in keys:
      old, new = (old or {}).get(k), (new or {}).get(k)
    if json_normalize(old) != json_normalize(new):
      raise ValueError(
          f"{workdir} holds a run with {path} = {old!r}, but this config has "
          f"{new!r}. Resume with the same config (see {workdir}/config.json) "
          "or use a new --workdir. Nothing was changed on disk.")


def json_normalize(value):
  """Tuples and lists compare equal after a JSON round trip."""
  if isinstance(value, (list, tuple)):
    return [json_normalize(v) for v in value]
  if isinstance(value, dict):
    return {k: json_normalize(v) for k, v in value.items()}
  return value


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
  """Everything a training run sets up once, before its first step."""
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


def _set_up(config, workdir: str):
  """Validates, loads data, builds the jitted steps; restores or inits.

  Returns:
    ``(run, state)``: the :class:`_Run` and the initial (or restored) train
    state, replicated over the mesh.
  """
  config_checks.validate(config, _default_config())
  if "://" not in workdir:
    # Orbax needs absolute paths; users type relative ones.
    workdir = os.path.abspath(workdir)
  _check_resume_compatible(workdir, config)
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
  abstract = checkpoints.abstract_like(jax.eval_shape(init_fn), replicated)

  # Only now, once the config, the data and the model are known to be good:
  # a run refused above leaves no empty workdir behind.
  os.makedirs(workdir, exist_ok=True)
  checkpointer = checkpoints.Checkpointer(
      workdir, every_steps=config.checkpoint.every_steps,
      keep=config.checkpoint.keep)
  if checkpointer.latest_step() is not None:
    state = checkpointer.restore(abstract)
    log(f"Resuming from checkpoint step {int(state.step)} in {workdir}")
  else:
    state = jax.jit(init_fn, out_shardings=replicated)()
  if parallel.is_main_process():
    checkpoints.write_config(workdir, config.to_json_best_effort(indent=2))

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
                        out_shardings=replicated))
  return run, state


def _logged_values(run: _Run, step_metrics, *, step: int, epoch: int,
                   step_start: float) -> dict:
  """Step metrics as floats; raises on a non-finite loss."""
  values = jax.device_get(step_metrics)
  if not math.isfinite(float(values["loss"])):
    raise NonFiniteLossError(
        f"The loss is {values['loss']} at step {step} (epoch "
        f"{epoch + 1}). Nothing was saved after the last good "
        f"checkpoint (step {run.checkpointer.latest_step()}). Lower "
        "optimizer.learning_rate or the robust weight (loss.lam).")
  values = {k: float(np.asarray(v)) for k, v in values.items()}
  values["epoch"] = epoch + 1
  values["step_time"] = time.perf_counter() - step_start
  return values


def _save_if_due(run: _Run, state, step: int) -> None:
  """Checkpoints on schedule and at the end, never non-finite params."""
  if run.checkpointer.should_save(step) or step == run.total_steps:
    if not bool(_all_finite(state.params)):
      raise NonFiniteLossError(
          f"Parameters are not finite at step {step}; the last good "
          f"checkpoint (step {run.checkpointer.latest_step()}) is kept.")
    run.checkpointer.save(step, state, force=step == run.total_steps)


def _train_epoch(run: _Run, state, epoch: int, first: int, writer):
  """Runs one epoch from its step ``first``; returns ``(state, logs)``."""
  config = run.config
  bar = progress_bar(
      total=run.steps_per_epoch, initial=first, enabled=config.progress,
      description=f"epoch {epoch + 1}/{config.num_epochs}")
  epoch_logs = []
  for step_in_epoch, local in batches.iterate_batches(
      run.datasets["train"], global_batch_size=config.batch_size,
      seed=config.seed, epoch=epoch, start_step=first,
      process_index=jax.process_index(), process_count=jax.process_count()):
    step_start = time.perf_counter()
    state, step_metrics = run.train_step(
        state, parallel.to_global(local, run.batch_sharding))
    step = epoch * run.steps_per_epoch + step_in_epoch + 1
    last_of_epoch = step_in_epoch == run.steps_per_epoch - 1
    if step % config.log_every_steps == 0 or last_of_epoch:
      values = _logged_values(run, step_metrics, step=step, epoch=epoch,
                              step_start=step_start)
      writer.write("train", step, values)
      epoch_logs.append(values)
      bar.set_postfix(loss=f"{values['loss']:.3f}",
                      acc=f"{values['accuracy']:.3f}",
                      radius=f"{values['mean_radius']:.3f}")
    bar.update(1)
    _save_if_due(run, state, step)
  bar.close()
  return state, epoch_logs


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


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains per ``config``, checkpointing and logging into ``workdir``.

  Returns:
    The final metrics (last epoch's validation and the final test
    evaluation when enabled), as plain floats.

  Raises:
    ValueError: bad config, data that does not fit the model, a batch that
      does not split over devices, or a workdir holding another run.
    NonFiniteLossError: the loss became NaN/inf (the last good checkpoint
      is kept).
  """
  run, state = _set_up(config, workdir)
  writer = metrics.MetricWriter(run.workdir)
  start_step = int(jax.device_get(state.step))
  final = {}
  try:
    for epoch in range(start_step // run.steps_per_epoch, config.num_epochs):
      first = max(start_step - epoch * run.steps_per_epoch, 0)
      epoch_start = time.perf_counter()
      state, epoch_logs = _train_epoch(run, state, epoch, first, writer)
      summary = {k: float(np.mean([m[k] for m in epoch_logs]))
                 for k in epoch_logs[0]} if epoch_logs else {}
      summary["epoch_time"] = time.perf_counter() - epoch_start
      summary["epoch"] = epoch + 1
      writer.write("epoch", (epoch + 1) * run.steps_per_epoch, summary)
      is_last = epoch + 1 == config.num_epochs
      if len(run.datasets["validation"].labels) and (
          (epoch + 1) % config.eval.every_epochs == 0 or is_last):
        final.update(_validate(run, state, epoch, writer))
    run.checkpointer.wait()
    if config.eval.final_test and len(run.datasets["test"].labels):
      final.update(_final_test(config, run.graphdef, state,
                               run.datasets["test"], run.eval_step,
                               run.batch_sharding, writer, run.total_steps))
  finally:
    writer.close()
    run.checkpointer.close()
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
