"""The randomized certificate's arithmetic (lipjax.guarantee).

Hand-computed numbers for the Kuczynski-Wozniakowski epsilon and the
start-vector floor, the floor checked by sampling, and the two eigenvalue
bounds checked against known spectra, including their failure rates.
"""

import math

import numpy as np
import pytest

from lipjax import guarantee


def test_kw_epsilon_hand_computed():
  # n = 100, m = 11 -> k = 10: x = ln(1.648 * 10 / 1e-3) / 19.
  x = math.log(16480.0) / 19.0
  assert x == pytest.approx(0.5110475159717612, rel=1e-12)
  assert guarantee.kw_epsilon(100, 11, 1e-3) == pytest.approx(x**2,
                                                              rel=1e-12)
  assert guarantee.kw_epsilon(100, 100, 1e-3) == 0.0  # The whole space.
  assert guarantee.kw_epsilon(100, 1, 1e-3) == 1.0    # No information.
  # More steps, smaller epsilon; smaller delta, larger epsilon.
  assert (guarantee.kw_epsilon(3072, 300, 1e-9)
          < guarantee.kw_epsilon(3072, 200, 1e-9)
          < guarantee.kw_epsilon(3072, 200, 1e-12))


def test_start_component_floor_hand_computed():
  # n = 3: b_1 is uniform on [-1, 1] (Archimedes), so P(|b_1| < g) = g.
  assert guarantee.start_component_floor(3, 0.01) == pytest.approx(0.01)
  # n = 5: the density of b_1 is (3/4)(1 - x^2), at most 3/4.
  assert guarantee.start_component_floor(5, 0.01) == pytest.approx(0.01 / 1.5)
  # n = 2: b_1 = cos(phi), P(|b_1| < g) = 2 asin(g) / pi.
  assert guarantee.start_component_floor(2, 0.01) == pytest.approx(
      math.sin(math.pi * 0.005))
  assert guarantee.start_component_floor(1, 0.01) == 1.0


@pytest.mark.parametrize("dim", [2, 3, 10, 200])
def test_start_component_floor_holds_by_sampling(dim):
  delta = 0.05
  gamma = guarantee.start_component_floor(dim, delta)
  b = np.random.default_rng(dim).standard_normal((200_000, dim))
  first = np.abs(b[:, 0]) / np.linalg.norm(b, axis=1)
  rate = np.mean(first < gamma)
  # Below delta (with 4 standard errors of sampling noise), and not absurdly
  # conservative: for n >= 3 the density is flat near 0, so ~delta.
  assert rate <= delta + 4 * math.sqrt(delta / 200_000)
  assert rate >= 0.5 * delta


@pytest.mark.parametrize("bad", [0.0, 1.0, -1e-9, float("nan")])
def test_bad_delta_is_refused(bad):
  with pytest.raises(ValueError, match="delta"):
    guarantee.kw_epsilon(10, 5, bad)


def lanczos_numpy(a: np.ndarray, b: np.ndarray, steps: int):
  """Plain float64 Lanczos with full reorthogonalization (test reference)."""
  q = [b / np.linalg.norm(b)]
  alpha, beta = [], []
  for j in range(steps):
    w = a @ q[j]
    alpha.append(q[j] @ w)
    w = w - alpha[j] * q[j] - (beta[j - 1] * q[j - 1] if j else 0.0)
    for _ in range(2):
      basis = np.asarray(q)
      w = w - basis.T @ (basis @ w)
    beta.append(np.linalg.norm(w))
    q.append(w / beta[j] if beta[j] > 0 else 0.0 * w)
  return np.asarray(alpha), np.asarray(beta)


def _spectrum(kind: str, n: int, rng) -> np.ndarray:
  if kind == "clustered":  # A hard case: 1, then everything at 0.98.
    return np.concatenate([[1.0], np.full(n - 1, 0.98)])
  if kind == "gap":
    return np.concatenate([[1.0], rng.uniform(0, 0.5, n - 1)])
  if kind == "flat":
    return rng.uniform(0.99, 1.0, n)
  return np.linspace(0.0, 1.0, n)


@pytest.mark.parametrize("kind", ["clustered", "gap", "flat", "linear"])
@pytest.mark.parametrize("scale", [1e-12, 1.0, 1e12])
def test_certified_bound_is_above_lambda_max(kind, scale):
  rng = np.random.default_rng(0)
  n = 300
  lam = _spectrum(kind, n, rng) * scale
  basis, _ = np.linalg.qr(rng.standard_normal((n, n)))
  a = (basis * lam) @ basis.T
  for trial in range(5):
    b = rng.standard_normal(n)
    alpha, beta = lanczos_numpy(a, b, 60)
    bound, details = guarantee.certified_square_norm(
        alpha, beta, dim=n, delta=1e-9)
    assert bound >= lam.max(), (trial, details)
    assert details["theta_max"] <= lam.max() * (1 + 1e-9)
  # With a gap the polynomial bound is tight after a few dozen steps.
  if kind == "gap":
    assert bound <= lam.max() * (1 + 1e-6)


def test_failure_rate_is_below_delta_for_a_bad_start_direction():
  # A spectrum whose top eigenvector is hard to see: the start has a tiny
  # component along it only rarely. With delta = 0.2 the bound may fail in
  # at most 20 % of the starts; it should fail in far fewer.
  rng = np.random.default_rng(1)
  n = 50
  lam = np.concatenate([[1.0], np.full(n - 1, 0.5)])
  a = np.diag(lam)
  failures = 0
  for _ in range(400):
    alpha, beta = lanczos_numpy(a, rng.standard_normal(n), 3)
    bound, _ = guarantee.certified_square_norm(alpha, beta, dim=n, delta=0.2)
    failures += bound < 1.0
  assert failures / 400 <= 0.2


def test_orthogonal_start_makes_the_bound_fail_loudly_only_by_chance():
  # b exactly orthogonal to the top eigenvector: the Ritz value never sees
  # it, and the polynomial bound (which assumes |b_1| >= gamma) must not be
  # relied on. This is the event whose probability delta bounds; here we
  # only check that the KW fallback does not hide it: both bounds are below
  # lambda_max, as the theory says they may be on this measure-zero start.
  n = 40
  a = np.diag(np.concatenate([[1.0], np.full(n - 1, 0.5)]))
  b = np.ones(n)
  b[0] = 0.0
  alpha, beta = lanczos_numpy(a, b, 10)
  bound, details = guarantee.certified_square_norm(alpha, beta, dim=n,
                                                   delta=1e-9)
  assert details["theta_max"] == pytest.approx(0.5, rel=1e-9)
  assert bound < 1.0
