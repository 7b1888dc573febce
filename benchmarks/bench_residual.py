"""Residual-network bounds: time and tightness vs depth (issue 15).

Random-init models of :func:`lipjax.residual_models.residual_spec` on small
inputs (16x16x3, widths 16/32, hidden 64, 10 classes) with 4 to 32 blocks,
and the LiResNet and two-activation families at one depth:

* training mode: ``lipjax.bound(model, iterations=5, state=...)`` under
  ``jit``, value and gradient, LipLT and naive calls interleaved, compile
  (lowering + XLA) timed apart;
* certified mode: ``lipjax.bound(model, seed=0)`` (float64 Lanczos, failure
  probability 1e-9), the first call (what a user waits for; the part spent in
  XLA compiles is read from JAX's compile events) and later calls, LipLT and
  naive interleaved;
* tightness: LipLT / naive per class pair from the same kind of norms
  (certified, and exact Gram norms where cheap), and certified / exact.

A trained residual model (a ``train.py`` workdir) gets the certified calls
and ratios too; it is restored read-only.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time

import jax
import numpy as np
from flax import nnx

import lipjax
from benchmarks import bench_bound, common
from lipjax import residual_bounds
from lipjax import residual_certified
from lipjax import residual_graph
from lipjax import residual_models

INPUT_SHAPE = (16, 16, 3)
WIDTHS = (16, 32)
HIDDEN = 64
NUM_CLASSES = 10
ITERATIONS = 5
# Blocks per stage (two stages): 4, 8, 16 and 32 blocks.
DEPTHS = ((2, 2), (4, 4), (8, 8), (16, 16))
# Run after the families and the trained model (hours on 2 cores).
LARGE_BLOCKS = 17
# Above this many blocks the training-mode LipLT program is only lowered:
# at 16 blocks its XLA compile takes tens of minutes and ~6 GB on 2 cores,
# and grows faster than the program (5x larger at 32 blocks).
TRAINING_COMPILE_MAX_BLOCKS = 16
# Exact Gram norms (and the certified / exact ratio) up to this many blocks.
EXACT_MAX_BLOCKS = 8
# The LiResNet and two-activation families are measured at this depth.
FAMILY_BLOCKS = (2, 2)
# --quick: one stage, one block, 8x8x3 (every code path, a few minutes).
QUICK = dict(blocks=(1,), widths=(8,), hidden=16, input_shape=(8, 8, 3))


@dataclasses.dataclass(frozen=True)
class Case:
  """One model of the grid (``family`` orders the report's rows)."""
  label: str
  family: str
  spec: tuple
  input_shape: tuple
  exact: bool

  @property
  def blocks(self) -> int:
    return sum(1 for layer in self.spec if layer[0] in (
        "residual", "linear_residual"))


def cases(quick: bool) -> list[Case]:
  """The depth grid, then the families."""
  if quick:
    spec = residual_models.residual_spec(QUICK["blocks"], QUICK["widths"],
                                         hidden=QUICK["hidden"])
    return [Case("residual 1 block (quick, 8x8x3)", "residual", spec,
                 QUICK["input_shape"], False)]
  out = []
  for blocks in DEPTHS:
    spec = residual_models.residual_spec(blocks, WIDTHS, hidden=HIDDEN)
    out.append(Case(f"residual {sum(blocks)} blocks", "residual", spec,
                    INPUT_SHAPE, sum(blocks) <= EXACT_MAX_BLOCKS))
  two = residual_models.residual_spec(FAMILY_BLOCKS, WIDTHS, hidden=HIDDEN,
                                      inner_activations=2)
  linear = residual_models.linear_residual_spec(FAMILY_BLOCKS, WIDTHS,
                                                hidden=HIDDEN)
  count = sum(FAMILY_BLOCKS)
  out.append(Case(f"residual, 2 activations/block, {count} blocks",
                  "residual x2", two, INPUT_SHAPE, True))
  out.append(Case(f"linear residual (LiResNet), {count} blocks",
                  "linear residual", linear, INPUT_SHAPE, True))
  return out


def build(spec, input_shape):
  return lipjax.models.build(spec, num_classes=NUM_CLASSES,
                             input_shape=input_shape, rngs=nnx.Rngs(0))


def describe(model) -> dict:
  """Blocks, nodes and the number of norms each bound needs."""
  graph = residual_graph.from_model(model)
  count = lambda method: len(residual_bounds.required_products(
      graph, method=method, kind="pairwise"))
  kinds = [unit.kind for unit in graph.units]
  return {"blocks": sum(k != "plain" for k in kinds),
          "nodes": graph.num_nodes, "maps_liplt": count("liplt"),
          "maps_naive": count("naive")}


def _interleaved(calls: dict, repeats: int) -> dict:
  """Median seconds per named call, the calls interleaved
  (:func:`common.interleaved_times`)."""
  return {name: statistics.median(t)
          for name, t in common.interleaved_times(calls, repeats).items()}


def training_times(model, *, repeats: int, compile_liplt: bool = True
                   ) -> dict:
  """Training-mode bound (value and gradient), LipLT and naive.

  With ``compile_liplt=False`` the LipLT program is only lowered (its size
  is recorded): XLA's compile of it grows faster than the maps' ops.
  """
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  calls, out = {}, {}
  for method in ("liplt", "naive"):
    state = lipjax.init_power_state(model, method=method, kind="pairwise",
                                    key=jax.random.key(1))
    fn = bench_bound._bound_fn(  # pylint: disable=protected-access
        graphdef, rest, method=method, kind="pairwise",
        iterations=ITERATIONS, grad=True)
    start = time.perf_counter()
    lowered = fn.lower(params, state)
    lowered_at = time.perf_counter()
    out[f"{method}_lower_s"] = lowered_at - start
    out[f"{method}_mlir_mb"] = len(lowered.as_text()) / 1e6
    if method == "liplt" and not compile_liplt:
      out.update(liplt_compile_s=None, liplt_median_s=None)
      continue
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    out[f"{method}_compile_s"] = time.perf_counter() - lowered_at
    common.block(compiled(params, state))  # warm-up
    calls[method] = (lambda c=compiled, s=state: c(params, s))
  medians = _interleaved(calls, repeats)
  for method, median in medians.items():
    out[f"{method}_median_s"] = median
  return out


def _certified(model, *, method: str, exact: bool):
  return lipjax.bound(model, method=method, kind="pairwise", seed=0,
                      exact=exact, return_info=True)


def _ritz_bound(model, info) -> np.ndarray:
  """The LipLT pairwise bound from the maps' largest Ritz values (lower
  estimates of their norms, no allowances): what the certificate costs."""
  with jax.enable_x64(True):
    graph = residual_graph.from_model(model).astype(np.float64)
    return np.asarray(residual_bounds.bound_from_norms(
        graph, np.asarray(info.certificate.norms, np.float64),
        method="liplt", kind="pairwise"))


def certified_times(model, *, repeats: int, exact: bool = False) -> tuple:
  """First and later certified calls, LipLT and naive.

  Returns:
    ``(record fields, {method: [K, K] bound})``.
  """
  out, bounds = {}, {}
  for method in ("liplt", "naive"):
    with common.compile_clock() as clock:
      start = time.perf_counter()
      value, info = _certified(model, method=method, exact=exact)
      out[f"{method}_first_s"] = time.perf_counter() - start
    out.update({f"{method}_{k}": v for k, v in clock.items()})
    out[f"{method}_max_steps"] = int(np.max(info.certificate.steps))
    out[f"{method}_max_factor"] = float(np.max(info.safety_factor))
    bounds[method] = np.asarray(value, np.float64)
    if method == "liplt" and not exact:
      out.update(pair_ratios(value, _ritz_bound(model, info),
                             "certified_over_ritz"))
  if repeats:
    medians = _interleaved(
        {m: (lambda m=m: _certified(model, method=m, exact=exact)[0])
         for m in ("liplt", "naive")}, repeats)
    out.update({f"{m}_later_s": s for m, s in medians.items()})
  return out, bounds


def pair_ratios(numerator, denominator, prefix: str) -> dict:
  """Mean/min/max over class pairs ``i != j`` of ``numerator / denominator``.
  """
  numerator = np.asarray(numerator, np.float64)
  off = ~np.eye(numerator.shape[0], dtype=bool)
  ratio = numerator[off] / np.asarray(denominator, np.float64)[off]
  return {f"{prefix}_mean": float(ratio.mean()),
          f"{prefix}_min": float(ratio.min()),
          f"{prefix}_max": float(ratio.max())}


def _offdiag_mean(bound) -> float:
  bound = np.asarray(bound, np.float64)
  return float(bound[~np.eye(bound.shape[0], dtype=bool)].mean())


def _recorded(sink, name: str, label: str) -> bool:
  """Whether ``sink`` (a :class:`benchmarks.common.Records` of an earlier,
  interrupted run) already holds this measurement."""
  return isinstance(sink, common.Records) and sink.has(name, label)


def certified_case(model, *, label: str, exact: bool, repeats: int, sink,
                   extra=None, sweeps: str = residual_certified.SWEEPS
                   ) -> None:
  """Certified calls, tightness ratios; one record.

  ``sweeps`` sets :data:`lipjax.residual_certified.SWEEPS` for the case
  (``"fused"``: one compiled program per map, the code before per-op
  sweeps).
  """
  if _recorded(sink, "residual_certified", label):
    return
  record = {"name": "residual_certified", "model": label, **describe(model),
            "sweeps": sweeps, "load_start": common.load_average()}
  default = residual_certified.SWEEPS
  residual_certified.SWEEPS = sweeps
  try:
    times, bounds = certified_times(model, repeats=repeats)
    record.update(times)
    record.update(pair_ratios(bounds["liplt"], bounds["naive"], "ratio"))
    record["liplt_pair_mean"] = _offdiag_mean(bounds["liplt"])
    record["naive_pair_mean"] = _offdiag_mean(bounds["naive"])
    if exact:
      start = time.perf_counter()
      _, exact_bounds = certified_times(model, repeats=0, exact=True)
      record["exact_s"] = time.perf_counter() - start
      record.update(pair_ratios(exact_bounds["liplt"], exact_bounds["naive"],
                                "exact_ratio"))
      record.update(pair_ratios(bounds["liplt"], exact_bounds["liplt"],
                                "certified_over_exact"))
  finally:
    residual_certified.SWEEPS = default
  record["load_average_1min"] = common.load_average()
  common.emit({**record, **(extra or {})}, sink)


def training_case(model, *, label: str, repeats: int, sink,
                  extra=None) -> None:
  if _recorded(sink, "residual_training", label):
    return
  record = {"name": "residual_training", "model": label, **describe(model),
            "iterations": ITERATIONS, "load_start": common.load_average()}
  compile_liplt = record["blocks"] <= TRAINING_COMPILE_MAX_BLOCKS
  record.update(training_times(model, repeats=repeats,
                               compile_liplt=compile_liplt))
  record["load_average_1min"] = common.load_average()
  common.emit({**record, **(extra or {})}, sink)


def measure(case: Case, *, quick: bool, sink) -> None:
  """Certified and training records of one case (the certified first: at
  32 blocks the training-mode compile may run out of memory)."""
  model = build(case.spec, case.input_shape)
  extra = {"family": case.family, "input_shape": list(case.input_shape)}
  certified_case(model, label=case.label, exact=case.exact,
                 repeats=1 if quick else 2, sink=sink, extra=extra)
  training_case(model, label=case.label, repeats=3 if quick else 5,
                sink=sink, extra=extra)


def trained(workdir: str, *, sink) -> None:
  """Certified LipLT / naive on a trained model and on its random init."""
  from lipjax.certification import workdir as workdir_lib  # pylint: disable=import-outside-toplevel
  from lipjax.training import batches, steps  # pylint: disable=import-outside-toplevel
  try:
    restored = workdir_lib.restore(workdir)
  except (FileNotFoundError, ValueError) as error:
    common.emit({"name": "residual_certified", "model": "trained",
                 "family": "trained",
                 "skipped": f"{workdir}: {str(error).splitlines()[0]}"}, sink)
    return
  model = restored.model
  if not isinstance(model, residual_models.ResidualNet):
    common.emit({"name": "residual_certified", "model": "trained",
                 "family": "trained",
                 "skipped": f"{workdir} holds a {type(model).__name__}, not "
                            "a residual network"}, sink)
    return
  arch = restored.config.model.architecture
  fresh = steps.build_model(restored.config, input_shape=model.input_shape,
                            num_classes=model.num_classes, rngs=nnx.Rngs(0))
  where = os.path.basename(os.path.normpath(workdir))
  final = restored.config.num_epochs * batches.num_steps_per_epoch(
      len(restored.datasets["train"]), restored.config.batch_size)
  extra = {"family": "trained", "input_shape": list(model.input_shape),
           "step": restored.step, "final_step": final}
  certified_case(fresh, label=f"{arch} random init", exact=False, repeats=0,
                 sink=sink, extra=extra)
  certified_case(model, label=f"{arch} trained ({where}, step "
                 f"{restored.step} of {final})", exact=False, repeats=0,
                 sink=sink, extra=extra)


def fused_sweeps(*, sink) -> None:
  """The first case's certified calls with one compiled program per map.

  Run after the per-op case in the same process, so the eager operations
  both share are already compiled: the fused side's time is flattered.
  """
  case = cases(quick=False)[0]
  certified_case(build(case.spec, case.input_shape),
                 label=f"{case.label}, fused sweeps", exact=case.exact,
                 repeats=2, sink=sink, sweeps="fused",
                 extra={"family": "ablation",
                        "input_shape": list(case.input_shape)})


def run(*, quick: bool, sink, trained_workdir: str = "") -> None:
  """Every case; the largest depths last (they take hours on 2 cores)."""
  grid = cases(quick)
  for case in grid:
    if case.blocks < LARGE_BLOCKS:
      measure(case, quick=quick, sink=sink)
  if not quick:
    fused_sweeps(sink=sink)
  if trained_workdir:
    trained(trained_workdir, sink=sink)
  for case in grid:
    if case.blocks >= LARGE_BLOCKS:
      measure(case, quick=quick, sink=sink)
