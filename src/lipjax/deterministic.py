"""Product-norm upper bounds that hold by proof, for products too large for
an exact Gram matrix.

* **Split by submultiplicativity.** ``||W_e ... W_s|| <= prod ||segment||``
  over consecutive segments. The product is cut greedily into the longest
  segments whose float64 Gram matrix fits ``max_bytes``; each of those gets
  its exact norm (:mod:`lipjax.exact`).
* **A single conv too large for a Gram matrix** gets its symbol bound. A
  zero-padded convolution with stride ``s`` on an ``H x W`` input is, after
  rearranging the padded input into its ``s x s`` phases as channels (an
  orthogonal map), a stride-1 convolution of the phases, which is ``R C E``:
  ``E`` embeds the phases into an ``N1 x N2`` grid large enough that no
  wrap-around reaches an output, ``C`` is the circular convolution on that
  grid, and ``R`` keeps the output positions. ``E`` and ``R`` have norm 1, so
  ``||conv|| <= ||C|| = max_w ||K^(w)||`` over the ``N1 N2`` grid
  frequencies, ``K^(w)`` the ``c_out x (s^2 c_in)`` Fourier symbol (with the
  per-channel input and output scales folded in). Computed in float64 with
  numpy's FFT and SVD, times ``1 + SYMBOL_MARGIN``. (The circular norm of the
  same conv at size ``N = H``, or the symbol of a *product* of convs, would
  not be bounds.)

Every factor is reported, so a certificate can say what each norm rests on.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from lipjax import exact as exact_lib
from lipjax import linear_maps
from lipjax.linear_maps import LinearChain

# Relative margin on a symbol norm: float64 FFT and SVD errors are of order
# 1e-14 relative for these sizes.
SYMBOL_MARGIN = 1e-9

Product = tuple[int, int]


@dataclasses.dataclass(frozen=True)
class Factor:
  """One factor of a split bound: a segment ``W_e ... W_s`` and its norm."""
  product: Product
  source: str  # "exact" or "symbol"
  norm: float  # Already times its own margin.


def _space_to_depth_kernel(kernel: np.ndarray, stride: tuple[int, int]
                           ) -> np.ndarray:
  """The stride-1 kernel of a strided conv seen on space-to-depth inputs.

  With ``x_r[j] = x[s j + r]`` (the ``s x s`` phases of the padded input as
  channels), ``y[i] = sum_a K[a] x[s i + a] = sum_{b, r} K[s b + r] x_r[i + b]``:
  kernel ``[ceil(kh/sh), ceil(kw/sw), sh sw c_in, c_out]``, zero where
  ``s b + r`` falls outside the original kernel.
  """
  kh, kw, c_in, c_out = kernel.shape
  sh, sw = stride
  bh, bw = -(-kh // sh), -(-kw // sw)
  padded = np.zeros((bh * sh, bw * sw, c_in, c_out))
  padded[:kh, :kw] = kernel
  # [bh, sh, bw, sw, ci, co] -> [bh, bw, sh, sw, ci, co] -> merge phases.
  blocks = padded.reshape(bh, sh, bw, sw, c_in, c_out).transpose(
      0, 2, 1, 3, 4, 5)
  return blocks.reshape(bh, bw, sh * sw * c_in, c_out)


def conv_symbol_norm(op) -> float:
  """The symbol bound of one conv :class:`~lipjax.linear_maps.LinearOp`.

  The padded input is rearranged into its ``stride x stride`` phases (an
  orthogonal map), which turns the strided conv into a stride-1 conv of
  the phases; that conv is the restriction of a circular one on a grid large
  enough that no wrap-around reaches an output.

  Returns:
    An upper bound on the op's spectral norm (float, margin included).
  """
  if op.kind != "conv":
    raise ValueError("conv_symbol_norm needs a conv op.")
  kernel = np.asarray(op.weight, np.float64)  # [kh, kw, c_in, c_out]
  if op.in_scale is not None:
    kernel = kernel * np.asarray(op.in_scale, np.float64)[None, None, :, None]
  if op.out_scale is not None:
    kernel = kernel * np.asarray(op.out_scale, np.float64)[None, None, None]
  (pt, pb), (pl, pr) = op.padding
  height, width, _ = op.in_shape
  out_h, out_w, _ = op.out_shape
  sh, sw = op.strides
  phased = _space_to_depth_kernel(kernel, (sh, sw))
  bh, bw = phased.shape[:2]
  # The phases have ceil((H + pads) / s) rows; outputs read rows i + b.
  n1 = max(-(-(height + pt + pb) // sh), out_h + bh - 1, bh)
  n2 = max(-(-(width + pl + pr) // sw), out_w + bw - 1, bw)
  symbol = np.fft.fft2(phased, s=(n1, n2), axes=(0, 1))  # [n1, n2, ci', co]
  top = np.linalg.svd(symbol.reshape(n1 * n2, *symbol.shape[2:]),
                      compute_uv=False)[:, 0]
  return float(np.max(top)) * (1.0 + SYMBOL_MARGIN)


def _single_op_bound(op, max_bytes: int) -> float:
  """A bound by proof on one op too large for an exact Gram matrix.

  A conv gets its symbol bound; a residual op ``S + B_m ... B_0`` the
  triangle inequality and submultiplicativity over its primitives (convs,
  by their symbols).

  Raises:
    MemoryError: a dense op (its Gram matrix does not fit either).
  """
  if isinstance(op, linear_maps.ResidualOp):
    shortcut = (abs(op.shortcut_scale) if op.shortcut is None
                else _single_op_bound(op.shortcut, max_bytes))
    return shortcut + math.prod(_single_op_bound(b, max_bytes)
                                for b in op.branch)
  if op.kind == "conv":
    return conv_symbol_norm(op)
  single = linear_maps.LinearChain(ops=(op,))
  return exact_lib.product_norm(single, (0, 0), max_bytes=max_bytes)


def op_upper_bound(op) -> float:
  """A cheap upper bound by proof on any single op's spectral norm.

  Convs: the symbol bound; dense: float64 SVD of the scaled matrix (with the
  symbol's margin for its rounding); residual ops: triangle inequality and
  submultiplicativity. Used where any upper bound will do, such as the
  rounding allowances of :mod:`lipjax.norm_certificates`.
  """
  if isinstance(op, linear_maps.ResidualOp):
    shortcut = (abs(op.shortcut_scale) if op.shortcut is None
                else op_upper_bound(op.shortcut))
    return shortcut + math.prod(op_upper_bound(b) for b in op.branch)
  if op.kind == "conv":
    return conv_symbol_norm(op)
  w = np.asarray(op.weight, np.float64)  # [in, out]
  if op.in_scale is not None:
    w = w * np.tile(np.asarray(op.in_scale, np.float64),
                    w.shape[0] // np.shape(op.in_scale)[0])[:, None]
  if op.out_scale is not None:
    w = w * np.asarray(op.out_scale, np.float64)[None, :]
  top = np.linalg.svd(w, compute_uv=False)[0] if w.size else 0.0
  return float(top) * (1.0 + SYMBOL_MARGIN)


def _segment_end(chain, start: int, end: int, max_bytes: int) -> int:
  """The last ``e' <= end`` with ``W_e' ... W_start``'s Gram in max_bytes."""
  best = None
  for e in range(start, end + 1):
    if exact_lib.fits(chain, (start, e), max_bytes):
      best = e
  return best


def split_bound(chain: LinearChain, product: Product, *, max_bytes: int,
                cache: dict, exact_norm) -> tuple[float, tuple[Factor, ...]]:
  """A deterministic upper bound on ``||W_e ... W_s||`` and its factors.

  Args:
    chain: the network's chain (concrete arrays).
    product: ``(s, e)``.
    max_bytes: the Gram matrix limit of one exact segment.
    cache: shared between calls, so that a segment's norm is computed once.
    exact_norm: ``(segment) -> float``, the certified norm of a segment whose
      Gram matrix fits (with its rounding allowances).

  Returns:
    ``(bound, factors)``; the bound is the product of the factors' norms.

  Raises:
    MemoryError: a single dense layer's Gram matrix exceeds ``max_bytes``.
  """
  s, e = product
  factors = []
  while s <= e:
    last = _segment_end(chain, s, e, max_bytes)
    if last is None:  # Not even the single layer fits.
      key, source, last = (s, s), "symbol", s
      if (key, source) not in cache:
        cache[key, source] = _single_op_bound(chain.ops[s], max_bytes)
    else:
      key, source = (s, last), "exact"
      if (key, source) not in cache:
        cache[key, source] = exact_norm(key)
    factors.append(Factor(product=key, source=source,
                          norm=cache[key, source]))
    s = last + 1
  return math.prod(f.norm for f in factors), tuple(factors)
