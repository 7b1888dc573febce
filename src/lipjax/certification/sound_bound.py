"""The bound a certificate rests on, with a per-product report.

Certification never uses training's warm-started power iterations (they
estimate norms from below). :func:`sound_bound` certifies the norm of every
product ``W_e ... W_s`` that the LipLT bound needs (the naive bound needs a
subset, so both come from one set of norms) with
:func:`lipjax.norm_certificates.certify_norms`:

* exact float64 Gram-matrix norms where allowed: ``exact=True`` for all (or
  a MemoryError that names every product that does not fit, before any
  work), ``"auto"`` where the Gram matrix fits ``max_exact_bytes``; each times
  :data:`lipjax.EXACT_SAFETY_FACTOR` (1 + 1e-5);
* for the others, float64 Lanczos from fresh random starts, times the
  Kuczynski-Wozniakowski factor, so that all of them hold at once with
  probability at least ``1 - delta`` over the start vectors.

The bounds are assembled in float64 and rounded up to float32 exactly as
:func:`lipjax.bound` does, so the same norms give the same numbers (tested).
The report lists every product's source, norm, factor, Lanczos steps, KW
epsilon and failure probability, and states the guarantee with its seed.
"""

from __future__ import annotations

import numpy as np

from lipjax import api
from lipjax import bounds as bounds_lib
from lipjax import exact as exact_lib
from lipjax import guarantee
from lipjax import linear_maps
from lipjax import norm_certificates


def _bytes(count: int) -> str:
  for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if count >= size:
      return f"{count / size:.2f} {unit}"
  return f"{count} bytes"


def _exact_choice(sizes, exact: bool | str, max_exact_bytes: int
                  ) -> list[bool]:
  """Which products get exact norms; with ``exact=True`` all or an error.

  Raises:
    MemoryError: ``exact=True`` and some Gram matrix exceeds the limit (the
      message names every such product), before any work.
  """
  fits = [s.gram_bytes <= max_exact_bytes for s in sizes]
  if exact is True and not all(fits):
    too_big = [f"W_{s.product[1]}...W_{s.product[0]} ({s.side}x{s.side}, "
               f"{_bytes(s.gram_bytes)})" for s, f in zip(sizes, fits)
               if not f]
    raise MemoryError(
        f"--exact: the float64 Gram matrices of {', '.join(too_big)} exceed "
        f"max_exact_bytes = {_bytes(max_exact_bytes)}. Raise "
        "--max_exact_gib if the machine has the memory, or drop --exact to "
        "bound those products by Lanczos (a randomized certificate).")
  return [bool(exact) and f for f in fits]


def _layer_bounds(chain, certified: dict) -> dict[str, np.ndarray]:
  """Certified single-layer norms and Lipschitz bounds up to each layer.

  What :mod:`lipjax.certification.float32_error` needs: ``layer_norms [N]``
  (the last layer's exact, it is small) and ``lipschitz_to [N - 1]``, the
  LipLT bound from the input to each layer's output before its activation.
  """
  n = chain.num_layers
  last = float(norm_certificates.certify_norms(
      chain, [(n - 1, n - 1)], use_exact=[True]).certified[0])
  layer_norms = np.asarray([certified[(k, k)] for k in range(n - 1)]
                           + [last], np.float64)
  products = [p for p in bounds_lib.required_products(
      n, method="liplt", kind="global") if p[1] < n - 1]
  m = bounds_lib.liplt_layer_bounds(
      np.asarray([certified[p] for p in products], np.float64), products,
      chain.slopes, n - 1)
  return {"layer_norms": layer_norms,
          "lipschitz_to": np.asarray([float(v) for v in m], np.float64)}


def sound_bound(model, *, method: str, kind: str,
                exact: bool | str = "auto",
                max_exact_bytes: int = exact_lib.DEFAULT_MAX_BYTES,
                large_class_threshold: int = (
                    bounds_lib.DEFAULT_LARGE_CLASS_THRESHOLD),
                guarantee_kind: str = "randomized",
                delta: float = guarantee.DEFAULT_DELTA,
                seed: int | None = None,
                target_factor: float = guarantee.DEFAULT_TARGET_FACTOR,
                max_steps: int = guarantee.DEFAULT_MAX_STEPS,
                progress: bool = False) -> tuple[dict[str, np.ndarray], dict]:
  """The bound of ``method`` and, for comparison, LipLT and naive bounds.

  Args:
    model: the network.
    method, kind: the bound that certifies (the one training used).
    exact: True, ``"auto"`` or False.
    max_exact_bytes: per-product Gram matrix limit.
    large_class_threshold: as in :func:`lipjax.bound`.
    guarantee_kind: ``"randomized"`` (Lanczos where exact norms do not fit)
      or ``"deterministic"`` (a bound by proof there; see
      :func:`lipjax.bound`).
    delta: failure probability of the whole certificate (Lanczos norms).
    seed: Lanczos start-vector seed; None draws one from OS entropy.
    target_factor, max_steps: Lanczos settings (see :func:`lipjax.bound`).
    progress: progress bars over the norms.

  Returns:
    ``({"bound", "liplt", "naive", "layer_norms", "lipschitz_to"},
    report)``: float32 bounds (scalar, [K] or [K, K] by ``kind``), the
    float64 per-layer bounds the float32-evaluation margin needs, and a
    JSON-able per-product report.

  Raises:
    MemoryError: ``exact=True`` and some Gram matrix exceeds the limit.
    ValueError: non-finite weights, bad settings.
  """
  bounds_lib.check_method_kind(method, kind)
  if exact not in (False, True, "auto"):
    raise ValueError(f"exact must be False, True or 'auto', got {exact!r}.")
  if guarantee_kind not in api.GUARANTEES:
    raise ValueError(f"guarantee must be one of {api.GUARANTEES}, got "
                     f"{guarantee_kind!r}.")
  deterministic = guarantee_kind == "deterministic"
  if deterministic and exact is False:
    exact = "auto"  # Exact wherever it fits, a proof elsewhere.
  chain = linear_maps.with_scales_rounded_up(linear_maps.to_chain(model))
  products = bounds_lib.required_products(chain.num_layers, method="liplt",
                                          kind=kind)
  sizes = [exact_lib.gram_size(chain, p) for p in products]
  layer_norms = {}
  certificate = norm_certificates.certify_norms(
      chain, products, use_exact=_exact_choice(sizes, exact, max_exact_bytes),
      delta=delta, seed=seed, target_factor=target_factor,
      max_steps=max_steps, max_exact_bytes=max_exact_bytes,
      progress=progress, layer_norms_out=layer_norms,
      deterministic=deterministic)
  certified = dict(zip(products, certificate.certified))
  rows = norm_certificates.class_row_factor(
      chain, kind=kind, layer_norms=layer_norms,
      large_class_threshold=large_class_threshold)
  results = {}
  for name in ("liplt", "naive"):
    needed = bounds_lib.required_products(chain.num_layers, method=name,
                                          kind=kind)
    value = api.assemble_bound_float64(
        chain, np.asarray([certified[p] for p in needed], np.float64),
        method=name, kind=kind, large_class_threshold=large_class_threshold)
    results[name] = api.round_up_to_float32(value.astype(np.float64) * rows)
  results["bound"] = results[method]
  results.update(_layer_bounds(chain, certified))
  product_rows = certificate.rows()
  for row, size in zip(product_rows, sizes):
    row.update(in_dim=size.in_dim, out_dim=size.out_dim,
               gram_side=size.side, gram_gib=size.gram_bytes / 2**30)
  report = {
      "method": method, "kind": kind,
      "mode": ("randomized" if "lanczos" in certificate.sources else
               "deterministic" if "split" in certificate.sources else "exact"),
      "guarantee": certificate.guarantee, "delta": certificate.delta,
      "delta_requested": delta, "seed": certificate.seed,
      "target_factor": target_factor,
      "exact_requested": exact, "max_exact_gib": max_exact_bytes / 2**30,
      "products": product_rows, "class_row_factor": rows,
      "used_by_method": [list(p) for p in bounds_lib.required_products(
          chain.num_layers, method=method, kind=kind)],
      "note": ("Norms involving the last layer contracted with class "
               "vectors are exact in every mode; each product norm is "
               "multiplied by its factor (exact: 1 + 1e-5; lanczos: "
               "sqrt((1 + 1e-7) / (1 - epsilon)) from the "
               "Kuczynski-Wozniakowski bound at that product's delta)."),
  }
  return results, report
