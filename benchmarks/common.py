"""Timing, machine information and model builders shared by the benchmarks."""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import resource
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import lipjax

# Architecture -> (input shape, number of classes), as in the reference.
ARCHS = {
    "4C3F": ((28, 28, 1), 10),
    "6C2F": ((32, 32, 3), 10),
    "8C2F": ((64, 64, 3), 200),
}


def block(tree):
  return jax.tree_util.tree_map(
      lambda x: x.block_until_ready() if hasattr(x, "block_until_ready")
      else x, tree)


def time_fn(fn: Callable[[], Any], *, repeats: int, warmup: int = 1,
            min_total_s: float = 0.0) -> dict:
  """Runs ``fn`` ``warmup`` times, then ``repeats`` timed times.

  Each call's outputs are blocked on. Returns median/min/max seconds and the
  individual times. ``min_total_s`` adds repetitions (up to 50) until that
  much time was spent, to steady very short calls.
  """
  for _ in range(warmup):
    block(fn())
  times = []
  while len(times) < repeats or (sum(times) < min_total_s and len(times) < 50):
    start = time.perf_counter()
    block(fn())
    times.append(time.perf_counter() - start)
  return {"median_s": statistics.median(times), "min_s": min(times),
          "max_s": max(times), "repeats": len(times)}


def interleaved_times(calls: dict[str, Callable[[], Any]], repeats: int
                      ) -> dict[str, list[float]]:
  """Seconds of each named call, the calls alternating ``repeats`` times.

  On a shared machine, load changes hit every call alike. Each call's
  outputs are blocked on.
  """
  times = {name: [] for name in calls}
  for _ in range(repeats):
    for name, fn in calls.items():
      start = time.perf_counter()
      block(fn())
      times[name].append(time.perf_counter() - start)
  return times


def compile_info(jitted, *args) -> dict:
  """FLOPs (XLA cost analysis), memory sizes and compile time of a jit."""
  start = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  out = {"compile_s": time.perf_counter() - start}
  try:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
      cost = cost[0]
    out["flops"] = float(cost.get("flops", float("nan")))
  except Exception:  # pylint: disable=broad-except
    out["flops"] = float("nan")
  try:
    mem = compiled.memory_analysis()
    out["temp_bytes"] = int(mem.temp_size_in_bytes)
    out["arg_bytes"] = int(mem.argument_size_in_bytes)
    out["out_bytes"] = int(mem.output_size_in_bytes)
  except Exception:  # pylint: disable=broad-except
    pass
  return out


XLA_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
TRACE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                "/jax/core/compile/jaxpr_to_mlir_module_duration")


@contextlib.contextmanager
def compile_clock():
  """Sums JAX's compile events while the block runs.

  Yields a dict that fills in as the block runs: ``xla_compile_s`` and
  ``xla_compiles`` (XLA backend compiles, the bulk of a first call) and
  ``trace_lower_s`` (tracing and lowering to MLIR; nested traces may be
  counted twice, so it is an upper estimate).
  """
  totals = {"xla_compile_s": 0.0, "xla_compiles": 0, "trace_lower_s": 0.0}

  def listener(event, duration, **_):
    if event == XLA_COMPILE_EVENT:
      totals["xla_compile_s"] += duration
      totals["xla_compiles"] += 1
    elif event in TRACE_EVENTS:
      totals["trace_lower_s"] += duration

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield totals
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


def peak_rss_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def load_average() -> float:
  try:
    return os.getloadavg()[0]
  except OSError:
    return float("nan")


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def machine_info() -> dict:
  return {
      "cpu": cpu_model(), "cores": os.cpu_count(),
      "memory_gb": round(os.sysconf("SC_PAGE_SIZE")
                         * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
      "platform": platform.platform(), "python": platform.python_version(),
      "jax": jax.__version__, "backend": jax.default_backend(),
      "devices": [str(d) for d in jax.devices()],
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "load_average_1min": load_average(),
  }


def matmul_peak(n: int, repeats: int) -> dict:
  """GFLOP/s of a jitted ``n x n @ n x n`` float32 matmul (best and median).

  The best time is the peak: on a shared machine the median mostly measures
  the other load.
  """
  keys = jax.random.split(jax.random.key(0), 2)
  a = jax.random.normal(keys[0], (n, n), jnp.float32)
  b = jax.random.normal(keys[1], (n, n), jnp.float32)
  f = jax.jit(jnp.matmul)
  t = time_fn(lambda: f(a, b), repeats=repeats)
  return {**t, "gflops": 2 * n**3 / t["min_s"] / 1e9,
          "gflops_median": 2 * n**3 / t["median_s"] / 1e9, "n": n}


def build_model(arch, *, seed=0, input_shape=None, num_classes=None):
  shape, classes = ARCHS.get(arch, (None, None)) if isinstance(arch, str) \
      else (None, None)
  shape = input_shape or shape
  classes = num_classes or classes
  return lipjax.models.build(arch, num_classes=classes, input_shape=shape,
                             rngs=nnx.Rngs(seed))


def emit(record: dict, sink: list) -> None:
  """Prints one JSON line and keeps the record."""
  clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
           for k, v in record.items()}
  print(json.dumps(clean), flush=True)
  sink.append(clean)


class Records(list):
  """Benchmark records that survive a killed run.

  With a ``path``, the records already in that JSONL file are loaded first
  and every new one is appended to it as it is measured, so a rerun can
  skip what :meth:`has` (long grids on a shared machine).
  """

  def __init__(self, path: str = ""):
    super().__init__()
    self.path = path
    if path and os.path.exists(path):
      with open(path) as f:
        super().extend(json.loads(line) for line in f if line.strip())

  def append(self, record: dict) -> None:
    super().append(record)
    if self.path:
      with open(self.path, "a") as f:
        f.write(json.dumps(record) + "\n")

  def has(self, name: str, model: str) -> bool:
    return any(r.get("name") == name and r.get("model") == model
               for r in self)


def random_batch(input_shape, num_classes, batch, seed=0):
  rng = np.random.default_rng(seed)
  return {"image": rng.integers(0, 256, (batch,) + tuple(input_shape),
                                dtype=np.uint8),
          "label": rng.integers(0, num_classes, (batch,), dtype=np.int32)}
