"""The float32 evaluation error of a residual network, over an L2 ball.

:mod:`lipjax.certification.float32_error` bounds ``|fl32(f)(x') - f(x')|``
for a plain network; this module gives the same guarantee, with the same
three parts (an elementwise part from rounding the values at ``x``, an L2
part carried from earlier errors, and an L2 part per unit of ``R`` from
rounding how far the values move over the ball), for a
:class:`lipjax.residual_models.ResidualNet`. ``f`` is the network in exact
arithmetic with the float32 parameters (batch norm's multiplier
``gamma / sqrt(var + eps)`` exact; the device's is within
:data:`lipjax.linear_maps.SCALE_ROUNDING` of it). Operation by operation,
in the standard model (``u = 2^-24``):

* the input normalization ``(x - mean) / std``: 3 roundings (a division may
  be a reciprocal and a product);
* a conv or dense layer with bias, ``n`` terms per output: its rounding
  ``gamma_{n+1} |W| |h|``, and its input's error through ``W``: elementwise
  ``|W| e`` or in L2 by ``||W||``, per example whichever is smaller;
* eval-mode batch norm ``((z - mean) * mul) + bias``: 3 roundings and the
  multiplier's own error;
* a residual block ``y = S x + W_m phi(... phi(W_0 x))``: the branch and
  the shortcut (identity, or a projection conv with its batch norm) as
  above, then the sum, ``u |y|``. An error entering the block leaves it
  through both paths, so at most ``||S|| + Lip(phi)^m prod ||W_i||`` times
  larger in L2;
* a linear residual block ``x + W x``: an entering error goes through the
  single map ``I + W`` (its own certified norm), then the sum rounds;
* activations as in :mod:`~lipjax.certification.float32_error`.

The norms are certified upper bounds on each single map (:func:`op_norms`:
conv symbol bounds and float64 SVDs, proofs without a probability). How far
a value moves over the ball is bounded by the certified LipLT bounds ``m_j``
of the node pre-activations when the certifying bound has them, else by
products of the single norms. Subnormals, whether flushed to zero or not,
add at most ``2^-126`` per operation, and a flushed weight or multiplier at
most ``2^-126`` times its operand; both are counted.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from lipjax import activations
from lipjax import deterministic
from lipjax import linear_maps
from lipjax import norm_certificates
from lipjax.certification import float32_error
from lipjax.certification.float32_error import U32
from lipjax.certification.float32_error import Err
from lipjax.certification.float32_error import Layer

FLUSH = float32_error.FLUSH
# 3 roundings of batch norm and its multiplier's relative error.
_BN_RHO = (1.0 + U32)**3 * (1.0 + linear_maps.SCALE_ROUNDING) - 1.0


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _Unit:
  """One spec layer of the network, in float64 (see residual_graph's units).

  Attributes:
    layers: plain and linear_residual: ``(W,)``; residual: ``(W_0 .. W_m)``.
    shortcut: a residual unit's projection, or None (identity, other kinds).
    kind: ``"plain"``, ``"linear_residual"`` or ``"residual"``.
    activated: an activation follows (all but residual units and logits).
  """
  layers: tuple[Layer, ...]
  shortcut: Layer | None
  kind: str = dataclasses.field(metadata=dict(static=True))
  activated: bool = dataclasses.field(metadata=dict(static=True))


def _spec_parts(model):
  """Per spec layer: ``(kind, [(module, batch norm, op kind)], projection,
  activated)``, the projection a ``(module, batch norm, "conv")`` or None."""
  last = len(model.spec) - 1
  for k, (spec, layer) in enumerate(zip(model.spec, model.layers)):
    if spec[0] == "conv":
      norm = model.batch_norms[k] if model.batch_norm else None
      yield "plain", [(layer, norm, "conv")], None, True
    elif spec[0] == "dense":
      yield "plain", [(layer, None, "dense")], None, k < last
    elif spec[0] == "linear_residual":
      yield "linear_residual", [(layer.conv, layer.norm, "conv")], None, True
    else:
      count = len(layer.convs)
      norms = list(layer.norms) if layer.batch_norm else [None] * (count + 1)
      projection = (None if layer.projection is None else
                    (layer.projection, norms[count], "conv"))
      yield ("residual", [(c, norms[i], "conv")
                          for i, c in enumerate(layer.convs)],
             projection, False)


def _batch_norm64(norm) -> tuple:
  """Exact (float64) eval-mode batch norm: ``(mul, mean, bias)`` or Nones."""
  if norm is None:
    return None, None, None
  mul = 1.0 / np.sqrt(np.asarray(norm.var[...], np.float64) + norm.epsilon)
  if norm.scale is not None:
    mul = mul * np.asarray(norm.scale[...], np.float64)
  bias = None if norm.bias is None else np.asarray(norm.bias[...], np.float64)
  return mul, np.asarray(norm.mean[...], np.float64), bias


def _layer(module, norm, kind: str) -> Layer:
  mul, mean, bias = _batch_norm64(norm)
  to = float32_error.to_f64
  extra = ({} if kind == "dense" else
           {"stride": int(module.strides[0]), "pad": int(module.padding[0][0])})
  return Layer(weight=to(module.kernel[...]), bias=to(module.bias[...]),
               bn_mul=to(mul), bn_mean=to(mean), bn_bias=to(bias), kind=kind,
               **extra)


def _units(model) -> tuple[_Unit, ...]:
  """The network's units with float64 arrays (call inside enable_x64)."""
  return tuple(
      _Unit(layers=tuple(_layer(*part) for part in parts),
            shortcut=None if projection is None else _layer(*projection),
            kind=kind, activated=activated)
      for kind, parts, projection, activated in _spec_parts(model))


# ----------------------------------------------------------------------------
# Certified norms of the single maps.


def _linear_op(module, norm, kind: str, in_shape) -> linear_maps.LinearOp:
  """A float64 op ``D W`` (``D`` the exact batch-norm multiplier)."""
  conv = kind == "conv"
  return linear_maps.LinearOp(
      weight=np.asarray(module.kernel[...], np.float64), in_scale=None,
      out_scale=_batch_norm64(norm)[0], kind=kind, in_shape=tuple(in_shape),
      strides=tuple(module.strides) if conv else (),
      padding=tuple(tuple(p) for p in module.padding) if conv else ())


def _identity_plus_norm(op: linear_maps.LinearOp) -> float:
  """A bound on ``||I + D W||`` for a stride-1 "same" conv that keeps the
  channels: the symbol bound of the conv whose kernel has ``I`` added at
  its centre, plus the float64 rounding of that kernel (3 ulps of each
  entry of ``|D W| + I``)."""
  kernel = np.asarray(op.weight, np.float64)
  if op.out_scale is not None:
    kernel = kernel * op.out_scale
  kh, kw, c_in, c_out = kernel.shape
  if c_in != c_out or op.strides != (1, 1):
    raise ValueError("I + W needs a stride-1 conv that keeps the channels.")
  kernel = kernel.copy()
  kernel[kh // 2, kw // 2] += np.eye(c_in)
  summed = dataclasses.replace(op, weight=kernel, out_scale=None)
  rounding = 3.0 * 2.0**-53 * (norm_certificates.abs_norm(op) + 1.0)
  return deterministic.conv_symbol_norm(summed) + rounding


def op_norms(model) -> np.ndarray:
  """Certified upper bounds on the norms of the network's single maps.

  Bounds by proof (:func:`lipjax.deterministic.op_upper_bound`: conv symbol
  bounds, float64 SVDs of dense layers), on the maps as they act on the
  normalized input (no ``1/std``) with each batch norm's exact multiplier.

  Returns:
    float64 ``[P]``, per spec layer in order: conv or dense ``||D W||``;
    linear_residual ``||D W||, ||I + D W||``; residual ``||D_0 W_0||, ...,
    ||D_m W_m||`` then ``||D_S S||`` for a projection, 1 for the identity.
  """
  out = []
  for (kind, parts, projection, _), shape in zip(
      _spec_parts(model), model.layer_input_shapes):
    ops = []
    for module, norm, op_kind in parts:
      ops.append(_linear_op(module, norm, op_kind,
                            ops[-1].out_shape if ops else shape))
    out += [deterministic.op_upper_bound(op) for op in ops]
    if kind == "linear_residual":
      out.append(_identity_plus_norm(ops[0]))
    elif kind == "residual":
      out.append(1.0 if projection is None else deterministic.op_upper_bound(
          _linear_op(*projection, shape)))
  return np.asarray(out, np.float64)


def num_op_norms(model) -> int:
  """How many entries :func:`op_norms` returns."""
  return sum(len(parts) + (kind != "plain")
             for kind, parts, _, _ in _spec_parts(model))


# ----------------------------------------------------------------------------
# The error, operation by operation (traced inside one jit).


@dataclasses.dataclass(frozen=True)
class _Affine:
  """A conv or dense layer with bias and optional batch norm, in parts.

  The error of its output is ``(own + carried) (1 + rho) + extra``:
  ``own`` its rounding, ``carried`` the input's error through ``D W``,
  ``rho`` batch norm's relative error and ``extra`` its other terms.
  ``by_abs`` is ``|D| |W| fresh`` (the elementwise carry), ``value`` the
  output at ``x`` and ``move`` how far it moves per unit of ``R``.
  """
  value: jax.Array
  move: jax.Array
  own: Err
  carried: Err
  extra: Err
  rho: float
  by_abs: jax.Array

  def error(self) -> Err:
    return (self.own + self.carried).times(1.0 + self.rho) + self.extra

  def local(self) -> Err:
    """The error made here, on the computed input: :meth:`error` less
    the input's own error carried through ``D W``."""
    return (self.own.times(1.0 + self.rho) + self.extra
            + self.carried.times(self.rho))


def _affine(layer: Layer, value, move, err: Err, norm, node_bound
            ) -> _Affine:
  """``D (W h + b - mean) + bias`` (see :class:`_Affine`).

  Args:
    layer: the layer (float64).
    value, move, err: its input at ``x``, its move and its error.
    norm: a certified bound on ``||D W||``.
    node_bound: a bound on the output's move (inf if none).
  """
  z, own, carry_abs, absolute = float32_error.affine_rounding(
      layer, value, move, err)
  out_move = jnp.minimum(node_bound, norm * move)
  if layer.bn_mul is None:
    return _Affine(z, out_move, own,
                   float32_error.carry(carry_abs, err, norm),
                   Err(0.0, 0.0, 0.0), 0.0, carry_abs)
  mul = jnp.abs(layer.bn_mul)
  top, centred = jnp.max(mul), z - layer.bn_mean
  by_abs = mul * carry_abs
  bn_bias = 0.0 if layer.bn_bias is None else layer.bn_bias
  # A multiplier or a bias flushed to zero: FLUSH times the pre-scale value
  # and its error (the L2 parts of W e through |||W||| >= ||W||).
  extra = Err(
      _BN_RHO * mul * jnp.abs(centred) + U32 * jnp.abs(bn_bias)
      + 2.0 * FLUSH * (jnp.abs(centred) + own.fresh + carry_abs + 2.0 + mul),
      2.0 * FLUSH * (own.xi + absolute * err.xi),
      _BN_RHO * out_move
      + 2.0 * FLUSH * (own.beta + absolute * (err.beta + move)))
  return _Affine(centred * layer.bn_mul + bn_bias, out_move,
                 Err(mul * own.fresh, top * own.xi, top * own.beta),
                 float32_error.carry(by_abs, err, norm), extra,
                 _BN_RHO, by_abs)


def _add(value, move, err: Err):
  """The rounding of a sum whose exact value is ``value`` (error ``err``
  before rounding): ``u |computed|``, and a flushed result.

  Returns:
    ``(value, move, error, local)``: ``local`` is the rounding alone.
  """
  local = Err(U32 * (err.fresh + jnp.abs(value)) + FLUSH, U32 * err.xi,
              U32 * (err.beta + move))
  return value, move, err + local, local


def _activate(value, move, err: Err, act, gain: float, ulps: float):
  """``phi`` (Lipschitz ``gain`` per coordinate), rounded to ``ulps``.

  Returns:
    ``(h, move, error, local)``: ``local`` is the rounding alone.
  """
  h = act.fn(value)
  h_move = gain * move
  local = Err(ulps * (jnp.abs(h) + gain * err.fresh) + float32_error.UNDERFLOW,
              gain * err.xi * ulps, ulps * (h_move + gain * err.beta))
  return h, h_move, err.times(gain) + local, local


def _linear_residual(layer: Layer, value, move, err: Err, norm_dw,
                     norm_idw, node_bound):
  """``x + D (W x + b - mean) + bias``: the input error through ``I + D W``
  (elementwise ``|e| + |D||W||e|``, or by ``||I + D W||``), this layer's
  rounding, batch norm's error on ``D W e``, then the sum.

  Returns:
    ``(value, move, error, local)``: ``local`` is the error made here (on
    the computed input).
  """
  parts = _affine(layer, value, move, err, norm_dw, jnp.inf)
  through = float32_error.carry(err.fresh + parts.by_abs, err, norm_idw)
  local = parts.local()
  value, move, err, rounding = _add(
      value + parts.value, jnp.minimum(node_bound, norm_idw * move),
      local + through)
  return value, move, err, local + rounding


def _residual(unit: _Unit, value, move, err: Err, norms, node_bounds, act,
              gain: float, ulps: float, nodes: list):
  """``S x + W_m phi(... phi(W_0 x))``: branch, shortcut, then the sum.

  Appends to ``nodes`` each inner node's local error ``(at its
  pre-activation, at its activation output)``.

  Returns:
    ``(value, move, error, local)``: ``local`` is the error made at the
    block's output (the last branch layer's, the projection's and the
    sum's roundings).
  """
  inner = len(unit.layers) - 1  # >= 1
  z = _affine(unit.layers[0], value, move, err, norms[0], node_bounds[0])
  for i in range(1, inner + 1):
    h, h_move, h_err, h_local = _activate(z.value, z.move, z.error(), act,
                                          gain, ulps)
    nodes.append((z.local(), h_local))
    z = _affine(unit.layers[i], h, h_move, h_err, norms[i],
                node_bounds[i] if i < inner else jnp.inf)
  local = z.local()
  if unit.shortcut is None:
    s_value, s_move, s_err = value, move, err
  else:
    s = _affine(unit.shortcut, value, move, err, norms[inner + 1], jnp.inf)
    s_value, s_move, s_err = s.value, s.move, s.error()
    local = local + s.local()
  value, move, err, rounding = _add(s_value + z.value, s_move + z.move,
                                    s_err + z.error())
  return value, move, err, local + rounding


@functools.partial(jax.jit, static_argnames=("activation",))
def _propagate(units, x, norms, node_bounds, inv_std, mean, *,
               activation: str):
  """The error bound at the logits, two ways.

  Returns:
    A dict: ``carried`` ``(fresh [B, K], xi [B], beta)``, every error
    carried to the logits by the single maps' norms; ``logits`` the same
    for the logits layer's own rounding alone; ``nodes`` ``([B, n], [n])``,
    the L2 sizes (at ``R = 0``, per unit of ``R``) of the errors made at
    each node as seen from its activation output (its pre-activation's
    times ``Lip(phi)``); ``outputs`` ``([B, U], [U])`` those made at the
    normalized input and at each residual block's output.
  """
  act = activations.get_activation(activation)
  gain = activations.lipschitz_constant(act.slopes)
  ulps = float32_error.activation_rounding(activation)
  value = (x - mean) * inv_std
  move = jnp.max(inv_std)
  rounding = (1.0 + U32)**3 - 1.0
  err = Err(rounding * jnp.abs(value) + 4.0 * FLUSH * (1.0 + move),
            jnp.zeros(x.shape[0], x.dtype), rounding * move)
  nodes, outputs = [], [err]
  n, node = 0, 0
  for unit in units:
    if unit.kind == "residual":
      count = len(unit.layers) - 1
      value, move, err, local = _residual(
          unit, value, move, err, norms[n:n + count + 2],
          node_bounds[node:node + count], act, gain, ulps, nodes)
      outputs.append(local)
      n, node = n + count + 2, node + count
      continue
    bound = node_bounds[node] if unit.activated else jnp.inf
    if unit.kind == "linear_residual":
      value, move, err, local = _linear_residual(
          unit.layers[0], value, move, err, norms[n], norms[n + 1], bound)
      n += 2
    else:
      z = _affine(unit.layers[0], value, move, err, norms[n], bound)
      value, move, err, local = z.value, z.move, z.error(), z.local()
      n += 1
    if not unit.activated:
      return {"carried": (err.fresh, err.xi, err.beta),
              "logits": (local.fresh, local.xi, local.beta),
              "nodes": float32_error.stack_terms(
                  [pre.times(gain) + act_local for pre, act_local in nodes]),
              "outputs": float32_error.stack_terms(outputs)}
    value, move, err, h_local = _activate(value, move, err, act, gain, ulps)
    nodes.append((local, h_local))
    node += 1
  raise ValueError("The last layer must be a dense layer without activation.")


def num_nodes(model) -> int:
  """How many activation inputs (LipLT nodes) the network has."""
  return sum(len(parts) - 1 if kind == "residual" else int(activated)
             for kind, parts, _, activated in _spec_parts(model))


def output_tails(model, norms, node_tails, rows) -> np.ndarray:
  """Pairwise Lipschitz bounds to the logits from the normalized input and
  from every residual block's output.

  From a unit's input: the logits layer's rows; a plain or linear residual
  layer's norm times ``Lip(phi)`` times its node's tail; a residual
  block's ``||D_0 W_0|| Lip(phi) T_j0 + ||S||`` times the tail from its
  output (a change ``e`` of the block's input moves its first node by
  ``D_0 W_0 e`` and its output through the shortcut by ``S e``).

  Args:
    model: the ResidualNet.
    norms: :func:`op_norms`' bounds.
    node_tails: ``[num_nodes, K, K]``
      (:func:`lipjax.residual_certified.error_tails`).
    rows: ``[K, K]`` the logits layer's pair row norms (same).

  Returns:
    ``[1 + residual blocks, K, K]`` float64, upper bounds.
  """
  gain = activations.lipschitz_constant(
      activations.get_activation(model.activation).slopes)
  units, n, node = [], 0, 0
  for kind, parts, _, activated in _spec_parts(model):
    units.append((kind, activated, node, n, len(parts)))
    if kind == "residual":
      n, node = n + len(parts) + 1, node + len(parts) - 1
    else:
      n, node = n + 1 + (kind == "linear_residual"), node + int(activated)
  into = [None] * (len(units) + 1)  # The tail from each unit's input.
  for u in reversed(range(len(units))):
    kind, activated, node, first, count = units[u]
    if not activated and kind == "plain":
      into[u] = np.asarray(rows, np.float64)
    elif kind == "residual":
      into[u] = (norms[first] * gain * node_tails[node]
                 + norms[first + count] * into[u + 1])
    else:
      norm = norms[first + (kind == "linear_residual")]
      into[u] = norm * gain * node_tails[node]
  outs = [into[0]] + [into[u + 1] for u, unit in enumerate(units)
                      if unit[0] == "residual"]
  # A few float64 products and sums of nonnegative numbers per entry.
  return np.stack(outs) * (1.0 + 1e-12)


def logit_error_bounds(model, images, layer_norms, lipschitz_to,
                       tails=None) -> float32_error.EvaluationError:
  """The float32 evaluation error of a residual ``model`` around ``images``.

  Args:
    model: a :class:`lipjax.residual_models.ResidualNet`.
    images: ``[B, H, W, C]`` float inputs in pixel units.
    layer_norms: certified norms in :func:`op_norms`'s layout.
    lipschitz_to: ``[num_nodes]`` certified Lipschitz bounds from the input
      (pixels) to every node pre-activation (LipLT's ``m_j``), or ``inf``
      where there is none.
    tails: None, or ``(node_tails [num_nodes, K, K], rows [K, K])`` from
      :func:`lipjax.residual_certified.error_tails`: then every rounding
      error reaches the logits through the pairwise Lipschitz bound from
      where it is made (much tighter), instead of through products of the
      single maps' norms.

  Returns:
    An :class:`~lipjax.certification.float32_error.EvaluationError`,
    inflated by ``1 + 1e-9`` for the float64 arithmetic of the bound.

  Raises:
    ValueError: arrays of the wrong length.
  """
  norms = np.asarray(layer_norms, np.float64).reshape(-1)
  bounds = np.asarray(lipschitz_to, np.float64).reshape(-1)
  expected = (num_op_norms(model), num_nodes(model))
  if (norms.size, bounds.size) != expected:
    raise ValueError(
        f"A residual network needs {expected[0]} layer norms and "
        f"{expected[1]} node bounds (from sound_bound), got {norms.size} "
        f"and {bounds.size}.")
  if tails is not None and np.shape(tails[0])[0] != expected[1]:
    raise ValueError(f"Expected {expected[1]} node tails, got "
                     f"{np.shape(tails[0])[0]}.")
  with jax.enable_x64(True):
    std = np.asarray(model.input_std, np.float32).astype(np.float64)
    mean = np.asarray(model.input_mean, np.float32).astype(np.float64)
    parts = jax.tree.map(np.asarray, _propagate(
        _units(model), jnp.asarray(np.asarray(images, np.float64)),
        jnp.asarray(norms), jnp.asarray(bounds), jnp.asarray(1.0 / std),
        jnp.asarray(mean), activation=model.activation))
  if tails is None:
    return float32_error.EvaluationError.from_parts(parts["carried"])
  node_tails = np.asarray(tails[0], np.float64)
  every = [(output_tails(model, norms, node_tails, tails[1]),
            parts["outputs"])]
  if parts["nodes"] is not None:
    every.insert(0, (node_tails, parts["nodes"]))
  return float32_error.EvaluationError.from_parts(parts["logits"], every)


def check_finite(model) -> None:
  """Raises a one-line ValueError naming the first non-finite parameter or
  batch-norm statistic of ``model``."""
  for k, (kind, parts, projection, _) in enumerate(_spec_parts(model)):
    for module, norm, _ in parts + ([projection] if projection else []):
      for name, variable in (("kernel", module.kernel), ("bias", module.bias),
                             *(() if norm is None else _norm_arrays(norm))):
        if variable is not None and not np.all(
            np.isfinite(np.asarray(variable[...]))):
          raise ValueError(
              f"Layer {k} ({model.spec[k][0]}) has a non-finite {name}: no "
              "bound can certify this network. Restore a checkpoint saved "
              "before the weights diverged.")


def _norm_arrays(norm):
  return (("batch-norm scale", norm.scale), ("batch-norm bias", norm.bias),
          ("batch-norm mean", norm.mean), ("batch-norm variance", norm.var))

