"""Ops that run as separately compiled programs, shared across chains.

Jitting a whole sweep through a chain compiles one XLA program per chain
structure. The LipLT bound of a residual network needs the norms of
``O(nodes^2)`` maps (:mod:`lipjax.residual_graph`), almost all of distinct
structure, yet built from a handful of distinct ops; compiling one program
per map then costs far more than running it (BENCHMARKS.md, "Residual
networks"). Wrapped by :func:`compiled_ops`, every op's forward and adjoint
call is jitted on its own: its compiled program is cached by the op's
structure and shapes and shared by every chain that holds such an op, and a
sweep runs op by op from the host. The arithmetic is the ops' own, so the
results are those of the jitted sweep up to XLA's fusion choices.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

# How sweeps through a chain compile: one program per chain structure, or
# one per op (this module).
SWEEPS = ("fused", "per_op")


def check_sweeps(sweeps: str) -> None:
  if sweeps not in SWEEPS:
    raise ValueError(f"sweeps must be one of {SWEEPS}, got {sweeps!r}.")


@jax.jit
def _call(op, x):
  return op(x)


@jax.jit
def _transpose(op, y):
  return op.transpose(y)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CompiledOp:
  """``op`` with its forward and adjoint each run as one compiled program.

  Attributes:
    op: any op of a chain (``__call__``, ``transpose``, ``in_shape``).
  """
  op: Any

  @property
  def in_shape(self):
    return self.op.in_shape

  def __call__(self, x):
    return _call(self.op, x)

  def transpose(self, y):
    return _transpose(self.op, y)


def compiled_ops(chain):
  """``chain`` (any dataclass with ``ops``) with every op a
  :class:`CompiledOp`; call it outside ``jit``."""
  return dataclasses.replace(
      chain, ops=tuple(CompiledOp(op) for op in chain.ops))
