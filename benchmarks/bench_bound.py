"""Bound benchmarks: per-call time, depth scaling, tightness, certification."""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import lipjax
from benchmarks import common


def _bound_fn(graphdef, rest, *, method, kind, iterations, grad):
  """A jitted ``(params, state) -> (L or loss and grads, state)``."""

  def value(params, state):
    model = nnx.merge(graphdef, params, rest)
    lip, state = lipjax.bound(model, method=method, kind=kind,
                              iterations=iterations, state=state,
                              return_state=True,
                              diagonal=1.0 if kind == "pairwise" else 0.0)
    return jnp.sum(lip), state

  if grad:
    return jax.jit(jax.value_and_grad(value, has_aux=True))
  return jax.jit(value)


def bound_case(model, *, arch, method, kind, iterations, grad, repeats,
               sink, peak_gflops, extra=None):
  """Times one bound call (warm state, compile excluded) and emits it."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  state = lipjax.init_power_state(model, method=method, kind=kind,
                                  key=jax.random.key(1))
  fn = _bound_fn(graphdef, rest, method=method, kind=kind,
                 iterations=iterations, grad=grad)
  info = common.compile_info(fn, params, state)
  timing = common.time_fn(lambda: fn(params, state), repeats=repeats,
                          min_total_s=0.5)
  from lipjax import power_iteration  # pylint: disable=import-outside-toplevel
  # Cost analysis counts a while-loop body once: no FLOP rate for loops.
  gflops = (info["flops"] / timing["median_s"] / 1e9
            if iterations <= power_iteration.UNROLL_LIMIT else float("nan"))
  record = {
      "name": "bound", "arch": arch, "method": method, "kind": kind,
      "iterations": iterations, "mode": "value+grad" if grad else "value",
      "num_products": len(state.products), **timing, **info,
      "gflops_per_s": gflops,
      "fraction_of_matmul_peak": (gflops / peak_gflops
                                  if peak_gflops and gflops == gflops
                                  else None),
      "load_average_1min": common.load_average(), **(extra or {})}
  common.emit(record, sink)
  return record


def bound_grid(*, quick, sink, peak_gflops):
  archs = ["4C3F", "6C2F", "8C2F"]
  for arch in archs:
    model = common.build_model(arch)
    if quick:
      cases = [("liplt", "pairwise", it, g) for it in (1, 5) for g in (0, 1)]
      cases += [("liplt", "pairwise", 100, 0),
                ("naive", "pairwise", 5, 1), ("liplt", "global", 5, 1),
                ("naive", "global", 5, 1)]
      if arch == "8C2F":  # expensive: the reference's 8C2F row, plus naive
        cases = [("liplt", "pairwise", 5, 1), ("naive", "pairwise", 5, 1),
                 ("liplt", "pairwise", 5, 0)]
    else:
      cases = [(m, k, it, g) for m in ("naive", "liplt")
               for k in ("pairwise", "global") for it in (1, 5, 100)
               for g in (0, 1)]
    for method, kind, iterations, grad in cases:
      bound_case(model, arch=arch, method=method, kind=kind,
                 iterations=iterations, grad=bool(grad),
                 repeats=3 if quick else 7, sink=sink,
                 peak_gflops=peak_gflops)


def depth_spec(num_layers: int):
  """``num_layers`` weight layers: 3x3 stride-1 convs (32 ch), 2 dense."""
  convs = [("conv", 32, 3, 1, 1)] * (num_layers - 2)
  return tuple(convs) + (("dense", 128), ("dense", None))


def depth_scaling(*, quick, sink, peak_gflops):
  depths = (4, 8, 12, 16) if quick else (4, 6, 8, 10, 12, 14, 16)
  for depth in depths:
    model = lipjax.models.build(depth_spec(depth), num_classes=10,
                                input_shape=(16, 16, 3), rngs=nnx.Rngs(0))
    for method in ("liplt", "naive"):
      bound_case(model, arch=f"depth{depth}", method=method,
                 kind="pairwise", iterations=5, grad=True,
                 repeats=3 if quick else 5, sink=sink,
                 peak_gflops=peak_gflops,
                 extra={"name": "depth_scaling", "num_layers": depth,
                        "input_shape": [16, 16, 3]})


def certification(*, quick, sink, archs=None):
  """Certified bounds: ``lipjax.bound(model)`` (Lanczos, delta = 1e-9)."""
  for arch in archs or (("4C3F",) if quick else ("4C3F", "6C2F")):
    model = common.build_model(arch)
    kwargs = dict(method="liplt", kind="pairwise", return_info=True, seed=0)
    lipjax.bound(model, **kwargs)  # compile
    start = time.perf_counter()
    lip, info = lipjax.bound(model, **kwargs)
    elapsed = time.perf_counter() - start
    common.emit({
        "name": "certification_lanczos", "arch": arch,
        "method": "liplt", "kind": "pairwise", "delta": 1e-9,
        "median_s": elapsed, "repeats": 1,
        "steps": int(info.certificate.steps.max()),
        "max_factor": float(info.safety_factor.max()),
        "mean_offdiag_bound": float(
            np.asarray(lip)[~np.eye(lip.shape[0], dtype=bool)].mean()),
        "load_average_1min": common.load_average()}, sink)


def _ratio_record(model, *, arch, label, sink, iterations=300):
  """LipLT / naive per class pair, both from ``iterations`` power steps."""
  key = jax.random.key(0)
  start = time.perf_counter()
  liplt = np.asarray(lipjax.bound(model, method="liplt", kind="pairwise",
                                  key=key, iterations=iterations))
  naive = np.asarray(lipjax.bound(model, method="naive", kind="pairwise",
                                  key=key, iterations=iterations))
  off = ~np.eye(liplt.shape[0], dtype=bool)
  ratio = liplt[off] / naive[off]
  common.emit({
      "name": "tightness", "arch": arch, "model": label,
      "median_s": time.perf_counter() - start, "repeats": 1,
      "power_iterations": iterations, "ratio_mean": float(ratio.mean()), "ratio_min": float(ratio.min()),
      "ratio_max": float(ratio.max()),
      "liplt_mean": float(liplt[off].mean()),
      "naive_mean": float(naive[off].mean())}, sink)


def restore_trained(workdir: str):
  """(model, architecture) restored from a ``train.py`` workdir, or None."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  from lipjax.training import checkpoints, parallel  # pylint: disable=import-outside-toplevel
  from lipjax.training import steps  # pylint: disable=import-outside-toplevel
  from configs import default  # pylint: disable=import-outside-toplevel

  workdir = os.path.abspath(workdir) if workdir else workdir
  if not workdir or not os.path.isdir(os.path.join(workdir, "checkpoints")):
    return None
  saved = checkpoints.read_config(workdir)
  if saved is None:
    return None
  config = default.get_config()
  config.update_from_flattened_dict(
      {k: v for k, v in _flatten(saved).items() if k in _flatten(
          config.to_dict())})
  config = ml_collections.ConfigDict(config)
  shape, classes = _data_shape(config)
  tx = steps.make_optimizer(config, steps.make_learning_rate(config, 1))
  init_fn = steps.make_init_fn(config, tx, input_shape=shape,
                            num_classes=classes)
  abstract = checkpoints.abstract_like(
      jax.eval_shape(init_fn), parallel.replicated(parallel.make_mesh()))
  with checkpoints.Checkpointer(workdir, every_steps=10**9,
                                  keep=10) as ckpt:
    if ckpt.latest_step() is None:
      return None
    state = ckpt.restore(abstract)
  graphdef = steps.make_graphdef(config, input_shape=shape, num_classes=classes)
  model = nnx.merge(graphdef, state.params, state.rest)
  return model, f"{config.model.architecture} ({config.data.name}, step " \
      f"{int(state.step)})"


def _data_shape(config):
  shapes = {"mnist": ((28, 28, 1), 10), "fashion_mnist": ((28, 28, 1), 10),
            "cifar10": ((32, 32, 3), 10), "cifar100": ((32, 32, 3), 100),
            "tiny_imagenet": ((64, 64, 3), 200)}
  if config.data.name == "synthetic":
    s = config.data.synthetic
    return tuple(s.image_shape), s.num_classes
  return shapes[config.data.name]


def _flatten(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = tuple(v) if isinstance(v, list) else v
  return out


def tightness(*, quick, sink, trained_workdir):
  for arch in (("4C3F",) if quick else ("4C3F", "6C2F")):
    _ratio_record(common.build_model(arch), arch=arch, label="random init",
                  sink=sink)
  restored = None
  try:
    restored = restore_trained(trained_workdir)
  except Exception as e:  # pylint: disable=broad-except
    print(f"# could not restore {trained_workdir}: {e!r}", flush=True)
  if restored is None:
    common.emit({"name": "tightness", "arch": None, "model": "trained",
                 "skipped": f"no checkpoint in {trained_workdir!r} (run "
                            "`make demo` first)"}, sink)
    return
  model, label = restored
  _ratio_record(model, arch=label.split()[0], label=f"trained: {label}",
                sink=sink)
