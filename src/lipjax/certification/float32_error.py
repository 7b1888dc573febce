"""A bound on the float32 evaluation error of a network, over an L2 ball.

The Lipschitz bound is about the network computed in exact arithmetic; the
deployed network runs in float32. A certificate for the deployed network
must also cover rounding, at the clean point *and* at every point of the
ball. For a :class:`lipjax.models.SequentialNet` and a batch of inputs
``x``, :func:`logit_error_bounds` returns float64 ``E0, E1 [B, K]`` such
that for every float32 input ``x'`` with ``||x' - x|| <= R``

  ``|fl32(f)(x') - f(x')| <= E0 + R E1``   (componentwise, every class),

whatever order the sums are taken in (any batch size, blocking or fused
multiply-add). It follows the standard model of floating-point arithmetic
(``u = 2^-24``): a dot product of ``d`` terms plus a bias is within
``gamma_{d+1} (|W| |h| + |b|)`` of the exact one, with
``gamma_n = n u / (1 - n u)``; subtraction, scaling and addition of the
normalizations add ``u`` each (a division by ``std`` counts twice: XLA may
turn it into a product with a rounded reciprocal); ReLU, abs and max are exact, leaky ReLU adds
``2u`` (its slope and the product round), and tanh, sigmoid, softplus and
elu are assumed within ``ACTIVATION_ULPS`` ulps (XLA's implementations are
within a few; an ulp is up to ``2u`` of the value).
Each error is split in two: an elementwise part from rounding the values
at ``x`` (computed in float64; they are exact to far below float32), and a
part of L2 norm at most ``R beta`` from rounding how far the values move
over the ball (at most ``R M_k`` in L2, with ``M_k`` the certified LipLT
bound up to layer ``k``). Elementwise parts propagate through ``|W|``; the
L2 part through the layers' certified spectral norms, and the rounding of
moved values through Schur's bound on ``|| |W| ||``. That gives ``E0`` (the
elementwise part at the logits) and ``E1`` (from ``beta``). Flushed
subnormals add ``2^-126`` per operation of a dot product (weights flushed
to zero ``2^-126`` times their input), and an absolute ``UNDERFLOW`` per
other value.

With a pairwise LipLT certificate's tails (``sound_bound``'s
``"error_tails"``) the errors are not carried layer by layer: the error
each operation makes on its computed input (its *local* error) reaches a
class pair's logit difference through the pairwise Lipschitz bound of the
exact network from where it is made (telescoping over the operations), so
the bound is per class pair instead of per logit: the logits layer's own
rounding plus ``sum_k T_k ||delta_k||`` (:class:`EvaluationError`;
docs/certificates.md).
:mod:`lipjax.certification.float32_residual` does the same for a
:class:`lipjax.residual_models.ResidualNet` (:func:`logit_error_bounds`
hands it over).

Assumptions (stated in the report): float32 arithmetic with round-to-nearest;
convolutions computed as sums of products (XLA:CPU's; a Winograd or FFT
convolution, which cuDNN may pick on a GPU, has other error bounds); matmuls
at full float32 precision (``jax.default_matmul_precision("highest")``,
never TF32 or bfloat16).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from lipjax import activations
from lipjax import residual_models

U32 = 2.0**-24
ACTIVATION_ULPS = 8
UNDERFLOW = 2.0**-120  # Above every float32 subnormal (flushed or not).
ASSUMPTIONS = (
    "float32 round-to-nearest; convolutions and matmuls as sums of products "
    "at full float32 precision (no TF32/bfloat16, no Winograd/FFT "
    f"convolutions); tanh/sigmoid/softplus/elu within {ACTIVATION_ULPS} ulps")

# Roundings in an activation's float32 evaluation (each at most u of its
# output); the others are within ACTIVATION_ULPS ulps. Leaky ReLU rounds
# its slope to float32 (0.01 is not a float32) and the product.
ACTIVATION_ROUNDING = {"relu": 0, "abs": 0, "leaky_relu": 2}
FLUSH = 2.0**-126  # The largest error of one flushed subnormal.


def activation_rounding(name: str) -> float:
  """The relative float32 error of activation ``name``'s output.

  One rounding is at most ``u |y|``; ``k`` ulps are at most ``2 k u |y|``
  (an ulp of ``y`` is up to ``2u |y|``).
  """
  if name in ACTIVATION_ROUNDING:
    return ACTIVATION_ROUNDING[name] * U32
  return 2.0 * ACTIVATION_ULPS * U32


def flushed(fan_in: int) -> float:
  """Flushed subnormals in a dot product of ``fan_in`` terms plus a bias:
  every product, partial sum and the bias, ``FLUSH`` each."""
  return (2 * fan_in + 2) * FLUSH


def gamma(n: int) -> float:
  """``gamma_n = n u / (1 - n u)``: a sum of ``n`` rounded terms."""
  return n * U32 / (1.0 - n * U32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Layer:
  """One layer in float64: the map, its bias, and batch norm if any."""
  weight: jax.Array
  bias: jax.Array
  bn_mul: jax.Array | None
  bn_mean: jax.Array | None
  bn_bias: jax.Array | None
  kind: str = dataclasses.field(metadata=dict(static=True))
  stride: int = dataclasses.field(metadata=dict(static=True), default=1)
  pad: int = dataclasses.field(metadata=dict(static=True), default=0)

  def linear(self, x, weight=None):
    """``W x`` (no bias) with ``weight`` (default ``self.weight``)."""
    w = self.weight if weight is None else weight
    if self.kind == "dense":
      return x.reshape(x.shape[0], -1) @ w
    return jax.lax.conv_general_dilated(
        x, w, (self.stride, self.stride),
        ((self.pad, self.pad), (self.pad, self.pad)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"))

  @property
  def fan_in(self) -> int:
    return int(math.prod(self.weight.shape[:-1]))


def to_f64(x):
  """A float64 jax array of ``x`` (inside ``enable_x64``), None stays."""
  return None if x is None else jnp.asarray(np.asarray(x, np.float64))


def _layers(model) -> list[Layer]:
  """The model's layers with their float32 values, held in float64."""
  layers, conv_index = [], 0
  for spec, layer in zip(model.spec, model.layers):
    bn = {"bn_mul": None, "bn_mean": None, "bn_bias": None}
    if spec[0] == "conv" and model.batch_norm:
      norm = model.batch_norms[conv_index]
      conv_index += 1
      # The float32 constant flax multiplies by, as the device computes it.
      mul = jax.lax.rsqrt(norm.var[...] + norm.epsilon)
      if norm.scale is not None:
        mul = mul * norm.scale[...]
      bn = {"bn_mul": to_f64(mul), "bn_mean": to_f64(norm.mean[...]),
            "bn_bias": to_f64(None if norm.bias is None else norm.bias[...])}
    extra = ({"stride": spec[3], "pad": spec[4]} if spec[0] == "conv"
             else {})
    layers.append(Layer(weight=to_f64(layer.kernel[...]),
                        bias=to_f64(layer.bias[...]), kind=spec[0], **extra,
                        **bn))
  return layers


def abs_norm(layer: Layer, abs_weight=None) -> jax.Array:
  """``sqrt(max row sum * max column sum)`` of ``|W|`` (Schur's test).

  An upper bound on the spectral norm of the matrix of absolute values of
  the layer's map (and so on the map's own norm). For a conv, an output
  sums ``kh kw c_in`` inputs and an input feeds at most ``kh kw`` outputs
  per output channel, whatever the stride and padding. ``abs_weight``
  (default ``|W|``) replaces ``|W|``: any nonnegative weight of its shape.
  """
  a = jnp.abs(layer.weight) if abs_weight is None else abs_weight
  if layer.kind == "dense":
    rows, cols = jnp.sum(a, axis=0), jnp.sum(a, axis=1)
  else:
    rows, cols = jnp.sum(a, axis=(0, 1, 2)), jnp.sum(a, axis=(0, 1, 3))
  return jnp.sqrt(jnp.max(rows) * jnp.max(cols))


def row_l2(x):
  """Per-example L2 norms ``[B]`` of ``x [B, ...]``."""
  return jnp.sqrt(jnp.sum(jnp.square(x.reshape(x.shape[0], -1)), axis=1))


@dataclasses.dataclass(frozen=True)
class Err:
  """An error bound: elementwise ``fresh [B, ...]`` plus vectors of L2 norm
  at most ``xi [B]`` and ``R beta`` (``beta`` a scalar)."""
  fresh: jax.Array
  xi: jax.Array
  beta: jax.Array

  def __add__(self, other: "Err") -> "Err":
    return Err(self.fresh + other.fresh, self.xi + other.xi,
               self.beta + other.beta)

  def times(self, factor) -> "Err":
    return Err(self.fresh * factor, self.xi * factor, self.beta * factor)


def carry(by_abs, err: Err, norm) -> Err:
  """``err`` through a map of norm ``norm``: its elementwise part either
  elementwise (``by_abs``, ``|map| err.fresh``) or in L2, per example
  whichever is smaller (elementwise is tight for few, wide rows, L2 for
  many: it does not pay ``|W|``'s missing cancellations)."""
  by_l2 = norm * row_l2(err.fresh)
  keep = row_l2(by_abs) <= by_l2
  rows = keep.reshape((-1,) + (1,) * (by_abs.ndim - 1))
  return Err(jnp.where(rows, by_abs, 0.0),
             norm * err.xi + jnp.where(keep, 0.0, by_l2), norm * err.beta)


def error_terms(err: Err):
  """``(L2 norms at R = 0 [B], per unit of R)`` of an error."""
  return row_l2(err.fresh) + err.xi, err.beta


def stack_terms(errors: list):
  """``([B, J], [J])`` of :func:`error_terms` for a list of errors (None
  for an empty list)."""
  if not errors:
    return None
  terms = [error_terms(e) for e in errors]
  return (jnp.stack([t for t, _ in terms], axis=1),
          jnp.stack([jnp.asarray(b, jnp.float64) for _, b in terms]))


def affine_rounding(layer: Layer, h, move, err: Err):
  """The rounding of ``W h + b`` on a computed input.

  Args:
    layer: the layer (its batch norm is not applied here).
    h, move, err: the input at ``x``, how far it moves per unit of ``R``,
      and its error.

  Returns:
    ``(z, own, by_abs, absolute)``: ``W h + b`` at ``x``; the rounding's
    :class:`Err` (``gamma (|W| |h'| + |b|)`` for the computed input ``h'``:
    its values at ``x``, its error and its move); ``|W| err.fresh`` (the
    elementwise carry); and Schur's bound on ``|| |W| ||``.
  """
  g = gamma(layer.fan_in + 1)
  # |W| + FLUSH / g: a weight flushed to zero errs by FLUSH |h|.
  abs_w = jnp.abs(layer.weight) + FLUSH / g
  absolute = abs_norm(layer, abs_w)
  own = Err(g * (layer.linear(jnp.abs(h) + err.fresh, abs_w)
                 + jnp.abs(layer.bias)) + flushed(layer.fan_in),
            g * absolute * err.xi, g * absolute * (err.beta + move))
  return (layer.linear(h) + layer.bias, own, layer.linear(err.fresh, abs_w),
          absolute)


def _layer_error(layer: Layer, h, move, err: Err, through):
  """One conv or dense layer (and its batch norm) on a computed input.

  Args:
    layer: the layer.
    h, move, err: its input at ``x``, how far it moves per unit of ``R``,
      and its error.
    through: a certified bound on the layer's norm (batch norm included).

  Returns:
    ``(z, error, local)``: the output at ``x``; its error; and ``local``,
    the error made here on the computed input (``error`` less the input's
    own error carried through the map).
  """
  z, own, by_abs, absolute = affine_rounding(layer, h, move, err)
  if layer.bn_mul is None:
    return z, own + carry(by_abs, err, through), own
  # BN rounds 3 times; its multiplier may also differ from the device's
  # by a few ulps (another computation of gamma * rsqrt(var + eps)): a
  # relative 2 g3 on what enters it, and g3 of its own values. The
  # factors compound: (1 + gamma_3)(1 + 4u) - 1, not gamma_3 + 4u.
  mul = jnp.abs(layer.bn_mul)
  g3 = (1.0 + gamma(3)) * (1.0 + 4.0 * U32) - 1.0
  top = jnp.max(mul)
  bn_bias = 0.0 if layer.bn_bias is None else jnp.abs(layer.bn_bias)
  own = Err(mul * own.fresh, top * own.xi, top * own.beta)
  carried = carry(mul * by_abs, err, through)  # through: D W's norm.
  extra = Err(g3 * (mul * (jnp.abs(z) + jnp.abs(layer.bn_mean)) + bn_bias)
              + UNDERFLOW, 0.0, g3 * top * absolute * move)
  rho = 2.0 * g3
  z = (z - layer.bn_mean) * layer.bn_mul + (
      0.0 if layer.bn_bias is None else layer.bn_bias)
  return (z, (own + carried).times(1.0 + rho) + extra,
          own.times(1.0 + rho) + extra + carried.times(rho))


@functools.partial(jax.jit, static_argnames=("activation",))
def _propagate(layers, x, layer_norms, lipschitz_to, inv_std, mean, std_max,
               *, activation: str):
  """The error bound at the logits (see the module doc), two ways.

  At every layer the error of the computed value at ``x'`` is bounded by
  an :class:`Err`:

  * ``fresh``: an elementwise part, the rounding of this layer's own
    operations on the values at ``x`` (``[B, ...]``);
  * ``xi``: a vector of L2 norm at most ``xi [B]``: the errors of earlier
    layers, propagated through the certified spectral norms;
  * ``R beta``: a vector of L2 norm at most ``R beta`` (``beta`` a scalar):
    the rounding of how far the values move over the ball, propagated too.

  Returns:
    A dict: ``carried`` ``(fresh [B, K], xi [B], beta)``, every error
    carried to the logits by the single layers' norms; ``logits`` the same
    for the logits layer's own rounding alone (on its computed input);
    ``input`` ``([B, 1], [1])``, the L2 sizes (at ``R = 0``, per unit of
    ``R``) of the input normalization's rounding; ``nodes`` ``([B, N-1],
    [N-1])``, those of the errors made at each layer ``k < N-1`` as seen
    from its activation output (its pre-activation's times ``Lip(phi)``,
    plus the activation's), or None for a single layer.
  """
  act = activations.get_activation(activation)
  gain = activations.lipschitz_constant(act.slopes)
  ulps = activation_rounding(activation)
  h = (x - mean) * inv_std
  move = jnp.max(inv_std)  # ||h(x') - h(x)|| <= move * R.
  # Subtract, then divide: 3 roundings, since XLA may rewrite a division
  # by a constant into a product with its rounded reciprocal.
  rounding = (1.0 + U32)**3 - 1.0
  err = Err(rounding * jnp.abs(h) + UNDERFLOW, jnp.zeros(x.shape[0], x.dtype),
            rounding * move)
  normalization, nodes = err, []
  for k, layer in enumerate(layers):
    # This layer's norm from h's coordinates (the first layer's certified
    # norm includes 1/std; its map from h does not).
    through = layer_norms[k] * (std_max if k == 0 else 1.0)
    z, err, local = _layer_error(layer, h, move, err, through)
    if k == len(layers) - 1:
      return {"carried": (err.fresh, err.xi, err.beta),
              "logits": (local.fresh, local.xi, local.beta),
              "input": stack_terms([normalization]),
              "nodes": stack_terms(nodes)}
    h = act.fn(z)
    move = gain * lipschitz_to[k]
    rounding = Err(ulps * (jnp.abs(h) + gain * err.fresh) + UNDERFLOW,
                   gain * err.xi * ulps, ulps * (move + gain * err.beta))
    err = err.times(gain) + rounding
    nodes.append(local.times(gain) + rounding)


@dataclasses.dataclass(frozen=True)
class EvaluationError:
  """A bound on ``|fl32 f(x') - f(x')|`` over the ball ``||x' - x|| <= R``.

  The error vector at the logits is at most ``elementwise`` componentwise
  plus a vector of L2 norm at most ``l2 + R l2_slope``, plus, for a class
  pair ``(y, i)``, ``sum_j tails[j, y, i] (tail_terms[:, j] + R
  tail_slopes[j])``: rounding errors made inside the network (L2 norms
  ``tail_terms + R tail_slopes``) times a pairwise Lipschitz bound of the
  exact network from where they are made to the logits. So the difference
  of two classes ``y, i`` is off by at most ``elementwise_y + elementwise_i
  + sqrt(2) (l2 + R l2_slope) + sum_j tails[j, y, i] (...)``.

  Attributes:
    elementwise: float64 ``[B, K]``.
    l2: float64 ``[B]``.
    l2_slope: float, per unit of ``R``.
    tails: float64 ``[J, K, K]`` pairwise tail bounds (``J = 0``: none).
    tail_terms: float64 ``[B, J]``.
    tail_slopes: float64 ``[J]``, per unit of ``R``.
  """
  elementwise: np.ndarray
  l2: np.ndarray
  l2_slope: float
  tails: np.ndarray | None = None
  tail_terms: np.ndarray | None = None
  tail_slopes: np.ndarray | None = None

  def pair(self, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(at_r0 [B, K], slope [B, K])`` for the pairs ``(y_b, i)``."""
    rows = np.arange(len(labels))
    e_y = self.elementwise[rows, labels][:, None]
    at_r0 = e_y + self.elementwise + math.sqrt(2.0) * self.l2[:, None]
    slope = np.full_like(at_r0, math.sqrt(2.0) * self.l2_slope)
    if self.tails is not None and len(self.tails):
      by_label = self.tails[:, labels, :]  # [J, B, K]
      at_r0 = at_r0 + np.einsum("jbk,bj->bk", by_label, self.tail_terms)
      slope = slope + np.einsum("jbk,j->bk", by_label, self.tail_slopes)
    return at_r0, slope

  @classmethod
  def from_parts(cls, at_logits, tailed=()) -> "EvaluationError":
    """A bound from its parts, inflated by ``1 + 1e-9`` for the float64
    arithmetic of the bound itself.

    Args:
      at_logits: ``(fresh [B, K], xi [B], beta)``, the error at the logits
        (or, with ``tailed``, the logits layer's own).
      tailed: ``[(tails [J, K, K], (terms [B, J], slopes [J]))]``: errors
        made inside the network and their tails (empty: none).
    """
    slack = 1.0 + 1e-9
    fresh, xi, beta = at_logits
    if not tailed:
      return cls(elementwise=fresh * slack, l2=xi * slack,
                 l2_slope=float(beta) * slack)
    return cls(
        elementwise=fresh * slack, l2=xi * slack,
        l2_slope=float(beta) * slack,
        tails=np.concatenate([t for t, _ in tailed]),
        tail_terms=np.concatenate([p[0] for _, p in tailed], axis=1) * slack,
        tail_slopes=np.concatenate([p[1] for _, p in tailed]) * slack)

  @classmethod
  def concatenate(cls, parts: list["EvaluationError"]) -> "EvaluationError":
    """One bound for the examples of ``parts`` (batches of one network)."""
    tails = parts[0].tails
    return cls(
        elementwise=np.concatenate([e.elementwise for e in parts]),
        l2=np.concatenate([e.l2 for e in parts]),
        l2_slope=max(e.l2_slope for e in parts), tails=tails,
        tail_terms=(None if tails is None else
                    np.concatenate([e.tail_terms for e in parts])),
        tail_slopes=(None if tails is None else np.max(
            np.stack([e.tail_slopes for e in parts]), axis=0)))


def logit_error_bounds(model, images, layer_norms, lipschitz_to,
                       tails=None) -> EvaluationError:
  """The float32 evaluation error of ``model`` around each of ``images``.

  Args:
    model: a :class:`lipjax.models.SequentialNet` (its float32 values), or a
      :class:`lipjax.residual_models.ResidualNet`
      (:mod:`lipjax.certification.float32_residual`, which documents its
      arguments' layout).
    images: ``[B, H, W, C]`` float inputs in pixel units.
    layer_norms: ``[N]`` certified spectral norms of the chain's single
      layers ``W_k`` (input normalization and batch norm folded in).
    lipschitz_to: ``[N]`` L2 Lipschitz bounds from the input to each
      layer's output before its activation (batch norm included); only the
      first ``N - 1`` are used.
    tails: None, or ``sound_bound``'s ``"error_tails"``: pairwise Lipschitz
      bounds from inside the network to the logits. Then every rounding
      error reaches the logits through the bound from where it is made
      (much tighter) instead of through products of single-layer norms.
      For a SequentialNet ``(node_tails [N-1, K, K], input_tail [K, K])``
      (:func:`lipjax.certification.sound_bound.chain_error_tails`); for a
      ResidualNet see
      :func:`~lipjax.certification.float32_residual.logit_error_bounds`.

  Returns:
    An :class:`EvaluationError`, inflated by ``1 + 1e-9`` for the float64
    arithmetic of the bound itself.
  """
  if isinstance(model, residual_models.ResidualNet):
    # Imported here: it builds on this module.
    # pylint: disable-next=import-outside-toplevel
    from lipjax.certification import float32_residual
    return float32_residual.logit_error_bounds(model, images, layer_norms,
                                               lipschitz_to, tails)
  # The deployed network's constants are float32: the exact network that
  # the error is measured against uses the same values.
  std = np.asarray(model.input_std, np.float32).astype(np.float64)
  from_input = None if tails is None else _input_tail(model, tails,
                                                      std.max())
  with jax.enable_x64(True):
    mean32 = np.asarray(model.input_mean, np.float32).astype(np.float64)
    parts = jax.tree.map(np.asarray, _propagate(
        _layers(model), jnp.asarray(np.asarray(images, np.float64)),
        jnp.asarray(np.asarray(layer_norms, np.float64)),
        jnp.asarray(np.asarray(lipschitz_to, np.float64)),
        jnp.asarray(1.0 / std), jnp.asarray(mean32),
        float(std.max()), activation=model.activation))
  if tails is None:
    return EvaluationError.from_parts(parts["carried"])
  tailed = [(from_input[None], parts["input"])]
  if parts["nodes"] is not None:
    tailed.append((np.asarray(tails[0], np.float64), parts["nodes"]))
  return EvaluationError.from_parts(parts["logits"], tailed)


def _input_tail(model, tails, std_max: float) -> np.ndarray:
  """``[K, K]``: a pairwise Lipschitz bound from the normalized input.

  ``tails[1]`` is from the pixel input, with ``1/std`` (rounded up) folded
  into the first layer; from the normalized input, where ``std`` is not,
  each of its maps is at most ``std_max`` times larger.
  """
  node_tails, input_tail = (np.asarray(t, np.float64) for t in tails)
  n, k = len(model.layers), model.num_classes
  if node_tails.shape != (n - 1, k, k) or input_tail.shape != (k, k):
    raise ValueError(
        f"A {n}-layer network with {k} classes needs tails of shapes "
        f"({n - 1}, {k}, {k}) and ({k}, {k}) (sound_bound's error_tails), "
        f"got {node_tails.shape} and {input_tail.shape}.")
  # One float64 product of nonnegative numbers per entry.
  return std_max * input_tail * (1.0 + 1e-12)


def certify_float64(logits: np.ndarray, labels: np.ndarray, lipschitz,
                    error: EvaluationError | None,
                    eps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Radii and certificates that also cover float32 evaluation.

  For the float32 logits ``z`` at ``x`` and pair bounds ``L_yi``, the
  deployed network keeps class ``y`` at every ``x'`` within ``R`` when, for
  every ``i != y``,

    ``z_y - z_i - 2 D_yi > R (L_yi + S_yi)``,

  with ``D_yi + R S_yi`` the bound on the pair's evaluation error
  (:meth:`EvaluationError.pair`): once at ``x``, where ``z`` was computed,
  and once at ``x'``. ``error=None`` certifies the exact-arithmetic network.
  Everything is float64; the margin side is rounded down and the slope side
  up by ``1e-12``. Fail-closed as :func:`lipjax.certified_radius`:
  non-finite logits or bounds that are not positive finite numbers never
  certify.

  Args:
    logits: ``[N, K]`` float32 logits of the deployed network.
    labels: ``[N]``.
    lipschitz: global, ``[K]`` or ``[K, K]`` bounds (float).
    error: from :func:`logit_error_bounds`, or None.
    eps: ``[E]`` radii.

  Returns:
    ``(radius [N] float64, certified [E, N] bool)``.
  """
  from lipjax.certification import radii  # pylint: disable=import-outside-toplevel
  logits = np.asarray(logits, np.float64)
  labels = np.asarray(labels)
  k = logits.shape[1]
  radii.check_labels(labels, k)
  lip = np.asarray(lipschitz, np.float64)
  with jax.enable_x64(True):
    pair = np.asarray(radii.pairwise_lipschitz(jnp.asarray(lip), k))[labels]
  rows = np.arange(len(labels))
  margin = logits[rows, labels][:, None] - logits
  slope = pair
  if error is not None:
    at_r0, error_slope = error.pair(labels)
    margin = margin - 2.0 * at_r0
    slope = slope + error_slope
  margin, slope = margin * (1.0 - 1e-12), slope * (1.0 + 1e-12)
  is_self = np.arange(k)[None, :] == labels[:, None]
  valid = is_self | (np.isfinite(pair) & (pair > 0))
  trusted = np.all(valid, axis=1) & np.all(np.isfinite(logits), axis=1)
  if lip.ndim < 2:
    trusted &= bool(np.all(np.isfinite(lip) & (lip > 0)))
  with np.errstate(divide="ignore", invalid="ignore"):
    per_class = np.where(is_self, np.inf, margin / slope)
  radius = np.min(per_class, axis=1)
  radius = np.where(np.isnan(radius), 0.0, radius)
  radius = np.where(trusted, radius, np.minimum(radius, 0.0))
  eps = np.asarray(eps, np.float64).reshape(-1)
  with np.errstate(invalid="ignore"):  # NaN bounds: never certified below.
    slack = margin[None] - eps[:, None, None] * slope[None]
  certified = np.all(is_self[None] | (slack > 0), axis=-1)
  certified &= trusted[None] & np.isfinite(eps)[:, None]
  return radius, certified
