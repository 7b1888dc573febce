"""The one-call entry point: ``lipjax.bound(network, ...)``.

Two uses, chosen by the arguments:

* ``iterations=k`` (training): ``k`` warm-started power-iteration steps from
  ``state`` (or fresh vectors), then the differentiable estimate
  ``||P sg(v)||``. Pure and traceable: call it inside ``jax.jit`` and
  ``jax.grad``. The estimates are lower bounds of the norms, so the result is
  *not* a certificate.
* default (``iterations=None``): a **certified** bound. Every product norm is
  an upper bound from :mod:`lipjax.norm_certificates`: exact float64 Gram
  norms (``exact=True``, or ``"auto"`` where they fit in
  ``max_exact_bytes``) or float64 Lanczos from fresh random starts with the
  Kuczynski-Wozniakowski factor, so that the whole bound holds with
  probability at least ``1 - delta`` over the start vectors (the seed is
  recorded; ``exact=True`` has no probability at all). The bound is
  assembled in float64 and rounded up to float32. ``return_info=True``
  returns a :class:`BoundInfo` that says, per product and overall, what the
  guarantee rests on.

Non-finite weights raise in the certified mode instead of giving a bound.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from lipjax import activations
from lipjax import bounds as bounds_lib
from lipjax import exact as exact_lib
from lipjax import guarantee as guarantee_lib
from lipjax import linear_maps
from lipjax import norm_certificates
from lipjax import power_iteration
from lipjax import residual_bounds
from lipjax import residual_certified
from lipjax import residual_graph
from lipjax import residual_models

EXACT_SAFETY_FACTOR = norm_certificates.EXACT_SAFETY_FACTOR


@dataclasses.dataclass(frozen=True)
class BoundInfo:
  """How a certified bound was computed, per product (for reports).

  Attributes:
    method, kind: as requested.
    products: the ``(s, e)`` pairs whose norms were used.
    norms: the norms used, before the safety factor (float64 ``[P]``).
    sources: per product, ``"exact"`` or ``"lanczos"``.
    safety_factor: per product, the factor applied to its norm.
    certificate: the per-product :class:`NormCertificate` (Lanczos steps,
      KW epsilon, failure probability, seed).
  """
  method: str
  kind: str
  products: tuple[tuple[int, int], ...]
  norms: np.ndarray
  sources: tuple[str, ...]
  safety_factor: np.ndarray
  certificate: norm_certificates.NormCertificate

  @property
  def guarantee(self) -> str:
    """What the bound rests on, in one sentence (with the seed)."""
    return self.certificate.guarantee

  @property
  def seed(self) -> int | None:
    return self.certificate.seed

  def summary(self) -> str:
    """A labelled table: one line per product, then the guarantee."""
    lines = [f"{self.method} {self.kind} bound; product norms:",
             f"  {'product':<14}{'source':<9}{'norm':>12}{'factor':>11}"
             f"{'steps':>7}{'epsilon':>10}{'delta':>10}"]
    for row in self.certificate.rows():
      lines.append(f"  {row['layers']:<14}{row['source']:<9}"
                   f"{row['norm']:>12.6g}{row['factor']:>11.6f}"
                   f"{row['steps']:>7}{row['epsilon']:>10.2e}"
                   f"{row['delta']:>10.2e}")
    lines.append(f"guarantee: {self.guarantee}")
    return "\n".join(lines)


def _resolve_network(network, graphdef, slopes):
  """A :class:`LinearChain`, or a :class:`ResidualGraph` for a residual
  network."""
  if graphdef is not None:
    from lipjax import models  # pylint: disable=import-outside-toplevel
    states = network if isinstance(network, tuple) else (network,)
    network = models.merge(graphdef, *states)
  if isinstance(network, residual_models.ResidualNet):
    network = residual_graph.from_model(network)
  if isinstance(network, residual_graph.ResidualGraph):
    residual_graph.check_graph(network)
    if slopes is not None:
      network = dataclasses.replace(
          network, slopes=activations.check_slopes(slopes))
    return network
  return linear_maps.to_chain(network, slopes=slopes)


def _is_residual(network) -> bool:
  return isinstance(network, residual_graph.ResidualGraph)


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
  key = jax.random.key(0) if key is None else key
  if _is_residual(chain):
    return residual_bounds.init_power_state(chain, method=method, kind=kind,
                                            key=key)
  products = bounds_lib.required_products(chain.num_layers, method=method,
                                          kind=kind)
  if not products:
    raise ValueError(f"A {kind} {method} bound of a {chain.num_layers}-layer "
                     "network needs no power iteration.")
  return power_iteration.init(chain, products, key)


@functools.partial(jax.jit, static_argnames=("method", "kind", "diagonal",
                                             "large_class_threshold"))
def _bound_jit(chain, norms, *, method, kind, diagonal, large_class_threshold):
  return bounds_lib.bound_from_norms(
      chain, norms.astype(chain.ops[-1].weight.dtype), method=method,
      kind=kind, diagonal=diagonal,
      large_class_threshold=large_class_threshold)


def round_up_to_float32(x: np.ndarray) -> np.ndarray:
  """The smallest float32 values >= the float64 ``x``, elementwise."""
  with np.errstate(over="ignore"):  # Above float32's range: inf, fails closed.
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
  return round_up_to_float32(value64)


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


GUARANTEES = ("randomized", "deterministic")


def _certified_bound(chain, products, *, method, kind, exact, guarantee_kind,
                     delta, seed, target_factor, max_steps, safety_factor,
                     diagonal, large_class_threshold, max_exact_bytes,
                     progress):
  """The certified mode of :func:`bound`; returns ``(value, info)``."""
  if exact not in (False, True, "auto"):
    raise ValueError(f"exact must be False, True or 'auto', got {exact!r}.")
  if guarantee_kind not in GUARANTEES:
    raise ValueError(f"guarantee must be one of {GUARANTEES}, got "
                     f"{guarantee_kind!r}.")
  deterministic = guarantee_kind == "deterministic"
  use_exact = np.asarray(
      [bool(exact) if exact != "auto" and not deterministic
       else exact_lib.fits(chain, p, max_exact_bytes) for p in products],
      dtype=bool)
  if safety_factor is not None and not use_exact.all():
    raise ValueError(
        "safety_factor replaces the factor of exact norms only (exact=True); "
        "the randomized certificate sets its own factor from delta.")
  if safety_factor is not None and not safety_factor >= 1.0:
    raise ValueError(f"safety_factor must be >= 1 (1 drops the rounding "
                     f"allowance of exact norms); got {safety_factor}.")
  chain = linear_maps.with_scales_rounded_up(chain)
  layer_norms = {}
  certificate = norm_certificates.certify_norms(
      chain, products, use_exact=use_exact, delta=delta, seed=seed,
      target_factor=target_factor, max_steps=max_steps,
      max_exact_bytes=max_exact_bytes, progress=progress,
      layer_norms_out=layer_norms, deterministic=deterministic)
  if safety_factor is None:
    factors, upper = certificate.factors, certificate.certified
  else:
    factors = np.full(len(products), float(safety_factor))
    upper = certificate.norms * factors
  value = assemble_bound_float64(
      chain, upper, method=method, kind=kind, diagonal=diagonal,
      large_class_threshold=large_class_threshold)
  value = round_up_to_float32(
      value.astype(np.float64) * norm_certificates.class_row_factor(
          chain, kind=kind, layer_norms=layer_norms,
          large_class_threshold=large_class_threshold))
  if kind == "pairwise":  # The diagonal is a convention, not a bound.
    np.fill_diagonal(value, np.float32(diagonal))
  value = jnp.asarray(value)
  info = BoundInfo(method=method, kind=kind, products=products,
                   norms=certificate.norms, sources=certificate.sources,
                   safety_factor=factors, certificate=certificate)
  return value, info


def bound(network, *, method: str = "liplt", kind: str = "pairwise",
          iterations: int | None = None,
          state: power_iteration.PowerState | None = None,
          key: jax.Array | None = None, return_state: bool = False,
          return_info: bool = False, exact: bool | str = False,
          guarantee: str = "randomized",
          delta: float = guarantee_lib.DEFAULT_DELTA, seed: int | None = None,
          target_factor: float = guarantee_lib.DEFAULT_TARGET_FACTOR,
          max_steps: int = guarantee_lib.DEFAULT_MAX_STEPS,
          safety_factor: float | None = None, diagonal: float = 0.0,
          large_class_threshold: int = bounds_lib.DEFAULT_LARGE_CLASS_THRESHOLD,
          max_exact_bytes: int = exact_lib.DEFAULT_MAX_BYTES,
          slopes=None, graphdef=None, progress: bool = False):
  """A Lipschitz bound of a network: global, per class or per class pair.

  Example::

    L = lipjax.bound([W0, W1, W2], method="liplt", kind="pairwise")  # [K, K]
    model = lipjax.models.build("4C3F", num_classes=10,
                                input_shape=(28, 28, 1), rngs=nnx.Rngs(0))
    L, info = lipjax.bound(model, return_info=True)  # P(fail) <= 1e-9
    print(info.summary())                          # per product + guarantee
    L = lipjax.bound(model, exact=True)            # deterministic
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
      and a differentiable, *uncertified* estimate. None: certified mode.
    state: warm-start vectors (:func:`init_power_state` or a previous call);
      training mode only (a certificate never starts from them).
    key: PRNG key of fresh training vectors (default ``key(0)``).
    return_state: also return the (training) :class:`PowerState`.
    return_info: also return a :class:`BoundInfo` (not in training mode).
    exact: True for float64 Gram-matrix norms everywhere (deterministic),
      ``"auto"`` for exact norms where they fit in ``max_exact_bytes`` and
      Lanczos elsewhere, False for Lanczos everywhere.
    guarantee: ``"randomized"`` (default): products without exact norms are
      bounded by Lanczos, with failure probability ``delta``;
      ``"deterministic"``: exact norms where the Gram matrix fits, and a
      bound by proof elsewhere (products of exact segments and conv symbol
      bounds, :mod:`lipjax.deterministic`; looser). No probability.
    delta: the certificate's failure probability over the Lanczos start
      vectors, split evenly over the Lanczos products.
    seed: seed of the Lanczos start vectors; None (default) draws a fresh one
      from the operating system. Recorded in ``info.seed``; passing it again
      reproduces the bound bit for bit.
    target_factor: Lanczos runs until every norm's certified factor is at
      most this (``max_steps`` caps it; the factor reached is reported).
    max_steps: cap on the Lanczos Krylov dimension.
    safety_factor: replaces the per-norm factor in training mode (default 1)
      and for exact norms (default 1 + 1e-5).
    diagonal: the pairwise matrix's diagonal (CRM training uses 1).
    large_class_threshold: pairwise LipLT with more classes than this uses
      the large-class fallback.
    max_exact_bytes: memory limit for one exact Gram matrix.
    slopes: override the activation's slope interval ``(alpha, beta)``.
    graphdef: with ``network`` a params state (or a tuple of states), the
      ``nnx`` graphdef to merge them with.
    progress: progress bars for the certified mode's norms.

  Returns:
    ``L``, or a tuple ``(L, state)`` / ``(L, info)`` / ``(L, state, info)``
    as requested.

  Raises:
    ValueError: bad arguments, or non-finite weights in the certified mode.
    MemoryError: ``exact=True`` and a Gram matrix exceeds the limit.
  """
  bounds_lib.check_method_kind(method, kind)
  chain = _resolve_network(network, graphdef, slopes)
  if _is_residual(chain):
    return _residual_bound(
        chain, method=method, kind=kind, iterations=iterations, state=state,
        key=key, return_state=return_state, return_info=return_info,
        exact=exact, guarantee_kind=guarantee, delta=delta, seed=seed,
        target_factor=target_factor, max_steps=max_steps,
        safety_factor=safety_factor, diagonal=diagonal,
        large_class_threshold=large_class_threshold,
        max_exact_bytes=max_exact_bytes, progress=progress)
  products = bounds_lib.required_products(chain.num_layers, method=method,
                                          kind=kind)
  if iterations is not None:
    if exact or return_info:
      raise ValueError("iterations=... (training mode) cannot be combined "
                       "with exact=... or return_info=True.")
    key = jax.random.key(0) if key is None else key
    if products and state is None:
      init_key, _ = jax.random.split(key)
      state = power_iteration.init(chain, products, init_key)
    _check_state_products(state, products, method, kind)
    value, state = _training_bound(
        chain, state, iterations, method=method, kind=kind,
        diagonal=diagonal, safety_factor=safety_factor,
        large_class_threshold=large_class_threshold)
    return (value, state) if return_state else value

  _check_state_products(state, products, method, kind)
  value, info = _certified_bound(
      chain, products, method=method, kind=kind, exact=exact,
      guarantee_kind=guarantee, delta=delta,
      seed=seed, target_factor=target_factor, max_steps=max_steps,
      safety_factor=safety_factor, diagonal=diagonal,
      large_class_threshold=large_class_threshold,
      max_exact_bytes=max_exact_bytes, progress=progress)
  outputs = [value]
  if return_state:
    outputs.append(state)
  if return_info:
    outputs.append(info)
  return tuple(outputs) if len(outputs) > 1 else value


def _check_state_products(state, products, method, kind) -> None:
  if state is not None and state.products != products:
    raise ValueError(
        f"The power-iteration state holds products {state.products}, but a "
        f"{method} {kind} bound of this network needs {products}. Create it "
        "with lipjax.init_power_state(network, method=..., kind=...).")


def _residual_bound(graph, *, method, kind, iterations, state, key,
                    return_state, return_info, exact, guarantee_kind, delta,
                    seed, target_factor, max_steps, safety_factor, diagonal,
                    large_class_threshold, max_exact_bytes, progress):
  """:func:`bound` for a residual network (:mod:`lipjax.residual_bounds`)."""
  if iterations is not None:
    if exact or return_info:
      raise ValueError("iterations=... (training mode) cannot be combined "
                       "with exact=... or return_info=True.")
    if state is None:
      key = jax.random.key(0) if key is None else key
      state = residual_bounds.init_power_state(
          graph, method=method, kind=kind, key=jax.random.split(key)[0])
    value, state = residual_bounds.training_bound(
        graph, state, iterations, method=method, kind=kind,
        diagonal=diagonal, safety_factor=safety_factor,
        large_class_threshold=large_class_threshold)
    return (value, state) if return_state else value
  if exact not in (False, True, "auto"):
    raise ValueError(f"exact must be False, True or 'auto', got {exact!r}.")
  if guarantee_kind not in GUARANTEES:
    raise ValueError(f"guarantee must be one of {GUARANTEES}, got "
                     f"{guarantee_kind!r}.")
  if safety_factor is not None and not safety_factor >= 1.0:
    raise ValueError(f"safety_factor must be >= 1 (1 drops the rounding "
                     f"allowance of exact norms); got {safety_factor}.")
  value, certificate, products = residual_certified.certified_bound(
      graph, method=method, kind=kind, exact=exact,
      deterministic=guarantee_kind == "deterministic", delta=delta,
      seed=seed, target_factor=target_factor, max_steps=max_steps,
      safety_factor=safety_factor, diagonal=diagonal,
      large_class_threshold=large_class_threshold,
      max_exact_bytes=max_exact_bytes, progress=progress)
  factors = (certificate.factors if safety_factor is None
             else np.full(len(products), float(safety_factor)))
  info = BoundInfo(method=method, kind=kind, products=products,
                   norms=certificate.norms, sources=certificate.sources,
                   safety_factor=factors, certificate=certificate)
  outputs = [jnp.asarray(value)]
  if return_state:
    outputs.append(state)
  if return_info:
    outputs.append(info)
  return tuple(outputs) if len(outputs) > 1 else outputs[0]
