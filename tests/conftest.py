"""Test set-up that must run before any test touches a JAX backend."""

import os

# Eight fake CPU devices for multi-device tests; harmless for the others.
os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")

import jax  # pylint: disable=wrong-import-position

jax.config.update("jax_num_cpu_devices", 8)

import pytest  # pylint: disable=wrong-import-position


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_code():
  """Drops JAX's compiled executables after each test module.

  The certified-bound tests compile many float64 Lanczos steps (one per
  residual map); kept for the whole session they grew one CI process until
  XLA crashed while compiling (the same tests pass on their own). No module
  reuses another's executables, so this only frees memory.
  """
  yield
  jax.clear_caches()
