"""Certified upper bounds on product norms, and what each one rests on.

A certifying bound needs an *upper* bound on every product norm
``||W_e ... W_s||``. :func:`certify_norms` gives each product one of

* ``"exact"``: the float64 Gram matrix on the smaller side and ``eigvalsh``
  (:mod:`lipjax.exact`), times ``EXACT_SAFETY_FACTOR`` (1 + 1e-5, covering
  float64 rounding with a wide margin). No probability.
* ``"split"`` (deterministic mode): a product of exact segment norms and
  conv symbol bounds (:mod:`lipjax.deterministic`). No probability.
* ``"lanczos"``: float64 Lanczos from a fresh random start
  (:mod:`lipjax.lanczos`), times the factor of :mod:`lipjax.guarantee`; it
  fails with probability at most ``delta_p`` over the start vector. The
  user's ``delta`` is split evenly over the Lanczos products, so all of them
  hold at once with probability at least ``1 - delta``.

Every path fails closed: non-finite weights or scales raise before any work,
and a non-finite or negative norm raises instead of entering a bound.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from lipjax import deterministic as deterministic_lib
from lipjax import exact as exact_lib
from lipjax import guarantee
from lipjax import lanczos
from lipjax import linear_maps
from lipjax.linear_maps import LinearChain
from lipjax.progress import progress_bar

EXACT_SAFETY_FACTOR = 1.0 + 1e-5


@dataclasses.dataclass(frozen=True)
class NormCertificate:
  """Per-product certified norms (arrays ``[P]`` in product order).

  Attributes:
    products: the ``(s, e)`` pairs.
    norms: float64 computed norms before the factor (exact norms, or
      ``sqrt`` of the largest Ritz value).
    upper: float64 certified upper bounds on the norms (what a bound uses).
    factors: ``upper / norms`` (1 where a norm is 0), for reports.
    sources: ``"exact"`` or ``"lanczos"`` per product.
    dims: the dimension of the Gram matrix of each product (its smaller
      side).
    steps: Krylov dimension per product (0 for exact norms).
    epsilons: KW relative eigenvalue error per product (0 for exact).
    deltas: failure probability per product (0 for exact).
    delta: the certificate's total failure probability (0 if all exact).
    seed: seed of the Lanczos start vectors, or None if none ran.
    splits: ``{product: factors}`` for ``"split"`` products (deterministic
      mode): the segments, each ``"exact"`` or ``"symbol"``, whose norms
      multiply to the bound.
  """
  products: tuple[tuple[int, int], ...]
  norms: np.ndarray
  upper: np.ndarray
  factors: np.ndarray
  sources: tuple[str, ...]
  dims: np.ndarray
  steps: np.ndarray
  epsilons: np.ndarray
  deltas: np.ndarray
  delta: float
  seed: int | None
  splits: dict = dataclasses.field(default_factory=dict)

  @property
  def certified(self) -> np.ndarray:
    """float64 certified upper bounds: what a certificate uses."""
    return self.upper

  @property
  def guarantee(self) -> str:
    """One sentence: what the certificate rests on."""
    if "lanczos" not in self.sources:
      if "split" in self.sources:
        return ("deterministic: exact float64 Gram norms, and for products "
                "too large for one, products of exact segment norms and "
                "conv symbol bounds")
      return "deterministic: every product norm is an exact float64 Gram norm"
    return (f"randomized: holds with probability >= 1 - {self.delta:.3g} "
            f"over the Lanczos start vectors (seed {self.seed})")

  def rows(self) -> list[dict]:
    """One labelled dict per product, for reports and printing."""
    rows = [{"product": list(p), "layers": f"W_{p[1]}...W_{p[0]}",
             "source": src, "norm": float(n), "factor": float(f),
             "certified_norm": float(up), "dim": int(d), "steps": int(k),
             "epsilon": float(e), "delta": float(dp)}
            for p, n, up, f, src, d, k, e, dp in zip(
                self.products, self.norms, self.upper, self.factors,
                self.sources, self.dims, self.steps, self.epsilons,
                self.deltas)]
    for row in rows:
      split = self.splits.get(tuple(row["product"]))
      if split:
        row["segments"] = [{"layers": f"W_{f.product[1]}...W_{f.product[0]}",
                            "source": f.source, "norm": f.norm}
                           for f in split]
    return rows


def check_finite(chain: LinearChain) -> None:
  """Raises ValueError naming the first layer with a non-finite array."""
  for k, outer in enumerate(chain.ops):
    for op in linear_maps.primitive_ops(outer):
      for name in ("weight", "in_scale", "out_scale"):
        value = getattr(op, name)
        if value is not None and not np.all(np.isfinite(np.asarray(value))):
          raise ValueError(
              f"Layer {k} ({op.kind}) has a non-finite {name}: no bound can "
              "certify this network. Restore a checkpoint saved before the "
              "weights diverged.")


U64 = 2.0**-53


def _gamma64(n: int) -> float:
  return n * U64 / (1.0 - n * U64)


def abs_norm(op) -> float:
  """Schur's bound ``sqrt(max row sum * max column sum)`` of ``|W|``.

  An upper bound on the spectral norm of the entrywise absolute value of the
  op's matrix (per-channel scales included), and so of the op itself. For a
  :class:`~lipjax.linear_maps.ResidualOp` ``S + B_m ... B_0`` it is
  ``S``'s bound plus the product of the branch's: ``|S + B| <= |S| + |B_m|
  ... |B_0|`` entrywise, and the norm is monotone on nonnegative matrices.
  """
  if isinstance(op, linear_maps.ResidualOp):
    shortcut = (abs(op.shortcut_scale) if op.shortcut is None
                else abs_norm(op.shortcut))
    return shortcut + math.prod(abs_norm(b) for b in op.branch)
  w = np.abs(np.asarray(op.weight, np.float64))
  c_in, c_out = w.shape[-2] if op.kind == "conv" else None, w.shape[-1]
  in_scale = (np.ones(c_in if op.kind == "conv" else op.in_shape[-1])
              if op.in_scale is None else np.abs(np.asarray(op.in_scale,
                                                            np.float64)))
  out_scale = (np.ones(c_out) if op.out_scale is None
               else np.abs(np.asarray(op.out_scale, np.float64)))
  if op.kind == "conv":
    a = w * in_scale[None, None, :, None] * out_scale
    rows, cols = a.sum(axis=(0, 1, 2)), a.sum(axis=(0, 1, 3))
  else:  # [in, out]; the input scale repeats over the flattened positions.
    repeat = w.shape[0] // in_scale.shape[0]
    a = w * np.tile(in_scale, repeat)[:, None] * out_scale
    rows, cols = a.sum(axis=0), a.sum(axis=1)
  return float(np.sqrt(rows.max() * cols.max()))


def _fan_in(op) -> int:
  """Terms summed per output (``gamma_{fan_in + 3}`` bounds its rounding).

  A residual op's evaluation rounds in every primitive (fan-in plus 3 scale
  roundings each) and once more in the sum; ``(1 + gamma_a)(1 + gamma_b)
  <= 1 + gamma_{a+b}`` lets one ``gamma`` cover them all.
  """
  if isinstance(op, linear_maps.ResidualOp):
    return sum(_fan_in(p) + 3 for p in op.primitives()) + 1
  return int(math.prod(np.shape(op.weight)[:-1]))


def matvec_error(chain, product, layer_norms: dict) -> float:
  """A bound on ``||fl64(P^T P q) - P^T P q||`` (or ``P P^T``), unit ``q``.

  Each layer's float64 evaluation adds at most ``gamma_{d+3} |W_k| |x_k|``
  (``d`` its fan-in; 3 more roundings for the scales), whose norm is at most
  ``gamma S_k ||x_k||`` with ``S_k`` :func:`abs_norm`; that error then goes
  through the later layers exactly. With ``n_k >= ||W_k||``, one sweep is
  off by at most ``F = prod n_k sum_k gamma_k S_k / n_k``, and the forward
  plus adjoint sweeps by ``2 F prod n_k + F^2``. This scales with the
  product of the layer norms, not with ``||P||``: a product that cancels
  (its norm far below the product of its layers') gets a large allowance,
  as it must, because float64 cannot resolve it.

  Args:
    chain: the chain (float64 values).
    product: ``(s, e)``.
    layer_norms: ``{k: n_k}``, upper bounds on the single-layer norms; a
      missing layer uses :func:`abs_norm`.
  """
  scale, f = _sweep_error(chain, product, layer_norms)
  return 2.0 * f * scale + f * f


def _sweep_error(chain, product, layer_norms: dict) -> tuple[float, float]:
  """``(prod n_k, F)``: one float64 sweep through ``W_e ... W_s`` is off by
  at most ``F = prod n_k sum_k gamma_k S_k / n_k`` per unit input (see
  :func:`matvec_error`)."""
  s, e = product
  norms, total = [], 0.0
  for k in range(s, e + 1):
    absolute = abs_norm(chain.ops[k])
    n_k = layer_norms.get(k, absolute)
    norms.append(n_k)
    total += _gamma64(_fan_in(chain.ops[k]) + 3) * absolute / max(
        n_k, np.finfo(np.float64).tiny)
  scale = math.prod(norms)
  return scale, scale * total


def interior_scale_allowance(chain, product, layer_norms: dict, *,
                             row_on_left: bool = False) -> float:
  """Covers the rounding of per-channel scales *inside* a product.

  :func:`lipjax.linear_maps.with_scales_rounded_up` raises every folded
  scale by ``r``; that bounds a norm only for the scales at the product's
  ends (``||A D||`` and ``||D A||`` grow with ``|D|``), not for one between
  two layers (``[1, 1] diag(d) [1, -1]^T = d_1 - d_2`` can shrink). With
  the exact scale within ``2 r`` of the raised one, every op ``k`` is off by
  at most ``((1 + 2r)^q_k - 1) n_k``, so the product by at most ``((1 +
  2r)^q - 1) prod n_k``, ``q`` its number of scales. Zero without interior
  scales (no batch norm: the input scale is always at the right end).

  Args:
    chain: the chain (with raised scales).
    product: ``(s, e)``.
    layer_norms: ``{k: n_k}`` upper bounds on the single-layer norms; a
      missing layer uses :func:`abs_norm`.
    row_on_left: a class row multiplies the product from the left (then
      layer ``e``'s output scale is inside too).
  """
  s, e = product
  inside = [op.out_scale is not None for op in chain.ops[s:e + 1]]
  if not row_on_left:
    inside = inside[:-1]
  if not any(inside):
    return 0.0
  count = sum((op.in_scale is not None) + (op.out_scale is not None)
              for op in chain.ops[s:e + 1])
  norms = [layer_norms.get(k, abs_norm(chain.ops[k]))
           for k in range(s, e + 1)]
  rho = (1.0 + 2.0 * linear_maps.SCALE_ROUNDING)**count - 1.0
  return rho * math.prod(norms)


def _exact_norms(chain, products, max_exact_bytes, progress,
                 sweeps="fused") -> np.ndarray:
  """Exact norms, one product at a time so that the bar names it."""
  sizes = [exact_lib.gram_size(chain, p) for p in products]
  for size in sizes:  # Every size is checked before any work.
    if size.gram_bytes > max_exact_bytes:
      exact_lib.product_norm(chain, size.product, max_bytes=max_exact_bytes)
  bar = progress_bar(total=len(products), initial=0,
                     description="exact norms",
                     enabled=progress and bool(products))
  norms = []
  for size in sizes:
    (s, e), side = size.product, size.side
    bar.set_postfix_str(f"W_{e}...W_{s} ({side}x{side} Gram)")
    norms.append(exact_lib.product_norm(chain, size.product,
                                        max_bytes=max_exact_bytes,
                                        sweeps=sweeps))
    bar.update(1)
  bar.close()
  return np.asarray(norms, np.float64)


def class_row_factor(chain, *, kind: str, layer_norms: dict,
                     large_class_threshold: int) -> float:
  """``1 + max_s a_s / g_s`` for the float64 class-row norms of a bound.

  Per-class and pairwise bounds use the exact norms ``g_s = ||r^T W_{N-1}
  ... W_s||`` of class rows ``r`` (``e_i`` or ``e_i - e_j``), computed in
  float64 by pushing the rows through the adjoints. Each is off by at most
  ``a_s = ||r|| F_s`` (:func:`matvec_error`'s one-sweep ``F`` for
  ``W_{N-1} ... W_s``). The bounds are sums of the ``g_s`` with nonnegative
  coefficients, so multiplying the bound by this factor covers every row.
  A row norm of 0 gives an infinite factor (the bound then never
  certifies). Above ``large_class_threshold`` classes the pairwise bound
  uses only the last layer's rows (the large-class fallback), and so does
  this factor: pushing ``K(K-1)/2`` rows through every layer is what the
  fallback avoids.
  """
  if kind == "global":
    return 1.0
  from lipjax import bounds as bounds_lib  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  n = chain.num_layers
  first = (n - 1 if kind == "pairwise"
           and chain.num_classes > large_class_threshold else 0)
  with jax.enable_x64(True):
    rows = bounds_lib.class_row_norms(chain.astype(np.float64), kind=kind,
                                      down_to=first)
    rows = [None if g is None else np.asarray(g) for g in rows]
  row_norm = math.sqrt(2.0) if kind == "pairwise" else 1.0
  worst = 0.0
  for s_ in range(first, n):
    allowance = row_norm * (
        _sweep_error(chain, (s_, n - 1), layer_norms)[1]
        + interior_scale_allowance(chain, (s_, n - 1), layer_norms,
                                   row_on_left=True))
    smallest = float(np.min(rows[s_])) if rows[s_].size else math.inf
    worst = max(worst, allowance / smallest if smallest > 0 else math.inf)
  return 1.0 + worst


def _lanczos_run(chain, products, *, delta, seed, target_factor, max_steps,
                 progress, sweeps="fused") -> lanczos.LanczosRun:
  """Lanczos for ``products``, stopped once every factor is on target.

  The stopping test ignores the evaluation error allowance (it only decides
  when to stop; :func:`certify_norms` then certifies with it).
  """
  delta_p = delta / len(products)
  dims = {p: exact_lib.gram_size(chain, p).side for p in products}

  def done(batch, alphas, betas):
    for p, a, b in zip(batch, alphas, betas):
      bound, details = guarantee.certified_square_norm(
          a, b, dim=dims[p], delta=delta_p, kw_stops=_stops(max_steps))
      top = details["theta_max"]
      if not (top > 0 and bound <= target_factor**2 * top):
        return False
    return True

  return lanczos.run(chain, products, max_steps=max_steps, done=done,
                     seed=seed, progress=progress, sweeps=sweeps)


def _stops(max_steps: int) -> int:
  """How many steps Lanczos may stop at (after each chunk)."""
  return -(-int(max_steps) // lanczos.CHUNK)


def _singles_first(products) -> list[int]:
  """Indices of ``products``, single layers first (their norms feed the
  evaluation allowance of the longer products)."""
  return sorted(range(len(products)),
                key=lambda i: products[i][1] - products[i][0])


def certify_norms(chain: LinearChain, products, *, use_exact,
                  delta: float = guarantee.DEFAULT_DELTA,
                  seed: int | None = None,
                  target_factor: float = guarantee.DEFAULT_TARGET_FACTOR,
                  max_steps: int = guarantee.DEFAULT_MAX_STEPS,
                  max_exact_bytes: int = exact_lib.DEFAULT_MAX_BYTES,
                  progress: bool = False,
                  layer_norms_out: dict | None = None,
                  deterministic: bool = False,
                  layer_norms_in: dict | None = None,
                  interior_scales: bool = True,
                  sweeps: str = "fused") -> NormCertificate:
  """Certified upper bounds on the norms of ``products``.

  Args:
    chain: the network's chain, with concrete (not traced) arrays.
    products: the ``(s, e)`` pairs.
    use_exact: ``[P]`` bools: exact norm for this product, else Lanczos.
    delta: total failure probability of the Lanczos norms, in (0, 1).
    seed: Lanczos start-vector seed; None draws one from OS entropy.
    target_factor: Lanczos stops once every product's certified factor
      (certified norm / largest Ritz norm) is at most this.
    max_steps: cap on the Krylov dimension.
    max_exact_bytes: per-product Gram matrix limit.
    progress: progress bars.
    layer_norms_out: if given, receives ``{k: certified ||W_k||}`` for the
      single-layer products (for :func:`class_row_factor`).
    deterministic: the products without exact norms get a bound by proof
      (:func:`lipjax.deterministic.split_bound`) instead of Lanczos.
    layer_norms_in: ``{k: upper bound on ||W_k||}`` for the rounding
      allowances, where the products do not include layer ``k`` alone.
    interior_scales: add :func:`interior_scale_allowance` to the products
      with scales inside (False: the caller accounts for its scales).
    sweeps: how Lanczos steps and exact Gram columns compile: ``"fused"``
      or ``"per_op"`` (:mod:`lipjax.per_op`; the same arithmetic).

  Returns:
    A :class:`NormCertificate`.

  Raises:
    ValueError: non-finite weights; bad ``delta`` or ``target_factor``.
  """
  check_finite(chain)
  delta = guarantee.check_delta(delta)
  if not target_factor > 1.0:
    raise ValueError(f"target_factor must be > 1, e.g. 1.0002; got "
                     f"{target_factor}.")
  products = tuple(tuple(p) for p in products)
  use_exact = np.asarray(use_exact, bool).reshape(len(products))
  sides = np.asarray([exact_lib.gram_size(chain, p).side for p in products],
                     np.int64)
  # Deterministic mode splits the products without exact norms instead.
  random = [i for i, e in enumerate(use_exact) if not e and not deterministic]
  exact_values = dict(zip(
      [i for i, e in enumerate(use_exact) if e],
      _exact_norms(chain, [p for p, e in zip(products, use_exact) if e],
                   max_exact_bytes, progress, sweeps)))
  run = None
  if random:
    run = _lanczos_run(chain, [products[i] for i in random], delta=delta,
                       seed=seed, target_factor=target_factor,
                       max_steps=max_steps, progress=progress,
                       sweeps=sweeps)
  delta_p = delta / len(random) if random else 0.0
  norms, upper = np.zeros(len(products)), np.zeros(len(products))
  steps = np.zeros(len(products), np.int64)
  epsilons, deltas = np.zeros(len(products)), np.zeros(len(products))
  # Certified single-layer norms, for the allowances.
  layer_norms = dict(layer_norms_in or {})
  splits, segment_cache = {}, {}

  def exact_certified(product, value):
    # Each Gram column is off by <= level: ||E|| <= sqrt(side) level.
    level = matvec_error(chain, product, layer_norms)
    side = exact_lib.gram_size(chain, product).side
    return math.sqrt(value**2 + math.sqrt(side) * level) * EXACT_SAFETY_FACTOR

  for i in _singles_first(products):
    level = matvec_error(chain, products[i], layer_norms)
    if use_exact[i]:
      norms[i] = exact_values[i]
      certified = exact_certified(products[i], exact_values[i])
    elif deterministic:
      certified, splits[products[i]] = deterministic_lib.split_bound(
          chain, products[i], max_bytes=max_exact_bytes, cache=segment_cache,
          exact_norm=lambda seg: exact_certified(seg, exact_lib.product_norm(
              chain, seg, max_bytes=max_exact_bytes, sweeps=sweeps)))
      norms[i] = certified
    else:
      r = run.products.index(products[i])
      bound, d = guarantee.certified_square_norm(
          run.alphas[r], run.betas[r], dim=int(sides[i]), delta=delta_p,
          matvec_error=level, kw_stops=_stops(max_steps))
      norms[i] = math.sqrt(d["theta_max"])
      certified = math.sqrt(bound)
      steps[i], epsilons[i], deltas[i] = d["steps"], d["kw_epsilon"], delta_p
    upper[i] = certified
    if products[i][0] == products[i][1]:
      layer_norms[products[i][0]] = certified
  if interior_scales:
    upper = upper + np.asarray([interior_scale_allowance(
        chain, p, layer_norms) for p in products])
  if not np.all(np.isfinite(upper)) or np.any(norms < 0):
    raise ValueError(f"A product norm came out non-finite or negative "
                     f"({norms}); refusing to certify with it.")
  seed = run.seed if run is not None else None
  if layer_norms_out is not None:
    layer_norms_out.update(layer_norms)
  return NormCertificate(
      products=products, norms=norms, upper=upper,
      factors=np.where(norms > 0, upper / np.where(norms > 0, norms, 1.0),
                       1.0),
      sources=tuple("exact" if e else ("split" if deterministic else
                                       "lanczos") for e in use_exact),
      dims=sides, steps=steps, epsilons=epsilons, deltas=deltas,
      delta=float(deltas.sum()), seed=seed, splits=splits)
