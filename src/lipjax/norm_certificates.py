"""Certified upper bounds on product norms, and what each one rests on.

A certifying bound needs an *upper* bound on every product norm
``||W_e ... W_s||``. :func:`certify_norms` gives each product one of

* ``"exact"``: the float64 Gram matrix on the smaller side and ``eigvalsh``
  (:mod:`lipjax.exact`), times ``EXACT_SAFETY_FACTOR`` (1 + 1e-5, covering
  float64 rounding with a wide margin). No probability.
* ``"lanczos"``: float64 Lanczos from a fresh random start
  (:mod:`lipjax.lanczos`), times the factor of :mod:`lipjax.guarantee`; it
  fails with probability at most ``delta_p`` over the start vector. The
  user's ``delta`` is split evenly over the Lanczos products, so all of them
  hold at once with probability at least ``1 - delta``.

Every path fails closed: non-finite weights or scales raise before any work,
and a non-finite or negative norm raises instead of entering a bound.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np

from lipjax import exact as exact_lib
from lipjax import guarantee
from lipjax import lanczos
from lipjax.linear_maps import LinearChain
from lipjax.progress import progress_bar

EXACT_SAFETY_FACTOR = 1.0 + 1e-5


@dataclasses.dataclass(frozen=True)
class NormCertificate:
  """Per-product certified norms (arrays ``[P]`` in product order).

  Attributes:
    products: the ``(s, e)`` pairs.
    norms: float64 computed norms before the factor (exact norms, or
      ``sqrt`` of the largest Ritz value).
    factors: what each norm is multiplied by to be certified.
    sources: ``"exact"`` or ``"lanczos"`` per product.
    dims: the dimension of the Gram matrix of each product (its smaller
      side).
    steps: Krylov dimension per product (0 for exact norms).
    epsilons: KW relative eigenvalue error per product (0 for exact).
    deltas: failure probability per product (0 for exact).
    delta: the certificate's total failure probability (0 if all exact).
    seed: seed of the Lanczos start vectors, or None if none ran.
  """
  products: tuple[tuple[int, int], ...]
  norms: np.ndarray
  factors: np.ndarray
  sources: tuple[str, ...]
  dims: np.ndarray
  steps: np.ndarray
  epsilons: np.ndarray
  deltas: np.ndarray
  delta: float
  seed: int | None

  @property
  def certified(self) -> np.ndarray:
    """float64 ``norms * factors``: the upper bounds a certificate uses."""
    return self.norms * self.factors

  @property
  def guarantee(self) -> str:
    """One sentence: what the certificate rests on."""
    if "lanczos" not in self.sources:
      return "deterministic: every product norm is an exact float64 Gram norm"
    return (f"randomized: holds with probability >= 1 - {self.delta:.3g} "
            f"over the Lanczos start vectors (seed {self.seed})")

  def rows(self) -> list[dict]:
    """One labelled dict per product, for reports and printing."""
    return [{"product": list(p), "layers": f"W_{p[1]}...W_{p[0]}",
             "source": src, "norm": float(n), "factor": float(f),
             "certified_norm": float(n * f), "dim": int(d), "steps": int(k),
             "epsilon": float(e), "delta": float(dp)}
            for p, n, f, src, d, k, e, dp in zip(
                self.products, self.norms, self.factors, self.sources,
                self.dims, self.steps, self.epsilons, self.deltas)]


def check_finite(chain: LinearChain) -> None:
  """Raises ValueError naming the first layer with a non-finite array."""
  for k, op in enumerate(chain.ops):
    for name in ("weight", "in_scale", "out_scale"):
      value = getattr(op, name)
      if value is not None and not np.all(np.isfinite(np.asarray(value))):
        raise ValueError(
            f"Layer {k} ({op.kind}) has a non-finite {name}: no bound can "
            "certify this network. Restore a checkpoint saved before the "
            "weights diverged.")


def _exact_norms(chain, products, max_exact_bytes, progress) -> np.ndarray:
  """Exact norms, one product at a time so that the bar names it."""
  sizes = [exact_lib.gram_size(chain, p) for p in products]
  for size in sizes:  # Every size is checked before any work.
    if size.gram_bytes > max_exact_bytes:
      exact_lib.product_norm(chain, size.product, max_bytes=max_exact_bytes)
  bar = progress_bar(total=len(products), initial=0,
                     description="exact norms",
                     enabled=progress and bool(products))
  norms = []
  for size in sizes:
    (s, e), side = size.product, size.side
    bar.set_postfix_str(f"W_{e}...W_{s} ({side}x{side} Gram)")
    norms.append(exact_lib.product_norm(chain, size.product,
                                        max_bytes=max_exact_bytes))
    bar.update(1)
  bar.close()
  return np.asarray(norms, np.float64)


def _lanczos_norms(chain, products, *, delta, seed, target_factor, max_steps,
                   progress):
  """Certified Lanczos norms; returns ``(run, bounds, details)``.

  ``bounds`` are the certified squared norms per product; Lanczos stops once
  every product of a batch has ``sqrt(bound / theta_max) <= target_factor``.
  """
  delta_p = delta / len(products)
  dims = {p: exact_lib.gram_size(chain, p).side for p in products}

  def certify(batch, alphas, betas):
    return [guarantee.certified_square_norm(a, b, dim=dims[p], delta=delta_p)
            for p, a, b in zip(batch, alphas, betas)]

  def done(batch, alphas, betas):
    for bound, details in certify(batch, alphas, betas):
      top = details["theta_max"]
      if not (top > 0 and bound <= target_factor**2 * top):
        return False
    return True

  run = lanczos.run(jax.lax.stop_gradient(chain), products,
                    max_steps=max_steps, done=done, seed=seed,
                    progress=progress)
  results = certify(run.products, run.alphas, run.betas)
  return run, [b for b, _ in results], [d for _, d in results]


def certify_norms(chain: LinearChain, products, *, use_exact,
                  delta: float = guarantee.DEFAULT_DELTA,
                  seed: int | None = None,
                  target_factor: float = guarantee.DEFAULT_TARGET_FACTOR,
                  max_steps: int = guarantee.DEFAULT_MAX_STEPS,
                  max_exact_bytes: int = exact_lib.DEFAULT_MAX_BYTES,
                  progress: bool = False) -> NormCertificate:
  """Certified upper bounds on the norms of ``products``.

  Args:
    chain: the network's chain, with concrete (not traced) arrays.
    products: the ``(s, e)`` pairs.
    use_exact: ``[P]`` bools: exact norm for this product, else Lanczos.
    delta: total failure probability of the Lanczos norms, in (0, 1).
    seed: Lanczos start-vector seed; None draws one from OS entropy.
    target_factor: Lanczos stops once every product's certified factor
      (certified norm / largest Ritz norm) is at most this.
    max_steps: cap on the Krylov dimension.
    max_exact_bytes: per-product Gram matrix limit.
    progress: progress bars.

  Returns:
    A :class:`NormCertificate`.

  Raises:
    ValueError: non-finite weights; bad ``delta`` or ``target_factor``.
  """
  check_finite(chain)
  delta = guarantee.check_delta(delta)
  if not target_factor > 1.0:
    raise ValueError(f"target_factor must be > 1, e.g. 1.0002; got "
                     f"{target_factor}.")
  products = tuple(tuple(p) for p in products)
  use_exact = np.asarray(use_exact, bool).reshape(len(products))
  dims = np.asarray([exact_lib.gram_size(chain, p).side for p in products],
                    np.int64)
  norms = np.zeros(len(products))
  factors = np.full(len(products), EXACT_SAFETY_FACTOR)
  steps = np.zeros(len(products), np.int64)
  epsilons, deltas = np.zeros(len(products)), np.zeros(len(products))
  norms[use_exact] = _exact_norms(
      chain, [p for p, e in zip(products, use_exact) if e], max_exact_bytes,
      progress)
  random = [i for i, e in enumerate(use_exact) if not e]
  if random:
    run, bounds, details = _lanczos_norms(
        chain, [products[i] for i in random], delta=delta, seed=seed,
        target_factor=target_factor, max_steps=max_steps, progress=progress)
    seed = run.seed
    for i, bound, d in zip(random, bounds, details):
      norms[i] = math.sqrt(d["theta_max"])
      factors[i] = math.sqrt(bound / d["theta_max"]) if bound > 0 else 1.0
      steps[i], epsilons[i] = d["steps"], d["kw_epsilon"]
      deltas[i] = delta / len(random)
  if not np.all(np.isfinite(norms * factors)) or np.any(norms < 0):
    raise ValueError(f"A product norm came out non-finite or negative "
                     f"({norms}); refusing to certify with it.")
  return NormCertificate(
      products=products, norms=norms, factors=factors,
      sources=tuple("exact" if e else "lanczos" for e in use_exact),
      dims=dims, steps=steps, epsilons=epsilons, deltas=deltas,
      delta=float(deltas.sum()), seed=seed if random else None)
