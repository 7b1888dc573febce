"""A sound Lipschitz bound for certification, with a per-product report.

Certification never trusts training's few warm-started power iterations.
:func:`sound_bound` computes the norm of every product ``W_e ... W_s`` that
the LipLT bound needs (the naive bound needs a subset, so both come from
one set of norms):

* exact float64 Gram-matrix norms (:mod:`lipjax.exact`, SPEC §7.6) where
  allowed: ``exact=True`` for all (or a MemoryError that names every
  product that does not fit, before any work), ``"auto"`` where the Gram
  matrix fits ``max_exact_bytes``; each times
  :data:`lipjax.EXACT_SAFETY_FACTOR` (1 + 1e-5);
* for the others, :func:`lipjax.power_iteration.converge` to a relative
  tolerance from the saved training vectors plus fresh random restarts,
  max over the starts, times :data:`lipjax.CONVERGED_SAFETY_FACTOR` (1.01,
  justified in :mod:`lipjax.api`; an estimate, not a proof).

The bounds are assembled in float64 and rounded up to float32 exactly as
:func:`lipjax.bound` does, so the same norms give the same numbers (tested);
unlike it, this module shows progress per exact product and reports every
norm with its source, safety factor and power-iteration residual.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from lipjax import api
from lipjax import bounds as bounds_lib
from lipjax import exact as exact_lib
from lipjax import linear_maps
from lipjax import power_iteration
from lipjax.progress import progress_bar


def _warm_state(chain, products, saved, key) -> power_iteration.PowerState:
  """Fresh vectors for ``products``, warm rows copied from ``saved``."""
  fresh = power_iteration.init(chain, products, key)
  if saved is None:
    return fresh
  saved_rows = {}
  for s, v in zip(saved.starts, saved.vectors):
    ends = [e for ps, e in saved.products if ps == s]
    saved_rows.update({(s, e): np.asarray(v[r]) for r, e in enumerate(ends)})
  vectors = []
  for s, v in zip(fresh.starts, fresh.vectors):
    v = np.array(v)
    ends = [e for ps, e in fresh.products if ps == s]
    for r, e in enumerate(ends):
      if (s, e) in saved_rows and saved_rows[(s, e)].shape == v[r].shape:
        v[r] = saved_rows[(s, e)]
    vectors.append(jnp.asarray(v))
  return dataclasses.replace(fresh, vectors=tuple(vectors))


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
        "use converged power iteration for those products.")
  return [bool(exact) and f for f in fits]


def _converged_norms(chain, products, state, entries, *, key, rtol,
                     max_iterations, restarts) -> dict:
  """Converged power-iteration norms of ``products`` into ``entries``.

  Returns:
    The convergence summary of the report.
  """
  warm = _warm_state(chain, products, state, jax.random.fold_in(key, 1))
  _, info = power_iteration.converge(
      chain, warm, key=key, rtol=rtol, max_iterations=max_iterations,
      restarts=restarts)
  for i, p in enumerate(info.products):
    entries[p].update(
        source="converged", norm=float(info.norms[i]),
        safety_factor=api.CONVERGED_SAFETY_FACTOR,
        residual=float(info.residuals[i]),
        relative_change=float(info.relative_change[i]),
        warm_start_won=bool(np.argmax(info.per_start[:, i]) == 0))
  return {"iterations": info.iterations, "converged": info.converged,
          "rtol": rtol, "restarts": restarts,
          "max_iterations": max_iterations}


def _exact_norms(chain, products, entries, *, max_exact_bytes: int,
                 progress: bool) -> None:
  """Exact float64 Gram norms of ``products`` into ``entries``.

  One product at a time, so that the bar names the one being computed (a
  12544-wide Gram matrix takes minutes on a CPU).
  """
  if not products:
    return
  bar = progress_bar(total=len(products), initial=0,
                     description="exact norms", enabled=progress)
  for p in products:
    side = entries[p]["gram_side"]
    bar.set_postfix_str(f"{entries[p]['layers']} ({side}x{side} Gram)")
    value = exact_lib.product_norm(chain, p, max_bytes=max_exact_bytes)
    entries[p].update(source="exact", norm=float(value),
                      safety_factor=api.EXACT_SAFETY_FACTOR)
    bar.update(1)
  bar.close()


def sound_bound(model, *, method: str, kind: str,
                state: power_iteration.PowerState | None,
                exact: bool | str = "auto",
                max_exact_bytes: int = exact_lib.DEFAULT_MAX_BYTES,
                large_class_threshold: int = (
                    bounds_lib.DEFAULT_LARGE_CLASS_THRESHOLD),
                key: jax.Array | None = None, rtol: float = 1e-6,
                max_iterations: int = 2000, restarts: int = 2,
                progress: bool = False) -> tuple[dict[str, np.ndarray], dict]:
  """The bound of ``method`` and, for comparison, LipLT and naive bounds.

  Computes the norms of every LipLT product once (naive needs a subset):
  exact where allowed (``exact=True``: all, or a MemoryError before any
  work; ``"auto"``: where the Gram matrix fits ``max_exact_bytes``), the rest
  by :func:`lipjax.power_iteration.converge` from the saved vectors plus
  ``restarts`` random starts. Each norm is multiplied by its safety factor
  and the bounds are assembled in float64 and rounded up to float32, as
  :func:`lipjax.bound` does (same numbers for the same norms).

  Args:
    model: the network.
    method, kind: the bound that certifies (the one training used).
    state: the saved power state (warm vectors), or None.
    exact: True, ``"auto"`` or False.
    max_exact_bytes: per-product Gram matrix limit.
    large_class_threshold: as in :func:`lipjax.bound`.
    key: PRNG key of the random restarts (default ``key(0)``).
    rtol, max_iterations, restarts: power-iteration settings.
    progress: a progress bar over the exact norms.

  Returns:
    ``({"bound", "liplt", "naive"}, report)``: float32 bounds (scalar, [K] or
    [K, K] by ``kind``) and a JSON-able per-product report.

  Raises:
    MemoryError: ``exact=True`` and some Gram matrix exceeds the limit.
  """
  bounds_lib.check_method_kind(method, kind)
  if exact not in (False, True, "auto"):
    raise ValueError(f"exact must be False, True or 'auto', got {exact!r}.")
  chain = linear_maps.to_chain(model)
  key = jax.random.key(0) if key is None else key
  products = bounds_lib.required_products(chain.num_layers, method="liplt",
                                          kind=kind)
  sizes = [exact_lib.gram_size(chain, p) for p in products]
  use_exact = _exact_choice(sizes, exact, max_exact_bytes)
  entries = {p: {"product": list(p), "layers": f"W_{p[1]}...W_{p[0]}",
                 "in_dim": s.in_dim, "out_dim": s.out_dim,
                 "gram_side": s.side, "gram_gib": s.gram_bytes / 2**30}
             for p, s in zip(products, sizes)}
  iterated = [p for p, e in zip(products, use_exact) if not e]
  convergence = _converged_norms(
      chain, iterated, state, entries, key=key, rtol=rtol,
      max_iterations=max_iterations, restarts=restarts) if iterated else None
  _exact_norms(chain, [p for p, e in zip(products, use_exact) if e], entries,
               max_exact_bytes=max_exact_bytes, progress=progress)
  results = {}
  for name in ("liplt", "naive"):
    needed = bounds_lib.required_products(chain.num_layers, method=name,
                                          kind=kind)
    norms = np.asarray([entries[p]["norm"] * entries[p]["safety_factor"]
                        for p in needed], np.float64)
    results[name] = api.assemble_bound_float64(
        chain, norms, method=name, kind=kind,
        large_class_threshold=large_class_threshold)
  results["bound"] = results[method]
  sources = {entries[p]["source"] for p in products}
  mode = ("exact" if sources == {"exact"} else "converged"
          if sources == {"converged"} else "mixed") if products else "exact"
  report = {
      "method": method, "kind": kind, "mode": mode,
      "exact_requested": exact, "max_exact_gib": max_exact_bytes / 2**30,
      "products": [entries[p] for p in products],
      "used_by_method": [list(p) for p in bounds_lib.required_products(
          chain.num_layers, method=method, kind=kind)],
      "convergence": convergence,
      "note": ("Norms involving the last layer contracted with class "
               "vectors are exact in every mode (SPEC §2.3); each product "
               "norm is multiplied by its safety factor."),
  }
  return results, report
