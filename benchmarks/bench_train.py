"""Train-step benchmarks: CRM and CE steps at batch 512, epoch throughput."""

from __future__ import annotations

import statistics
import time

import jax

from benchmarks import bench_bound, common
from configs import default
from lipjax.training import steps

STEPS_PER_EPOCH = 100  # only sets the (irrelevant) schedules


def make_config(arch: str, loss: str, iterations: int, batch_size: int):
  c = default.get_config()
  c.model.architecture = arch
  c.loss.name = loss
  c.loss.robust_start_epoch = 0  # the robust term is active from step 0
  c.bound.power_iterations = iterations
  c.batch_size = batch_size
  return c


def make_step(arch, loss, iterations, batch_size):
  """(jitted train step with donation, initial state, device batch)."""
  shape, classes = common.ARCHS[arch]
  c = make_config(arch, loss, iterations, batch_size)
  lr = steps.make_learning_rate(c, STEPS_PER_EPOCH)
  tx = steps.make_optimizer(c, lr)
  init_fn = steps.make_init_fn(c, tx, input_shape=shape, num_classes=classes)
  graphdef = steps.make_graphdef(c, input_shape=shape, num_classes=classes)
  state = jax.jit(init_fn)()
  step = jax.jit(steps.make_train_step(c, graphdef, tx, lr,
                                    steps_per_epoch=STEPS_PER_EPOCH),
                 donate_argnums=0)
  batch = jax.device_put(common.random_batch(shape, classes, batch_size))
  return step, state, batch


def train_steps(*, quick, sink, iterations=5, batch_size=512, archs=None):
  """One CRM and one CE train step per architecture, and the bound share."""
  for arch in archs or ("4C3F", "6C2F"):
    times = {}
    for loss in ("crm", "ce"):
      step, state, batch = make_step(arch, loss, iterations, batch_size)
      info = common.compile_info(step, state, batch)
      box = [state]
      run = _step_runner(step, box, batch)
      timing = common.time_fn(run, repeats=3 if quick else 7, warmup=2)
      times[loss] = timing["median_s"]
      # Epoch throughput: steps dispatched back to back, one sync at the end.
      n = 4 if quick else 20
      start = time.perf_counter()
      for _ in range(n):
        box[0], metrics = step(box[0], batch)
      common.block(metrics)
      per_step = (time.perf_counter() - start) / n
      record = {"name": "train_step", "arch": arch, "loss": loss,
                "batch_size": batch_size,
                "power_iterations": iterations if loss == "crm" else None,
                **timing, **info,
                "throughput_images_per_s": batch_size / per_step,
                "throughput_steps": n,
                "load_average_1min": common.load_average()}
      if loss == "crm":
        model = common.build_model(arch)
        bound = bench_bound.bound_case(
            model, arch=arch, method="liplt", kind="pairwise",
            iterations=iterations, grad=True, repeats=3 if quick else 7,
            sink=[], peak_gflops=None)
        record["bound_value_and_grad_s"] = bound["median_s"]
        record["bound_share_of_step"] = bound["median_s"] / timing["median_s"]
      common.emit(record, sink)
    common.emit({"name": "train_step_overhead", "arch": arch,
                 "median_s": times["crm"] - times["ce"],
                 "crm_minus_ce_share": (times["crm"] - times["ce"])
                 / times["crm"]}, sink)


def ablation_unroll(*, quick, sink, iterations=5):
  """Power-iteration steps unrolled (default) vs in a ``fori_loop``.

  ``lipjax.power_iteration.UNROLL_LIMIT = 0`` restores the loop.
  """
  from lipjax import power_iteration  # pylint: disable=import-outside-toplevel
  default = power_iteration.UNROLL_LIMIT
  archs = ("4C3F", "6C2F")
  try:
    for arch in archs:
      model = common.build_model(arch)
      for limit, label in ((0, "fori_loop"), (default, "unrolled")):
        power_iteration.UNROLL_LIMIT = limit
        for grad in (False, True):
          bench_bound.bound_case(
              model, arch=arch, method="liplt", kind="pairwise",
              iterations=iterations, grad=grad, repeats=3 if quick else 7,
              sink=sink, peak_gflops=None,
              extra={"name": "ablation_unroll", "variant": label})
        if quick and arch != "4C3F":
          continue
        step, state, batch = make_step(arch, "crm", iterations, 512)
        run = _step_runner(step, [state], batch)
        timing = common.time_fn(run, repeats=3 if quick else 7, warmup=2)
        common.emit({"name": "ablation_unroll", "arch": arch,
                     "variant": label, "mode": "CRM train step",
                     "iterations": iterations, **timing,
                     "load_average_1min": common.load_average()}, sink)
  finally:
    power_iteration.UNROLL_LIMIT = default


def ablation_conv(*, quick, sink, iterations=5):
  """CRM train step with the models' convs plain ``lax`` vs ``fast_conv``.

  Interleaved in one process (A, B, A, B, ...) so that both sides see the
  same load. The plain side builds its models with
  ``conv_general_dilated=lax.conv_general_dilated``, the code before.
  """
  from lipjax import fast_conv  # pylint: disable=import-outside-toplevel
  fast = fast_conv.conv_general_dilated
  repeats = 3 if quick else 7
  for arch in ("4C3F", "6C2F"):
    runs = {}
    try:
      for label, conv in (("lax", jax.lax.conv_general_dilated),
                          ("fast_conv", fast)):
        fast_conv.conv_general_dilated = conv  # read when models are built
        step, state, batch = make_step(arch, "crm", iterations, 512)
        runs[label] = _step_runner(step, [state], batch)
        common.block(runs[label]())
        common.block(runs[label]())
    finally:
      fast_conv.conv_general_dilated = fast
    times = common.interleaved_times(runs, repeats)
    for label, values in times.items():
      common.emit({"name": "ablation_conv", "arch": arch, "variant": label,
                   "mode": "CRM train step", "iterations": iterations,
                   "median_s": statistics.median(values),
                   "min_s": min(values), "repeats": repeats,
                   "load_average_1min": common.load_average()}, sink)


def _step_runner(step, box, batch):
  """``run()``: one step on the state in ``box[0]`` (updated), its metrics."""

  def run():
    box[0], metrics = step(box[0], batch)
    return metrics

  return run
