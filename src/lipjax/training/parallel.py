"""Devices, meshes and shardings: the only module that knows about devices.

Training is data-parallel: parameters and optimizer state are replicated
(``P()``), batches are split over a one-axis ``('data',)`` mesh spanning every
device of every process (``P('data')``), and ``jax.jit`` inserts the gradient
all-reduce. Multi-host runs call :func:`initialize_distributed` first.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def initialize_distributed(*, coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> None:
  """``jax.distributed.initialize`` with explicit or auto-detected settings.

  Must run before anything touches a device. With no arguments, JAX detects
  the cluster (SLURM, Cloud TPU, ...); give all three for a hand-made cluster
  (e.g. two processes on one machine for tests).
  """
  kwargs = {}
  if coordinator_address is not None:
    kwargs = dict(coordinator_address=coordinator_address,
                  num_processes=num_processes, process_id=process_id)
    if coordinator_address.startswith("127.0.0.1:"):
      # Bind to loopback only when the coordinator is local.
      kwargs["coordinator_bind_address"] = coordinator_address
  jax.distributed.initialize(**kwargs)


def make_mesh() -> jax.sharding.Mesh:
  """A ``('data',)`` mesh over all devices of all processes.

  Auto axis types let XLA choose shardings of intermediates (the bound, the
  loss), which are replicated or reduced as needed.
  """
  return jax.make_mesh((jax.device_count(),), (DATA_AXIS,),
                       axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_sharded(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def check_global_batch(global_batch_size: int) -> None:
  """Raises ValueError unless the batch splits evenly over devices/processes."""
  devices, processes = jax.device_count(), jax.process_count()
  if global_batch_size % devices:
    raise ValueError(
        f"The global batch size {global_batch_size} is not divisible by the "
        f"{devices} devices; choose a multiple of {devices} (for example "
        f"--config.batch_size={max(devices, global_batch_size // devices * devices)}).")
  if global_batch_size % processes:
    raise ValueError(f"The global batch size {global_batch_size} is not "
                     f"divisible by the {processes} processes.")


def to_global(local_batch: dict, sharding: NamedSharding) -> dict:
  """This process's numpy slice of a batch -> global arrays split on 'data'."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}


def is_main_process() -> bool:
  return jax.process_index() == 0
