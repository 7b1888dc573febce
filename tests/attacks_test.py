"""L2 PGD: exact projection, feasibility, strength, per-example radii.

The attack must (a) never leave the ε-ball or the [0, 1] box, (b) find the
closest adversarial point of a linear classifier (whose distance to the
decision boundary is known in closed form), and (c) break an undefended
tiny network at a radius where random noise of the same size does not.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lipjax.certification import attacks
from lipjax.training import augment
from lipjax.training import data


def _flat_norms(a):
  return np.linalg.norm(np.asarray(a).reshape(len(a), -1), axis=1)


def _dykstra(x, y, eps, iterations=3000):
  """Reference projection onto ball ∩ box by Dykstra's alternating method."""
  z, p, q = y.copy(), np.zeros_like(y), np.zeros_like(y)
  for _ in range(iterations):
    a = z + p
    b = np.clip(a, -x, 1 - x)
    p = a - b
    c = b + q
    norm = np.linalg.norm(c)
    z = c if norm <= eps else c * eps / norm
    q = c - z
  return z


def test_projection_is_exact_and_feasible():
  rng = np.random.default_rng(0)
  num, dim = 12, 40
  x = rng.uniform(0, 1, (num, dim))
  x[:, :15] = 0.0  # Pixels on the box boundary, as in MNIST backgrounds.
  x[:, 15:20] = 1.0
  y = rng.normal(size=(num, dim)) * rng.uniform(0.1, 2.0, (num, 1))
  eps = rng.uniform(0.0, 3.0, num)
  eps[0] = 0.0
  got = np.asarray(attacks.project_l2_box(
      jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32),
      jnp.asarray(eps, jnp.float32)))
  assert np.all(_flat_norms(got) <= eps * (1 + 1e-6))
  assert np.all(x + got >= -1e-7) and np.all(x + got <= 1 + 1e-7)
  for i in range(num):
    np.testing.assert_allclose(got[i], _dykstra(x[i], y[i], eps[i]),
                               atol=1e-5)


def _linear(w, images):
  return images.reshape(images.shape[0], -1) @ w.T


def test_linear_classifier_threshold():
  """PGD succeeds just past the closed-form distance and cannot before it."""
  rng = np.random.default_rng(1)
  w = rng.normal(size=(2, 16)).astype(np.float32)
  x = (0.5 + rng.uniform(-0.05, 0.05, (16, 4, 4, 1))).astype(np.float32)
  logits = _linear(w, x)
  labels = np.argmax(logits, axis=1)
  # The closest boundary point is x -+ distance * u; where it lies inside
  # the box (checked), the closed-form distance is the exact answer.
  normal = (w[0] - w[1]) / np.linalg.norm(w[0] - w[1])
  distance = np.abs(logits[:, 0] - logits[:, 1]) / np.linalg.norm(w[0] - w[1])
  assert np.all(1.05 * distance[:, None] * np.abs(normal) < 0.45)
  for factor, fooled in ((0.95, False), (1.05, True)):
    adv = attacks.pgd_l2(_linear, w, x, labels, distance * factor,
                         key=jax.random.key(0), steps=20, restarts=2)
    predicted = np.argmax(_linear(w, np.asarray(adv)), axis=1)
    assert np.all((predicted != labels) == fooled), factor
    assert np.all(_flat_norms(adv - x) <= distance * factor * (1 + 1e-5))


def _mlp(params, images):
  h = images.reshape(images.shape[0], -1)
  for w, b in params[:-1]:
    h = jax.nn.relu(h @ w + b)
  w, b = params[-1]
  return h @ w + b


@pytest.fixture(scope="module")
def undefended():
  """A ReLU MLP trained with plain cross-entropy on synthetic 8x8 data."""
  dataset = data.synthetic_dataset(num_examples=512, image_shape=(8, 8, 1),
                                   num_classes=4, seed=0)
  x, y = augment.to_float(dataset.images), jnp.asarray(dataset.labels)
  dims = (64, 128, 128, 4)
  keys = jax.random.split(jax.random.key(0), len(dims) - 1)
  params = [(jax.random.normal(k, (i, o)) / np.sqrt(i), jnp.zeros(o))
            for k, i, o in zip(keys, dims[:-1], dims[1:])]
  tx = optax.adam(1e-2)

  @jax.jit
  def train(params):
    def step(carry, _):
      p, state = carry
      grads = jax.grad(lambda p: jnp.mean(
          optax.softmax_cross_entropy_with_integer_labels(
              _mlp(p, x[:384]), y[:384])))(p)
      updates, state = tx.update(grads, state, p)
      return (optax.apply_updates(p, updates), state), None
    return jax.lax.scan(step, (params, tx.init(params)), None, length=200)[0][0]

  return train(params), x[384:], y[384:]


def test_pgd_breaks_an_undefended_model(undefended):
  params, x, y = undefended
  accuracy = lambda images: float(jnp.mean(
      jnp.argmax(_mlp(params, images), -1) == y))
  assert accuracy(x) >= 0.95
  eps = 2.0
  adv = attacks.pgd_l2(_mlp, params, x, y, eps, key=jax.random.key(1),
                       steps=20, restarts=2)
  assert accuracy(adv) <= 0.2
  # Random noise of the same norm barely matters: the gradient does the work.
  noise = jax.random.normal(jax.random.key(2), x.shape)
  noise = noise * eps / _flat_norms(noise).reshape(-1, 1, 1, 1)
  assert accuracy(jnp.clip(x + noise, 0, 1)) >= 0.9
  assert np.all(_flat_norms(adv - x) <= eps * (1 + 1e-5))
  assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0


def test_per_example_eps_zero_and_jit(undefended):
  params, x, y = undefended
  x, y = x[:8], y[:8]
  eps = jnp.array([0.0, 0.5, 1.0, 2.0, 0.0, 0.3, 3.0, 1.5])
  run = lambda images, radius: attacks.pgd_l2(
      _mlp, params, images, y, radius, key=jax.random.key(3), steps=4,
      restarts=2, loss="ce", schedule="constant")
  adv = run(x, eps)
  norms = _flat_norms(adv - x)
  assert np.all(norms <= np.asarray(eps) * (1 + 1e-5))
  np.testing.assert_array_equal(np.asarray(adv)[[0, 4]],
                                np.asarray(x)[[0, 4]])
  # Pure: the same inside jax.jit (the step loop is then unrolled).
  np.testing.assert_allclose(jax.jit(run)(x, eps), adv, atol=1e-5)


def test_bad_arguments():
  x = jnp.zeros((2, 4))
  with pytest.raises(ValueError, match="loss"):
    attacks.pgd_l2(_linear, jnp.zeros((2, 4)), x, jnp.zeros(2, int), 0.1,
                   key=jax.random.key(0), loss="hinge")
  with pytest.raises(ValueError, match="eps"):
    attacks.pgd_l2(_linear, jnp.zeros((2, 4)), x, jnp.zeros(2, int),
                   jnp.ones(3), key=jax.random.key(0))
  with pytest.raises(ValueError, match="steps"):
    attacks.pgd_l2(_linear, jnp.zeros((2, 4)), x, jnp.zeros(2, int), 0.1,
                   key=jax.random.key(0), steps=0)


def test_images_outside_the_box_are_refused_unless_the_box_says_so():
  # 0-255 pixels with the default [0, 1] box would make every projection
  # meaningless (the clean point is not feasible).
  x = jnp.full((2, 4), 200.0)
  labels = jnp.zeros(2, int)
  w = jnp.eye(4)[:2]  # Two classes of 4 features.
  with pytest.raises(ValueError, match=r"\[200, 200\].*images / 255"):
    attacks.pgd_l2(_linear, w, x, labels, 0.1, key=jax.random.key(0))
  adv = attacks.pgd_l2(_linear, w, x, labels, 0.1, key=jax.random.key(0),
                       steps=2, restarts=1, box=(0.0, 255.0))
  assert np.all(_flat_norms(adv - x) <= 0.1 * (1 + 1e-5))
  assert np.all((np.asarray(adv) >= 0) & (np.asarray(adv) <= 255))


def test_empty_batch_gives_an_empty_batch():
  x = jnp.zeros((0, 4))
  adv = attacks.pgd_l2(_linear, jnp.eye(4)[:2], x, jnp.zeros(0, int), 0.1,
                       key=jax.random.key(0))
  assert adv.shape == (0, 4)
