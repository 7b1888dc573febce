"""A residual network's maps share their ops: per-op compiles and bounds.

Lanczos and exact Gram norms with per-op sweeps (lipjax.per_op,
sweeps="per_op") compute what the fused programs compute (plain chains
with many products, residual maps through skip connections), a chain of a
new structure whose ops' shapes were seen before compiles nothing new (the
point: a residual network's maps), and the residual certified bound that
uses them equals the one from fused sweeps. The ops' proven norm bounds
(rounding allowances) are computed once per op, with the same bound.
"""

import jax
import numpy as np
import pytest
from flax import nnx

import lipjax
from lipjax import deterministic
from lipjax import exact
from lipjax import lanczos
from lipjax import per_op
from lipjax import residual_certified
from lipjax import residual_graph
from lipjax.linear_maps import LinearChain
from tests import chains


def _assert_same_run(a, b):
  for x, y in zip(a.alphas + a.betas, b.alphas + b.betas):
    np.testing.assert_allclose(x, y, rtol=1e-9, atol=1e-12)


def test_per_op_sweeps_match_fused_on_a_plain_chain():
  chain = chains.expanding_conv_chain(seed=2)
  n = chain.num_layers
  products = [(s, e) for s in range(n) for e in range(s, n)]
  fused = lanczos.run(chain, products, max_steps=16, seed=5)
  ops = lanczos.run(chain, products, max_steps=16, seed=5, sweeps="per_op")
  _assert_same_run(fused, ops)
  assert max(len(a) for a in ops.alphas) == 16


def _tiny_resnet(seed=0):
  spec = (("conv", 4, 3, 1, 1), ("residual", 6, 3, 2, 2),
          ("residual", 6, 3, 1, 1), ("dense", None))
  return lipjax.models.build(spec, num_classes=3, input_shape=(6, 6, 2),
                             rngs=nnx.Rngs(seed))


def test_per_op_sweeps_match_fused_on_residual_maps():
  # Projection shortcut, stride, two inner activations: ResidualOps.
  graph = residual_graph.from_model(_tiny_resnet())
  for product in [(0, graph.num_nodes), (1, graph.num_nodes - 1)]:
    chain = residual_graph.product_chain(graph, product)
    full = [(0, chain.num_layers - 1)]
    fused = lanczos.run(chain, full, max_steps=24, seed=3)
    ops = lanczos.run(chain, full, max_steps=24, seed=3, sweeps="per_op")
    _assert_same_run(fused, ops)


def _compiles(fn) -> int:
  count = [0]

  def listener(event, duration, **_):
    del duration
    count[0] += event == "/jax/core/compile/backend_compile_duration"

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    fn()
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  return count[0]


def _lanczos(chain, sweeps):
  return lanczos.run(chain, [(0, chain.num_layers - 1)], max_steps=8, seed=1,
                     sweeps=sweeps)


def _exact(chain, sweeps):
  return exact.product_norm(chain, (0, chain.num_layers - 1), sweeps=sweeps)


@pytest.mark.parametrize("run", [_lanczos, _exact])
def test_a_new_chain_structure_of_known_ops_compiles_nothing(run):
  three = chains.dense_chain((7, 7, 7, 7), seed=4)
  two = LinearChain(ops=three.ops[1:])  # Another structure, same ops.
  run(three, "per_op")
  run(three, "fused")
  assert _compiles(lambda: run(two, "per_op")) == 0
  assert _compiles(lambda: run(two, "fused")) > 0  # One step per structure.


def test_exact_norms_per_op_match_fused_on_residual_maps():
  graph = residual_graph.from_model(_tiny_resnet())
  for product in [(0, graph.num_nodes), (2, graph.num_nodes)]:
    chain = residual_graph.product_chain(graph, product)
    np.testing.assert_allclose(_exact(chain, "per_op"),
                               _exact(chain, "fused"), rtol=1e-12)


@pytest.mark.parametrize("run", [_lanczos, _exact])
def test_unknown_sweeps_raise(run):
  chain = chains.dense_chain((3, 3), seed=0)
  with pytest.raises(ValueError, match="sweeps must be one of"):
    run(chain, "loop")


def test_compiled_op_keeps_the_op_and_its_adjoint():
  op = chains.expanding_conv_chain(seed=1).ops[1]
  wrapped = per_op.CompiledOp(op)
  x = np.random.default_rng(0).standard_normal(
      (2,) + tuple(op.in_shape)).astype(np.float32)
  y = np.random.default_rng(1).standard_normal(
      (2,) + tuple(op.out_shape)).astype(np.float32)
  np.testing.assert_allclose(wrapped(x), op(x), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(wrapped.transpose(y), op.transpose(y),
                             rtol=1e-6, atol=1e-6)
  assert wrapped.in_shape == op.in_shape


@pytest.mark.parametrize("exact_norms", [False, True])
def test_residual_certified_bound_same_with_fused_sweeps(monkeypatch,
                                                         exact_norms):
  model = _tiny_resnet(seed=1)
  assert residual_certified.SWEEPS == "per_op"
  bound, info = lipjax.bound(model, seed=7, exact=exact_norms,
                             return_info=True)
  monkeypatch.setattr(residual_certified, "SWEEPS", "fused")
  fused, fused_info = lipjax.bound(model, seed=7, exact=exact_norms,
                                   return_info=True)
  np.testing.assert_allclose(np.asarray(bound), np.asarray(fused),
                             rtol=1e-6)
  np.testing.assert_array_equal(info.certificate.steps,
                                fused_info.certificate.steps)
  assert set(info.certificate.sources) == {
      "exact" if exact_norms else "lanczos"}


def test_op_bounds_are_computed_once_per_op_and_give_the_same_bound(
    monkeypatch):
  model = _tiny_resnet(seed=2)
  calls = []
  original = deterministic.op_upper_bound

  def counted(op):
    calls.append(op)
    return original(op)

  monkeypatch.setattr(deterministic, "op_upper_bound", counted)
  cached = np.asarray(lipjax.bound(model, exact=True))
  with_cache = len(calls)
  calls.clear()
  monkeypatch.setattr(residual_certified, "_op_key", lambda op: object())
  uncached = np.asarray(lipjax.bound(model, exact=True))
  np.testing.assert_array_equal(cached, uncached)
  assert 0 < 3 * with_cache < len(calls)
