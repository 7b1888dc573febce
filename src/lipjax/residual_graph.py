"""A residual network as the bounds see it: units, nodes and product maps.

The network is a sequence of *units* (docs/residual.md):

* ``plain``: ``z = W x``, followed by the activation (but the last unit,
  the logits);
* ``linear_residual``: ``z = x + W x``, followed by the activation;
* ``residual``: ``y = S x + W_m phi(... phi(W_0 x))``, no activation after.

Every activation input is a *node*. Splitting each activation as
``phi(z) = a z + c psi(z)`` (``psi`` 1-Lipschitz) turns the network into a
linear one with injections ``c psi(z_j)`` at the nodes. The LipLT recursion
then needs the linear maps ``G(s, e)``, from the network input (``s = 0``)
or from the injection at node ``s - 1`` to node ``e`` (or to the logits,
``e = num_nodes``), with every activation in between replaced by ``a``.
:func:`product_ops` writes each ``G(s, e)`` as a sequence of
:class:`~lipjax.linear_maps.LinearOp` and
:class:`~lipjax.linear_maps.ResidualOp`, so a chain of them is an ordinary
:class:`~lipjax.linear_maps.LinearChain` whose norm power iteration, Lanczos
and exact Gram matrices compute unchanged. ``(s, e)`` is numbered like the
products of a chain with ``num_nodes + 1`` layers.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from lipjax import activations
from lipjax.linear_maps import LinearChain
from lipjax.linear_maps import LinearOp
from lipjax.linear_maps import ResidualOp

UNIT_KINDS = ("plain", "linear_residual", "residual")


def _static(**kwargs):
  return dataclasses.field(metadata=dict(static=True), **kwargs)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Unit:
  """One unit of a residual network (see the module docstring).

  Attributes:
    ops: plain and linear_residual: ``(W,)``; residual: ``(W_0, ..., W_m)``.
    shortcut: a residual unit's projection ``S``; None for the identity
      (and for the other kinds).
    kind: one of :data:`UNIT_KINDS`.
    activated: an activation follows (plain and linear_residual units).
  """
  ops: tuple[LinearOp, ...]
  shortcut: LinearOp | None
  kind: str = _static()
  activated: bool = _static(default=True)

  @property
  def num_nodes(self) -> int:
    if self.kind == "residual":
      return len(self.ops) - 1
    return int(self.activated)

  def primitives(self) -> tuple[LinearOp, ...]:
    return self.ops + (() if self.shortcut is None else (self.shortcut,))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ResidualGraph:
  """Units plus the activation's slope interval.

  Attributes:
    units: input first; the last is a plain, non-activated unit (logits).
    slopes: the activation's ``(alpha, beta)`` (static).
  """
  units: tuple[Unit, ...]
  slopes: tuple[float, float] = _static(default=(0.0, 1.0))

  @property
  def nodes(self) -> tuple[tuple[int, int], ...]:
    """``(unit index, index inside the unit)`` of every node, in order."""
    return tuple((u, i) for u, unit in enumerate(self.units)
                 for i in range(unit.num_nodes))

  @property
  def num_nodes(self) -> int:
    return len(self.nodes)

  @property
  def num_layers(self) -> int:
    """Nodes plus the logits: the chain length whose products are ours."""
    return self.num_nodes + 1

  @property
  def num_classes(self) -> int:
    return self.units[-1].ops[0].out_dim

  def astype(self, dtype) -> "ResidualGraph":
    def cast(unit):
      return dataclasses.replace(
          unit, ops=tuple(op.astype(dtype) for op in unit.ops),
          shortcut=None if unit.shortcut is None else unit.shortcut.astype(
              dtype))
    return dataclasses.replace(self, units=tuple(cast(u) for u in self.units))


def check_graph(graph: ResidualGraph) -> None:
  """Raises ValueError for a graph whose units cannot form a network."""
  if not graph.units:
    raise ValueError("A residual graph needs at least one unit (the logits).")
  for k, unit in enumerate(graph.units):
    if unit.kind not in UNIT_KINDS:
      raise ValueError(f"Unit {k}: unknown kind {unit.kind!r}.")
    if k < len(graph.units) - 1 and unit.kind != "residual" and (
        not unit.activated):
      raise ValueError(f"Unit {k}: only the last unit may lack an "
                       "activation.")
  last = graph.units[-1]
  if last.kind != "plain" or last.activated:
    raise ValueError("The last unit must be a plain, non-activated layer "
                     "(the logits).")
  shapes = [_unit_shapes(k, unit) for k, unit in enumerate(graph.units)]
  for k in range(len(shapes) - 1):
    if shapes[k][1] != shapes[k + 1][0]:
      raise ValueError(f"Unit {k} outputs shape {shapes[k][1]} but unit "
                       f"{k + 1} expects {shapes[k + 1][0]}: the units do not "
                       "form a network.")


def _unit_shapes(k: int, unit: Unit) -> tuple[tuple, tuple]:
  """``(in_shape, out_shape)`` of a unit whose ops fit together."""
  ops = unit.ops
  count = len(ops)
  if count == 0 or (unit.kind != "residual" and count != 1):
    raise ValueError(f"Unit {k}: a {unit.kind} unit needs "
                     f"{'one op' if unit.kind != 'residual' else 'ops'}, "
                     f"got {count}.")
  for i in range(count - 1):
    if ops[i].out_shape != tuple(ops[i + 1].in_shape):
      raise ValueError(f"Unit {k}: op {i} outputs shape {ops[i].out_shape} "
                       f"but op {i + 1} expects {tuple(ops[i + 1].in_shape)}.")
  shape = (tuple(ops[0].in_shape), tuple(ops[-1].out_shape))
  if unit.shortcut is not None and unit.kind != "residual":
    raise ValueError(f"Unit {k}: only residual units have a shortcut.")
  if unit.kind == "linear_residual" and shape[0] != shape[1]:
    raise ValueError(f"Unit {k}: x + W x needs W to keep the shape, got "
                     f"{shape[0]} -> {shape[1]}.")
  if unit.kind == "residual" and unit.shortcut is None and (
      shape[0] != shape[1]):
    raise ValueError(f"Unit {k}: an identity shortcut needs the branch to "
                     f"keep the shape, got {shape[0]} -> {shape[1]}; give "
                     "the unit a projection shortcut.")
  if unit.shortcut is not None and (
      tuple(unit.shortcut.in_shape), unit.shortcut.out_shape) != shape:
    raise ValueError(f"Unit {k}: the shortcut maps "
                     f"{tuple(unit.shortcut.in_shape)} -> "
                     f"{unit.shortcut.out_shape}, the branch {shape[0]} -> "
                     f"{shape[1]}.")
  return shape


def _scaled(op: LinearOp, factor: float) -> LinearOp:
  """``factor * op`` (folded into the output scale)."""
  if factor == 1.0:
    return op
  # numpy stays numpy (float64 certification copies built outside x64).
  xp = np if isinstance(op.weight, np.ndarray) else jnp
  dtype = op.weight.dtype
  base = (xp.ones((op.out_shape[-1],), dtype) if op.out_scale is None
          else op.out_scale)
  return dataclasses.replace(op, out_scale=base * xp.asarray(factor, dtype))


def _linear_residual(op: LinearOp, factor: float) -> ResidualOp:
  """``factor * (I + W)``."""
  return ResidualOp(branch=(_scaled(op, factor),), shortcut=None,
                    shortcut_scale=float(factor))


def _read(unit: Unit, index: int, a: float) -> list:
  """From the unit's input to its node ``index`` (or to the logits)."""
  if unit.kind == "plain":
    return [unit.ops[0]]
  if unit.kind == "linear_residual":
    return [_linear_residual(unit.ops[0], 1.0)]
  return [unit.ops[0]] + [_scaled(op, a) for op in unit.ops[1:index + 1]]


def _through(unit: Unit, a: float) -> list:
  """The whole unit, linearized (activations replaced by ``a``)."""
  if unit.kind == "plain":
    return [_scaled(unit.ops[0], a) if unit.activated else unit.ops[0]]
  if unit.kind == "linear_residual":
    return [_linear_residual(unit.ops[0], a)]
  branch = (unit.ops[0],) + tuple(_scaled(op, a) for op in unit.ops[1:])
  return [ResidualOp(branch=branch, shortcut=unit.shortcut,
                     shortcut_scale=1.0)]


def _rest(unit: Unit, index: int, a: float) -> list:
  """From the injection at node ``index`` to the unit's output."""
  if unit.kind != "residual":
    return []
  return _within(unit, index, len(unit.ops) - 1, a)


def _within(unit: Unit, source: int, target: int, a: float) -> list:
  """Inside a residual unit: from node ``source``'s injection to the input
  of its op ``target`` (node ``target`` or, for the last op, the output)."""
  ops = unit.ops[source + 1:target + 1]
  return [ops[0]] + [_scaled(op, a) for op in ops[1:]]


def product_ops(graph: ResidualGraph, product) -> tuple:
  """The ops of ``G(s, e)``, input first (see the module docstring)."""
  s, e = product
  nodes = graph.nodes
  if not 0 <= s <= e <= len(nodes):
    raise ValueError(f"Product {product} is not within the graph's "
                     f"{len(nodes) + 1} layers.")
  a, _ = activations.loop_transformation(graph.slopes)
  target_unit, target_index = ((len(graph.units) - 1, 0) if e == len(nodes)
                               else nodes[e])
  if s == 0:
    ops, first_unit = [], 0
  else:
    source_unit, source_index = nodes[s - 1]
    if source_unit == target_unit:
      return tuple(_within(graph.units[source_unit], source_index,
                           target_index, a))
    ops = _rest(graph.units[source_unit], source_index, a)
    first_unit = source_unit + 1
  for unit in graph.units[first_unit:target_unit]:
    ops += _through(unit, a)
  ops += _read(graph.units[target_unit], target_index, a)
  return tuple(ops)


def product_chain(graph: ResidualGraph, product) -> LinearChain:
  """``G(s, e)`` as a :class:`LinearChain` (its full product)."""
  return LinearChain(ops=product_ops(graph, product), slopes=graph.slopes)


def single_ops(graph: ResidualGraph) -> tuple:
  """The naive bound's factors: every weight map on its own, per unit.

  Returns:
    Per unit, a tuple of ops: plain ``(W,)``; linear_residual ``(I + W,)``;
    residual ``(W_0, ..., W_m)`` then ``S`` if it is a projection.
  """
  out = []
  for unit in graph.units:
    if unit.kind == "linear_residual":
      out.append((_linear_residual(unit.ops[0], 1.0),))
    else:
      out.append(unit.primitives())
  return tuple(out)


def class_rows_back(graph: ResidualGraph, rows: jax.Array) -> list:
  """Rows ``r^T G(s, N-1)`` for every source ``s``, in one backward sweep.

  The rows are pushed back through the logits layer and then unit by unit;
  at each node the injection's row is read off on the way.

  Args:
    graph: the network.
    rows: ``[R, *logits shape]``.

  Returns:
    ``out[s]`` of shape ``[R, *in_shape of G(s, N-1)]``, ``s = 0 ..
    num_nodes``.
  """
  a, _ = activations.loop_transformation(graph.slopes)
  units = graph.units
  out = [None] * (graph.num_nodes + 1)
  node_ids = {node: k for k, node in enumerate(graph.nodes)}
  back = units[-1].ops[0].transpose(rows)
  for u in range(len(units) - 2, -1, -1):
    unit = units[u]
    for i in range(unit.num_nodes - 1, -1, -1):
      chain = LinearChain(ops=tuple(_rest(unit, i, a)))
      out[node_ids[(u, i)] + 1] = (chain.transpose_product(
          0, chain.num_layers - 1, back) if chain.ops else back)
    for op in reversed(_through(unit, a)):
      back = op.transpose(back)
  out[0] = back
  return out


def _bn_scale(bn):
  """Eval-mode batch norm's multiplier ``gamma / sqrt(var + eps)``."""
  scale = jax.lax.rsqrt(bn.var[...] + bn.epsilon)
  return scale if bn.scale is None else bn.scale[...] * scale


def _conv_op(conv, in_shape, bn, in_scale=None) -> LinearOp:
  return LinearOp(weight=conv.kernel[...], in_scale=in_scale,
                  out_scale=None if bn is None else _bn_scale(bn),
                  kind="conv", in_shape=tuple(in_shape),
                  strides=tuple(conv.strides),
                  padding=tuple(tuple(p) for p in conv.padding))


def from_model(model) -> ResidualGraph:
  """The units of a :class:`lipjax.residual_models.ResidualNet`.

  Biases are dropped; the input normalization ``1/std`` is folded into the
  stem's input scale and eval-mode batch norms into output scales, as for
  :func:`lipjax.linear_maps.from_model`. Works on traced params.
  """
  identity = all(s == 1.0 for s in model.input_std)
  inv_std = None if identity else 1.0 / jnp.asarray(model.input_std,
                                                     jnp.float32)
  units, last = [], len(model.spec) - 1
  for k, (spec, layer, shape) in enumerate(zip(
      model.spec, model.layers, model.layer_input_shapes)):
    in_scale = inv_std if k == 0 else None
    if spec[0] == "conv":
      bn = model.batch_norms[k] if model.batch_norm else None
      units.append(Unit(ops=(_conv_op(layer, shape, bn, in_scale),),
                        shortcut=None, kind="plain"))
    elif spec[0] == "dense":
      units.append(Unit(ops=(LinearOp(
          weight=layer.kernel[...], in_scale=in_scale, out_scale=None,
          kind="dense", in_shape=tuple(shape)),), shortcut=None,
                        kind="plain", activated=k < last))
    elif spec[0] == "linear_residual":
      units.append(Unit(ops=(_conv_op(layer.conv, shape, layer.norm),),
                        shortcut=None, kind="linear_residual"))
    else:
      units.append(_residual_unit(layer, shape))
  slopes = activations.get_activation(model.activation).slopes
  graph = ResidualGraph(units=tuple(units), slopes=slopes)
  check_graph(graph)
  return graph


def _residual_unit(block, in_shape) -> Unit:
  norms = list(block.norms) if block.batch_norm else [None] * (
      len(block.convs) + 1)
  ops, shape = [], tuple(in_shape)
  for i, conv in enumerate(block.convs):
    op = _conv_op(conv, shape, norms[i])
    ops.append(op)
    shape = op.out_shape
  shortcut = None
  if block.projection is not None:
    shortcut = _conv_op(block.projection, in_shape, norms[len(block.convs)])
  return Unit(ops=tuple(ops), shortcut=shortcut, kind="residual")
