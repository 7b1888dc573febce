"""Tiny linear chains shared by the norm tests (exact and power iteration).

Small enough to materialize with ``linear_maps.dense_matrix`` and take a
float64 SVD in milliseconds. The conv chain expands the dimension, then
shrinks it with a strided, output-scaled conv, so that strided and scaled
adjoints are exercised.
"""

import jax.numpy as jnp
import numpy as np

from lipjax.linear_maps import LinearChain
from lipjax.linear_maps import LinearOp
from lipjax.linear_maps import from_matrices
from lipjax.linear_maps import from_ops


def weight_sampler(seed: int):
  """Returns ``weight(*shape)``: normal draws / sqrt(fan-in), float32."""
  rng = np.random.default_rng(seed)

  def weight(*shape):
    scale = 1.0 / np.sqrt(np.prod(shape[:-1]))
    return jnp.asarray(rng.standard_normal(shape) * scale, jnp.float32)

  return weight


def dense_chain(widths: tuple[int, ...], seed: int) -> LinearChain:
  """Dense layers ``widths[k] -> widths[k + 1]``, standard normal weights."""
  rng = np.random.default_rng(seed)
  return from_matrices([
      rng.standard_normal((widths[k + 1], widths[k]))
      for k in range(len(widths) - 1)
  ])


def expanding_conv_chain(seed: int) -> LinearChain:
  """conv 6x6x1 -> 6x6x2, strided scaled conv -> 3x3x3, dense 27->6, 6->4."""
  weight = weight_sampler(seed)
  return from_ops([
      LinearOp(kind="conv", weight=weight(3, 3, 1, 2), in_scale=None,
               out_scale=None, in_shape=(6, 6, 1), strides=(1, 1),
               padding=((1, 1), (1, 1))),
      LinearOp(kind="conv", weight=weight(3, 3, 2, 3), in_scale=None,
               out_scale=jnp.asarray([0.5, 1.5, 1.0], jnp.float32),
               in_shape=(6, 6, 2), strides=(2, 2), padding=((1, 1), (1, 1))),
      LinearOp(kind="dense", weight=weight(27, 6), in_scale=None,
               out_scale=None, in_shape=(3, 3, 3)),
      LinearOp(kind="dense", weight=weight(6, 4), in_scale=None,
               out_scale=None, in_shape=(6,)),
  ])
