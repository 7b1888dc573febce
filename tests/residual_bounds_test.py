"""Tests of the bounds of residual networks (docs/residual.md).

Ground truth comes from outside the engine: a hand-computed example, a numpy
reference of the linearized network (activations replaced by ``a``, vectors
injected at the nodes), the plain-chain bound of :func:`lipjax.bound`, and
the network itself (sampled pairs, Jacobians found by gradient ascent, in
float64). Networks are tiny (4x4 to 6x6 images, 2-4 channels) so exact
norms are cheap; most of the time goes to compiling each map's Gram
function, hence few architectures and few hypothesis examples.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lipjax
from lipjax import residual_graph
from lipjax.linear_maps import LinearOp
from lipjax.residual_graph import ResidualGraph
from lipjax.residual_graph import Unit

RELU = (0.0, 1.0)

# ----------------------------------------------------------------- helpers --


def dense_op(matrix) -> LinearOp:
  """A dense op of an ``[out, in]`` matrix (math convention)."""
  matrix = np.asarray(matrix, np.float32)
  return LinearOp(weight=jnp.asarray(matrix.T), in_scale=None,
                  out_scale=None, kind="dense", in_shape=(matrix.shape[1],))


def plain(matrix, activated=True) -> Unit:
  return Unit(ops=(dense_op(matrix),), shortcut=None, kind="plain",
              activated=activated)


def block(*matrices, shortcut=None) -> Unit:
  return Unit(ops=tuple(dense_op(m) for m in matrices),
              shortcut=None if shortcut is None else dense_op(shortcut),
              kind="residual")


def dense_graph(*units, slopes=RELU) -> ResidualGraph:
  graph = ResidualGraph(units=tuple(units), slopes=slopes)
  residual_graph.check_graph(graph)
  return graph


def randomize(model, seed: int):
  """Random biases and batch-norm statistics (negative gammas included)."""
  rng = np.random.default_rng(seed)
  for _, node in nnx.iter_graph(model):
    if isinstance(node, nnx.BatchNorm):
      n = node.mean[...].shape
      node.mean[...] = jnp.asarray(rng.normal(size=n), jnp.float32)
      node.var[...] = jnp.asarray(rng.uniform(0.3, 3.0, n), jnp.float32)
      node.scale[...] = jnp.asarray(rng.uniform(-1.5, 1.5, n), jnp.float32)
      node.bias[...] = jnp.asarray(rng.normal(size=n), jnp.float32)
    elif isinstance(node, (nnx.Conv, nnx.Linear)):
      n = node.bias[...].shape
      node.bias[...] = jnp.asarray(0.5 * rng.normal(size=n), jnp.float32)
  return model


def build(spec, *, classes=3, shape=(4, 4, 1), activation="relu", seed=0,
          batch_norm=False, normalize=False):
  """A randomized ResidualNet (input normalization with ``normalize``)."""
  channels = shape[-1]
  mean = std = None
  if normalize:
    rng = np.random.default_rng(seed + 1)
    mean = tuple(rng.uniform(0.2, 0.6, channels))
    std = tuple(rng.uniform(0.2, 0.5, channels))
  model = lipjax.models.build(
      spec, num_classes=classes, input_shape=shape, rngs=nnx.Rngs(seed),
      activation=activation, batch_norm=batch_norm, input_mean=mean,
      input_std=std)
  return randomize(model, seed)


def float64_logits(model):
  """``f(x)`` of the model with its float32 params, evaluated in float64
  (call inside ``jax.enable_x64``)."""
  graphdef, state = nnx.split(model)

  def f(x):
    state64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), state)
    return nnx.merge(graphdef, state64)(x)

  return f


def pair_rows(k: int) -> np.ndarray:
  """``c_ij = e_i - e_j`` for every ordered pair, ``[k, k, k]``."""
  eye = np.eye(k)
  return eye[:, None, :] - eye[None, :, :]


def sampled_pairs(model, seed: int, count: int = 24):
  """Input pairs ``(x, x')``: random, near and along ``J^T c`` directions.

  Returns:
    ``(f(x) - f(x'))`` ``[B, K]`` and ``||x - x'||`` ``[B]``, float64.
  """
  rng = np.random.default_rng(seed)
  shape = model.input_shape
  k = model.num_classes
  with jax.enable_x64(True):
    f = float64_logits(model)
    x = rng.uniform(0.0, 1.0, (count,) + shape)
    scales = np.geomspace(1e-3, 1.0, count).reshape((count,) + (1,) * 3)
    far = x + scales * rng.normal(size=x.shape)
    # Along c_ij^T J(x) for every pair at one base point: the direction in
    # which the pair's difference grows fastest there.
    base = x[:1]
    _, vjp = jax.vjp(f, jnp.asarray(base))
    rows = pair_rows(k)[~np.eye(k, dtype=bool)]
    (grads,) = jax.vmap(vjp)(jnp.asarray(rows)[:, None, :])
    grads = np.asarray(grads)[:, 0]
    norms = np.linalg.norm(grads.reshape(len(rows), -1), axis=1)
    steps = grads / np.maximum(norms, 1e-30).reshape((-1,) + (1,) * 3)
    along = base + 1e-4 * steps
    first = np.concatenate([x, np.repeat(base, len(rows), 0)])
    second = np.concatenate([far, along])
    diff = np.asarray(f(jnp.asarray(first)) - f(jnp.asarray(second)))
  dist = np.linalg.norm((first - second).reshape(len(first), -1), axis=1)
  return diff, dist


def assert_sound(diff, dist, pairwise=None, per_class=None):
  """``|c^T (f(x) - f(x'))| <= L ||x - x'||`` on every sampled pair."""
  slack = 1e-9 + 1e-7 * np.abs(diff).max()
  if pairwise is not None:
    pair = np.abs(diff[:, :, None] - diff[:, None, :])
    allowed = np.asarray(pairwise, np.float64)[None] * dist[:, None, None]
    assert np.all(pair <= allowed + slack), np.max(pair - allowed)
  if per_class is not None:
    allowed = np.asarray(per_class, np.float64)[None] * dist[:, None]
    assert np.all(np.abs(diff) <= allowed + slack)


def off_diagonal(matrix) -> np.ndarray:
  matrix = np.asarray(matrix)
  return matrix[~np.eye(len(matrix), dtype=bool)]


# ------------------------------------------------------ hand computation --

# x -> z = relu(W0 x) -> y = z + W2 relu(W1 z) -> logits W3 y (ReLU: a = c =
# 1/2). Nodes: node 0 = W0 x, node 1 = W1 z.
W0 = [[2.0, 0.0], [0.0, 1.0]]
W1 = [[0.0, 1.0], [0.0, 0.0]]
W2 = [[2.0, 1.0], [0.0, 1.0]]
W3 = [[1.0, 0.0], [0.0, 1.0]]
GOLDEN = (1.0 + math.sqrt(5.0)) / 2.0
SQRT2, SQRT5 = math.sqrt(2.0), math.sqrt(5.0)


def hand_graph() -> ResidualGraph:
  return dense_graph(plain(W0), block(W1, W2), plain(W3, activated=False))


def test_hand_computed_example():
  # The maps, activations replaced by a = 1/2:
  #   G(0,0) = W0 = diag(2, 1)                       ||.|| = 2 = m_0
  #   G(0,1) = W1 a W0 = [[0, 1/2], [0, 0]]          ||.|| = 1/2
  #   G(1,1) = W1                                    ||.|| = 1
  #   m_1 = ||G(0,1)|| + c ||G(1,1)|| m_0 = 1/2 + 1/2 * 1 * 2 = 3/2.
  # Through the block: W2 W1 = [[0, 2], [0, 0]], A = I + a W2 W1 = [[1, 1],
  # [0, 1]], A^T A = [[1, 1], [1, 2]] has eigenvalues (3 +- sqrt 5)/2, so
  # ||A|| = (1 + sqrt 5)/2 = GOLDEN.
  #   G(0,2) = W3 A a W0 = [[1, 1/2], [0, 1/2]]
  #   G(1,2) = W3 A = [[1, 1], [0, 1]]
  #   G(2,2) = W3 W2 = [[2, 1], [0, 1]]   (the injection at node 1 skips W1)
  # Pair r = e_0 - e_1: r^T G(0,2) = (1, 0), r^T G(1,2) = (1, 0),
  # r^T G(2,2) = (2, 0), so L_01 = 1 + 1/2 (1 * m_0 + 2 * m_1) = 7/2.
  # Class 0, rows (1, 1/2), (1, 1), (2, 1): L_0 = sqrt5/2 + 1/2 (sqrt2 * 2
  # + sqrt5 * 3/2) = 5/4 sqrt5 + sqrt2. Class 1, rows (0, 1/2), (0, 1),
  # (0, 1): L_1 = 1/2 + 1/2 (1 * 2 + 1 * 3/2) = 9/4.
  # Global: the Gram of G(0,2), [[1, 1/2], [1/2, 1/2]], has top eigenvalue
  # (3 + sqrt5)/4, so ||G(0,2)|| = GOLDEN/sqrt2; ||G(1,2)|| = GOLDEN; W2's
  # Gram [[4, 2], [2, 2]] has top eigenvalue 3 + sqrt5, so ||G(2,2)|| =
  # sqrt2 GOLDEN: L = GOLDEN/sqrt2 + 1/2 (GOLDEN * 2 + sqrt2 GOLDEN * 3/2)
  # = GOLDEN (1 + 5/4 sqrt2).
  # Naive: Lip ||W0|| = 2 and the block 1 + Lip ||W2|| ||W1|| = 1 + sqrt2
  # GOLDEN, times the logit row norm (sqrt2 per pair, 1 per class and
  # ||W3|| = 1 globally).
  graph = hand_graph()
  naive = 2 * (1 + SQRT2 * GOLDEN)
  want = {
      ("liplt", "pairwise"): 3.5 * (1 - np.eye(2)),
      ("liplt", "per_class"): np.array([1.25 * SQRT5 + SQRT2, 2.25]),
      ("liplt", "global"): GOLDEN * (1 + 1.25 * SQRT2),
      ("naive", "pairwise"): SQRT2 * naive * (1 - np.eye(2)),
      ("naive", "per_class"): np.array([naive, naive]),
      ("naive", "global"): naive,
  }
  for (method, kind), value in want.items():
    got = lipjax.bound(graph, method=method, kind=kind, exact=True,
                       safety_factor=1.0)
    np.testing.assert_allclose(got, value, rtol=1e-6, atol=0,
                               err_msg=f"{method} {kind}")
    assert np.all(np.asarray(got) >= value * (1 - 1e-12))  # Rounded up.
    if method == "liplt":
      trained = lipjax.bound(graph, method=method, kind=kind, iterations=30)
      np.testing.assert_allclose(trained, value, rtol=1e-5, atol=0)
  # The network itself: on a quadrant f_0 - f_1 = relu(2 x_0) + relu(x_1),
  # f_0 = relu(2 x_0) + 2 relu(x_1), f_1 = relu(x_1): constants sqrt5,
  # sqrt8 and 1, below 7/2, 4.21 and 9/4.


def test_identity_weights_give_the_true_constant():
  # relu(x) -> y = z + I relu(I z) = 2 relu(x) -> I y: f_0 - f_1 = 2 relu(x_0)
  # - 2 relu(x_1), Lipschitz constant 2 sqrt 2. LipLT: m_0 = 1, m_1 =
  # ||a I|| + c ||I|| m_0 = 1; rows of G(0,2) = 3/4 I, G(1,2) = 3/2 I,
  # G(2,2) = I: L = sqrt2 (3/4 + 1/2 (3/2 + 1)) = 2 sqrt 2, tight.
  eye = np.eye(2)
  graph = dense_graph(plain(eye), block(eye, eye), plain(eye, False))
  got = lipjax.bound(graph, exact=True, safety_factor=1.0)
  np.testing.assert_allclose(off_diagonal(got), 2 * math.sqrt(2), rtol=1e-6)
  # A linear residual block with W = I: relu(2 relu(x)), constant 2 per
  # class; LipLT: m_0 = 1, m_1 = ||2 a I|| + c ||2 I|| = 2, per class
  # ||e_i^T 2 a^2 I|| + c (||e_i^T 2 a I|| m_0 + ||e_i^T|| m_1) = 2.
  linear = Unit(ops=(dense_op(eye),), shortcut=None, kind="linear_residual")
  graph = dense_graph(plain(eye), linear, plain(eye, False))
  got = lipjax.bound(graph, kind="per_class", exact=True, safety_factor=1.0)
  np.testing.assert_allclose(got, [2.0, 2.0], rtol=1e-6)


# ------------------------------------------------------------ edge cases --


def _zero(unit: Unit) -> Unit:
  return dataclasses.replace(unit, ops=tuple(
      dataclasses.replace(op, weight=jnp.zeros_like(op.weight))
      for op in unit.ops))


@pytest.mark.parametrize("kind", ["pairwise", "global"])
def test_zero_branch_with_identity_shortcut_drops_out(kind):
  # y = x + 0: the network without the block, exactly (its nodes inject
  # nothing), for LipLT and naive (||S|| + 0 = 1). No batch norm: its
  # rounding allowance grows with the number of ops, and the block has two.
  model = build((("conv", 3, 3, 1, 1), ("residual", 3, 3, 2, 1),
                 ("dense", 5), ("dense", None)), normalize=True,
                shape=(4, 4, 2))
  graph = residual_graph.from_model(model)
  zeroed = dataclasses.replace(graph, units=graph.units[:1] + (
      _zero(graph.units[1]),) + graph.units[2:])
  without = dataclasses.replace(graph, units=graph.units[:1]
                                + graph.units[2:])
  for method in ("liplt", "naive"):
    got = lipjax.bound(zeroed, method=method, kind=kind, exact=True)
    want = lipjax.bound(without, method=method, kind=kind, exact=True)
    assert np.all(np.isfinite(got)), got
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_zero_branch_with_projection_is_its_shortcut():
  # y = S x + 0 with S = [[3, 0], [0, 1], [1, 1]] (2 -> 3): the bound of
  # relu(W0 x) -> W3 S y. Naive: Lip ||W0|| (||S|| + 0) ||r^T W3||.
  w0 = [[1.0, 2.0], [0.0, 1.0]]
  s = [[3.0, 0.0], [0.0, 1.0], [1.0, 1.0]]
  w3 = [[1.0, 0.0, 2.0], [0.0, 1.0, 1.0], [1.0, 1.0, 0.0]]
  zero = np.zeros((3, 2)), np.zeros((3, 3))
  graph = dense_graph(plain(w0), block(*zero, shortcut=s), plain(w3, False))
  folded = dense_graph(plain(w0), plain(np.asarray(w3) @ s, False))
  for kind in ("pairwise", "per_class", "global"):
    got = lipjax.bound(graph, kind=kind, exact=True, safety_factor=1.0)
    want = lipjax.bound(folded, kind=kind, exact=True, safety_factor=1.0)
    np.testing.assert_allclose(got, want, rtol=1e-6)
  rows = np.asarray(w3)[:, None] - np.asarray(w3)[None]
  naive = (np.linalg.norm(w0, 2) * np.linalg.norm(s, 2)
           * np.linalg.norm(rows, axis=-1))
  got = lipjax.bound(graph, method="naive", exact=True, safety_factor=1.0)
  np.testing.assert_allclose(got, naive, rtol=1e-6)


def test_abs_activation_gives_finite_bounds():
  # abs has a = 0: every map through a plain activation is exactly zero,
  # and so are the class rows that cross one. They are exact (no rounding
  # error), not a reason for an infinite bound.
  model = build((("conv", 2, 3, 1, 1), ("residual", 2, 3, 1, 1),
                 ("dense", None)), activation="abs")
  for kind in ("pairwise", "per_class"):
    got = np.asarray(lipjax.bound(model, kind=kind, exact=True))
    assert np.all(np.isfinite(got)), got
    diff, dist = sampled_pairs(model, seed=0)
    assert_sound(diff, dist, **{kind: got})


def _set(variable, index, value):
  variable[...] = variable[...].at[index].set(value)


@pytest.mark.parametrize("where", ["logits", "projection", "batch_norm"])
def test_non_finite_weights_raise_in_every_certified_mode(where):
  model = build((("conv", 2, 3, 1, 1), ("residual", 3, 3, 1, 2),
                 ("dense", None)), batch_norm=True)
  if where == "logits":  # Read by the class rows only, after the norms.
    _set(model.layers[-1].kernel, (0, 0), np.nan)
  elif where == "projection":
    _set(model.layers[1].projection.kernel, (0, 0, 0, 0), np.inf)
  else:
    _set(model.layers[1].norms[0].var, 0, np.nan)
  modes = (dict(exact=True), dict(), dict(guarantee="deterministic"),
           dict(method="naive", exact=True))
  for mode in modes:
    for kind in ("pairwise", "global"):
      with pytest.raises(ValueError, match="non-finite"):
        lipjax.bound(model, kind=kind, **mode)
