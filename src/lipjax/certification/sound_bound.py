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

A :class:`lipjax.residual_models.ResidualNet` gets
:func:`lipjax.bound`'s certified bound (:mod:`lipjax.residual_certified`),
with a row per map ``G(s, e)`` (or per single map for the naive bound) and
the other method's bound for comparison, plus what its float32 margin
needs (:mod:`lipjax.certification.float32_residual`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lipjax import api
from lipjax import bounds as bounds_lib
from lipjax import exact as exact_lib
from lipjax import guarantee
from lipjax import linear_maps
from lipjax import norm_certificates
from lipjax import residual_bounds
from lipjax import residual_certified
from lipjax import residual_graph
from lipjax import residual_models
from lipjax.certification import float32_residual


def _bytes(count: int) -> str:
  for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if count >= size:
      return f"{count / size:.2f} {unit}"
  return f"{count} bytes"


def _exact_choice(sizes, exact: bool | str, max_exact_bytes: int,
                  labels=None) -> list[bool]:
  """Which products get exact norms; with ``exact=True`` all or an error.

  ``labels`` name the products in the message (default ``W_e...W_s``).

  Raises:
    MemoryError: ``exact=True`` and some Gram matrix exceeds the limit (the
      message names every such product), before any work.
  """
  fits = [s.gram_bytes <= max_exact_bytes for s in sizes]
  if labels is None:
    labels = [f"W_{s.product[1]}...W_{s.product[0]}" for s in sizes]
  if exact is True and not all(fits):
    too_big = [f"{label} ({s.side}x{s.side}, {_bytes(s.gram_bytes)})"
               for label, s, f in zip(labels, sizes, fits) if not f]
    raise MemoryError(
        f"--exact: the float64 Gram matrices of {', '.join(too_big)} exceed "
        f"max_exact_bytes = {_bytes(max_exact_bytes)}. Raise "
        "--max_exact_gib if the machine has the memory, or drop --exact to "
        "bound those products by Lanczos (a randomized certificate).")
  return [bool(exact) and f for f in fits]


def _mode(certificate) -> str:
  return ("randomized" if "lanczos" in certificate.sources else
          "deterministic" if "split" in certificate.sources else "exact")


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


@jax.jit
def _tails_jit(chain, norms):
  return bounds_lib.liplt_pair_tails(chain, norms)


def chain_error_tails(chain, norms: np.ndarray, row_factor: float
                      ) -> tuple[np.ndarray, np.ndarray]:
  """Pairwise Lipschitz bounds from inside a plain chain to the logits.

  For the float32 evaluation margin
  (:func:`lipjax.certification.float32_error.logit_error_bounds`): a
  rounding error made at layer ``k``'s activation output reaches a class
  pair's logit difference through at most ``node_tails[k]`` times its L2
  norm (:func:`lipjax.bounds.liplt_pair_tails` from layer ``k + 1``; the
  last, ``k = N - 2``, is the logits layer's pair rows), and one made at
  the input through at most ``input_tail`` (the network's own pairwise
  bound, in pixel units).

  Args:
    chain: the chain with scales rounded up
      (:func:`lipjax.linear_maps.with_scales_rounded_up`).
    norms: certified upper bounds on the norms of
      ``required_products(N, method="liplt", kind="pairwise")``.
    row_factor: :func:`lipjax.norm_certificates.class_row_factor` for
      pairwise rows (covers their float64 evaluation and inner scales).

  Returns:
    ``(node_tails [N-1, K, K], input_tail [K, K])`` float64, upper bounds:
    sums of class-row norms with nonnegative coefficients, so the row
    factor covers them; the recursion's own float64 roundings get
    :data:`lipjax.residual_certified.ASSEMBLY_ROUNDING`.
  """
  expected = len(bounds_lib.required_products(
      chain.num_layers, method="liplt", kind="pairwise"))
  if np.shape(norms) != (expected,):
    raise ValueError(f"Expected the {expected} norms of a pairwise LipLT "
                     f"certificate, got shape {np.shape(norms)}.")
  with jax.enable_x64(True):
    tails = np.asarray(_tails_jit(chain.astype(jnp.float64),
                                  jnp.asarray(norms, jnp.float64)))
  tails = tails * (row_factor * (1.0 + residual_certified.ASSEMBLY_ROUNDING))
  return tails[1:], tails[0]


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
    model: the network (a SequentialNet, a chain's weights, or a
      ResidualNet).
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
    float64 per-layer bounds the float32-evaluation margin needs (for a
    ResidualNet in :func:`~lipjax.certification.float32_residual.op_norms`'
    layout, and the LipLT node bounds or ``inf``), and a JSON-able
    per-product report. The dict also has ``"error_tails"`` for a
    pairwise LipLT bound (:func:`chain_error_tails`, or for a ResidualNet
    :func:`lipjax.residual_certified.error_tails`), else None (and for a
    plain network above ``large_class_threshold`` classes).

  Raises:
    MemoryError: ``exact=True`` and some Gram matrix exceeds the limit.
    ValueError: non-finite weights (a ResidualNet's biases and batch-norm
      statistics too), bad settings.
  """
  bounds_lib.check_method_kind(method, kind)
  if exact not in (False, True, "auto"):
    raise ValueError(f"exact must be False, True or 'auto', got {exact!r}.")
  if guarantee_kind not in api.GUARANTEES:
    raise ValueError(f"guarantee must be one of {api.GUARANTEES}, got "
                     f"{guarantee_kind!r}.")
  deterministic = guarantee_kind == "deterministic"
  if isinstance(model, residual_models.ResidualNet):
    return _residual_sound_bound(
        model, method=method, kind=kind, exact=exact,
        max_exact_bytes=max_exact_bytes,
        large_class_threshold=large_class_threshold,
        deterministic=deterministic, delta=delta, seed=seed,
        target_factor=target_factor, max_steps=max_steps, progress=progress)
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
  # With the pairwise LipLT certificate's norms and class rows, the float32
  # margin carries each rounding error to the logits by the pairwise bound
  # from where it is made.
  results["error_tails"] = (chain_error_tails(
      chain, np.asarray([certified[p] for p in products], np.float64), rows)
                            if (method, kind) == ("liplt", "pairwise")
                            and chain.num_classes <= large_class_threshold
                            else None)
  product_rows = certificate.rows()
  for row, size in zip(product_rows, sizes):
    row.update(in_dim=size.in_dim, out_dim=size.out_dim,
               gram_side=size.side, gram_gib=size.gram_bytes / 2**30)
  report = {
      "method": method, "kind": kind, "mode": _mode(certificate),
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


# ----------------------------------------------------------------------------
# Residual networks (lipjax.residual_certified).


def _map_labels(graph, products, method: str) -> list[str]:
  """``G(s,e)`` for LipLT's maps; ``W[u]``, ``I+W[u]``, ``W[u.i]`` or
  ``S[u]`` (unit ``u`` = spec layer) for the naive bound's single maps."""
  if method == "liplt":
    return [f"G({s},{e})" for s, e in products]
  labels = []
  for u, i in products:
    unit = graph.units[u]
    if unit.kind == "linear_residual":
      labels.append(f"I+W[{u}]")
    elif unit.kind == "residual":
      labels.append(f"S[{u}]" if i == len(unit.ops) else f"W[{u}.{i}]")
    else:
      labels.append(f"W[{u}]")
  return labels


def _residual_maps(graph, method: str, kind: str):
  """``(products, labels, Gram sizes)`` of a bound's maps."""
  products = residual_bounds.required_products(graph, method=method,
                                               kind=kind)
  chains = residual_bounds.norm_chains(graph, products, method=method)
  sizes = [exact_lib.gram_size(c, (0, c.num_layers - 1)) for c in chains]
  return products, _map_labels(graph, products, method), sizes


def _residual_sound_bound(model, *, method: str, kind: str, exact,
                          max_exact_bytes: int, large_class_threshold: int,
                          deterministic: bool, delta: float, seed,
                          target_factor: float, max_steps: int,
                          progress: bool):
  """:func:`sound_bound` for a :class:`~lipjax.residual_models.ResidualNet`.

  The certifying bound is :func:`lipjax.bound`'s (the same maps, norms and
  seed give the same numbers); the other method's bound, with the same
  settings and seed, is for comparison only. The float32 margin's single
  map norms are bounds by proof (no probability), and its node bounds the
  certifying LipLT recursion's (``inf`` for a naive bound), so the whole
  certificate rests on the certifying bound's guarantee alone.
  """
  float32_residual.check_finite(model)
  graph = residual_graph.from_model(model)
  products, labels, sizes = _residual_maps(graph, method, kind)
  other = "naive" if method == "liplt" else "liplt"
  for maps in ((products, labels, sizes), _residual_maps(graph, other, kind)):
    _exact_choice(maps[2], exact, max_exact_bytes, maps[1])  # Before work.
  settings = dict(kind=kind, exact=exact, deterministic=deterministic,
                  delta=delta, target_factor=target_factor,
                  max_steps=max_steps, safety_factor=None, diagonal=0.0,
                  large_class_threshold=large_class_threshold,
                  max_exact_bytes=max_exact_bytes, progress=progress)
  value, certificate, _ = residual_certified.certified_bound(
      graph, method=method, seed=seed, **settings)
  other_value, other_certificate, _ = residual_certified.certified_bound(
      graph, method=other, seed=seed if certificate.seed is None
      else certificate.seed, **settings)
  results = {"bound": value, method: value, other: other_value,
             "layer_norms": float32_residual.op_norms(model),
             "lipschitz_to": _node_bounds(graph, certificate, products,
                                          method),
             # Where the certificate has the pairwise LipLT maps, the
             # float32 margin carries each rounding error to the logits by
             # the pairwise bound from where it is made.
             "error_tails": (residual_certified.error_tails(
                 graph, certificate.upper)
                             if (method, kind) == ("liplt", "pairwise")
                             else None)}
  report = _residual_report(certificate, (products, labels, sizes),
                            other_certificate, method=method, kind=kind,
                            exact=exact, delta=delta,
                            max_exact_bytes=max_exact_bytes,
                            target_factor=target_factor)
  return results, report


def _residual_report(certificate, maps, other_certificate, *, method: str,
                     kind: str, exact, delta: float, max_exact_bytes: int,
                     target_factor: float) -> dict:
  """The JSON-able report: one row per map, the guarantee, the comparison."""
  rows = certificate.rows()
  for row, product, label, size in zip(rows, *maps):
    row.update(product=list(product), layers=label, in_dim=size.in_dim,
               out_dim=size.out_dim, gram_side=size.side,
               gram_gib=size.gram_bytes / 2**30)
  return {
      "method": method, "kind": kind, "mode": _mode(certificate),
      "guarantee": certificate.guarantee, "delta": certificate.delta,
      "delta_requested": delta, "seed": certificate.seed,
      "target_factor": target_factor, "exact_requested": exact,
      "max_exact_gib": max_exact_bytes / 2**30, "network": "residual",
      "products": rows, "used_by_method": [list(p) for p in maps[0]],
      "comparison": {
          "method": "naive" if method == "liplt" else "liplt",
          "mode": _mode(other_certificate),
          "guarantee": other_certificate.guarantee},
      "note": ("Residual network: each row is one map of the bound "
               "(G(s,e): from the input, s = 0, or from node s-1's "
               "injection to node e, or to the logits; W[u], I+W[u], "
               "W[u.i], S[u]: single maps of spec layer u). Class rows are "
               "exact in every mode. The float32 margin uses single-map "
               "norms bounded by proof and the certifying bound's node "
               "bounds; the comparison bound certifies nothing."),
  }


def _node_bounds(graph, certificate, products, method: str) -> np.ndarray:
  """LipLT's ``m_j`` from the certified norms (inf without LipLT maps),
  raised by ``1e-12`` for their float64 recursion."""
  if method != "liplt":
    return np.full(graph.num_nodes, np.inf)
  m = residual_bounds.node_bounds(certificate.upper, products, graph.slopes,
                                  graph.num_nodes)
  return np.asarray([float(v) for v in m], np.float64) * (1.0 + 1e-12)
