"""Independent numpy reference for the bounds (closed forms, dense SVD).

Nothing here uses lipjax's power iteration or recursion: norms come from
``np.linalg.norm(M, 2)`` of explicitly multiplied matrices and LipLT from the
partition closed form of docs/bounds.md#closed-form, so agreement with lipjax
is a real check.
"""

import itertools

import numpy as np


def spectral_norm(matrix: np.ndarray) -> float:
  return float(np.linalg.norm(np.atleast_2d(matrix), 2))


def chain_product(mats, start, end):
  """``M_end @ ... @ M_start`` for math-convention ``[out, in]`` matrices."""
  out = mats[start]
  for m in mats[start + 1:end + 1]:
    out = m @ out
  return out


def liplt_closed_form(mats, slopes=(0.0, 1.0)) -> float:
  """Sum over cut sets S of c^|S| |a|^(k-|S|) prod_blocks ||M_B||.

  Args:
    mats: ``M_0 .. M_k`` (the last may be a single row ``c^T W_{N-1}``).
    slopes: ``(alpha, beta)``.
  """
  alpha, beta = slopes
  a, c = abs((alpha + beta) / 2), (beta - alpha) / 2
  k = len(mats) - 1
  total = 0.0
  for cuts in itertools.product((False, True), repeat=k):
    # cuts[b] is True when the boundary between M_b and M_{b+1} is cut.
    weight = 1.0
    blocks, start = [], 0
    for b, cut in enumerate(cuts):
      weight *= c if cut else a
      if cut:
        blocks.append((start, b))
        start = b + 1
    blocks.append((start, k))
    total += weight * np.prod(
        [spectral_norm(chain_product(mats, s, e)) for s, e in blocks])
  return float(total)


def naive(mats, slopes=(0.0, 1.0)) -> float:
  gain = max(abs(slopes[0]), abs(slopes[1]))**(len(mats) - 1)
  return float(gain * np.prod([spectral_norm(m) for m in mats]))


def class_rows(num_classes, kind):
  """The class vectors e_i (per_class) or c_ij, i < j row-major (pairwise)."""
  eye = np.eye(num_classes)
  if kind == "per_class":
    return list(eye)
  return [eye[i] - eye[j] for i, j in zip(*np.triu_indices(num_classes, 1))]


def reference_bound(mats, *, method, kind, slopes=(0.0, 1.0), diagonal=0.0):
  """The bound from dense matrices: scalar, [K] or [K, K] (numpy float64)."""
  fn = liplt_closed_form if method == "liplt" else naive
  if kind == "global":
    return fn(mats, slopes)
  num_classes = mats[-1].shape[0]
  values = np.asarray([fn(list(mats[:-1]) + [row[None] @ mats[-1]], slopes)
                       for row in class_rows(num_classes, kind)])
  if kind == "per_class":
    return values
  matrix = np.full((num_classes, num_classes), float(diagonal))
  first, second = np.triu_indices(num_classes, 1)
  matrix[first, second] = values
  matrix[second, first] = values
  return matrix
