"""Tests for lipjax.certification.radii and lipjax.training.losses.

Expected values are worked out by hand in the comments (docs/training.md,
docs/bounds.md#two-classes); numpy only evaluates the written-out arithmetic.
Gradients are checked against finite differences (float64) on smooth points,
and for finiteness on the edge cases that break naive implementations (empty
sets, +inf radii, ties, huge temperatures).
"""

import functools
import math

import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest

from lipjax.certification import radii
from lipjax.training import losses

# Under jit, as in training (and much faster than op-by-op dispatch); one
# test also runs the functions eagerly.
margins_over_lipschitz = jax.jit(radii.margins_over_lipschitz)
certified_radius = jax.jit(radii.certified_radius)
certified_accuracy = jax.jit(radii.certified_accuracy)
clean_accuracy = jax.jit(radii.clean_accuracy)
is_certified = jax.jit(radii.is_certified)
cross_entropy = jax.jit(losses.cross_entropy)
crm_loss = jax.jit(losses.crm_loss,
                   static_argnames=("form", "regularize_misclassified"))
gloro_loss = jax.jit(losses.gloro_loss)
lmt_loss = jax.jit(losses.lmt_loss)

# docs/bounds.md#two-classes: L_01 = (sqrt(13) + 6 sqrt(10)) / 4 = 5.644804.
L01 = (math.sqrt(13.0) + 6.0 * math.sqrt(10.0)) / 4.0
PAIR_2 = np.array([[0.0, L01], [L01, 0.0]], np.float32)

# A 3-class pairwise matrix (symmetric; the zero diagonal must be ignored).
PAIR_3 = np.array([[0.0, 2.0, 4.0],
                   [2.0, 0.0, 1.0],
                   [4.0, 1.0, 0.0]], np.float32)
# Three examples, predicted class p = argmax:
#   b=0: z=(3, 1, 0),   y=0, p=0 correct.  R_01 = 2/2 = 1,   R_02 = 3/4 = 0.75
#   b=1: z=(0, 2, 1.5), y=0, p=1 WRONG.    R_10 = 2/2 = 1,   R_12 = 0.5/1 = 0.5
#   b=2: z=(0, 0, 4),   y=2, p=2 correct.  R_20 = 4/4 = 1,   R_21 = 4/1 = 4
# With r0 = 0.9: min radii (0.75, 0.5, 1.0); b=2 is not active (1 >= r0).
LOGITS_3 = np.array([[3.0, 1.0, 0.0],
                     [0.0, 2.0, 1.5],
                     [0.0, 0.0, 4.0]], np.float32)
LABELS_3 = np.array([0, 0, 2])
T, R0 = 2.0, 0.9


def lse(*values):
  return math.log(sum(math.exp(v) for v in values))


def ce_by_hand(logits, labels):
  return np.mean([lse(*row) - row[y] for row, y in zip(logits, labels)])


# ------------------------------------------------------------------ certify


@pytest.mark.parametrize("jit", [True, False])
def test_two_classes_radius_example(jit):
  # R = (2.0 - 0.5) / 5.644804 = 0.265731; certified iff eps < R.
  maybe_jit = jax.jit if jit else (lambda f: f)
  logits, labels = jnp.array([[2.0, 0.5]]), jnp.array([0])
  radius = maybe_jit(radii.certified_radius)(logits, labels, PAIR_2)
  np.testing.assert_allclose(radius, [0.265731], rtol=1e-6)
  acc = maybe_jit(radii.certified_accuracy)(logits, labels, PAIR_2,
                                              jnp.array([0.26, 0.27]))
  np.testing.assert_array_equal(acc, [1.0, 0.0])
  assert float(maybe_jit(radii.clean_accuracy)(logits, labels)) == 1.0


def test_per_class_and_global_conversions():
  logits, labels = jnp.array([[2.0, 0.5]]), jnp.array([0])
  # Per class (L_0, L_1) = (5.25, 2.0) -> L_01 = 7.25 -> R = 1.5 / 7.25.
  np.testing.assert_allclose(
      certified_radius(logits, labels, jnp.array([5.25, 2.0])),
      [1.5 / 7.25], rtol=1e-6)
  # Global 5.25 -> sqrt(2) * 5.25 = 7.424621 -> R = 0.202030.
  np.testing.assert_allclose(
      certified_radius(logits, labels, 5.25), [0.202030], rtol=1e-5)
  np.testing.assert_allclose(radii.pairwise_lipschitz(5.25, 2)[0, 1],
                             7.424621, rtol=1e-6)
  with pytest.raises(ValueError, match="lipschitz must be"):
    certified_radius(logits, labels, jnp.ones(3))


def test_margins_over_lipschitz_shape_and_self_entry():
  # Row b=0 of PAIR_3 with p=0: (inf, 2/2, 3/4); zero diagonal, no NaN.
  radii = margins_over_lipschitz(LOGITS_3, jnp.array([0, 1, 2]),
                                 PAIR_3)
  assert radii.shape == (3, 3)
  np.testing.assert_allclose(radii[0], [np.inf, 1.0, 0.75])
  np.testing.assert_allclose(radii[1], [1.0, np.inf, 0.5])
  np.testing.assert_allclose(radii[2], [1.0, 4.0, np.inf])


def test_radius_sign_and_misclassified_never_certified():
  # z=(0, 1), y=0, L=2: R = (0 - 1) / 2 = -0.5 < 0; a tie gives R = 0.
  logits = jnp.array([[0.0, 1.0], [1.0, 1.0]])
  labels = jnp.array([0, 0])
  pair = jnp.array([[0.0, 2.0], [2.0, 0.0]])
  np.testing.assert_allclose(certified_radius(logits, labels, pair),
                             [-0.5, 0.0])
  np.testing.assert_array_equal(
      certified_accuracy(logits, labels, pair, jnp.array([0.0, 0.1])),
      [0.0, 0.0])
  # The tie counts as clean-correct (argmax -> lowest index) but is on the
  # decision boundary, so it is never certified.
  assert float(clean_accuracy(logits, labels)) == 0.5


def test_strict_at_boundary():
  # z=(2, 1), L_01 = 2: slack = 1 - 2 eps is exactly 0 at eps = 0.5. The
  # reference's argmax (ties to the lower index, here y=0) would certify it.
  logits, labels = jnp.array([[2.0, 1.0]]), jnp.array([0])
  pair = jnp.array([[0.0, 2.0], [2.0, 0.0]])
  acc = certified_accuracy(logits, labels, pair,
                           jnp.array([0.4999, 0.5, 0.5001]))
  np.testing.assert_array_equal(acc, [1.0, 0.0, 0.0])
  # Same with the tie against a class *below* the label (z_1 = z_0 + 0 L).
  logits, labels = jnp.array([[1.0, 2.0]]), jnp.array([1])
  assert float(certified_accuracy(logits, labels, pair, 0.5)) == 0.0


def test_zero_off_diagonal_bound():
  # L_01 = 0 would mean f_0 - f_1 is constant; certification does not take
  # a bound's word for that: a bound <= 0 never certifies (fail closed).
  logits = jnp.array([[2.0, 1.0], [1.0, 2.0], [1.0, 1.0]])
  labels = jnp.array([0, 0, 0])
  radius = certified_radius(logits, labels, jnp.zeros((2, 2)))
  np.testing.assert_array_equal(radius, [0.0, -np.inf, 0.0])
  assert float(certified_accuracy(logits, labels, jnp.zeros((2, 2)),
                                  0.0)) == 0.0
  # Training's per-class radii keep the limit (+inf) for the CRM loss.
  np.testing.assert_array_equal(
      margins_over_lipschitz(logits, labels, jnp.zeros((2, 2)))[:, 1],
      [np.inf, -np.inf, 0.0])


@pytest.mark.parametrize("bad", [0.0, -1.0, np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("form", ["global", "per_class", "pairwise"])
def test_invalid_bounds_never_certify(bad, form):
  logits = jnp.array([[9.0, 0.0, 0.0], [0.0, 9.0, 0.0]])
  labels = jnp.array([0, 1])
  if form == "global":
    lip = jnp.asarray(bad)
  elif form == "per_class":
    lip = jnp.array([1.0, bad, 1.0])
  else:
    lip = jnp.ones((3, 3)).at[0, 1].set(bad).at[1, 0].set(bad)
  radius = np.asarray(certified_radius(logits, labels, lip))
  assert np.all(radius <= 0)  # Both rows involve the bad bound.
  for eps in (0.0, 1e-3, 1.0):
    assert float(certified_accuracy(logits, labels, lip, eps)) == 0.0


def test_non_finite_logits_or_eps_never_certify():
  logits = jnp.array([[9.0, jnp.nan], [9.0, jnp.inf], [9.0, 0.0]])
  labels = jnp.zeros(3, jnp.int32)
  radius = np.asarray(certified_radius(logits, labels, 1.0))
  assert np.all(radius[:2] <= 0) and radius[2] > 0
  np.testing.assert_array_equal(
      is_certified(logits, labels, 1.0, jnp.array([0.1])), [[0, 0, 1]])
  assert not np.any(is_certified(logits, labels, 1.0, jnp.array([np.nan])))


def test_mask():
  # Rows: certified, wrong, certified(pad), wrong(pad).
  logits = jnp.array([[5.0, 0.0], [0.0, 5.0], [5.0, 0.0], [0.0, 5.0]])
  labels = jnp.zeros(4, jnp.int32)
  mask = jnp.array([True, True, True, False])
  acc = certified_accuracy(logits, labels, PAIR_2, 0.1, mask=mask)
  np.testing.assert_allclose(acc, 2.0 / 3.0, rtol=1e-6)
  np.testing.assert_allclose(clean_accuracy(logits, labels, mask=mask),
                             2.0 / 3.0, rtol=1e-6)
  # An all-padding batch gives 0, not NaN.
  empty = jnp.zeros(4, bool)
  assert float(certified_accuracy(logits, labels, PAIR_2, 0.1,
                                          mask=empty)) == 0.0
  assert float(clean_accuracy(logits, labels, mask=empty)) == 0.0
  assert float(cross_entropy(logits, labels, mask=empty)) == 0.0
  # Masked cross-entropy: rows 0 and 2 have CE log(1 + e^-5), row 1 has
  # log(1 + e^5); mean over 3 rows.
  np.testing.assert_allclose(
      cross_entropy(logits, labels, mask=mask),
      (2 * math.log1p(math.exp(-5.0)) + math.log1p(math.exp(5.0))) / 3,
      rtol=1e-6)


@pytest.mark.parametrize("kind", ["pairwise", "per_class", "global"])
def test_certified_accuracy_properties(kind):
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(64, 5)) * 3, jnp.float32)
  labels = jnp.asarray(rng.integers(0, 5, size=64))
  if kind == "pairwise":
    lip = rng.uniform(0.5, 3.0, size=(5, 5))
    lip = jnp.asarray(lip + lip.T, jnp.float32)
  elif kind == "per_class":
    lip = jnp.asarray(rng.uniform(0.5, 3.0, size=5), jnp.float32)
  else:
    lip = jnp.float32(1.7)
  eps = jnp.linspace(0.0, 3.0, 31)
  acc = certified_accuracy(logits, labels, lip, eps)
  assert acc.shape == (31,)
  assert np.all(np.diff(np.asarray(acc)) <= 0)
  assert np.all(np.asarray(acc) <= float(clean_accuracy(logits,
                                                                labels)))
  assert float(acc[0]) > float(acc[-1])  # The test is not vacuous.
  # certified at eps  <=>  radius > eps  (away from rounding ties).
  radius = certified_radius(logits, labels, lip)
  np.testing.assert_allclose(
      acc, [np.mean(np.asarray(radius) > e) for e in np.asarray(eps)])
  assert certified_accuracy(logits, labels, lip, 0.5).shape == ()


# ---------------------------------------------------------------------- CRM


def crm(form="softmax", **kwargs):
  kwargs = {"t": T, "lam": 1.0, "r0": R0, "form": form} | kwargs
  return crm_loss(LOGITS_3, LABELS_3, PAIR_3, **kwargs)


def test_crm_softmax_by_hand():
  # Only b=0 is active (b=1 wrong, b=2 has R = 1 >= r0):
  #   LSE_{i != 0}(-t R_0i) = log(e^{-2*1} + e^{-2*0.75}) = -1.025923,
  # normalized by t B = 2 * 3 (the FULL batch, not |A| = 1).
  term = lse(-2.0, -1.5)
  np.testing.assert_allclose(term, -1.025923, rtol=1e-6)
  loss, aux = crm("softmax", lam=3.0)
  ce = ce_by_hand(LOGITS_3, LABELS_3)
  np.testing.assert_allclose(aux["robust_term"], term / 6.0, rtol=1e-6)
  np.testing.assert_allclose(aux["cross_entropy"], ce, rtol=1e-6)
  np.testing.assert_allclose(loss, ce + 3.0 * term / 6.0, rtol=1e-6)
  np.testing.assert_allclose(aux["active_fraction"], 1.0 / 3.0)
  # Mean radius over correct points b=0, b=2: (0.75 + 1.0) / 2.
  np.testing.assert_allclose(aux["mean_radius"], 0.875, rtol=1e-6)
  np.testing.assert_allclose(aux["accuracy"], 2.0 / 3.0)


def test_crm_max_by_hand():
  # exp(-t min_i R_0i) / (t B) = exp(-2 * 0.75) / 6 = 0.223130 / 6.
  loss, aux = crm("max")
  np.testing.assert_allclose(aux["robust_term"], math.exp(-1.5) / 6.0,
                             rtol=1e-6)
  np.testing.assert_allclose(
      loss, ce_by_hand(LOGITS_3, LABELS_3) + math.exp(-1.5) / 6.0, rtol=1e-6)


def test_crm_regularize_misclassified_changes_the_set():
  # b=1 joins, relative to its predicted class p=1: radii (1, 0.5):
  #   softmax: log(e^{-2} + e^{-1}) = -0.686738;  max: e^{-2*0.5} = e^{-1}.
  _, aux = crm("softmax", regularize_misclassified=True)
  np.testing.assert_allclose(
      aux["robust_term"], (lse(-2.0, -1.5) + lse(-2.0, -1.0)) / 6.0,
      rtol=1e-6)
  np.testing.assert_allclose(aux["active_fraction"], 2.0 / 3.0)
  _, aux = crm("max", regularize_misclassified=True)
  np.testing.assert_allclose(
      aux["robust_term"], (math.exp(-1.5) + math.exp(-1.0)) / 6.0, rtol=1e-6)
  # A larger r0 also activates b=2: radii (1, 4), LSE(-2, -8).
  _, aux = crm("softmax", r0=5.0)
  np.testing.assert_allclose(
      aux["robust_term"], (lse(-2.0, -1.5) + lse(-2.0, -8.0)) / 6.0,
      rtol=1e-6)


def test_crm_robust_inactive_is_pure_cross_entropy():
  ce = ce_by_hand(LOGITS_3, LABELS_3)
  loss, aux = crm(robust_active=False, lam=100.0)
  np.testing.assert_allclose(loss, ce, rtol=1e-6)
  assert float(aux["robust_term"]) != 0.0  # still logged
  # Traced flag (epoch >= E0 inside jit) gives the same values.
  fn = jax.jit(lambda active, lam, r0: crm_loss(
      LOGITS_3, LABELS_3, PAIR_3, t=T, lam=lam, r0=r0,
      robust_active=active)[0])
  np.testing.assert_allclose(fn(False, 3.0, R0), ce, rtol=1e-6)
  np.testing.assert_allclose(fn(True, 3.0, R0), crm(lam=3.0)[0], rtol=1e-6)
  grad_off = jax.jit(jax.grad(lambda z: crm_loss(
      z, LABELS_3, PAIR_3, t=T, lam=3.0, r0=R0, robust_active=False)[0]))(
          jnp.asarray(LOGITS_3))
  grad_ce = jax.jit(jax.grad(losses.cross_entropy))(jnp.asarray(LOGITS_3),
                                                    LABELS_3)
  np.testing.assert_allclose(grad_off, grad_ce, rtol=1e-6)


def test_crm_inactive_rows_get_no_robust_gradient():
  def robust(z, lip):
    return crm_loss(z, LABELS_3, lip, t=T, lam=1.0, r0=R0)[1]["robust_term"]

  gz, glip = jax.jit(jax.grad(robust, argnums=(0, 1)))(
      jnp.asarray(LOGITS_3), jnp.asarray(PAIR_3))
  np.testing.assert_array_equal(gz[1:], 0.0)  # b=1 wrong, b=2 R >= r0.
  assert np.all(np.asarray(gz[0]) != 0.0)
  # Only L_01 and L_02 (row p=0) enter; the diagonal never does.
  np.testing.assert_array_equal(np.asarray(glip) != 0, [[0, 1, 1],
                                                        [0, 0, 0],
                                                        [0, 0, 0]])


def test_crm_lipschitz_forms_agree():
  # Per class (1, 1, 3) -> pairwise L_i + L_j.
  per_class = jnp.array([1.0, 1.0, 3.0])
  pair = per_class[:, None] + per_class[None, :]
  for form in ("softmax", "max"):
    a = crm_loss(LOGITS_3, LABELS_3, per_class, t=T, lam=1.0, r0=R0,
                 form=form)[0]
    b = crm_loss(LOGITS_3, LABELS_3, pair, t=T, lam=1.0, r0=R0,
                 form=form)[0]
    np.testing.assert_allclose(a, b, rtol=1e-6)
  # Global 1 -> sqrt(2) everywhere: b=0 radii (2/sqrt2, 3/sqrt2) = (1.414,
  # 2.121) are >= r0 = 0.9, so raise r0 to 3 to make b=0 active.
  _, aux = crm_loss(LOGITS_3, LABELS_3, 1.0, t=T, lam=1.0, r0=3.0,
                    form="max")
  # b=0: exp(-2 * 2/sqrt2); b=2: radii (4/sqrt2, 4/sqrt2) = 2.83 < 3 too.
  expected = (math.exp(-2 * 2 / math.sqrt(2)) +
              math.exp(-2 * 4 / math.sqrt(2))) / 6.0
  np.testing.assert_allclose(aux["robust_term"], expected, rtol=1e-5)


def test_crm_gradients_match_finite_differences():
  # Smooth point: no ties, active set stable under small perturbations
  # (r0 = 1.4 makes every example active once misclassified ones count).
  with jax.enable_x64(True):
    z = jnp.asarray(LOGITS_3, jnp.float64)
    lip = jnp.asarray(PAIR_3 + 0.3, jnp.float64)  # Symmetric, positive.
    # (form, regularize_misclassified): False masks b=1 out, True makes all
    # three rows active.
    for form, misclassified in (("softmax", False), ("softmax", True),
                                ("max", True)):
      fn = jax.jit(functools.partial(
          lambda z, lip, **kw: crm_loss(z, LABELS_3, lip, **kw)[0],
          t=T, lam=2.0, r0=R0 + 0.5, form=form,
          regularize_misclassified=misclassified))
      jax.test_util.check_grads(fn, (z, lip), order=1, modes=("rev",),
                                eps=1e-4)


@functools.cache
def crm_value_and_grad(form, misclassified):
  """Jitted value and (logits, lipschitz) gradients; t and r0 are traced."""
  def loss(z, lip, labels, t, r0):
    return crm_loss(z, labels, lip, t=t, lam=10.0, r0=r0, form=form,
                           regularize_misclassified=misclassified)[0]
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def assert_finite_grads(loss_fn, logits, lipschitz):
  value, grads = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1)))(
      jnp.asarray(logits, jnp.float32), jnp.asarray(lipschitz, jnp.float32))
  assert_all_finite(value, grads)


def assert_all_finite(value, grads):
  assert np.isfinite(float(value)), value
  for g in grads:
    assert np.all(np.isfinite(np.asarray(g))), g


EDGE_CASES = {
    # name: (logits, labels, lipschitz)
    "all_wrong": ([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0]], [0, 1], PAIR_3),
    "all_correct": ([[3.0, 1.0, 0.0], [0.0, 2.0, 1.9]], [0, 1], PAIR_3),
    "all_above_r0": ([[30.0, 1.0, 0.0], [0.0, 0.0, 40.0]], [0, 2], PAIR_3),
    "tied_top": ([[2.0, 2.0, 0.0], [1.0, 1.0, 1.0]], [0, 1], PAIR_3),
    "zero_offdiagonal": ([[3.0, 1.0, 0.0], [0.0, 2.0, 1.5]], [0, 1],
                         np.zeros((3, 3))),
    "some_zero": ([[3.0, 1.0, 0.0], [0.0, 2.0, 1.5]], [0, 1],
                  [[1.0, 0.0, 4.0], [0.0, 1.0, 1.0], [4.0, 1.0, 1.0]]),
    "huge_logits": ([[1e4, -1e4, 0.0], [0.0, 1e4, 1e4 - 1e-3]], [0, 1],
                    PAIR_3),
}


@pytest.mark.parametrize("case", sorted(EDGE_CASES))
def test_crm_edge_cases_have_finite_gradients(case):
  logits, labels, lip = EDGE_CASES[case]
  args = (jnp.asarray(logits, jnp.float32), jnp.asarray(lip, jnp.float32),
          jnp.asarray(labels))
  for form in ("softmax", "max"):
    for misclassified in (False, True):
      for t in (5.0, 1e6):
        for r0 in (R0, np.inf):
          assert_all_finite(*crm_value_and_grad(form, misclassified)(
              *args, t, r0))


def test_crm_edge_case_values():
  # all wrong: no robust term; all R >= r0: none either.
  for case in ("all_wrong", "all_above_r0"):
    logits, labels, lip = EDGE_CASES[case]
    _, aux = crm_loss(jnp.asarray(logits), jnp.asarray(labels), lip,
                      t=T, lam=1.0, r0=R0)
    assert float(aux["robust_term"]) == 0.0
    assert float(aux["active_fraction"]) == 0.0
  _, aux = crm_loss(jnp.asarray(EDGE_CASES["all_wrong"][0]),
                    jnp.asarray([0, 1]), PAIR_3, t=T, lam=1.0, r0=R0)
  assert float(aux["mean_radius"]) == 0.0  # no correct point
  # Tied top logits (2, 2, 0), y=p=0: R_01 = 0, R_02 = 2/4;
  # LSE(-t*0, -t*0.5) with t=2 = log(1 + e^-1); b=1 (1, 1, 1) has p=0 != 1.
  logits, labels, lip = EDGE_CASES["tied_top"]
  _, aux = crm_loss(jnp.asarray(logits), jnp.asarray(labels), lip,
                    t=T, lam=1.0, r0=R0)
  np.testing.assert_allclose(aux["robust_term"], lse(0.0, -1.0) / 4.0,
                             rtol=1e-6)
  # L_01 = 0 with margin 2 gives R_01 = +inf, which drops out of the sum:
  # b=0 keeps only R_02 = 3/4 -> LSE = -2 * 0.75.
  logits, labels, lip = EDGE_CASES["some_zero"]
  _, aux = crm_loss(jnp.asarray(logits), jnp.asarray(labels),
                    jnp.asarray(lip), t=T, lam=1.0, r0=R0)
  # b=1 (p=1=y): R_10 = +inf, R_12 = 0.5 -> -2 * 0.5.
  np.testing.assert_allclose(aux["robust_term"], (-1.5 - 1.0) / 4.0,
                             rtol=1e-6)


def test_crm_softmax_bounds_the_min_radius():
  # -min R <= LSE(-t R)/t <= -min R + log(K - 1)/t per example
  # (docs/training.md#crm-loss).
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.normal(size=(1, 6)), jnp.float32)
  labels = jnp.argmax(logits, axis=1)
  lip = rng.uniform(0.5, 2.0, size=(6, 6))
  lip = jnp.asarray(lip + lip.T, jnp.float32)
  radius = float(certified_radius(logits, labels, lip)[0])
  for t in (0.5, 5.0, 50.0):
    _, aux = crm_loss(logits, labels, lip, t=t, lam=1.0, r0=np.inf)
    soft = float(aux["robust_term"])  # B = 1, so this is LSE / t.
    assert -radius - 1e-6 <= soft <= -radius + math.log(5) / t + 1e-6


def test_crm_rejects_bad_form():
  with pytest.raises(ValueError, match="Unknown CRM form"):
    crm("softMax")


# -------------------------------------------------------------------- GloRo


def test_gloro_by_hand():
  # z = (2, 0.5), y = 0, L_01 = 1, eps = 0.5: z_bot = 0.5 + 0.5 * 1 = 1.0.
  # KL([softmax(z), 0] || softmax([2, 0.5, 1])) = LSE(2, .5, 1) - LSE(2, .5).
  logits, labels = jnp.array([[2.0, 0.5]]), jnp.array([0])
  pair = jnp.array([[0.0, 1.0], [1.0, 0.0]])
  q = np.exp([2.0, 0.5]) / np.exp([2.0, 0.5]).sum()
  p = np.exp([2.0, 0.5, 1.0]) / np.exp([2.0, 0.5, 1.0]).sum()
  kl = float(np.sum(q * np.log(q / p[:2])))  # the 0 * log 0 term is 0
  np.testing.assert_allclose(kl, lse(2.0, 0.5, 1.0) - lse(2.0, 0.5),
                             rtol=1e-12)
  loss, aux = gloro_loss(logits, labels, pair, eps=0.5, lam=2.0)
  ce = lse(2.0, 0.5) - 2.0
  np.testing.assert_allclose(aux["robust_term"], kl, rtol=1e-6)
  np.testing.assert_allclose(loss, ce + 2.0 * kl, rtol=1e-6)
  assert float(aux["certified_fraction"]) == 1.0  # 2 > 1
  # Scalar L = 1 -> 2 L (reference code): z_bot = 0.5 + 0.5 * 2 = 1.5.
  _, aux = gloro_loss(logits, labels, 1.0, eps=0.5, lam=2.0)
  np.testing.assert_allclose(aux["robust_term"],
                             lse(2.0, 0.5, 1.5) - lse(2.0, 0.5), rtol=1e-6)
  # Per class (1, 1) -> L_01 = 2: same bottom logit 1.5.
  _, aux2 = gloro_loss(logits, labels, jnp.ones(2), eps=0.5, lam=2.0)
  np.testing.assert_allclose(aux2["robust_term"], aux["robust_term"])
  # eps = 1.6: z_bot = 0.5 + 1.6 * 1 = 2.1 > 2: not certified.
  _, aux = gloro_loss(logits, labels, pair, eps=1.6, lam=2.0)
  assert float(aux["certified_fraction"]) == 0.0


def test_gloro_three_class_bottom_uses_label_row():
  # b=1 of LOGITS_3 is wrong (y=0): z_bot = max(2 + .5*2, 1.5 + .5*4) = 3.5.
  _, aux = gloro_loss(LOGITS_3[1:2], LABELS_3[1:2], PAIR_3, eps=0.5,
                      lam=1.0)
  np.testing.assert_allclose(
      aux["robust_term"], lse(0.0, 2.0, 1.5, 3.5) - lse(0.0, 2.0, 1.5),
      rtol=1e-6)


@pytest.mark.parametrize("case", ["all_wrong", "all_correct", "tied_top",
                                  "huge_logits"])
def test_gloro_no_nan_and_above_cross_entropy(case):
  logits, labels, lip = EDGE_CASES[case]
  labels = jnp.asarray(labels)
  fn = lambda z, l: gloro_loss(z, labels, l, eps=0.3, lam=3.0)
  loss, aux = fn(jnp.asarray(logits), jnp.asarray(lip))
  assert all(np.isfinite(float(v)) for v in aux.values())
  assert float(loss) >= float(aux["cross_entropy"])
  assert_finite_grads(lambda z, l: fn(z, l)[0], logits, lip)


def test_gloro_gradients_match_finite_differences():
  with jax.enable_x64(True):
    fn = jax.jit(lambda z, lip: gloro_loss(z, LABELS_3, lip, eps=0.3,
                                                  lam=2.0)[0])
    jax.test_util.check_grads(
        fn, (jnp.asarray(LOGITS_3, jnp.float64),
             jnp.asarray(PAIR_3 + 0.3, jnp.float64)),
        order=1, modes=("fwd", "rev"), eps=1e-4)


# ---------------------------------------------------------------------- LMT


def test_lmt_by_hand():
  # b=0: z=(2, .5, 0), y=0 correct, L row (., 1, 2), mu eps = 2 * .5 = 1:
  #   z' = (2, 1.5, 2), CE = LSE(2, 1.5, 2) - 2.
  # b=1: z=(0, 1, 0), y=0 wrong -> no offset: CE = LSE(0, 1, 0) - 0.
  logits = jnp.array([[2.0, 0.5, 0.0], [0.0, 1.0, 0.0]])
  labels = jnp.array([0, 0])
  pair = jnp.array([[0.0, 1.0, 2.0], [1.0, 0.0, 1.0], [2.0, 1.0, 0.0]])
  loss, aux = lmt_loss(logits, labels, pair, eps=0.5, mu=2.0)
  expected = (lse(2.0, 1.5, 2.0) - 2.0 + lse(0.0, 1.0, 0.0)) / 2
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  clean = (lse(2.0, 0.5, 0.0) - 2.0 + lse(0.0, 1.0, 0.0)) / 2
  np.testing.assert_allclose(aux["cross_entropy"], clean, rtol=1e-6)
  np.testing.assert_allclose(aux["robust_term"], expected - clean,
                             rtol=1e-5)
  np.testing.assert_allclose(aux["accuracy"], 0.5)
  # Scalar L = 1 -> sqrt(2): z' = (2, .5 + sqrt2, sqrt2) for b=0.
  loss, _ = lmt_loss(logits, labels, 1.0, eps=0.5, mu=2.0)
  s = math.sqrt(2.0)
  np.testing.assert_allclose(
      loss, (lse(2.0, 0.5 + s, s) - 2.0 + lse(0.0, 1.0, 0.0)) / 2, rtol=1e-6)


def test_lmt_finite_gradients():
  for case in ("all_wrong", "all_correct", "tied_top", "huge_logits"):
    logits, labels, lip = EDGE_CASES[case]
    labels = jnp.asarray(labels)
    assert_finite_grads(
        lambda z, l: lmt_loss(z, labels, l, eps=0.3, mu=2.0)[0],
        logits, lip)


@pytest.mark.parametrize("labels", [[0, 3], [0, -1], [0, 5]])
def test_labels_outside_the_classes_are_refused(labels):
  # A label >= K has no logit and a negative one would wrap around to class
  # K - 1: neither may give a radius. Eagerly they are refused; inside jit
  # (where values cannot be read) such a point is never certified.
  logits = jnp.array([[2.0, 0.0, 1.0], [0.0, 3.0, 1.0]])
  labels = jnp.array(labels)
  for fn, args in ((radii.certified_radius, (PAIR_3,)),
                   (radii.is_certified, (PAIR_3, jnp.array([0.1]))),
                   (radii.certified_accuracy, (PAIR_3, 0.1)),
                   (radii.clean_accuracy, ())):
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
      fn(logits, labels, *args)
  # Label 0 on row 0: margins 2 and 1 over bounds 2 and 4 -> radius 0.25.
  np.testing.assert_allclose(certified_radius(logits, labels, PAIR_3)[0],
                             0.25)
  assert float(certified_radius(logits, labels, PAIR_3)[1]) <= 0.0
  np.testing.assert_array_equal(
      is_certified(logits, labels, PAIR_3, jnp.array([0.0])), [[1, 0]])
  with pytest.raises(ValueError, match="integers"):
    radii.certified_radius(logits, jnp.array([0.0, 1.0]), PAIR_3)


def test_empty_batches():
  # Radii of no examples are an empty array; an accuracy over no examples is
  # undefined, so it is refused unless a mask says how many are real.
  logits, labels = jnp.zeros((0, 3)), jnp.zeros((0,), jnp.int32)
  assert radii.certified_radius(logits, labels, PAIR_3).shape == (0,)
  assert radii.is_certified(logits, labels, PAIR_3,
                            jnp.array([0.1])).shape == (1, 0)
  with pytest.raises(ValueError, match="empty batch"):
    radii.certified_accuracy(logits, labels, PAIR_3, 0.1)
  with pytest.raises(ValueError, match="empty batch"):
    radii.clean_accuracy(logits, labels)
  assert float(radii.clean_accuracy(logits, labels,
                                    mask=jnp.zeros(0, bool))) == 0.0
