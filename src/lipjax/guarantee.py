"""The arithmetic of a randomized norm certificate (Lanczos, random start).

Lanczos on ``A = P^T P`` (``n x n``, positive semidefinite) from a start
vector ``b`` drawn uniformly from the unit sphere builds, after ``m`` steps,
the tridiagonal ``T_m`` (diagonal ``alpha_1..alpha_m``, off-diagonal
``beta_1..beta_{m-1}``) and the next residual norm ``beta_m``. Its largest
eigenvalue ``theta_max`` (the largest Ritz value) is a lower bound of
``lambda_max = ||P||^2``. Two statements turn it into an upper bound; each
product's certified bound is the smaller of the two, each taken at half the
product's failure probability ``delta_p`` (a union bound):

**The Lanczos polynomial (a posteriori).** The next Lanczos vector is
``q_{m+1} = p_m(A) b`` with ``p_m(t) = det(t I - T_m) / (beta_1 ... beta_m)``,
a unit vector, so with ``b_1`` the component of ``b`` along a top eigenvector

  ``1 = ||p_m(A) b||^2 = sum_i p_m(lambda_i)^2 b_i^2 >= p_m(lambda_max)^2 b_1^2``.

``|p_m(t)| = prod_j |t - theta_j| / prod_j beta_j`` grows without bound
beyond ``theta_max`` (all its roots, the Ritz values, lie below), so
``|b_1| >= gamma`` gives ``lambda_max <= t*``, the root of
``|p_m(t*)| = 1 / gamma`` above ``theta_max``. For ``b`` uniform on the sphere,
``b_1^2`` is Beta(1/2, (n-1)/2)-distributed, whose density on ``[-1, 1]`` is
at most ``c_n = Gamma(n/2) / (sqrt(pi) Gamma((n-1)/2))`` (``n >= 3``), so
``P(|b_1| < gamma) <= 2 gamma c_n``: ``gamma = delta / (2 c_n)``. The event
does not depend on ``m``, so the bound holds at every step at once and the
number of steps may depend on the data. It is tight once the top Ritz value
has converged, which is why certification stops when this factor reaches its
target.

**Kuczynski-Wozniakowski (a priori).** Kuczynski and Wozniakowski (SIAM J.
Matrix Anal. Appl. 13(4), 1992) bound, for ``k`` Lanczos steps and every
symmetric positive definite ``A`` (semidefinite ones follow by shifting
``A + tI``, ``t -> 0``),

  ``P(theta_max < (1 - eps) lambda_max) <= 1.648 sqrt(n) exp(-sqrt(eps) (2k - 1))``.

We use ``k = m - 1`` for an ``m``-dimensional Krylov space: the paper's ``k``
or one less, whichever its ``k`` counts, and the bound grows as ``k``
shrinks, so either reading is covered. Then
``eps = (ln(1.648 sqrt(n) / delta) / (2k - 1))^2`` and
``lambda_max <= theta_max / (1 - eps)``. This one needs no gap but converges
slowly; it is the fallback for clustered spectra. Its failure events for
different steps are not nested, so when Lanczos may stop at any of several
steps the bound pays for each of them (``kw_stops`` in
:func:`certified_square_norm`, a union bound).

A Krylov space of dimension ``m >= n`` is the whole space, so then
``theta_max = lambda_max``. A breakdown (a residual ``beta_m`` at rounding
level) needs no special case: the polynomial bound with the inflated
``beta_m`` covers it. Rounding: the Ritz values are shifted up and the
``beta`` inflated by ``LEVEL`` times the scale of ``A`` (float64 Lanczos
with full reorthogonalization behaves as exact Lanczos on a matrix within a
few ``m n u ||A||`` of ``A``, ``u = 2^-53``, about ``1e-12 ||A||`` for the
sizes here), and the result is multiplied by ``1 + ROUNDING_MARGIN``. The float64 evaluation of ``A q`` is
covered separately, by an allowance that scales with the product of the
layer norms (``matvec_error``, see :mod:`lipjax.norm_certificates`).

The user's ``delta`` is split evenly over the Lanczos products, so all of
them hold at once with probability at least ``1 - delta``.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.linalg

KW_CONSTANT = 1.648
# Relative margin on every eigenvalue bound (see the module docstring).
ROUNDING_MARGIN = 1e-7
DEFAULT_DELTA = 1e-9
# Target for the certified norm / Ritz norm factor; reached, Lanczos stops.
DEFAULT_TARGET_FACTOR = 1.0002
DEFAULT_MAX_STEPS = 512
# Rounding level of float64 Lanczos, relative to the scale of A.
LEVEL = 1e-10
# A residual below this times the running scale ends the Krylov space (the
# same rule as lipjax.lanczos.BREAKDOWN).
BREAKDOWN = 1e-12


def check_delta(delta: float) -> float:
  """``delta`` as a float in (0, 1), or a ValueError that names the fix."""
  delta = float(delta)
  if not 0.0 < delta < 1.0:
    raise ValueError(f"delta (the certificate's failure probability) must "
                     f"be in (0, 1), e.g. 1e-9; got {delta}.")
  return delta


def kw_epsilon(dim: int, steps: int, delta: float) -> float:
  """The KW relative eigenvalue error ``eps`` at failure probability delta.

  Args:
    dim: ``n``, the dimension of ``A = P^T P`` (the product's input size).
    steps: ``m``, the dimension of the Krylov space built.
    delta: failure probability for this bound, in (0, 1).

  Returns:
    ``eps`` in [0, 1]: with probability ``>= 1 - delta``,
    ``theta_max >= (1 - eps) lambda_max``. 0 when ``m >= n``; 1 (no
    information) when ``m < 2``.
  """
  delta = check_delta(delta)
  if steps >= dim:
    return 0.0
  k = steps - 1  # Conservative reading of the paper's k (module docstring).
  if k < 1:
    return 1.0
  x = math.log(KW_CONSTANT * math.sqrt(dim) / delta) / (2 * k - 1)
  return min(max(x, 0.0)**2, 1.0)


def start_component_floor(dim: int, delta: float) -> float:
  """``gamma`` with ``P(|b_1| < gamma) <= delta`` for ``b`` uniform on S^{n-1}.

  ``n = 1``: ``b = +-1``, so any ``gamma <= 1`` (we return 1). ``n = 2``:
  ``b_1 = cos(phi)`` with ``phi`` uniform, ``P(|b_1| < g) = 2 asin(g) / pi``.
  ``n >= 3``: the density of ``b_1`` is at most ``c_n`` (its value at 0).
  """
  delta = check_delta(delta)
  if dim <= 1:
    return 1.0
  if dim == 2:
    return math.sin(math.pi * delta / 2.0)
  log_c = (math.lgamma(dim / 2.0) - math.lgamma((dim - 1) / 2.0)
           - 0.5 * math.log(math.pi))
  return delta / (2.0 * math.exp(log_c))


def _krylov_block(alpha: np.ndarray, beta: np.ndarray):
  """``(alpha, beta)`` up to the first breakdown (a zero next vector).

  The device zeroes the next Lanczos vector when the residual is below
  ``BREAKDOWN`` times the running scale ``max(|alpha_i| + beta_i)``; the same
  rule finds that step here. The raw residual norm of the last kept step is
  kept (the bound inflates it; see :func:`polynomial_bound`).
  """
  scale = np.maximum.accumulate(np.abs(alpha) + beta)
  dead = np.flatnonzero(beta <= BREAKDOWN * scale)
  if len(dead):
    j = int(dead[0]) + 1
    return alpha[:j], beta[:j]
  return alpha, beta


def ritz_values(alpha: np.ndarray, beta: np.ndarray) -> np.ndarray:
  """Ascending eigenvalues of the tridiagonal ``(alpha, beta[:-1])``."""
  if len(alpha) == 1:
    return np.asarray(alpha, np.float64)
  return scipy.linalg.eigvalsh_tridiagonal(alpha, beta[:len(alpha) - 1])


def polynomial_bound(theta: np.ndarray, beta: np.ndarray,
                     gamma: float) -> float:
  """The root ``t* > theta_max`` of ``prod |t - theta_j| / prod beta_j = 1/gamma``.

  Args:
    theta: ``[m]`` Ritz values (already shifted up by the rounding level).
    beta: ``[m]`` off-diagonal and, last, the residual norm (already
      inflated by the rounding level, so none is 0).
    gamma: the floor on the start vector's top component.

  Returns:
    The upper bound on ``lambda_max`` if ``|b_1| >= gamma``.
  """
  top = float(theta[-1])
  target = float(np.sum(np.log(beta))) - math.log(gamma)

  def excess(t):  # log |p_m(t)| - log(1 / gamma), increasing for t > top.
    return float(np.sum(np.log(t - theta))) - target

  lo, hi = top, top + max(abs(top), float(np.max(beta)))
  while excess(hi) < 0:
    lo, hi = hi, hi + 2.0 * (hi - top)
  for _ in range(200):  # Bisection to float64 resolution.
    mid = 0.5 * (lo + hi)
    if not lo < mid < hi:
      break
    if excess(mid) < 0:
      lo = mid
    else:
      hi = mid
  return hi


def certified_square_norm(alpha: np.ndarray, beta: np.ndarray, *, dim: int,
                          delta: float, matvec_error: float = 0.0,
                          kw_stops: int = 1) -> tuple[float, dict]:
  """The certified upper bound on ``||P||^2`` from a Lanczos run.

  Rounding: the Ritz values are shifted up, and the ``beta`` inflated, by
  ``LEVEL`` times the scale of ``A`` (``max(theta_max, |alpha|) +
  max(beta)``), which covers the float64 arithmetic of Lanczos with full
  reorthogonalization, plus ``10 sqrt(m) matvec_error``, which covers the
  float64 evaluation of ``A q`` itself (``||fl(A q) - A q|| <=
  matvec_error`` for unit ``q``; the errors of ``m`` steps add up to at most
  ``sqrt(m)`` times that in Frobenius norm). Both changes can only raise the
  bounds. The result is then multiplied by ``1 + ROUNDING_MARGIN``.

  Args:
    alpha, beta: ``[m]`` Lanczos coefficients (``beta[-1]`` the residual).
    dim: ``n``.
    delta: failure probability for this product (split in half between the
      polynomial and the KW bound).
    matvec_error: absolute bound on the evaluation error of ``A q``.
    kw_stops: the number of steps at which Lanczos may have stopped. The
      polynomial bound holds at every step at once; the KW bound is paid for
      each possible stop (a union bound), so it gets ``delta / 2 / kw_stops``.

  Returns:
    ``(bound, details)``: the bound and a dict with ``steps`` (the Krylov
    dimension used), ``theta_max`` (the largest Ritz value as computed), the
    ``polynomial`` and ``kw`` bounds, ``kw_epsilon`` and which one ``won``.
  """
  half = check_delta(delta) / 2.0
  alpha, beta = _krylov_block(np.asarray(alpha, np.float64),
                              np.asarray(beta, np.float64))
  steps = len(alpha)
  theta = ritz_values(alpha, beta)
  raw_top = float(theta[-1])
  level = LEVEL * (max(raw_top, float(np.max(np.abs(alpha))))
                   + float(np.max(beta))) + 10.0 * math.sqrt(steps) * float(
                       matvec_error)
  if level == 0.0:  # A = 0 on the Krylov space of b: P b = 0.
    level = np.finfo(np.float64).tiny
  theta = theta + level
  theta_max = float(theta[-1])
  if steps >= dim:  # The whole space: theta_max is lambda_max.
    poly = kw = theta_max
    eps = 0.0
  else:
    poly = polynomial_bound(theta, beta + level,
                            start_component_floor(dim, half))
    eps = kw_epsilon(dim, steps, half / max(int(kw_stops), 1))
    kw = theta_max / (1.0 - eps) if eps < 1.0 else math.inf
  bound = min(poly, kw) * (1.0 + ROUNDING_MARGIN)
  return max(bound, 0.0), {
      "steps": steps, "theta_max": max(raw_top, 0.0), "polynomial": poly,
      "kw": kw, "kw_epsilon": eps,
      "won": "polynomial" if poly <= kw else "kw"}
