"""Naive and LipLT bounds of residual networks (docs/residual.md).

With ``phi = a id + c psi`` at every node, the pre-activation of node ``k``
is ``z_k = G(0, k) x + sum_{j<k} G(j+1, k) c psi(z_j)`` (biases aside), so

  ``m_k = ||G(0, k)|| + c sum_{j<k} ||G(j+1, k)|| m_j``

bounds its Lipschitz constant, and the logits' class rows ``r`` (``e_i`` or
``e_i - e_j``) get ``||r^T G(0, N-1)|| + c sum_j ||r^T G(j+1, N-1)|| m_j``
with exact row norms. On a plain chain this is the chain's LipLT bound
(``G(s, e) = a^(e-s) W_e ... W_s``); through a residual block the maps hold
sums such as ``S + a W_1 W_0``, which is where it beats the product of
per-block bounds. The maps ``G(s, e)`` come from
:mod:`lipjax.residual_graph` as chains of ops, so their norms come from the
same power iteration (training), Lanczos and exact Gram code as a plain
network's.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from lipjax import activations
from lipjax import bounds as bounds_lib
from lipjax import power_iteration
from lipjax import residual_graph
from lipjax.linear_maps import LinearChain
from lipjax.residual_graph import ResidualGraph


def required_products(graph: ResidualGraph, *, method: str, kind: str):
  """The maps whose norms a bound needs.

  Returns:
    liplt: the ``(s, e)`` pairs of ``G(s, e)``, numbered like a chain of
    ``num_nodes + 1`` layers; naive: ``(unit, index)`` of every single
    weight map (:func:`lipjax.residual_graph.single_ops`), the logits layer
    only for ``kind="global"``.
  """
  bounds_lib.check_method_kind(method, kind)
  if method == "liplt":
    return bounds_lib.required_products(graph.num_layers, method=method,
                                        kind=kind)
  singles = residual_graph.single_ops(graph)
  top = len(singles) if kind == "global" else len(singles) - 1
  return tuple((u, i) for u in range(top) for i in range(len(singles[u])))


def norm_chains(graph: ResidualGraph, products, *,
                method: str) -> tuple[LinearChain, ...]:
  """One chain per needed map; its full product is the map."""
  if method == "liplt":
    return tuple(residual_graph.product_chain(graph, p) for p in products)
  singles = residual_graph.single_ops(graph)
  return tuple(LinearChain(ops=(singles[u][i],)) for u, i in products)


def _full(chain: LinearChain) -> tuple[int, int]:
  return (0, chain.num_layers - 1)


def _class_row_norms(graph: ResidualGraph, kind: str) -> list:
  """``||r^T G(s, N-1)||`` for every source ``s`` (``[R]`` each)."""
  last = graph.units[-1].ops[0]
  k = graph.num_classes
  rows = jnp.eye(k, dtype=last.weight.dtype).reshape((k,) + last.out_shape)
  back = residual_graph.class_rows_back(graph, rows)
  first, second = bounds_lib._pair_indices(k)  # pylint: disable=protected-access
  if kind == "pairwise":
    return [power_iteration._row_norms(b[first] - b[second]) for b in back]  # pylint: disable=protected-access
  return [power_iteration._row_norms(b) for b in back]  # pylint: disable=protected-access


def node_bounds(norms, products, slopes, count: int, source: int = 0
                ) -> list:
  """``m_source .. m_{count-1}``: Lipschitz bounds of the node
  pre-activations as functions of the input (``source = 0``) or of node
  ``source - 1``'s injection (the same recursion over ``G(source, k)``)."""
  _, c = activations.loop_transformation(slopes)
  index = {tuple(p): i for i, p in enumerate(products)}
  m = []
  for k in range(source, count):
    m_k = norms[index[(source, k)]]
    for j in range(source, k):
      m_k = m_k + c * norms[index[(j + 1, k)]] * m[j - source]
    m.append(m_k)
  return m


def node_tails(graph: ResidualGraph, norms, *, row_allowances=None):
  """Pairwise Lipschitz bounds from every node's activation to the logits.

  ``T_j[y, i]`` bounds ``|(e_y - e_i)^T (f(p') - f(p))|`` over changes of
  node ``j``'s activation output (``phi(z_j)`` replaced by ``p``, every
  other input of the later layers held), by the same recursion as the
  network's bound started at node ``j``: with ``m'_k = ||G(j+1, k)|| + c
  sum_{j<i<k} ||G(i+1, k)|| m'_i``,

    ``T_j = ||r^T G(j+1, N-1)|| + c sum_{i>j} ||r^T G(i+1, N-1)|| m'_i``.

  The float32 evaluation margin multiplies the rounding errors made at node
  ``j`` by ``T_j`` (:mod:`lipjax.certification.float32_residual`). Uses the
  pairwise bound's norms (traceable).

  Args:
    graph: the network.
    norms: ``[len(required_products(graph, method="liplt",
      kind="pairwise"))]`` upper bounds on the maps' norms.
    row_allowances: as in :func:`liplt_bound`.

  Returns:
    ``[num_nodes, K, K]`` (zero diagonals).
  """
  n = graph.num_nodes
  products = required_products(graph, method="liplt", kind="pairwise")
  _, c = activations.loop_transformation(graph.slopes)
  g = _class_row_norms(graph, "pairwise")
  if row_allowances is not None:
    g = [g_s + row_allowances[s] for s, g_s in enumerate(g)]
  tails = []
  for j in range(n):
    m = node_bounds(norms, products, graph.slopes, n, source=j + 1)
    value = g[j + 1]
    for k, m_k in enumerate(m, start=j + 1):
      value = value + c * g[k + 1] * m_k
    tails.append(bounds_lib._assemble(value, "pairwise", graph.num_classes,  # pylint: disable=protected-access
                                      0.0))
  return jnp.stack(tails)


def logit_row_norms(graph: ResidualGraph):
  """``[K, K]``: ``||(e_y - e_i)^T W||`` of the logits layer ``W`` alone
  (float64 in, float64 out; traceable)."""
  return bounds_lib._assemble(_class_row_norms_last(graph, "pairwise"),  # pylint: disable=protected-access
                              "pairwise", graph.num_classes, 0.0)


def liplt_bound(graph: ResidualGraph, norms, *, kind: str,
                diagonal: float = 0.0,
                large_class_threshold: int = (
                    bounds_lib.DEFAULT_LARGE_CLASS_THRESHOLD),
                row_allowances=None):
  """The loop-transformed bound from the norms of ``required_products``.

  Traceable; the norms must be upper bounds for the result to be sound.
  Pairwise bounds with more classes than ``large_class_threshold`` use
  ``||w_i - w_j|| Lip(phi) m_last`` (the last node must feed the logits
  layer through its activation).

  Args:
    row_allowances: optional ``[num_nodes + 1]``, added to every class-row
      norm ``||r^T G(s, N-1)||`` of source ``s`` (certification: their
      float64 evaluation and scale-rounding errors). Additive, so that a
      row norm of exactly 0 (e.g. ``a = 0``) stays usable.
  """
  n = graph.num_nodes
  products = required_products(graph, method="liplt", kind=kind)
  _, c = activations.loop_transformation(graph.slopes)
  if kind == "global":
    return node_bounds(norms, products, graph.slopes, n + 1)[-1]
  m = node_bounds(norms, products, graph.slopes, n)
  if kind == "pairwise" and graph.num_classes > large_class_threshold:
    extra = 0.0 if row_allowances is None else row_allowances[n]
    return _large_class_bound(graph, m, diagonal, extra)
  g = _class_row_norms(graph, kind)
  if row_allowances is not None:
    g = [g_s + row_allowances[s] for s, g_s in enumerate(g)]
  values = g[0]
  for j in range(n):
    values = values + c * g[j + 1] * m[j]
  return bounds_lib._assemble(values, kind, graph.num_classes, diagonal)  # pylint: disable=protected-access


def _large_class_bound(graph: ResidualGraph, m, diagonal: float,
                       row_allowance=0.0):
  before = graph.units[-2] if len(graph.units) > 1 else None
  if before is None or before.kind == "residual":
    raise ValueError(
        "The large-class pairwise fallback needs an activated plain layer "
        "before the logits; raise large_class_threshold above the number of "
        "classes to use exact class rows.")
  last = graph.units[-1].ops[0]
  k = graph.num_classes
  rows = last.transpose(jnp.eye(k, dtype=last.weight.dtype))
  first, second = bounds_lib._pair_indices(k)  # pylint: disable=protected-access
  values = power_iteration._row_norms(  # pylint: disable=protected-access
      rows[first] - rows[second]) + row_allowance
  gain = activations.lipschitz_constant(graph.slopes)
  return bounds_lib._assemble(values * (gain * m[-1]), "pairwise", k,  # pylint: disable=protected-access
                              diagonal)


def naive_bound(graph: ResidualGraph, norms, *, kind: str,
                diagonal: float = 0.0, row_allowance=0.0):
  """Product of per-unit bounds; ``norms`` of ``required_products(naive)``.

  A unit contributes ``Lip(phi) ||W||`` (plain), ``Lip(phi) ||I + W||``
  (linear residual) or ``||S|| + Lip(phi)^m ||W_m|| ... ||W_0||`` (residual,
  ``||S|| = 1`` for the identity). ``row_allowance`` is added to the
  logits layer's class-row norms (see :func:`liplt_bound`).
  """
  products = required_products(graph, method="naive", kind=kind)
  lip = activations.lipschitz_constant(graph.slopes)
  by_unit = {}
  for (u, i), value in zip(products, norms):
    by_unit.setdefault(u, []).append(value)
  total = jnp.asarray(1.0, graph.units[-1].ops[0].weight.dtype)
  for u, values in sorted(by_unit.items()):
    unit = graph.units[u]
    if unit.kind == "residual":
      inner = lip**(len(unit.ops) - 1) * math.prod(values[:len(unit.ops)])
      shortcut = values[-1] if unit.shortcut is not None else 1.0
      total = total * (shortcut + inner)
    elif unit.activated:
      total = total * lip * values[0]
    else:
      total = total * values[0]
  if kind == "global":
    return total
  g = _class_row_norms_last(graph, kind) + row_allowance
  return bounds_lib._assemble(g * total, kind, graph.num_classes, diagonal)  # pylint: disable=protected-access


def _class_row_norms_last(graph: ResidualGraph, kind: str):
  last = graph.units[-1].ops[0]
  k = graph.num_classes
  rows = last.transpose(jnp.eye(k, dtype=last.weight.dtype).reshape(
      (k,) + last.out_shape))
  if kind == "pairwise":
    first, second = bounds_lib._pair_indices(k)  # pylint: disable=protected-access
    rows = rows[first] - rows[second]
  return power_iteration._row_norms(rows)  # pylint: disable=protected-access


def bound_from_norms(graph: ResidualGraph, norms, *, method: str, kind: str,
                     diagonal: float = 0.0,
                     large_class_threshold: int = (
                         bounds_lib.DEFAULT_LARGE_CLASS_THRESHOLD),
                     row_allowances=None):
  """Dispatches to :func:`naive_bound` or :func:`liplt_bound`.

  ``row_allowances``: see :func:`liplt_bound`; for the naive bound only its
  last entry is used (the logits layer's rows).
  """
  expected = len(required_products(graph, method=method, kind=kind))
  if tuple(np.shape(norms)) != (expected,):
    raise ValueError(f"Expected {expected} norms for method={method}, "
                     f"kind={kind}, got shape {np.shape(norms)}.")
  if method == "naive":
    return naive_bound(graph, norms, kind=kind, diagonal=diagonal,
                       row_allowance=(0.0 if row_allowances is None
                                      else row_allowances[-1]))
  return liplt_bound(graph, norms, kind=kind, diagonal=diagonal,
                     large_class_threshold=large_class_threshold,
                     row_allowances=row_allowances)


# ----------------------------------------------------------------------------
# Training: warm-started power iteration, one state per map.


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ResidualPowerState:
  """Power-iteration vectors of a residual network's maps.

  Attributes:
    states: one :class:`~lipjax.power_iteration.PowerState` per map, each
      for the full product of its chain.
    products: the maps, as :func:`required_products` lists them (static).
  """
  states: tuple[power_iteration.PowerState, ...]
  products: tuple = dataclasses.field(metadata=dict(static=True))


def init_power_state(graph: ResidualGraph, *, method: str, kind: str,
                     key: jax.Array) -> ResidualPowerState:
  """Fresh unit vectors for every map of the bound."""
  products = required_products(graph, method=method, kind=kind)
  chains = norm_chains(graph, products, method=method)
  keys = jax.random.split(key, max(len(chains), 1))
  states = tuple(power_iteration.init(chain, (_full(chain),), k)
                 for chain, k in zip(chains, keys))
  return ResidualPowerState(states=states, products=products)


def training_bound(graph: ResidualGraph, state: ResidualPowerState,
                   iterations: int, *, method: str, kind: str,
                   diagonal: float, safety_factor, large_class_threshold):
  """``iterations`` warm steps per map and the differentiable estimate.

  Returns:
    ``(bound, state)``; not a certificate (power iteration estimates norms
    from below).
  """
  products = required_products(graph, method=method, kind=kind)
  if state.products != products:
    raise ValueError(
        f"The power-iteration state holds maps {state.products}, but a "
        f"{method} {kind} bound of this network needs {products}. Create it "
        "with lipjax.init_power_state(network, method=..., kind=...).")
  chains = norm_chains(graph, products, method=method)
  factor = 1.0 if safety_factor is None else float(safety_factor)
  states, norms = [], []
  for chain, s in zip(chains, state.states):
    s = power_iteration.iterate(chain, s, iterations)
    states.append(s)
    norms.append(power_iteration.estimate(chain, s)[0] * factor)
  dtype = graph.units[-1].ops[0].weight.dtype
  norms = jnp.stack(norms) if norms else jnp.zeros((0,), dtype)
  value = bound_from_norms(graph, norms, method=method, kind=kind,
                           diagonal=diagonal,
                           large_class_threshold=large_class_threshold)
  return value, dataclasses.replace(state, states=tuple(states))
