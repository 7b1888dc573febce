"""Test set-up that must run before any test touches a JAX backend."""

import os

# Eight fake CPU devices for multi-device tests; harmless for the others.
os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")

import jax  # pylint: disable=wrong-import-position

jax.config.update("jax_num_cpu_devices", 8)
