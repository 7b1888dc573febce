"""Certified bounds of residual networks: every map's norm certified.

Each map ``G(s, e)`` of :mod:`lipjax.residual_bounds` is a chain of ops, and
:func:`lipjax.norm_certificates.certify_norms` certifies its norm exactly as
it certifies a plain network's product: an exact float64 Gram norm, float64
Lanczos from a random start with failure probability ``delta / P``
(a union bound over the ``P`` Lanczos maps), or a bound by proof in the
deterministic mode. The recursion and the class rows then run in float64
and the result is rounded up to float32.

Rounding of the folded scales (docs/residual.md#rounding): the stem's
``1/std`` multiplies every map that contains it from the right, so raising
it by :data:`lipjax.linear_maps.SCALE_ROUNDING` covers it. A batch-norm
scale sits inside maps (in a sum ``S + a W_1 W_0``, or between two
layers), where a norm is not monotone in it; there each norm gets the
additive allowance ``((1 + r)^q - 1) prod_k n_k`` instead, ``q`` the number
of scales in the map and ``n_k`` a bound by proof on op ``k``'s norm
(:func:`lipjax.deterministic.op_upper_bound`). Class rows get additive
allowances too (:func:`class_row_allowances`).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from lipjax import deterministic as deterministic_lib
from lipjax import exact as exact_lib
from lipjax import lanczos
from lipjax import linear_maps
from lipjax import norm_certificates
from lipjax import residual_bounds
from lipjax import residual_graph
from lipjax.progress import progress_bar
from lipjax.residual_graph import ResidualGraph

# Relative allowance for the float64 arithmetic of the recursion itself:
# at most a few hundred roundings of nonnegative terms, each 2^-53.
ASSEMBLY_ROUNDING = 1e-12
# The maps are many chains of distinct structures made of few distinct ops:
# Lanczos and exact Gram columns compile per op, not per map
# (lipjax.per_op; the same numbers).
SWEEPS = "per_op"


def _to_float64(graph: ResidualGraph) -> ResidualGraph:
  """Numpy float64 copy; the stem's input scale raised (see module doc)."""
  def f64(op):
    cast = lambda a: None if a is None else np.asarray(a, np.float64)
    return dataclasses.replace(op, weight=cast(op.weight),
                               in_scale=cast(op.in_scale),
                               out_scale=cast(op.out_scale))

  units = []
  for k, unit in enumerate(graph.units):
    ops = tuple(f64(op) for op in unit.ops)
    if k == 0 and ops[0].in_scale is not None:
      ops = (dataclasses.replace(ops[0], in_scale=ops[0].in_scale * (
          1.0 + linear_maps.SCALE_ROUNDING)),) + ops[1:]
    units.append(dataclasses.replace(
        unit, ops=ops,
        shortcut=None if unit.shortcut is None else f64(unit.shortcut)))
  return dataclasses.replace(graph, units=tuple(units))


def has_inner_scales(graph: ResidualGraph) -> bool:
  """Whether any weight map has a folded output scale (batch norm)."""
  return any(op.out_scale is not None for unit in graph.units
             for op in unit.primitives())


def scale_allowance(chain, inner_scales: bool, bounds: dict) -> float:
  """The additive allowance of a map for the rounding of inner scales.

  Each scale is within ``r`` (relative) of its exact value, so an op with
  ``q_k`` scales is off by at most ``((1 + r)^q_k - 1) n_k`` (``n_k`` an
  upper bound on its norm, for a residual op on ``||S|| + prod ||B_i||``),
  and the map by at most ``((1 + r)^q - 1) prod n_k`` with ``q = sum q_k``.

  Args:
    chain: the map.
    inner_scales: whether the network has any batch-norm scales.
    bounds: ``{k: n_k}`` (:func:`op_bounds`).
  """
  if not inner_scales:
    return 0.0
  count = sum(2 * len(linear_maps.primitive_ops(op)) for op in chain.ops)
  rho = (1.0 + linear_maps.SCALE_ROUNDING)**count - 1.0
  return rho * math.prod(bounds[k] for k in range(chain.num_layers))


def _op_key(op) -> tuple:
  """An op's identity within one bound: its weight array by identity (the
  maps share the float64 graph's arrays), its scales by value (the maps
  scale their own copies)."""
  if isinstance(op, linear_maps.ResidualOp):
    return ("residual", op.shortcut_scale,
            tuple(_op_key(b) for b in op.branch),
            None if op.shortcut is None else _op_key(op.shortcut))
  value = lambda a: None if a is None else np.asarray(a).tobytes()
  return (id(op.weight), op.kind, tuple(op.in_shape), op.strides,
          op.padding, value(op.in_scale), value(op.out_scale))


def op_bounds(chain, cache: dict | None = None) -> dict:
  """``{k: upper bound on ||op_k||}`` by proof, for rounding allowances
  (products of these, not of the far larger entrywise-absolute norms).

  ``cache`` (one dict per bound, while its float64 graph is alive) keeps
  each op's bound for the other maps that hold the op: the same few ops
  recur in ``O(nodes^2)`` maps, and a bound costs an SVD.
  """
  cache = {} if cache is None else cache
  out = {}
  for k, op in enumerate(chain.ops):
    key = _op_key(op)
    if key not in cache:
      cache[key] = deterministic_lib.op_upper_bound(op)
    out[k] = cache[key]
  return out


def _use_exact(chains, exact, deterministic: bool, max_exact_bytes: int):
  out = []
  for chain in chains:
    full = (0, chain.num_layers - 1)
    if exact == "auto" or deterministic:
      out.append(exact_lib.fits(chain, full, max_exact_bytes))
    else:
      out.append(bool(exact))
  return np.asarray(out, bool)


def certify_maps(graph64: ResidualGraph, chains, *, use_exact, delta, seed,
                 target_factor, max_steps, max_exact_bytes, deterministic,
                 progress, op_cache: dict | None = None
                 ) -> norm_certificates.NormCertificate:
  """Certified norms of every map; one certificate for all of them.

  ``op_cache``: :func:`op_bounds`'s cache, shared with the class rows.
  """
  randomized = int(np.sum(~use_exact)) if not deterministic else 0
  seed = lanczos.fresh_seed() if seed is None and randomized else seed
  delta_each = delta / randomized if randomized else delta
  inner = has_inner_scales(graph64)
  bar = progress_bar(total=len(chains), initial=0,
                     description="residual map norms", enabled=progress)
  parts = []
  for chain, exact in zip(chains, use_exact):
    bar.set_postfix_str(f"{chain.num_layers} ops")
    bounds = op_bounds(chain, op_cache)
    part = norm_certificates.certify_norms(
        chain, [(0, chain.num_layers - 1)], use_exact=[exact],
        delta=delta_each, seed=seed, target_factor=target_factor,
        max_steps=max_steps, max_exact_bytes=max_exact_bytes,
        deterministic=deterministic, layer_norms_in=bounds,
        interior_scales=False,  # scale_allowance below covers them.
        sweeps=SWEEPS)
    parts.append((part, scale_allowance(chain, inner, bounds)))
    bar.update(1)
  bar.close()
  return _combine(parts, seed)


def _combine(parts, seed) -> norm_certificates.NormCertificate:
  """One certificate from per-map ones (map ``p`` numbered ``(p, p)``)."""
  def stack(name):
    return np.concatenate([getattr(p, name) for p, _ in parts])
  norms = stack("norms")
  upper = stack("upper") + np.asarray([a for _, a in parts])
  sources = tuple(s for p, _ in parts for s in p.sources)
  deltas = stack("deltas")
  return norm_certificates.NormCertificate(
      products=tuple((i, i) for i in range(len(parts))), norms=norms,
      upper=upper,
      factors=np.where(norms > 0, upper / np.where(norms > 0, norms, 1.0),
                       1.0),
      sources=sources, dims=stack("dims"), steps=stack("steps"),
      epsilons=stack("epsilons"), deltas=deltas, delta=float(deltas.sum()),
      seed=seed if "lanczos" in sources else None)


def _row_allowance(chain, inner: bool, row_norm: float,
                   op_cache: dict | None = None) -> float:
  """How far a float64 row ``r^T M`` (``||r|| = row_norm``) may be off:
  one sweep's rounding plus the scale allowance, times ``||r||``."""
  bounds = op_bounds(chain, op_cache)
  full = (0, chain.num_layers - 1)
  sweep = norm_certificates._sweep_error(chain, full, bounds)[1]  # pylint: disable=protected-access
  return row_norm * (sweep + scale_allowance(chain, inner, bounds))


def class_row_allowances(graph64: ResidualGraph, *, method: str, kind: str,
                         large_class_threshold: int,
                         op_cache: dict | None = None) -> np.ndarray:
  """Additive allowances for the float64 class-row norms, per source.

  Per-class and pairwise bounds use the exact norms ``g_s = ||r^T G(s,
  N-1)||``, computed in float64; each is off by at most its map's
  :func:`_row_allowance`. Added to every row norm (not a relative factor:
  a row norm may be exactly 0, e.g. with ``a = 0``).

  Returns:
    ``[num_nodes + 1]`` float64 (zeros for ``kind="global"``); the naive
    bound and the large-class fallback use only the last entry (the logits
    layer alone).
  """
  n = graph64.num_nodes
  out = np.zeros(n + 1)
  if kind == "global":
    return out
  inner = has_inner_scales(graph64)
  row_norm = math.sqrt(2.0) if kind == "pairwise" else 1.0
  last_only = method == "naive" or (
      kind == "pairwise" and graph64.num_classes > large_class_threshold)
  if last_only:
    last = linear_maps.LinearChain(ops=(graph64.units[-1].ops[0],))
    out[n] = _row_allowance(last, inner, row_norm, op_cache)
    return out
  for s in range(n + 1):
    chain = residual_graph.product_chain(graph64, (s, n))
    out[s] = _row_allowance(chain, inner, row_norm, op_cache)
  return out


@functools.partial(jax.jit, static_argnames=("method", "kind", "diagonal",
                                             "large_class_threshold"))
def _bound_jit(graph, norms, allowances, *, method, kind, diagonal,
               large_class_threshold):
  return residual_bounds.bound_from_norms(
      graph, norms, method=method, kind=kind, diagonal=diagonal,
      large_class_threshold=large_class_threshold,
      row_allowances=allowances)


def certified_bound(graph: ResidualGraph, *, method: str, kind: str,
                    exact, deterministic: bool, delta: float, seed,
                    target_factor: float, max_steps: int,
                    safety_factor, diagonal: float,
                    large_class_threshold: int, max_exact_bytes: int,
                    progress: bool):
  """The certified bound of a residual network.

  Returns:
    ``(value, certificate, products)``: float32 numpy bound (rounded up),
    the :class:`~lipjax.norm_certificates.NormCertificate` of the maps and
    the maps' keys (:func:`lipjax.residual_bounds.required_products`).
  """
  from lipjax import api  # pylint: disable=import-outside-toplevel
  graph64 = _to_float64(graph)
  products = residual_bounds.required_products(graph64, method=method,
                                               kind=kind)
  # Every weight layer, the logits too: a pairwise or per-class bound reads
  # those only through its class rows, after all the norms.
  norm_certificates.check_finite(linear_maps.LinearChain(ops=tuple(
      op for unit in graph64.units for op in unit.primitives())))
  chains = residual_bounds.norm_chains(graph64, products, method=method)
  use_exact = _use_exact(chains, exact, deterministic, max_exact_bytes)
  if safety_factor is not None and not use_exact.all():
    raise ValueError(
        "safety_factor replaces the factor of exact norms only (exact=True); "
        "the randomized certificate sets its own factor from delta.")
  op_cache = {}  # Lives while graph64 does (op_bounds keys by identity).
  certificate = certify_maps(
      graph64, chains, use_exact=use_exact, delta=delta, seed=seed,
      target_factor=target_factor, max_steps=max_steps,
      max_exact_bytes=max_exact_bytes, deterministic=deterministic,
      progress=progress, op_cache=op_cache)
  upper = certificate.upper
  if safety_factor is not None:  # It replaces the factor, not the allowance.
    inner = has_inner_scales(graph64)
    upper = certificate.norms * float(safety_factor) + np.asarray(
        [scale_allowance(chain, inner, op_bounds(chain)) for chain in chains])
  allowances = class_row_allowances(
      graph64, method=method, kind=kind,
      large_class_threshold=large_class_threshold, op_cache=op_cache)
  with jax.enable_x64(True):
    value64 = np.asarray(_bound_jit(
        graph64, jnp.asarray(upper, jnp.float64),
        jnp.asarray(allowances, jnp.float64), method=method, kind=kind,
        diagonal=float(diagonal),
        large_class_threshold=int(large_class_threshold)))
  # The recursion's own float64 roundings (a few additions and
  # multiplications of nonnegative numbers) are covered by this factor.
  value = api.round_up_to_float32(value64 * (1.0 + ASSEMBLY_ROUNDING))
  if kind == "pairwise":
    np.fill_diagonal(value, np.float32(diagonal))
  return value, certificate, products


def _naive_row_factor(graph64: ResidualGraph, kind: str) -> float:
  """The class-row rounding factor of the naive bound (logits layer only)."""
  if kind == "global":
    return 1.0
  last = linear_maps.LinearChain(ops=(graph64.units[-1].ops[0],))
  with jax.enable_x64(True):
    rows = np.asarray(residual_bounds._class_row_norms_last(graph64, kind))  # pylint: disable=protected-access
  row_norm = math.sqrt(2.0) if kind == "pairwise" else 1.0
  allowance = row_norm * norm_certificates._sweep_error(  # pylint: disable=protected-access
      last, (0, 0), op_bounds(last))[1]
  smallest = float(np.min(rows))
  return 1.0 + (allowance / smallest if smallest > 0 else math.inf)


@jax.jit
def _tails_jit(graph, norms, allowances):
  return (residual_bounds.node_tails(graph, norms, row_allowances=allowances),
          residual_bounds.logit_row_norms(graph))


def error_tails(graph: ResidualGraph, upper: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
  """Pairwise Lipschitz bounds from inside the network to the logits.

  For the float32 evaluation margin
  (:mod:`lipjax.certification.float32_residual`): a rounding error made at
  node ``j``'s activation output reaches a class pair's logit difference
  through at most ``tails[j]`` times its L2 norm, and one made at the
  logits layer's input through at most ``rows``.

  Args:
    graph: the network (float32 or float64).
    upper: the certified norms of a pairwise LipLT certificate's maps
      (:func:`certified_bound` with ``method="liplt", kind="pairwise"``),
      in :func:`lipjax.residual_bounds.required_products`' order.

  Returns:
    ``(tails [num_nodes, K, K], rows [K, K])`` float64, upper bounds: the
    class rows get their float64 evaluation allowances, and the recursion's
    own roundings :data:`ASSEMBLY_ROUNDING`.
  """
  graph64 = _to_float64(graph)
  allowances = class_row_allowances(graph64, method="liplt", kind="pairwise",
                                    large_class_threshold=math.inf)
  last = linear_maps.LinearChain(ops=(graph64.units[-1].ops[0],))
  last_allowance = _row_allowance(last, has_inner_scales(graph64),
                                  math.sqrt(2.0))
  expected = len(residual_bounds.required_products(
      graph64, method="liplt", kind="pairwise"))
  if np.shape(upper) != (expected,):
    raise ValueError(f"Expected the {expected} norms of a pairwise LipLT "
                     f"certificate, got shape {np.shape(upper)}.")
  with jax.enable_x64(True):
    tails, rows = _tails_jit(graph64, jnp.asarray(upper, jnp.float64),
                             jnp.asarray(allowances, jnp.float64))
    tails, rows = np.asarray(tails), np.asarray(rows)
  k = graph64.num_classes
  off = ~np.eye(k, dtype=bool)
  rows = np.where(off, rows + last_allowance, 0.0)
  factor = 1.0 + ASSEMBLY_ROUNDING
  return tails * factor, rows * factor
