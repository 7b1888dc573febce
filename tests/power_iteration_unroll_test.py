"""The unrolled power iteration equals the looped one.

``iterate`` unrolls up to ``UNROLL_LIMIT`` steps (for speed on CPU, see
BENCHMARKS.md); that must not change any result.
"""

import jax
import numpy as np
import pytest

from lipjax import power_iteration
from lipjax.linear_maps import from_matrices


def _chain():
  rng = np.random.default_rng(0)
  widths = (6, 5, 7, 4)
  return from_matrices([rng.standard_normal((o, i)).astype(np.float32)
                        for i, o in zip(widths[:-1], widths[1:])])


def _products():
  return [(s, e) for s in range(3) for e in range(s, 3)]


@pytest.mark.parametrize("num_iterations", [0, 1, 7])
def test_unrolled_iterate_equals_fori_loop(monkeypatch, num_iterations):
  chain = _chain()
  state = power_iteration.init(chain, _products(), jax.random.key(0))
  unrolled = power_iteration.iterate(chain, state, num_iterations)
  monkeypatch.setattr(power_iteration, "UNROLL_LIMIT", 0)
  looped = power_iteration.iterate(chain, state, num_iterations)
  for a, b in zip(unrolled.vectors, looped.vectors):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
