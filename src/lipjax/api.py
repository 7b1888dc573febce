"""The one-call entry point: ``lipjax.bound(network, ...)``.

Three ways to get the product norms a bound needs, chosen by the arguments:

* ``iterations=k`` (training): ``k`` warm-started power-iteration steps from
  ``state`` (or fresh vectors), then the differentiable estimate
  ``||P sg(v)||``. Pure and traceable: call it inside ``jax.jit`` and
  ``jax.grad``. The estimates are lower bounds of the norms, so the result is
  *not* a certificate.
* default (``iterations=None``): power iteration converged to ``rtol`` from
  the warm vectors and ``restarts`` fresh random ones, max over them, each
  norm multiplied by ``safety_factor`` (default 1.01, see below).
* ``exact=True``: float64 Gram-matrix norms (:mod:`lipjax.exact`) times
  ``1 + 1e-5``; a ``MemoryError`` names the product that is too large.
  ``exact="auto"`` uses exact norms where they fit in ``max_exact_bytes``
  and converged iteration elsewhere.

Why 1.01: converged power iteration stops when the estimate changes by less
than ``rtol`` per step; with a ratio ``rho = (sigma_2/sigma_1)^2`` between the
top two squared singular values the remaining error is about
``rtol / (1 - rho)``, which 1 % covers for ``rho`` up to ``1 - 1e-4``. It is
not a proof; exact norms are.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from lipjax import bounds as bounds_lib
from lipjax import exact as exact_lib
from lipjax import linear_maps
from lipjax import power_iteration

CONVERGED_SAFETY_FACTOR = 1.01
EXACT_SAFETY_FACTOR = 1.0 + 1e-5


@dataclasses.dataclass(frozen=True)
class BoundInfo:
  """How a bound was computed, per product (for reports).

  Attributes:
    method, kind: as requested.
    products: the ``(s, e)`` pairs whose norms were used.
    norms: the norms used, before the safety factor (float64 ``[P]``).
    sources: per product, ``"exact"``, ``"converged"`` or ``"iterated"``.
    safety_factor: per product, the factor applied to its norm.
    convergence: the power-iteration report, or None if none ran.
  """
  method: str
  kind: str
  products: tuple[tuple[int, int], ...]
  norms: np.ndarray
  sources: tuple[str, ...]
  safety_factor: np.ndarray
  convergence: power_iteration.ConvergenceInfo | None


def _resolve_network(network, graphdef, slopes):
  if graphdef is not None:
    from flax import nnx  # pylint: disable=import-outside-toplevel
    states = network if isinstance(network, tuple) else (network,)
    network = nnx.merge(graphdef, *states)
  return linear_maps.to_chain(network, slopes=slopes)


def init_power_state(network, *, method: str = "liplt",
                     kind: str = "pairwise", key: jax.Array | None = None,
                     slopes=None, graphdef=None) -> power_iteration.PowerState:
  """Fresh power-iteration vectors for ``bound(network, method, kind)``.

  Args:
    network: anything :func:`bound` accepts.
    method, kind: the bound the state will serve.
    key: ``jax.random.key``; defaults to ``jax.random.key(0)``.
    slopes, graphdef: as in :func:`bound`.
  """
  chain = _resolve_network(network, graphdef, slopes)
  products = bounds_lib.required_products(chain.num_layers, method=method,
                                          kind=kind)
  if not products:
    raise ValueError(f"A {kind} {method} bound of a {chain.num_layers}-layer "
                     "network needs no power iteration.")
  key = jax.random.key(0) if key is None else key
  return power_iteration.init(chain, products, key)


@functools.partial(jax.jit, static_argnames=("method", "kind", "diagonal",
                                             "large_class_threshold"))
def _bound_jit(chain, norms, *, method, kind, diagonal, large_class_threshold):
  return bounds_lib.bound_from_norms(
      chain, norms.astype(chain.ops[-1].weight.dtype), method=method,
      kind=kind, diagonal=diagonal,
      large_class_threshold=large_class_threshold)


def _round_up_to_float32(x: np.ndarray) -> np.ndarray:
  """The smallest float32 values >= the float64 ``x``, elementwise."""
  x32 = x.astype(np.float32)
  return np.where(x32.astype(np.float64) < x,
                  np.nextafter(x32, np.float32(np.inf)), x32)


def assemble_bound_float64(chain, norms, *, method: str, kind: str,
                           diagonal: float = 0.0,
                           large_class_threshold: int = (
                               bounds_lib.DEFAULT_LARGE_CLASS_THRESHOLD)
                           ) -> np.ndarray:
  """The bound from given product norms, computed in float64.

  The exact last-layer rows and the recursion run in float64 and the result
  is rounded *up* to float32, so rounding never makes the bound smaller.

  Args:
    chain: the network's :class:`~lipjax.linear_maps.LinearChain`.
    norms: ``[P]`` product norms (already times any safety factor), in the
      order of :func:`lipjax.required_products`.
    method, kind, diagonal, large_class_threshold: as in :func:`bound`.

  Returns:
    float32 numpy: a scalar, ``[K]`` or ``[K, K]``.
  """
  with jax.enable_x64(True):
    value64 = np.asarray(_bound_jit(
        chain.astype(jnp.float64), jnp.asarray(norms, jnp.float64),
        method=method, kind=kind, diagonal=float(diagonal),
        large_class_threshold=int(large_class_threshold)))
  return _round_up_to_float32(value64)


def _training_bound(chain, state, iterations: int, *, method, kind, diagonal,
                    safety_factor, large_class_threshold):
  """``iterations`` warm steps and the differentiable estimate (traceable).

  Returns:
    ``(bound, state)``.
  """
  factor = 1.0 if safety_factor is None else float(safety_factor)
  if state is not None and state.products:
    state = power_iteration.iterate(chain, state, iterations)
    norms = power_iteration.estimate(chain, state) * factor
  else:
    norms = jnp.zeros((0,), chain.ops[-1].weight.dtype)
  value = bounds_lib.bound_from_norms(
      chain, norms, method=method, kind=kind, diagonal=diagonal,
      large_class_threshold=large_class_threshold)
  return value, state


def _norms_by_source(chain, state, products, use_exact: np.ndarray, *, key,
                     rtol, max_iterations, restarts, max_exact_bytes):
  """float64 norms: exact where ``use_exact``, converged iteration elsewhere.

  Returns:
    ``(norms [P], state, convergence or None)``.
  """
  norms = np.zeros(len(products), np.float64)
  convergence = None
  if products and not use_exact.all():
    state, convergence = power_iteration.converge(
        chain, state, key=key, rtol=rtol, max_iterations=max_iterations,
        restarts=restarts)
    norms[:] = convergence.norms
  if use_exact.any():
    chosen = [p for p, e in zip(products, use_exact) if e]
    norms[use_exact] = exact_lib.product_norms(chain, chosen,
                                               max_bytes=max_exact_bytes)
  return norms, state, convergence


def bound(network, *, method: str = "liplt", kind: str = "pairwise",
          iterations: int | None = None,
          state: power_iteration.PowerState | None = None,
          key: jax.Array | None = None, return_state: bool = False,
          return_info: bool = False, exact: bool | str = False,
          rtol: float = 1e-6, max_iterations: int = 2000, restarts: int = 2,
          safety_factor: float | None = None, diagonal: float = 0.0,
          large_class_threshold: int = bounds_lib.DEFAULT_LARGE_CLASS_THRESHOLD,
          max_exact_bytes: int = exact_lib.DEFAULT_MAX_BYTES,
          slopes=None, graphdef=None):
  """A Lipschitz bound of a network: global, per class or per class pair.

  Example::

    L = lipjax.bound([W0, W1, W2], method="liplt", kind="pairwise")  # [K, K]
    model = lipjax.models.build("4C3F", num_classes=10,
                                input_shape=(28, 28, 1), rngs=nnx.Rngs(0))
    L = lipjax.bound(model)                        # converged, x safety factor
    L = lipjax.bound(model, exact=True)            # float64 Gram norms
    L, state = lipjax.bound(model, iterations=5, state=state,
                            return_state=True)     # training, inside jit

  Args:
    network: a :class:`lipjax.models.SequentialNet`; a list of ``[out, in]``
      weight matrices (a dense chain, ReLU unless ``slopes`` says otherwise);
      a :class:`lipjax.LinearChain`; or model params with ``graphdef=``.
    method: ``"liplt"`` (loop-transformed, tighter) or ``"naive"``.
    kind: ``"pairwise"`` -> ``[K, K]`` symmetric, ``"per_class"`` -> ``[K]``,
      ``"global"`` -> scalar.
    iterations: training mode: this many warm-started power-iteration steps
      and a differentiable, *uncertified* estimate. None: converged mode.
    state: warm-start vectors (:func:`init_power_state` or a previous call).
    key: PRNG key for fresh vectors and restarts (default ``key(0)``).
    return_state: also return the updated :class:`PowerState`.
    return_info: also return a :class:`BoundInfo` (not in training mode).
    exact: True for float64 Gram-matrix norms everywhere, ``"auto"`` for
      exact norms where they fit in ``max_exact_bytes``.
    rtol, max_iterations, restarts: converged-mode power iteration settings.
    safety_factor: multiplies every product norm; defaults to 1 in training
      mode, 1.01 for converged iteration and 1 + 1e-5 for exact norms.
    diagonal: the pairwise matrix's diagonal (CRM training uses 1).
    large_class_threshold: pairwise LipLT with more classes than this uses
      the large-class fallback (SPEC §3.3).
    max_exact_bytes: memory limit for one exact Gram matrix.
    slopes: override the activation's slope interval ``(alpha, beta)``.
    graphdef: with ``network`` a params state (or a tuple of states), the
      ``nnx`` graphdef to merge them with.

  Returns:
    ``L``, or a tuple ``(L, state)`` / ``(L, info)`` / ``(L, state, info)``
    as requested.
  """
  bounds_lib.check_method_kind(method, kind)
  chain = _resolve_network(network, graphdef, slopes)
  products = bounds_lib.required_products(chain.num_layers, method=method,
                                          kind=kind)
  key = jax.random.key(0) if key is None else key
  if products and state is None:
    init_key, key = jax.random.split(key)
    state = power_iteration.init(chain, products, init_key)
  if state is not None and state.products != products:
    raise ValueError(
        f"The power-iteration state holds products {state.products}, but a "
        f"{method} {kind} bound of this network needs {products}. Create it "
        "with lipjax.init_power_state(network, method=..., kind=...).")

  if iterations is not None:
    if exact or return_info:
      raise ValueError("iterations=... (training mode) cannot be combined "
                       "with exact=... or return_info=True.")
    value, state = _training_bound(
        chain, state, iterations, method=method, kind=kind,
        diagonal=diagonal, safety_factor=safety_factor,
        large_class_threshold=large_class_threshold)
    return (value, state) if return_state else value

  if exact not in (False, True, "auto"):
    raise ValueError(f"exact must be False, True or 'auto', got {exact!r}.")
  use_exact = np.asarray(
      [bool(exact) if exact != "auto"
       else exact_lib.fits(chain, p, max_exact_bytes) for p in products],
      dtype=bool)
  sources = ["exact" if e else "converged" for e in use_exact]
  norms, state, convergence = _norms_by_source(
      chain, state, products, use_exact, key=key, rtol=rtol,
      max_iterations=max_iterations, restarts=restarts,
      max_exact_bytes=max_exact_bytes)
  if safety_factor is None:
    factors = np.where(use_exact, EXACT_SAFETY_FACTOR,
                       CONVERGED_SAFETY_FACTOR)
  else:
    factors = np.full(len(products), float(safety_factor))
  value = jnp.asarray(assemble_bound_float64(
      chain, norms * factors, method=method, kind=kind, diagonal=diagonal,
      large_class_threshold=large_class_threshold))
  outputs = [value]
  if return_state:
    outputs.append(state)
  if return_info:
    outputs.append(BoundInfo(method=method, kind=kind, products=products,
                             norms=norms, sources=tuple(sources),
                             safety_factor=factors, convergence=convergence))
  return tuple(outputs) if len(outputs) > 1 else value
