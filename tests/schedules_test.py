"""Tests for lipjax.training.schedules against the documented recipe numbers.

``exponential_with_stopping`` is compared with the reference formula
``eta(n) = eta0 * gamma ** clip(n - S + 1, 0, E - S)`` evaluated in float64,
and ``epoch_schedule`` with the reference's step-by-step ``schedulerStep``
(multiply, add, clip after every epoch past ``E0``).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lipjax.training import schedules

# (eta0, eta_min, S, E, gamma from docs/training.md#learning-rate)
RECIPES = {
    "mnist": (1e-3, 1e-6, 25, 400, 0.981748),
    "cifar10": (1e-3, 1e-6, 200, 400, 0.966051),
    "cifar10_300": (1e-3, 1e-6, 200, 300, 0.933254),
    "tiny_imagenet": (1e-4, 1e-7, 100, 300, 0.966051),
}
STEPS = 7  # steps per epoch; any value works, 7 makes off-by-one visible.


def reference_eta(n, eta0, eta_min, start, total):
  gamma = (eta_min / eta0) ** (1.0 / (total - start))
  return eta0 * gamma ** np.clip(n - start + 1, 0, total - start)


def make(name):
  eta0, eta_min, start, total, _ = RECIPES[name]
  return schedules.exponential_with_stopping(
      init_value=eta0, end_value=eta_min, decay_start_epoch=start,
      total_epochs=total, steps_per_epoch=STEPS)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_exponential_gamma_and_boundaries(name):
  eta0, eta_min, start, total, gamma = RECIPES[name]
  lr = jax.jit(make(name))
  at_epoch = lambda n: float(lr(n * STEPS))
  # The decay factor between consecutive decaying epochs is the documented
  # gamma.
  np.testing.assert_allclose(at_epoch(start) / at_epoch(start - 1), gamma,
                             atol=1e-6)
  np.testing.assert_allclose(at_epoch(start + 50) / at_epoch(start + 49),
                             gamma, atol=1e-6)
  # Epochs 0 .. S-1 run at eta0; epoch S is the first decayed one.
  np.testing.assert_allclose(at_epoch(0), eta0, rtol=1e-6)
  np.testing.assert_allclose(at_epoch(start - 1), eta0, rtol=1e-6)
  np.testing.assert_allclose(at_epoch(start), eta0 * gamma, rtol=1e-5)
  # The formula reaches eta_min at the LAST epoch n = E-1 (exponent E-S),
  # and stays there at n = E and beyond (the "stopping"); epoch E-2 is one
  # factor gamma above it.
  np.testing.assert_allclose(at_epoch(total - 1), eta_min, rtol=1e-5)
  np.testing.assert_allclose(at_epoch(total), eta_min, rtol=1e-5)
  np.testing.assert_allclose(at_epoch(total + 100), eta_min, rtol=1e-5)
  np.testing.assert_allclose(at_epoch(total - 2), eta_min / gamma, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_exponential_matches_reference_every_step(name):
  eta0, eta_min, start, total, _ = RECIPES[name]
  steps = np.arange((total + 3) * STEPS)
  values = np.asarray(jax.jit(jax.vmap(make(name)))(jnp.asarray(steps)))
  expected = reference_eta(steps // STEPS, eta0, eta_min, start, total)
  np.testing.assert_allclose(values, expected, rtol=2e-6)
  # Constant within each epoch.
  per_epoch = values.reshape(total + 3, STEPS)
  np.testing.assert_array_equal(
      per_epoch, np.broadcast_to(per_epoch[:, :1], per_epoch.shape))


def test_exponential_python_int_step():
  lr = make("mnist")
  assert float(lr(0)) == pytest.approx(1e-3, rel=1e-6)
  assert float(lr(25 * STEPS - 1)) == pytest.approx(1e-3, rel=1e-6)
  assert float(lr(25 * STEPS)) == pytest.approx(1e-3 * 0.9817479, rel=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    ({"decay_start_epoch": 400}, "decay_start_epoch"),
    ({"decay_start_epoch": 500}, "decay_start_epoch"),
    ({"decay_start_epoch": -1}, "decay_start_epoch"),
    ({"init_value": 0.0}, "init_value"),
    ({"end_value": -1e-6}, "end_value"),
    ({"total_epochs": 0}, "total_epochs"),
    ({"steps_per_epoch": 0}, "steps_per_epoch"),
    ({"steps_per_epoch": 2.5}, "steps_per_epoch"),
])
def test_exponential_invalid_args(kwargs, match):
  args = {"init_value": 1e-3, "end_value": 1e-6, "decay_start_epoch": 25,
          "total_epochs": 400, "steps_per_epoch": 10} | kwargs
  with pytest.raises(ValueError, match=match):
    schedules.exponential_with_stopping(**args)


def test_exponential_rejects_positional_args():
  with pytest.raises(TypeError):
    # pylint: disable-next=too-many-function-args
    schedules.exponential_with_stopping(1e-3, 1e-6, 25, 400, 10)


# ------------------------------------------------------------------- cosine


def test_cosine_endpoints():
  lr = schedules.cosine(init_value=1e-3, end_value=1e-5, total_epochs=10,
                        steps_per_epoch=4)
  np.testing.assert_allclose(lr(0), 1e-3, rtol=1e-6)
  # Halfway, cos = 0: the mean of the endpoints.
  np.testing.assert_allclose(lr(20), (1e-3 + 1e-5) / 2, rtol=1e-5)
  np.testing.assert_allclose(lr(40), 1e-5, rtol=1e-5)
  np.testing.assert_allclose(lr(1000), 1e-5, rtol=1e-5)


def test_cosine_warmup():
  lr = schedules.cosine(init_value=1e-3, end_value=0.0, total_epochs=10,
                        steps_per_epoch=4, warmup_epochs=2)
  np.testing.assert_allclose(lr(0), 0.0, atol=1e-12)
  np.testing.assert_allclose(lr(4), 0.5e-3, rtol=1e-5)  # halfway up
  np.testing.assert_allclose(lr(8), 1e-3, rtol=1e-6)    # peak after warm-up
  np.testing.assert_allclose(lr(24), 0.5e-3, rtol=1e-5)  # halfway down
  np.testing.assert_allclose(lr(40), 0.0, atol=1e-9)
  with pytest.raises(ValueError, match="warmup_epochs"):
    schedules.cosine(init_value=1e-3, end_value=0.0, total_epochs=10,
                     steps_per_epoch=4, warmup_epochs=10)
  with pytest.raises(ValueError, match="end_value"):
    schedules.cosine(init_value=1e-3, end_value=-1.0, total_epochs=10,
                     steps_per_epoch=4)


# ----------------------------------------------------------- epoch_schedule


def reference_scheduler(epoch, *, initial, start_epoch, multiplier=1.0,
                        increment=0.0, minimum=-math.inf, maximum=math.inf,
                        total_epochs=None):
  """The reference's per-epoch update applied step by step, in float64."""
  value = initial
  last = epoch if total_epochs is None else min(epoch, total_epochs)
  for counter in range(1, last + 1):
    if counter > start_epoch:
      value = min(max(value * multiplier + increment, minimum), maximum)
  return value


E0, E = 10, 400
CASES = {
    "crm_constant": {"initial": 15.0, "start_epoch": E0},
    "gloro_linear": {"initial": 0.1, "start_epoch": E0,
                     "increment": (3.0 - 0.1) / (E - E0), "total_epochs": E},
    "lmt_growth": {"initial": 1e-3, "start_epoch": E0, "multiplier": 1.03,
                   "maximum": 2.0},
    "decay_to_floor": {"initial": 1.0, "start_epoch": 3, "multiplier": 0.5,
                       "minimum": 0.1},
    "affine_capped": {"initial": 1.0, "start_epoch": 0, "multiplier": 0.9,
                      "increment": 0.5, "maximum": 4.0},
    "near_one": {"initial": 2.0, "start_epoch": 5, "multiplier": 1.0 + 1e-6,
                 "increment": 0.01},
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_epoch_schedule_matches_step_by_step(name):
  kwargs = CASES[name]
  schedule = schedules.epoch_schedule(**kwargs)
  epochs = np.arange(0, 420)
  traced = np.asarray(jax.jit(jax.vmap(schedule))(jnp.asarray(epochs)))
  expected = [reference_scheduler(int(n), **kwargs) for n in epochs]
  np.testing.assert_allclose(traced, expected, rtol=2e-5)
  # A Python int epoch gives the same value as a traced one.
  for n in (0, E0, E0 + 1, 250, 419):
    assert float(schedule(n)) == pytest.approx(float(traced[n]), rel=1e-6)


def test_epoch_schedule_recipes():
  crm = schedules.epoch_schedule(**CASES["crm_constant"])
  assert {float(crm(n)) for n in (0, 9, 10, 11, 399)} == {15.0}
  gloro = schedules.epoch_schedule(**CASES["gloro_linear"])
  assert float(gloro(0)) == pytest.approx(0.1)
  assert float(gloro(E0)) == pytest.approx(0.1)
  assert float(gloro((E0 + E) // 2)) == pytest.approx(1.55, rel=1e-6)
  assert float(gloro(E)) == pytest.approx(3.0, rel=1e-6)
  assert float(gloro(E + 50)) == pytest.approx(3.0, rel=1e-6)  # frozen
  # LMT: 1e-3 * 1.03^k; 1.03^257 = 1991.4 < 2000 <= 1.03^258 = 2051.2, so mu
  # first hits the cap 2 at k = 258 (docs/training.md#lmt).
  lmt = schedules.epoch_schedule(**CASES["lmt_growth"])
  assert float(lmt(E0)) == pytest.approx(1e-3)
  assert float(lmt(E0 + 1)) == pytest.approx(1.03e-3, rel=1e-6)
  assert float(lmt(E0 + 257)) == pytest.approx(1e-3 * 1.03**257, rel=1e-5)
  assert float(lmt(E0 + 257)) < 2.0
  assert float(lmt(E0 + 258)) == 2.0
  assert float(lmt(E0 + 1000)) == 2.0


@pytest.mark.parametrize("kwargs, match", [
    ({"multiplier": 0.0}, "multiplier"),
    ({"multiplier": -1.03}, "multiplier"),
    ({"maximum": 0.5}, "initial"),
    ({"minimum": 2.0}, "initial"),
    ({"start_epoch": -1}, "start_epoch"),
    ({"total_epochs": 5}, "total_epochs"),
])
def test_epoch_schedule_invalid_args(kwargs, match):
  with pytest.raises(ValueError, match=match):
    schedules.epoch_schedule(**({"initial": 1.0, "start_epoch": 10} | kwargs))
