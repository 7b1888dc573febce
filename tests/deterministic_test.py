"""Deterministic norm bounds (lipjax.deterministic) against dense SVD.

The conv symbol bound must be above the exact norm for every stride, padding,
kernel and scale combination; the split bound above the exact product norm;
and ``guarantee="deterministic"`` must give an upper bound with no
probability in its statement.
"""

import hypothesis
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import strategies as st

import lipjax
from lipjax import deterministic
from lipjax.certification import sound_bound
from lipjax.linear_maps import LinearOp
from lipjax.linear_maps import dense_matrix


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(kernel=st.integers(1, 5), stride=st.integers(1, 3),
                  pad=st.integers(0, 2), height=st.integers(1, 9),
                  width=st.integers(1, 9), c_in=st.integers(1, 3),
                  c_out=st.integers(1, 3), scaled=st.booleans(),
                  seed=st.integers(0, 2**16))
def test_symbol_bound_is_above_the_exact_conv_norm(kernel, stride, pad, height,
                                                   width, c_in, c_out, scaled,
                                                   seed):
  hypothesis.assume(height + 2 * pad >= kernel and width + 2 * pad >= kernel)
  rng = np.random.default_rng(seed)
  op = LinearOp(
      kind="conv",
      weight=jnp.asarray(rng.standard_normal((kernel, kernel, c_in, c_out)),
                         jnp.float32),
      in_scale=(jnp.asarray(rng.uniform(0.2, 3, c_in), jnp.float32)
                if scaled else None),
      out_scale=(jnp.asarray(rng.normal(size=c_out), jnp.float32)
                 if scaled else None),
      in_shape=(height, width, c_in), strides=(stride, stride),
      padding=((pad, pad), (pad, pad)))
  exact = np.linalg.norm(dense_matrix(op), 2)
  assert deterministic.conv_symbol_norm(op) >= exact


@pytest.mark.parametrize("kernel,stride,pad", [(3, 1, 1), (4, 2, 1),
                                               (3, 2, 1), (5, 1, 2)])
def test_symbol_bound_on_the_reference_conv_shapes(kernel, stride, pad):
  rng = np.random.default_rng(kernel + stride)
  op = LinearOp(kind="conv",
                weight=jnp.asarray(rng.standard_normal((kernel, kernel, 3, 4))
                                   / 6, jnp.float32),
                in_scale=None, out_scale=None, in_shape=(12, 12, 3),
                strides=(stride, stride), padding=((pad, pad), (pad, pad)))
  exact = np.linalg.norm(dense_matrix(op), 2)
  bound = deterministic.conv_symbol_norm(op)
  assert exact <= bound <= exact * 1.6  # Sound, and not absurdly loose.


def test_circular_norm_at_the_input_size_is_not_a_bound():
  # Why the grid must be larger than the input: at N = H the circular conv
  # wraps around and can be smaller than the zero-padded one.
  w = np.zeros((3, 3, 1, 1))
  w[:, :, 0, 0] = [[1, -1, 1], [-1, 1, -1], [1, -1, 1]]
  op = LinearOp(kind="conv", weight=jnp.asarray(w, jnp.float32),
                in_scale=None, out_scale=None, in_shape=(3, 3, 1),
                strides=(1, 1), padding=((1, 1), (1, 1)))
  exact = np.linalg.norm(dense_matrix(op), 2)
  small = np.abs(np.fft.fft2(w[:, :, 0, 0], s=(3, 3))).max()
  assert small < exact <= deterministic.conv_symbol_norm(op)


def test_deterministic_bound_is_above_exact_and_states_no_probability():
  model = lipjax.models.build("2C2F", num_classes=10, input_shape=(16, 16, 1),
                              rngs=nnx.Rngs(0))
  exact = np.asarray(lipjax.bound(model, exact=True), np.float64)
  limit = 8 * 200**2  # Forces the conv products to be split.
  lip, info = lipjax.bound(model, guarantee="deterministic",
                           max_exact_bytes=limit, return_info=True)
  off = ~np.eye(10, dtype=bool)
  ratio = np.asarray(lip, np.float64)[off] / exact[off]
  assert np.all(ratio >= 1.0) and np.all(ratio <= 2.0)
  assert "split" in info.sources and info.seed is None
  assert info.guarantee.startswith("deterministic")
  assert "probability" not in info.guarantee
  split_rows = [r for r in info.certificate.rows() if r["source"] == "split"]
  assert split_rows and all(r["segments"] for r in split_rows)
  # The same through certification's bound, with the mode in its report.
  bounds, report = sound_bound.sound_bound(
      model, method="liplt", kind="pairwise", max_exact_bytes=limit,
      guarantee_kind="deterministic")
  assert report["mode"] == "deterministic" and report["seed"] is None
  np.testing.assert_array_equal(bounds["bound"], np.asarray(lip))


def test_split_bound_multiplies_exact_segments():
  rng = np.random.default_rng(0)
  mats = [rng.standard_normal((20, 30)), rng.standard_normal((25, 20)),
          rng.standard_normal((22, 25))]
  chain = lipjax.from_matrices(mats)
  limit = 8 * 20**2  # (0, 0) fits (side 20), (0, 1) does not (25); (1, 2)
  # does (its input side is 20): the greedy split takes the longest segment.
  value, factors = deterministic.split_bound(
      chain, (0, 2), max_bytes=limit, cache={},
      exact_norm=lambda seg: np.linalg.norm(dense_matrix(chain, *seg), 2))
  assert [f.product for f in factors] == [(0, 0), (1, 2)]
  true = np.linalg.norm(dense_matrix(chain, 0, 2), 2)
  assert value >= true
  np.testing.assert_allclose(value, np.prod([f.norm for f in factors]))
