"""Tests of the bounds of residual networks (docs/residual.md).

Ground truth comes from outside the engine: a hand-computed example, a numpy
reference of the linearized network (activations replaced by ``a``, vectors
injected at the nodes), the plain-chain bound of :func:`lipjax.bound`, and
the network itself (sampled pairs, Jacobians found by gradient ascent, in
float64). Networks are tiny (4x4 and 5x5 images, 1-4 channels) so exact
norms are cheap; most of the time goes to compiling each map's Gram
function, hence few architectures and few hypothesis examples.
"""

import dataclasses
import math

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lipjax
from lipjax import activations
from lipjax import linear_maps
from lipjax import residual_bounds
from lipjax import residual_graph
from lipjax.linear_maps import LinearChain
from lipjax.linear_maps import LinearOp
from lipjax.linear_maps import ResidualOp
from lipjax.linear_maps import dense_matrix
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


def _random_value(rng, name: str, shape):
  """Weights ~ N(0, 1/fan_in), nonzero biases, batch-norm statistics with
  negative gammas."""
  if name == "kernel":
    return rng.normal(size=shape) / math.sqrt(math.prod(shape[:-1]))
  if name in ("bias", "mean"):
    return 0.5 * rng.normal(size=shape)
  if name == "var":
    return rng.uniform(0.3, 3.0, shape)
  if name == "scale":
    return rng.uniform(-1.5, 1.5, shape)
  raise ValueError(f"No random value for a variable called {name!r}.")


def build(spec, *, classes=3, shape=(4, 4, 1), activation="relu", seed=0,
          batch_norm=False, normalize=False):
  """A ResidualNet with random params (input normalization with
  ``normalize``).

  Built abstractly and filled from numpy: initializing each parameter shape
  with jax.random compiles once per shape, seconds per model.
  """
  rng = np.random.default_rng(seed)
  channels = shape[-1]
  mean = std = None
  if normalize:
    mean = tuple(rng.uniform(0.2, 0.6, channels))
    std = tuple(rng.uniform(0.2, 0.5, channels))
  abstract = nnx.eval_shape(lambda: lipjax.models.build(
      spec, num_classes=classes, input_shape=shape, rngs=nnx.Rngs(seed),
      activation=activation, batch_norm=batch_norm, input_mean=mean,
      input_std=std))
  graphdef, state = nnx.split(abstract)
  state = jax.tree_util.tree_map_with_path(
      lambda path, leaf: jnp.asarray(_random_value(
          rng, path[-2].key, leaf.shape), leaf.dtype), state)
  return nnx.merge(graphdef, state)


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


def assert_sound(diff, dist, pairwise=None, per_class=None, global_=None):
  """``|c^T (f(x) - f(x'))| <= L ||x - x'||`` on every sampled pair."""
  slack = 1e-9 + 1e-7 * np.abs(diff).max()
  if global_ is not None:
    assert np.all(np.linalg.norm(diff, axis=1) <= global_ * dist + slack)
  if pairwise is not None:
    pair = np.abs(diff[:, :, None] - diff[:, None, :])
    allowed = np.asarray(pairwise, np.float64)[None] * dist[:, None, None]
    assert np.all(pair <= allowed + slack), np.max(pair - allowed)
  if per_class is not None:
    allowed = np.asarray(per_class, np.float64)[None] * dist[:, None]
    assert np.all(np.abs(diff) <= allowed + slack)


def eager_bound(network, **kwargs):
  """:func:`lipjax.bound` with jit disabled.

  Compiled, every map's Gram function is compiled on its own, again for
  each activation (slopes are static); eagerly, the maps of every test
  share the primitives of their shapes. The jitted paths run in the hand
  example, the edge cases and the randomized and training tests.
  """
  with jax.disable_jit():
    return lipjax.bound(network, **kwargs)


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
      trained = lipjax.bound(graph, method=method, kind=kind, iterations=10)
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


def test_zero_branch_with_identity_shortcut_drops_out():
  # y = x + 0: exactly the network without the block (its nodes inject
  # nothing), for LipLT and naive (||S|| + 0 = 1).
  rng = np.random.default_rng(0)
  w = lambda n, m: rng.normal(size=(n, m))  # noqa: E731
  head, tail = plain(w(3, 2)), (plain(w(4, 3)), plain(w(3, 4), False))
  zero = block(np.zeros((2, 3)), np.zeros((2, 2)), np.zeros((3, 2)))
  with_block = dense_graph(head, zero, *tail, slopes=(0.1, 1.0))
  without = dense_graph(head, *tail, slopes=(0.1, 1.0))
  for method in ("liplt", "naive"):
    for kind in ("pairwise", "global"):
      got = eager_bound(with_block, method=method, kind=kind, exact=True)
      want = eager_bound(without, method=method, kind=kind, exact=True)
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


def test_safety_factor_keeps_the_batch_norm_allowance():
  # An inner scale of ones is the same map; its rounding allowance stays
  # when safety_factor replaces the exact norms' factor.
  graph = hand_graph()
  inner = dataclasses.replace(graph.units[1].ops[0], out_scale=jnp.ones(2))
  scaled = dataclasses.replace(graph, units=(
      graph.units[0],
      dataclasses.replace(graph.units[1], ops=(inner, graph.units[1].ops[1])),
      graph.units[2]))
  plain_value = lipjax.bound(graph, kind="global", exact=True,
                             safety_factor=1.0)
  value = lipjax.bound(scaled, kind="global", exact=True, safety_factor=1.0)
  assert plain_value * (1 + 1e-6) < value < plain_value * (1 + 1e-4)


@pytest.mark.parametrize("units, match", [
    ((plain(np.eye(2)), plain(np.eye(2))), "The last unit must be a plain, "
     "non-activated layer"),
    ((plain(np.ones((3, 2))), plain(np.ones((2, 2)), False)),
     r"Unit 0 outputs shape \(3,\) but unit 1 expects \(2,\)"),
    ((plain(np.ones((3, 2))), block(np.ones((2, 3)), np.ones((2, 2))),
      plain(np.ones((2, 2)), False)),
     r"Unit 1: an identity shortcut needs the branch to keep the shape, got "
     r"\(3,\) -> \(2,\); give the unit a projection shortcut"),
    ((plain(np.eye(2)), block(np.eye(2), np.eye(2), shortcut=np.ones((3, 2))),
      plain(np.eye(2), False)), r"Unit 1: the shortcut maps \(2,\) -> "
     r"\(3,\), the branch \(2,\) -> \(2,\)"),
    ((plain(np.eye(2)), block(np.ones((3, 2)), np.ones((3, 2))),
      plain(np.eye(2), False)), r"Unit 1: op 0 outputs shape \(3,\) but op 1 "
     r"expects \(2,\)"),
])
def test_malformed_graphs_fail_before_any_work(units, match):
  graph = ResidualGraph(units=units, slopes=RELU)
  for kwargs in (dict(exact=True), dict(iterations=1)):
    with pytest.raises(ValueError, match=match):
      lipjax.bound(graph, **kwargs)


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


# ---------------------------------------------- operators and products --


def _conv(rng, shape, c_out, kernel=3, stride=1, scaled=False,
          in_scaled=False) -> LinearOp:
  pad = (kernel - 1) // 2
  c_in = shape[-1]
  return LinearOp(
      weight=jnp.asarray(rng.normal(size=(kernel, kernel, c_in, c_out))),
      in_scale=jnp.asarray(rng.uniform(0.5, 2, c_in)) if in_scaled else None,
      out_scale=jnp.asarray(rng.uniform(-2, 2, c_out)) if scaled else None,
      kind="conv", in_shape=tuple(shape), strides=(stride, stride),
      padding=((pad, pad), (pad, pad)))


def _dense(rng, n_in, n_out, scaled=False) -> LinearOp:
  return LinearOp(weight=jnp.asarray(rng.normal(size=(n_in, n_out))),
                  in_scale=None,
                  out_scale=jnp.asarray(rng.uniform(-2, 2, n_out))
                  if scaled else None, kind="dense", in_shape=(n_in,))


def _residual_ops(rng):
  """Every ResidualOp configuration (float64 arrays; call in x64)."""
  shape = (5, 5, 2)
  same = lambda **kw: _conv(rng, shape, 2, **kw)  # noqa: E731
  strided = _conv(rng, shape, 3, stride=2, scaled=True)
  return {
      "identity": ResidualOp((same(),), None),
      "identity scaled by -0.7, BN": ResidualOp(
          (same(in_scaled=True), same(scaled=True)), None, -0.7),
      "three ops, BN, scale 0.5": ResidualOp(
          (same(scaled=True), same(kernel=1), same(scaled=True)), None, 0.5),
      "projection, stride 2": ResidualOp(
          (strided, _conv(rng, (3, 3, 3), 3)),
          _conv(rng, shape, 3, kernel=1, stride=2, scaled=True)),
      "dense identity": ResidualOp(
          (_dense(rng, 4, 6), _dense(rng, 6, 4, scaled=True)), None, 2.0),
      "dense projection": ResidualOp((_dense(rng, 4, 3),),
                                     _dense(rng, 4, 3, scaled=True)),
  }


def test_residual_op_adjoints_and_matrices():
  rng = np.random.default_rng(0)
  with jax.enable_x64(True):
    for name, op in _residual_ops(rng).items():
      # Batches as large as the bases below: the same compiled primitives.
      x = jnp.asarray(rng.normal(size=(op.in_dim,) + op.in_shape))
      y = jnp.asarray(rng.normal(size=(op.out_dim,) + op.out_shape))
      m = min(op.in_dim, op.out_dim)
      forward = jnp.vdot(op(x)[:m], y[:m])
      backward = jnp.vdot(x[:m], op.transpose(y)[:m])
      assert abs(forward - backward) <= 1e-10 * abs(forward), name
      # S + B_m ... B_0 from the primitives' matrices.
      matrix = dense_matrix(LinearChain(ops=(op,)))
      want = np.eye(op.in_dim) * op.shortcut_scale if op.shortcut is None \
          else dense_matrix(op.shortcut)
      branch = np.eye(op.in_dim)
      for b in op.branch:
        branch = dense_matrix(b) @ branch
      np.testing.assert_allclose(matrix, want + branch, rtol=0, atol=1e-10,
                                 err_msg=name)
      flat = np.eye(op.out_dim).reshape((op.out_dim,) + op.out_shape)
      adjoint = np.asarray(op.transpose(jnp.asarray(flat)))
      np.testing.assert_allclose(adjoint.reshape(op.out_dim, -1), matrix,
                                 rtol=0, atol=1e-10, err_msg=name)


def reference_maps(graph: ResidualGraph) -> dict:
  """Every ``G(s, e)`` of the linearized network, by pushing identity
  matrices through it in numpy: activations replaced by ``a``, unit vectors
  injected after node ``s - 1`` (independent of residual_graph's ops)."""
  a, _ = activations.loop_transformation(graph.slopes)
  units = [([dense_matrix(op) for op in unit.ops],
            None if unit.shortcut is None else dense_matrix(unit.shortcut),
            unit) for unit in graph.units]

  def run(h, inject):
    nodes, count = [], 0

    def node(z):
      nonlocal count
      nodes.append(z)
      count += 1
      return a * z + inject.get(count - 1, 0.0)

    for mats, shortcut, unit in units:
      if unit.kind == "plain":
        h = mats[0] @ h
        h = node(h) if unit.activated else h
      elif unit.kind == "linear_residual":
        h = node(h + mats[0] @ h)
      else:
        t = h
        for i, m in enumerate(mats):
          t = m @ t
          t = node(t) if i < len(mats) - 1 else t
        h = (h if shortcut is None else shortcut @ h) + t
    return nodes + [h]

  first = units[0][0][0]
  outs = {0: run(np.eye(first.shape[1]), {})}
  dims = [z.shape[0] for z in outs[0]]
  for s in range(1, graph.num_nodes + 1):
    width = dims[s - 1]
    outs[s] = run(np.zeros((first.shape[1], width)),
                  {s - 1: np.eye(width)})
  return {(s, e): outs[s][e] for s in outs for e in range(s, len(dims))}


MIXED_SPEC = (("conv", 3, 3, 1, 1), ("residual", 4, 3, 2, 2),
              ("linear_residual", 3), ("residual", 4, 1, 1, 1),
              ("dense", 5), ("dense", None))


@pytest.mark.parametrize("activation", ["leaky_relu", "sigmoid", "abs"])
def test_product_chains_match_the_linearized_network(activation):
  model = build(MIXED_SPEC, shape=(4, 4, 2), batch_norm=True,
                normalize=True, activation=activation)
  with jax.enable_x64(True):  # a = 0.505 (leaky_relu) folded exactly.
    graph = residual_graph.from_model(model).astype(jnp.float64)
    chains = {p: residual_graph.product_chain(graph, p)
              for p in residual_bounds.required_products(
                  graph, method="liplt", kind="global")}
  want = reference_maps(graph)
  assert set(want) == set(chains)
  for (s, e), matrix in want.items():
    got = dense_matrix(chains[(s, e)])
    scale = max(1.0, np.abs(matrix).max())
    np.testing.assert_allclose(got, matrix, rtol=0, atol=1e-10 * scale,
                               err_msg=f"G({s}, {e})")
  # The class rows: r^T G(s, N-1) for every source, in one sweep.
  n, k = graph.num_nodes, graph.num_classes
  with jax.enable_x64(True):
    rows = residual_graph.class_rows_back(graph,
                                          jnp.eye(k, dtype=jnp.float64))
  for s in range(n + 1):
    np.testing.assert_allclose(np.asarray(rows[s]).reshape(k, -1),
                               want[(s, n)], rtol=0, atol=1e-10)


# ------------------------------------------------------------ soundness --

# Projection with stride 2, two inner activations, a linear residual block.
SHARED_SPEC = (("conv", 2, 3, 1, 1), ("residual", 3, 3, 2, 2),
               ("linear_residual", 3), ("dense", None))


def shared_model(activation="relu", **kwargs):
  return build(SHARED_SPEC, activation=activation, batch_norm=True,
               normalize=True, **kwargs)


@st.composite
def architectures(draw):
  """Tiny residual specs with every kind of block, and how to build them."""
  blocks = []
  for _ in range(draw(st.integers(1, 2))):
    if draw(st.booleans()):
      blocks.append(("residual", draw(st.integers(2, 3)),
                     draw(st.sampled_from([1, 3])), draw(st.integers(1, 2)),
                     draw(st.integers(1, 2))))
    else:
      blocks.append(("linear_residual", draw(st.sampled_from([1, 3]))))
  head = [("dense", 3)] if draw(st.booleans()) else []
  spec = ((("conv", draw(st.integers(2, 3)), 3, 1, 1),) + tuple(blocks)
          + tuple(head) + (("dense", None),))
  size = draw(st.sampled_from([4, 5]))
  return dict(spec=spec, shape=(size, size, draw(st.integers(1, 2))),
              classes=draw(st.integers(2, 3)),
              activation=draw(st.sampled_from(activations.ACTIVATIONS)),
              batch_norm=draw(st.booleans()), normalize=draw(st.booleans()),
              seed=draw(st.integers(0, 2**16)))


@hypothesis.settings(max_examples=3, deadline=None,
                     suppress_health_check=list(hypothesis.HealthCheck))
@hypothesis.given(arch=architectures())
def test_exact_bounds_are_sound_and_below_naive(arch):
  model = build(**arch)
  pairwise = eager_bound(model, exact=True)
  naive = eager_bound(model, method="naive", exact=True)
  assert np.all(np.isfinite(pairwise))
  diff, dist = sampled_pairs(model, seed=arch["seed"])
  assert_sound(diff, dist, pairwise=pairwise)
  # Same exact norms: LipLT is never above naive (docs/residual.md); the
  # certified values carry different batch-norm rounding allowances.
  assert np.all(np.asarray(pairwise) <= np.asarray(naive) * (1 + 1e-3))


def test_every_activation_sound():
  for activation in activations.ACTIVATIONS:
    model = shared_model(activation, seed=1)
    pairwise = eager_bound(model, exact=True)
    per_class = eager_bound(model, kind="per_class", exact=True)
    global_ = float(eager_bound(model, kind="global", exact=True))
    naive = eager_bound(model, method="naive", exact=True)
    assert np.all(np.isfinite(pairwise)), activation
    assert np.all(np.isfinite(per_class)), activation
    diff, dist = sampled_pairs(model, seed=1)
    assert_sound(diff, dist, pairwise=pairwise, per_class=per_class,
                 global_=global_)
    assert np.all(np.asarray(pairwise) <= np.asarray(naive) * (1 + 1e-3))


def test_large_class_fallback():
  # Above large_class_threshold classes: ||w_i - w_j|| Lip(phi) m_last,
  # looser than the exact rows and sound; only after an activation.
  model = shared_model(seed=6)
  rows = np.asarray(eager_bound(model, exact=True))
  fallback = np.asarray(eager_bound(model, exact=True,
                                    large_class_threshold=2))
  assert np.all(off_diagonal(fallback) >= off_diagonal(rows))
  diff, dist = sampled_pairs(model, seed=6)
  assert_sound(diff, dist, pairwise=fallback)
  blocks_last = build((("conv", 2, 3, 1, 1), ("residual", 2, 3, 1, 1),
                       ("dense", None)))
  with pytest.raises(ValueError, match="raise large_class_threshold above "
                     "the number of classes"):
    eager_bound(blocks_last, exact=True, large_class_threshold=2)


def largest_pair_jacobians(model, *, starts=4, steps=25, seed=0):
  """``max_x ||c_ij^T J(x)||`` per pair, by gradient ascent on ``x``
  (float64), from random starts; ``[K, K]``."""
  k = model.num_classes
  rng = np.random.default_rng(seed)
  best = np.zeros((k, k))
  with jax.enable_x64(True):
    f = float64_logits(model)

    def pair_norm(x, row):
      return jnp.linalg.norm(jax.grad(lambda x: f(x[None])[0] @ row)(x))

    step = jax.jit(jax.value_and_grad(pair_norm))
    for i in range(k):
      for j in range(i + 1, k):
        row = jnp.asarray(np.eye(k)[i] - np.eye(k)[j])
        for _ in range(starts):
          x = jnp.asarray(rng.uniform(0, 1, model.input_shape))
          for _ in range(steps):
            value, grad = step(x, row)
            best[i, j] = max(best[i, j], float(value))
            x = x + 0.1 * grad / (jnp.linalg.norm(grad) + 1e-12)
        best[j, i] = best[i, j]
  return best


@pytest.mark.parametrize("activation", ["tanh", "softplus"])
def test_bound_above_the_largest_jacobian_found(activation):
  model = shared_model(activation, seed=2)
  bound = np.asarray(eager_bound(model, exact=True), np.float64)
  found = largest_pair_jacobians(model, seed=2)
  assert np.all(off_diagonal(found) > 0)
  assert np.all(found <= bound), (found, bound)


# Three maps: Lanczos and the training step compile code for every map.
SMALL_SPEC = (("conv", 2, 3, 1, 1), ("residual", 3, 3, 1, 2), ("dense", None))


def test_randomized_and_deterministic_modes():
  model = build(SMALL_SPEC, batch_norm=True, normalize=True, seed=3)
  exact = np.asarray(eager_bound(model, exact=True), np.float64)
  randomized = np.asarray(lipjax.bound(model, seed=7), np.float64)
  again = np.asarray(lipjax.bound(model, seed=7))
  np.testing.assert_array_equal(again, randomized.astype(np.float32))
  raw = np.asarray(eager_bound(model, exact=True, safety_factor=1.0))
  mask = ~np.eye(len(exact), dtype=bool)
  # Above the bound from the true norms (exact=True adds 1e-5), barely.
  assert np.all(randomized[mask] >= raw[mask])
  assert np.all(randomized[mask] <= exact[mask] * 1.003)
  # Deterministic: exact where the Gram matrices fit (all here), and a
  # looser bound by proof where none fits.
  for same in (eager_bound(model, guarantee="deterministic"),
               eager_bound(model, exact="auto")):
    np.testing.assert_array_equal(same, exact.astype(np.float32))
  proof, info = lipjax.bound(model, guarantee="deterministic",
                             max_exact_bytes=64, return_info=True)
  assert "exact" not in info.sources
  proof = np.asarray(proof, np.float64)
  assert np.all(np.isfinite(proof)) and np.all(proof[mask] >= exact[mask])
  diff, dist = sampled_pairs(model, seed=3)
  assert_sound(diff, dist, pairwise=randomized)
  assert_sound(diff, dist, pairwise=proof)


def test_training_mode_is_jittable_differentiable_and_converges():
  model = build(SMALL_SPEC, batch_norm=True, normalize=True, seed=4)
  # The bound from the exact norms, without the certificate's allowances.
  _, info = eager_bound(model, exact=True, return_info=True)
  with jax.enable_x64(True):
    graph = residual_graph.from_model(model).astype(jnp.float64)
    exact = np.asarray(residual_bounds.bound_from_norms(
        graph, jnp.asarray(info.norms), method="liplt", kind="pairwise"))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(params, state):
    value, state = lipjax.bound((params, rest), graphdef=graphdef,
                                iterations=3, state=state, return_state=True)
    return jnp.sum(value), (value, state)

  step = jax.jit(jax.value_and_grad(loss, has_aux=True))
  state = lipjax.init_power_state(model, key=jax.random.key(4))
  mask = ~np.eye(len(exact), dtype=bool)
  previous = np.zeros_like(exact)
  # Warm-started: 3, 6, ... iterations; power iteration estimates norms
  # from below, and the bound grows with them.
  for _ in range(15):
    (_, (value, state)), grads = step(params, state)
    leaves = jax.tree.leaves(grads)
    assert all(np.all(np.isfinite(g)) for g in leaves)
    assert any(np.any(g != 0) for g in leaves)
    value = np.asarray(value, np.float64)
    assert np.all(value[mask] <= exact[mask] * (1 + 1e-6))
    assert np.all(value[mask] >= previous[mask] * (1 - 1e-6))
    previous = value
  np.testing.assert_allclose(previous[mask], exact[mask], rtol=1e-3)


def _as_plain_graph(model) -> ResidualGraph:
  """A SequentialNet's ops as plain units of a ResidualGraph."""
  chain = linear_maps.from_model(model)
  last = chain.num_layers - 1
  graph = ResidualGraph(units=tuple(
      Unit(ops=(op,), shortcut=None, kind="plain", activated=k < last)
      for k, op in enumerate(chain.ops)), slopes=chain.slopes)
  residual_graph.check_graph(graph)
  return graph


# The layer shapes of SHARED_SPEC's stem, first block conv and logits.
PLAIN_SPEC = (("conv", 2, 3, 1, 1), ("conv", 3, 3, 2, 1), ("dense", None))


def test_plain_network_as_a_graph_matches_the_chain_bound():
  model = build(PLAIN_SPEC, activation="leaky_relu", normalize=True, seed=5)
  graph = _as_plain_graph(model)
  for method, kind in (("liplt", "pairwise"), ("naive", "per_class")):
    want = eager_bound(model, method=method, kind=kind, exact=True)
    got = eager_bound(graph, method=method, kind=kind, exact=True)
    np.testing.assert_allclose(got, want, rtol=1e-5, err_msg=method + kind)


def test_batch_norm_rounding_allowance_is_small():
  # Batch-norm scales sit in sums in a residual network, so their rounding
  # gets an additive allowance, not a raised scale. It must stay a rounding
  # allowance: built from spectral op bounds, not from entrywise-absolute
  # norms (which made a ResNet4's class-row factor 2.6e8, this one 1.007).
  model = build(PLAIN_SPEC, activation="leaky_relu", normalize=True,
                batch_norm=True, seed=5)
  want = np.asarray(eager_bound(model, exact=True))
  got = np.asarray(eager_bound(_as_plain_graph(model), exact=True))
  mask = ~np.eye(len(want), dtype=bool)
  # Both paths add allowances for the scales between layers (the chain's
  # on raised scales, 2r; the graph's on unraised ones, r): close, neither
  # a reference for the other.
  np.testing.assert_allclose(got[mask], want[mask], rtol=1e-3)
