"""Bias-free linear maps of a network's weight layers, with exact adjoints.

Every weight layer k of a sequential network is turned into a
:class:`LinearOp` ``W_k``: the layer without its bias, with any fixed
per-channel scale folded in (the input normalization ``1/std`` before the
first layer, so that Lipschitz constants are in pixel units, and an eval-mode
batch-norm scale ``gamma / sqrt(var + eps)`` after a conv). Flatten is folded
into the first dense layer. The adjoint ``W_k^T`` comes from
``jax.linear_transpose``, which is exact for any stride and padding (no
``output_padding`` trap; see
docs/bounds.md#the-network-as-a-chain-of-linear-maps).

A :class:`LinearChain` is the list of ops plus the activation's slope interval:
everything a bound needs. It is a pytree (weights are leaves, shapes and
slopes are static), so it can be passed through ``jax.jit`` and differentiated.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lipjax import activations

_CONV_DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def _static(**kwargs):
  return dataclasses.field(metadata=dict(static=True), **kwargs)


def _conv_by_patches(x, weight, strides, padding):
  """The conv of :class:`LinearOp` as strided slices and one matrix product.

  The same map as ``lax.conv_general_dilated`` (NHWC, HWIO), for the
  float64 certification sweeps: XLA:CPU runs some float64 convolutions (the
  adjoints of strided ones above all) 10-30x slower than this, whose
  transpose is pads and adds around a matrix product.

  Args:
    x: ``[batch, H, W, c_in]``.
    weight: ``[kh, kw, c_in, c_out]``.
    strides: ``(sh, sw)``.
    padding: ``((top, bottom), (left, right))``.

  Returns:
    ``[batch, H_out, W_out, c_out]``.
  """
  kh, kw, c_in, c_out = weight.shape
  (sh, sw) = strides
  x = jnp.pad(x, ((0, 0),) + tuple(padding) + ((0, 0),))
  out_h = (x.shape[1] - kh) // sh + 1
  out_w = (x.shape[2] - kw) // sw + 1
  patches = jnp.concatenate(
      [x[:, i:i + sh * (out_h - 1) + 1:sh, j:j + sw * (out_w - 1) + 1:sw, :]
       for i in range(kh) for j in range(kw)], axis=-1)
  return patches @ weight.reshape(kh * kw * c_in, c_out)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LinearOp:
  """One bias-free weight layer, acting on batches of vectors.

  Attributes:
    weight: dense: ``[in_features, out_features]`` (Flax convention, so the
      map is ``x @ weight``); conv: ``[kh, kw, c_in, c_out]`` (HWIO).
    in_scale: optional ``[c_in]`` per-channel factor applied to the input
      first (broadcast over the last axis of ``in_shape``), or None.
    out_scale: optional ``[c_out]`` per-channel factor applied last, or None.
    kind: ``"dense"`` or ``"conv"``.
    in_shape: shape of one input vector: ``(H, W, C)`` for a conv, ``(n,)`` for
      a dense layer, or ``(H, W, C)`` for a dense layer that flattens.
    strides: conv strides ``(sh, sw)``; ``()`` for dense.
    padding: conv zero padding ``((top, bottom), (left, right))``; ``()`` for
      dense.
  """
  weight: jax.Array
  in_scale: jax.Array | None
  out_scale: jax.Array | None
  kind: str = _static()
  in_shape: tuple[int, ...] = _static()
  strides: tuple[int, ...] = _static(default=())
  padding: tuple[tuple[int, int], ...] = _static(default=())

  @property
  def out_shape(self) -> tuple[int, ...]:
    """Shape of one output vector."""
    if self.kind == "dense":
      return (self.weight.shape[1],)
    height, width, _ = self.in_shape
    kh, kw, _, c_out = self.weight.shape
    (pt, pb), (pl, pr) = self.padding
    sh, sw = self.strides
    return ((height + pt + pb - kh) // sh + 1, (width + pl + pr - kw) // sw + 1,
            c_out)

  @property
  def in_dim(self) -> int:
    return math.prod(self.in_shape)

  @property
  def out_dim(self) -> int:
    return math.prod(self.out_shape)

  def __call__(self, x: jax.Array) -> jax.Array:
    """Applies the map to a batch.

    Args:
      x: ``[batch, *in_shape]``.

    Returns:
      ``[batch, *out_shape]``.
    """
    if self.in_scale is not None:
      x = x * self.in_scale.astype(x.dtype)
    weight = self.weight.astype(x.dtype)
    if self.kind == "dense":
      y = x.reshape(x.shape[0], -1) @ weight
    elif x.dtype == jnp.float64:
      y = _conv_by_patches(x, weight, self.strides, self.padding)
    else:
      y = jax.lax.conv_general_dilated(
          x, weight, window_strides=self.strides, padding=self.padding,
          dimension_numbers=_CONV_DIMENSIONS)
    if self.out_scale is not None:
      y = y * self.out_scale.astype(y.dtype)
    return y

  def transpose(self, y: jax.Array) -> jax.Array:
    """Applies the adjoint map to a batch.

    Args:
      y: ``[batch, *out_shape]``.

    Returns:
      ``[batch, *in_shape]``, such that ``<W x, y> = <x, W^T y>``.
    """
    primal = jax.ShapeDtypeStruct((y.shape[0],) + tuple(self.in_shape),
                                  y.dtype)
    (x,) = jax.linear_transpose(self.__call__, primal)(y)
    return x

  def astype(self, dtype) -> "LinearOp":
    """The same op with its arrays cast to ``dtype``."""
    cast = lambda a: None if a is None else jnp.asarray(a, dtype)
    return dataclasses.replace(self, weight=cast(self.weight),
                               in_scale=cast(self.in_scale),
                               out_scale=cast(self.out_scale))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ResidualOp:
  """``y = S x + B_m ... B_0 x``: the linear part of a residual block.

  Used by :mod:`lipjax.residual_bounds` to describe products through
  residual blocks (docs/residual.md); it acts like a :class:`LinearOp`
  (shapes, ``__call__``, exact ``transpose``, ``astype``), so power
  iteration, Lanczos and exact Gram norms work on chains of them unchanged.

  Attributes:
    branch: the ops ``B_0, ..., B_m``, applied in order.
    shortcut: a projection :class:`LinearOp` ``S``, or None for
      ``shortcut_scale`` times the identity.
    shortcut_scale: the identity shortcut's factor (static).
  """
  branch: tuple[LinearOp, ...]
  shortcut: LinearOp | None
  shortcut_scale: float = _static(default=1.0)
  kind: str = _static(default="residual")

  @property
  def in_shape(self) -> tuple[int, ...]:
    return tuple(self.branch[0].in_shape)

  @property
  def out_shape(self) -> tuple[int, ...]:
    return tuple(self.branch[-1].out_shape)

  @property
  def in_dim(self) -> int:
    return math.prod(self.in_shape)

  @property
  def out_dim(self) -> int:
    return math.prod(self.out_shape)

  @property
  def weight(self) -> jax.Array:
    """The first branch weight (its dtype is the op's)."""
    return self.branch[0].weight

  @property
  def in_scale(self):
    return None

  @property
  def out_scale(self):
    return None

  def primitives(self) -> tuple[LinearOp, ...]:
    """The :class:`LinearOp` s inside: the branch, then the projection."""
    return tuple(self.branch) + (() if self.shortcut is None
                                 else (self.shortcut,))

  def __call__(self, x: jax.Array) -> jax.Array:
    """``S x + B_m(... B_0(x))`` for ``x: [batch, *in_shape]``."""
    y = x
    for op in self.branch:
      y = op(y)
    if self.shortcut is None:
      return y + self.shortcut_scale * x
    return y + self.shortcut(x)

  def transpose(self, y: jax.Array) -> jax.Array:
    """The adjoint map, for ``y: [batch, *out_shape]``."""
    primal = jax.ShapeDtypeStruct((y.shape[0],) + self.in_shape, y.dtype)
    (x,) = jax.linear_transpose(self.__call__, primal)(y)
    return x

  def astype(self, dtype) -> "ResidualOp":
    return dataclasses.replace(
        self, branch=tuple(op.astype(dtype) for op in self.branch),
        shortcut=None if self.shortcut is None else self.shortcut.astype(
            dtype))


def primitive_ops(op) -> tuple[LinearOp, ...]:
  """The weight layers inside an op: itself, or a :class:`ResidualOp` 's."""
  return op.primitives() if isinstance(op, ResidualOp) else (op,)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LinearChain:
  """A sequential network seen by the bounds: ``W_{N-1} phi(... phi(W_0 x))``.

  Attributes:
    ops: the N bias-free weight layers, input first (:class:`LinearOp`, or
      :class:`ResidualOp` in the products of a residual network).
    slopes: ``(alpha, beta)``, the slope interval of the activation that sits
      after every layer but the last.
  """
  ops: tuple[LinearOp, ...]
  slopes: tuple[float, float] = _static(default=(0.0, 1.0))

  @property
  def num_layers(self) -> int:
    return len(self.ops)

  @property
  def num_classes(self) -> int:
    return self.ops[-1].out_dim

  def astype(self, dtype) -> "LinearChain":
    return dataclasses.replace(self,
                               ops=tuple(op.astype(dtype) for op in self.ops))

  def apply_product(self, start: int, end: int, x: jax.Array) -> jax.Array:
    """``W_end ... W_start x`` for a batch ``x: [batch, *ops[start].in_shape]``."""
    for op in self.ops[start:end + 1]:
      x = op(x)
    return x

  def transpose_product(self, start: int, end: int, y: jax.Array) -> jax.Array:
    """``W_start^T ... W_end^T y`` for ``y: [batch, *ops[end].out_shape]``."""
    for op in reversed(self.ops[start:end + 1]):
      y = op.transpose(y)
    return y


def _check_shapes(ops: Sequence[LinearOp]) -> None:
  # Shapes must agree exactly (not just in size): the adjoint of layer k+1
  # returns its declared input shape, which layer k's adjoint must accept.
  for k, (op, nxt) in enumerate(zip(ops[:-1], ops[1:])):
    if op.out_shape != tuple(nxt.in_shape):
      raise ValueError(
          f"Layer {k} outputs shape {op.out_shape} but layer {k + 1} expects "
          f"{tuple(nxt.in_shape)}: the layers do not form a chain.")


def from_matrices(matrices: Sequence[Any], *, slopes=(0.0, 1.0)) -> LinearChain:
  """A chain of dense layers from weight matrices in math convention.

  Args:
    matrices: ``W_0, ..., W_{N-1}``, each of shape ``[out, in]`` (so the
      network is ``W_{N-1} phi(... phi(W_0 x))``); biases are irrelevant.
    slopes: the activation's slope interval; ReLU's ``(0, 1)`` by default.

  Returns:
    A :class:`LinearChain`.

  Raises:
    ValueError: if a matrix is not 2-D or consecutive shapes do not chain.
  """
  if len(matrices) == 0:
    raise ValueError("Need at least one weight matrix.")
  ops = []
  for k, matrix in enumerate(matrices):
    matrix = jnp.asarray(matrix)
    if not jnp.issubdtype(matrix.dtype, jnp.floating):
      matrix = matrix.astype(jnp.float32)
    if matrix.ndim != 2:
      raise ValueError(f"Weight matrix {k} has shape {matrix.shape}; expected "
                       "a 2-D [out, in] matrix.")
    ops.append(LinearOp(weight=matrix.T, in_scale=None, out_scale=None,
                        kind="dense", in_shape=(matrix.shape[1],)))
  _check_shapes(ops)
  return LinearChain(ops=tuple(ops), slopes=activations.check_slopes(slopes))


def from_ops(ops: Sequence[LinearOp], *, slopes=(0.0, 1.0)) -> LinearChain:
  """A chain from explicit :class:`LinearOp` objects (checks they chain)."""
  ops = tuple(ops)
  if not ops:
    raise ValueError("Need at least one layer.")
  _check_shapes(ops)
  return LinearChain(ops=ops, slopes=activations.check_slopes(slopes))


def dense_matrix(op_or_chain, start: int = 0, end: int | None = None,
                 dtype=np.float64) -> np.ndarray:
  """Materializes a linear map as a dense ``[out_dim, in_dim]`` matrix.

  Meant for tests and small layers: pushes every basis vector through the map.
  Inputs and outputs are flattened in row-major (H, W, C) order.
  """
  if isinstance(op_or_chain, LinearOp):
    chain, start, end = LinearChain(ops=(op_or_chain,)), 0, 0
  else:
    chain = op_or_chain
    end = chain.num_layers - 1 if end is None else end
  in_shape = chain.ops[start].in_shape
  n = math.prod(in_shape)
  with jax.enable_x64(True):
    chain64 = chain.astype(jnp.float64)
    basis = jnp.eye(n, dtype=jnp.float64).reshape((n,) + tuple(in_shape))
    columns = chain64.apply_product(start, end, basis).reshape(n, -1)
    return np.asarray(columns, dtype=dtype).T


def _value(variable):
  return None if variable is None else variable[...]


def from_model(model) -> LinearChain:
  """The bias-free linear chain of a :class:`lipjax.models.SequentialNet`.

  Works inside ``jax.jit``/``jax.grad`` on a model merged from traced params
  (``nnx.merge(graphdef, params, rest)``); the chain's weights are then
  traced too.

  The input normalization ``(x - mean) / std`` contributes ``diag(1/std)``
  to the first layer (its mean is a bias), so bounds are in pixel units. An
  eval-mode batch norm after a conv contributes ``diag(gamma / sqrt(var +
  eps))`` (docs/bounds.md#batch-norm).
  """
  # Imported here so linear_maps does not depend on flax for plain chains.
  from lipjax import models  # pylint: disable=import-outside-toplevel

  if not isinstance(model, models.SequentialNet):
    raise TypeError(
        f"Expected a lipjax.models.SequentialNet, got {type(model).__name__}. "
        "Build one with lipjax.models.build(...); if you hold restored params, "
        "use nnx.merge(graphdef, params, ...) or nnx.update(model, params).")
  inv_std = 1.0 / jnp.asarray(model.input_std, jnp.float32)
  identity_scale = all(s == 1.0 for s in model.input_std)
  ops = []
  conv_index = 0
  for k, (spec, layer, in_shape) in enumerate(
      zip(model.spec, model.layers, model.layer_input_shapes)):
    in_scale = inv_std if (k == 0 and not identity_scale) else None
    if spec[0] == "conv":
      out_scale = None
      if model.batch_norm:
        bn = model.batch_norms[conv_index]
        conv_index += 1
        gamma = _value(bn.scale)
        out_scale = jax.lax.rsqrt(_value(bn.var) + bn.epsilon)
        if gamma is not None:
          out_scale = gamma * out_scale
      _, _, _, stride, pad = spec
      ops.append(LinearOp(weight=_value(layer.kernel), in_scale=in_scale,
                          out_scale=out_scale, kind="conv", in_shape=in_shape,
                          strides=(stride, stride),
                          padding=((pad, pad), (pad, pad))))
    else:
      ops.append(LinearOp(weight=_value(layer.kernel), in_scale=in_scale,
                          out_scale=None, kind="dense", in_shape=in_shape))
  slopes = activations.get_activation(model.activation).slopes
  return LinearChain(ops=tuple(ops), slopes=slopes)


# Relative amount by which certification raises the folded per-channel
# scales: it covers the float32 rounding of 1/std and of the batch-norm
# multiplier gamma * rsqrt(var + eps) (a few ulps, 2^-24 each).
SCALE_ROUNDING = 2.0**-20


def with_scales_rounded_up(chain: LinearChain) -> LinearChain:
  """A float64 copy whose per-channel scales are raised in magnitude.

  The model's folded scales (``1 / std``, batch norm's multiplier) are
  float32 results of a division or a reciprocal square root, so they may sit
  a few ulps below the exact values the deployed network divides by. Scaling
  each by ``1 + SCALE_ROUNDING`` (exact in float64) makes a norm an upper
  bound when the scale sits at an end of the product (``||A D||`` and ``||D
  A||`` grow with ``|D|``). Scales inside a product (batch norm between two
  layers) are covered by
  :func:`lipjax.norm_certificates.interior_scale_allowance` instead.
  """
  def raise_(scale):
    if scale is None:
      return None
    return np.asarray(scale, np.float64) * (1.0 + SCALE_ROUNDING)

  # numpy float64 leaves: every consumer casts them inside enable_x64.
  return dataclasses.replace(chain, ops=tuple(
      dataclasses.replace(op, weight=np.asarray(op.weight, np.float64),
                          in_scale=raise_(op.in_scale),
                          out_scale=raise_(op.out_scale))
      for op in chain.ops))


def to_chain(network, *, slopes=None) -> LinearChain:
  """Converts what a user holds into a :class:`LinearChain`.

  Args:
    network: a :class:`LinearChain`; a :class:`lipjax.models.SequentialNet`;
      or a sequence of ``[out, in]`` weight matrices (math convention).
    slopes: overrides the activation's slope interval ``(alpha, beta)``;
      required to differ from ReLU's ``(0, 1)`` for plain matrices.

  Returns:
    A :class:`LinearChain`.
  """
  if isinstance(network, LinearChain):
    chain = network
  elif isinstance(network, (list, tuple)):
    is_op = [isinstance(op, LinearOp) for op in network]
    if any(is_op) and not all(is_op):
      raise TypeError("A network given as a list must hold only weight "
                      "matrices or only LinearOps, not a mix.")
    chain = from_ops(network) if network and all(is_op) else from_matrices(
        network)
  elif isinstance(network, (np.ndarray, jax.Array)):
    raise TypeError(
        f"Got one array of shape {network.shape}; pass the weight matrices "
        "as a list [W0, W1, ...] (each [out, in]), since their shapes "
        "usually differ.")
  else:
    chain = from_model(network)
  if slopes is not None:
    chain = dataclasses.replace(chain,
                                slopes=activations.check_slopes(slopes))
  return chain
