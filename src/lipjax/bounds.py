"""Naive and LipLT Lipschitz bounds from product norms (docs/bounds.md).

The functions here are pure and jit-able. They take a
:class:`~lipjax.linear_maps.LinearChain` and the norms of the products that
:func:`required_products` lists (estimated by :mod:`lipjax.power_iteration`
or computed by :mod:`lipjax.exact`), and return

* ``kind="global"``: a scalar ``L`` with ``||f(x) - f(x')|| <= L ||x - x'||``;
* ``kind="per_class"``: ``[K]`` bounds ``L_i = Lip(f_i)``;
* ``kind="pairwise"``: a symmetric ``[K, K]`` matrix ``L_ij = Lip(f_i - f_j)``
  with the diagonal set to ``diagonal``.

Every norm that involves the last layer contracted with a class vector
``e_i`` or ``c_ij = e_i - e_j`` is exact: those rows are pushed back through
the adjoints and their 2-norms taken (docs/bounds.md#pairwise-last-step).
The bounds are sound when the product norms are upper bounds of the true
norms.

References:
  Fazlyab et al., Certified Robustness via Dynamic Margin Maximization and
  Improved Lipschitz Regularization, NeurIPS 2023 (LipLT recursion,
  docs/bounds.md#the-recursion).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lipjax import activations
from lipjax.linear_maps import LinearChain
from lipjax.power_iteration import Product, _row_norms

METHODS = ("naive", "liplt")
KINDS = ("global", "per_class", "pairwise")
DEFAULT_LARGE_CLASS_THRESHOLD = 101


def check_method_kind(method: str, kind: str) -> None:
  if method not in METHODS:
    raise ValueError(f"Unknown method {method!r}; choose one of {METHODS}.")
  if kind not in KINDS:
    raise ValueError(f"Unknown kind {kind!r}; choose one of {KINDS}.")


def required_products(num_layers: int, *, method: str,
                      kind: str) -> tuple[Product, ...]:
  """The ``(s, e)`` products ``W_e ... W_s`` whose norms a bound needs.

  Global bounds need products up to the last layer; per-class and pairwise
  bounds treat the last layer exactly and need products up to the
  penultimate one. LipLT needs every contiguous product, naive only the
  single layers.

  Args:
    num_layers: N, the number of weight layers.
    method: ``"naive"`` or ``"liplt"``.
    kind: ``"global"``, ``"per_class"`` or ``"pairwise"``.

  Returns:
    Sorted ``(s, e)`` pairs (empty for a one-layer per-class/pairwise bound).
  """
  check_method_kind(method, kind)
  top = num_layers if kind == "global" else num_layers - 1
  if method == "naive":
    return tuple((k, k) for k in range(top))
  return tuple((s, e) for s in range(top) for e in range(s, top))


def liplt_layer_bounds(norms: jax.Array, products, slopes,
                       count: int, start: int = 0) -> list[jax.Array]:
  """The LipLT recursion ``m_0, ..., m_{count-1}``.

  See docs/bounds.md#the-recursion.

  ``m_k = |a|^k ||W_k..W_0|| + c sum_{j<k} |a|^(k-1-j) ||W_k..W_{j+1}|| m_j``
  bounds the Lipschitz constant from the input to the k-th weight layer's
  output, with ``(a, c)`` from :func:`lipjax.activations.loop_transformation`.

  Args:
    norms: ``[len(products)]`` norms (upper bounds, for soundness).
    products: the ``(s, e)`` pairs ``norms`` refers to.
    slopes: the activation's ``(alpha, beta)``.
    count: how many ``m_k`` to compute.
    start: the recursion of the sub-network from layer ``start``'s input:
      ``m_{start}, ..., m_{start+count-1}`` with the products ``(s, e)``,
      ``s >= start``, in place of those from 0.

  Returns:
    A list of ``count`` scalars.
  """
  a, c = activations.loop_transformation(slopes)
  a = abs(a)
  index = {tuple(p): i for i, p in enumerate(products)}
  m = []
  for k in range(start, start + count):
    # Python floats for the coefficients: 0.0 ** 0 == 1.0 handles a == 0.
    m_k = a**(k - start) * norms[index[(start, k)]]
    for j in range(start, k):
      m_k = m_k + c * a**(k - 1 - j) * norms[index[(j + 1, k)]] * m[j - start]
    m.append(m_k)
  return m


def _pair_indices(num_classes: int) -> tuple[np.ndarray, np.ndarray]:
  """Row-major upper-triangular pairs (0,1), (0,2), ..., (K-2, K-1)."""
  return np.triu_indices(num_classes, k=1)


def class_row_norms(chain: LinearChain, *, kind: str,
                    down_to: int = 0) -> list[jax.Array]:
  """Exact norms ``||r^T W_{N-1} ... W_s||`` for class rows ``r``.

  The K unit rows ``e_i`` are pushed back through the adjoints once; by
  linearity ``c_ij^T M = e_i^T M - e_j^T M``, so pairwise rows are formed by
  subtraction at every layer instead of pushing K(K-1)/2 rows.

  Args:
    chain: the network.
    kind: ``"per_class"`` (rows ``e_i``) or ``"pairwise"`` (rows ``c_ij``,
      i < j, row-major).
    down_to: the lowest start layer ``s`` needed.

  Returns:
    ``g`` with ``g[s]`` of shape ``[K]`` or ``[K(K-1)/2]`` for
    ``s = down_to .. N-1`` (entries below ``down_to`` are None).
  """
  last = chain.ops[-1]
  num_classes = chain.num_classes
  rows = jnp.eye(num_classes, dtype=last.weight.dtype).reshape(
      (num_classes,) + tuple(last.out_shape))
  first, second = _pair_indices(num_classes)
  out = [None] * chain.num_layers
  for s in range(chain.num_layers - 1, down_to - 1, -1):
    rows = chain.ops[s].transpose(rows)
    if kind == "pairwise":
      out[s] = _row_norms(rows[first] - rows[second])
    else:
      out[s] = _row_norms(rows)
  return out


def _assemble(values: jax.Array, kind: str, num_classes: int,
              diagonal: float) -> jax.Array:
  if kind != "pairwise":
    return values
  first, second = _pair_indices(num_classes)
  matrix = jnp.zeros((num_classes, num_classes), values.dtype)
  matrix = matrix.at[first, second].set(values).at[second, first].set(values)
  return matrix + diagonal * jnp.eye(num_classes, dtype=values.dtype)


def naive_bound(chain: LinearChain, norms: jax.Array, *, kind: str,
                diagonal: float = 0.0) -> jax.Array:
  """Product-of-norms bound, generalized to slopes [alpha, beta].

  See docs/bounds.md#the-naive-bound.

  Args:
    chain: the network (N layers).
    norms: ``[len(required_products(N, method="naive", kind=kind))]`` norms
      ``||W_k||``.
    kind: ``"global"``, ``"per_class"`` or ``"pairwise"``.
    diagonal: value of the pairwise diagonal.

  Returns:
    A scalar, ``[K]`` or ``[K, K]``.
  """
  check_method_kind("naive", kind)
  gain = activations.lipschitz_constant(chain.slopes)**(chain.num_layers - 1)
  product = gain * jnp.prod(norms) if norms.shape[0] else jnp.asarray(
      gain, chain.ops[-1].weight.dtype)
  if kind == "global":
    return product
  last = class_row_norms(chain, kind=kind, down_to=chain.num_layers - 1)[-1]
  return _assemble(last * product, kind, chain.num_classes, diagonal)


def liplt_bound(chain: LinearChain, norms: jax.Array, *, kind: str,
                diagonal: float = 0.0,
                large_class_threshold: int = DEFAULT_LARGE_CLASS_THRESHOLD
                ) -> jax.Array:
  """Loop-transformed bound (docs/bounds.md#loop-transformed-bound).

  For ``kind="pairwise"`` with more than ``large_class_threshold`` classes
  the last step falls back to ``||w_i - w_j|| Lip(phi) m_{N-2}`` (the
  reference's Tiny-ImageNet path, which omits ``Lip(phi)`` because its
  activation is ReLU): sound, never tighter than full pairwise
  LipLT, and it avoids pushing K(K-1)/2 rows through every layer.

  Args:
    chain: the network (N layers).
    norms: norms of ``required_products(N, method="liplt", kind=kind)``.
    kind: ``"global"``, ``"per_class"`` or ``"pairwise"``.
    diagonal: value of the pairwise diagonal.
    large_class_threshold: K above which pairwise uses the fallback.

  Returns:
    A scalar, ``[K]`` or ``[K, K]``.
  """
  check_method_kind("liplt", kind)
  n = chain.num_layers
  products = required_products(n, method="liplt", kind=kind)
  if kind == "global":
    return liplt_layer_bounds(norms, products, chain.slopes, n)[-1]
  m = liplt_layer_bounds(norms, products, chain.slopes, n - 1)
  if kind == "pairwise" and chain.num_classes > large_class_threshold:
    # ||w_i - w_j|| Lip(phi) m_{N-2}: the activation sits between m_{N-2}
    # and the last layer.
    last = class_row_norms(chain, kind=kind, down_to=n - 1)[-1]
    gain = activations.lipschitz_constant(chain.slopes)
    values = last * (gain * m[-1]) if m else last
    return _assemble(values, kind, chain.num_classes, diagonal)
  g = class_row_norms(chain, kind=kind, down_to=0)
  return _assemble(_class_step(chain.slopes, g, m, 0), kind,
                   chain.num_classes, diagonal)


def _class_step(slopes, g, m, start: int):
  """The recursion's last step for class rows, from layer ``start``'s input:
  ``|a|^(N-1-start) g[start] + c sum_{t>start} |a|^(N-1-t) g[t] m_{t-1}``
  (``m`` from ``m_start`` on, ``N = len(g)``)."""
  a, c = activations.loop_transformation(slopes)
  a = abs(a)
  n = len(g)
  values = a**(n - 1 - start) * g[start]
  for t in range(start + 1, n):
    values = values + c * a**(n - 1 - t) * g[t] * m[t - 1 - start]
  return values


def liplt_pair_tails(chain: LinearChain, norms: jax.Array) -> jax.Array:
  """Pairwise LipLT bounds from every layer's input to the logits.

  ``T_s[y, i]`` bounds the Lipschitz constant of ``(e_y - e_i)^T f_s``,
  with ``f_s`` the sub-network of layers ``s .. N-1`` (the activation of
  layer ``s - 1`` is not part of it): the pairwise bound of
  :func:`liplt_bound` started at layer ``s``, with the same product norms
  (all ``(s', e)`` with ``s' >= s``) and exact class rows. ``T_0`` is the
  network's own bound; ``T_{N-1}`` the logits layer's pair rows
  ``||w_y - w_i||``. The float32 evaluation margin multiplies a rounding
  error made at layer ``s - 1``'s activation output by ``T_s``
  (:mod:`lipjax.certification.float32_error`). Traceable.

  Args:
    chain: the network (N layers).
    norms: norms of ``required_products(N, method="liplt",
      kind="pairwise")``.

  Returns:
    ``[N, K, K]`` (zero diagonals).
  """
  n = chain.num_layers
  products = required_products(n, method="liplt", kind="pairwise")
  g = class_row_norms(chain, kind="pairwise", down_to=0)
  tails = []
  for s in range(n):
    m = liplt_layer_bounds(norms, products, chain.slopes, n - 1 - s, start=s)
    tails.append(_assemble(_class_step(chain.slopes, g, m, s), "pairwise",
                           chain.num_classes, 0.0))
  return jnp.stack(tails)


def bound_from_norms(chain: LinearChain, norms: jax.Array, *, method: str,
                     kind: str, diagonal: float = 0.0,
                     large_class_threshold: int = DEFAULT_LARGE_CLASS_THRESHOLD
                     ) -> jax.Array:
  """Dispatches to :func:`naive_bound` or :func:`liplt_bound`."""
  check_method_kind(method, kind)
  expected = len(required_products(chain.num_layers, method=method,
                                   kind=kind))
  if norms.shape != (expected,):
    raise ValueError(f"Expected {expected} product norms for method={method}, "
                     f"kind={kind}, got shape {norms.shape}.")
  if method == "naive":
    return naive_bound(chain, norms, kind=kind, diagonal=diagonal)
  return liplt_bound(chain, norms, kind=kind, diagonal=diagonal,
                     large_class_threshold=large_class_threshold)
