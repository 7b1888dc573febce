"""The certification report: JSON, figures and the stdout table.

:func:`build_report` turns the arrays of :func:`lipjax.certification.pipeline.run`
into one JSON-able dict (every number, the bound mode, units, versions,
timings); :func:`write` puts ``certify_step<N>.json`` and two PNG figures in
the workdir or another folder, and the same files at the stable names
``certify.json``, ... while N is the newest step certified (atomically,
never touching a training file); :func:`format_table` is the
human-readable summary.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import math
import os
import platform
import sys
import tempfile

import jax
import numpy as np

from lipjax.certification import radii

FORMAT = "lipjax.certify/1"
_HISTOGRAM_BINS = 40
_MATRIX_MAX_CLASSES = 20


def _finite(value) -> float | str:
  value = float(value)
  return value if math.isfinite(value) else str(value)  # JSON has no inf.


def _stats(values: np.ndarray) -> dict:
  if values.size == 0:
    return {"count": 0}
  return {"count": int(values.size), "min": _finite(values.min()),
          "mean": _finite(values.mean()), "max": _finite(values.max())}


def versions() -> dict:
  def version(name):
    try:
      return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      return None
  device = jax.devices()[0]
  return {"lipjax": version("lipjax"), "jax": version("jax"),
          "jaxlib": version("jaxlib"), "flax": version("flax"),
          "orbax-checkpoint": version("orbax-checkpoint"),
          "numpy": version("numpy"), "python": sys.version.split()[0],
          "platform": platform.platform(),
          "device": f"{device.platform}: {device.device_kind}",
          "device_count": jax.device_count()}


def _bound_stats(bounds: dict, lip: np.ndarray, num_classes: int) -> dict:
  """Effective pairwise bounds ``L_ij`` (i < j): certifying, LipLT, naive."""
  first, second = np.triu_indices(num_classes, k=1)
  pairs = {name: np.asarray(radii.pairwise_lipschitz(
      np.asarray(value, np.float64), num_classes))[first, second]
           for name, value in (("certifying", lip),
                               ("liplt", bounds["liplt"]),
                               ("naive", bounds["naive"]))}
  ratio = pairs["liplt"] / np.maximum(pairs["naive"], 1e-300)
  result = {f"{name}_pairwise": _stats(v) for name, v in pairs.items()}
  result["liplt_over_naive"] = _stats(ratio)
  result["fraction_liplt_tighter"] = float(np.mean(ratio < 1))
  if num_classes <= _MATRIX_MAX_CLASSES:
    result["matrices"] = {name: np.asarray(value, np.float64).tolist()
                          for name, value in (("certifying", lip),
                                              ("liplt", bounds["liplt"]),
                                              ("naive", bounds["naive"]))}
  return result


def _radius_stats(radius: np.ndarray, correct: np.ndarray, scale: float,
                  normalized_units: bool) -> dict:
  """Radius statistics in pixel units (and normalized ones if asked)."""
  clipped = np.maximum(radius, 0.0)  # Misclassified points certify nothing.
  finite = clipped[np.isfinite(clipped)]
  positive = radius[correct & np.isfinite(radius)]
  top = float(positive.max()) if positive.size else 1.0
  counts, edges = np.histogram(positive, bins=_HISTOGRAM_BINS,
                               range=(0.0, max(top, 1e-6)))

  def summary(unit):
    return {
        "mean_over_correct": _finite(np.mean(radius[correct]) / unit)
        if correct.any() else 0.0,
        "mean_over_all": _finite(np.mean(clipped) / unit),
        "median_over_all": _finite(np.median(clipped) / unit),
        "quantiles_over_all": {str(q): _finite(np.quantile(finite, q) / unit)
                               for q in (0.1, 0.25, 0.5, 0.75, 0.9)}
        if finite.size else {},
        "max": _finite(np.max(clipped) / unit)}

  result = {"pixel": summary(1.0),
            "fraction_positive": float(np.mean(radius > 0)),
            "histogram_pixel": {"edges": edges.tolist(),
                                "counts": counts.tolist(),
                                "of": "radii of correctly classified points"}}
  if normalized_units:
    result["normalized"] = summary(scale)
  return result


def _curve(radius: np.ndarray, eps_pixel: np.ndarray) -> dict:
  """Fraction of points with radius > eps on a grid (for the figure)."""
  finite = radius[np.isfinite(radius) & (radius > 0)]
  top = max([float(np.max(eps_pixel, initial=0.0)) * 1.25,
             float(np.quantile(finite, 0.99)) if finite.size else 0.0, 1e-3])
  grid = np.linspace(0.0, top, 101)
  fraction = (radius[None, :] > grid[:, None]).mean(axis=1)
  return {"eps_pixel": grid.tolist(), "certified_fraction": fraction.tolist(),
          "note": "fraction with certified radius > eps"}


def build_report(*, restored, split, dataset, logits, radius, certified,
                 robust, eps_pixel, scale, normalized_units, bounds,
                 bound_report, lip, audit, timings, pgd,
                 total_seconds) -> dict:
  """Collects every number of a certification run into a JSON-able dict."""
  config = restored.config
  labels = dataset.labels
  num_classes = dataset.num_classes
  correct = np.argmax(logits, axis=1) == labels
  per_class = []
  for k in range(num_classes):
    mask = labels == k
    n = int(mask.sum())

    def frac(values, mask=mask, n=n):  # [N] -> float, [E, N] -> [E]
      return (np.asarray(values)[..., mask].sum(-1) / max(n, 1)).tolist()

    per_class.append({
        "class": k, "count": n, "clean_accuracy": frac(correct),
        "certified_accuracy": frac(certified), "pgd_accuracy": frac(robust),
        "mean_radius_over_correct": _finite(
            np.mean(radius[mask & correct])) if (mask & correct).any()
            else 0.0})
  return {
      "format": FORMAT,
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec="seconds"),
      "command": sys.argv,
      "workdir": restored.workdir, "checkpoint_step": restored.step,
      "dataset": config.data.name, "split": split,
      "num_examples": int(len(labels)), "num_classes": num_classes,
      "model": {"architecture": config.model.architecture,
                "activation": config.model.activation,
                "input_mean": config.model.input_mean,
                "input_std": config.model.input_std},
      "units": {
          "eps_and_radii": "L2 distance in [0, 1] pixel units (the model "
                           "normalizes its input itself)",
          "normalized_units": normalized_units,
          "pixels_per_normalized_unit": scale,
          "note": ("eps_normalized = eps_pixel / std: distances measured "
                   "after the model's Normalize(mean, std), the reference "
                   "code's CIFAR-10 convention") if normalized_units else
                  "--normalized_units also reports eps after Normalize."},
      "eps_pixel": eps_pixel.astype(float).tolist(),
      "eps_normalized": (eps_pixel / scale).astype(float).tolist()
                        if normalized_units else None,
      "clean_accuracy": float(correct.mean()),
      "certified_accuracy": certified.mean(axis=1).astype(float).tolist(),
      "pgd_accuracy": robust.mean(axis=1).astype(float).tolist(),
      "radius": _radius_stats(radius, correct, scale, normalized_units),
      "certified_accuracy_curve": _curve(radius, eps_pixel),
      "per_class": per_class,
      "bound": dict(bound_report, statistics=_bound_stats(bounds, lip,
                                                          num_classes)),
      "pgd": pgd,
      "audit": audit,
      "timings_seconds": dict(timings, total=total_seconds),
      "versions": versions(),
  }


class OutputError(OSError):
  """The results cannot be written where they should go."""


def _atomic_write_bytes(path: str, payload: bytes) -> None:
  """Writes ``path`` whole or not at all: a temporary file, then os.replace.

  The temporary file is in the same folder (so the rename is atomic) and is
  removed if anything fails, so no partial or empty file is left behind.
  """
  tmp = f"{path}.tmp.{os.getpid()}"  # open(), not mkstemp: umask modes.
  try:
    with open(tmp, "wb") as f:
      f.write(payload)
    os.replace(tmp, path)
  except BaseException:
    if os.path.lexists(tmp):
      os.remove(tmp)
    raise


def output_paths(folder: str, split: str, step: int | None = None
                 ) -> dict[str, str]:
  """Where a report goes: ``certify*.json`` and two ``certify*.png``.

  ``step=None`` gives the stable names (``certify.json``,
  ``certify_accuracy.png``, ``certify_radii.png``), a step the names of that
  checkpoint's results (``certify_step500.json``, ...). Another split than
  ``test`` adds ``_<split>`` after ``certify``.
  """
  stem = "certify" + ("" if split == "test" else f"_{split}") + (
      "" if step is None else f"_step{int(step)}")
  return {name: os.path.join(folder, f"{stem}{ext}")
          for name, ext in (("json", ".json"),
                            ("accuracy_png", "_accuracy.png"),
                            ("radii_png", "_radii.png"))}


def check_output_dir(folder: str) -> str:
  """The absolute ``folder``, once a file could be created there.

  Run before the certification, so that a read-only or missing folder is
  reported in seconds, not after the work. A folder that does not exist yet
  is checked through its nearest existing parent (:func:`write` creates it).

  Raises:
    OutputError: naming the folder and the reason.
  """
  folder = os.path.abspath(folder)
  existing = folder
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  try:
    if not os.path.isdir(existing):
      raise NotADirectoryError(f"{existing} is a file")
    fd, probe = tempfile.mkstemp(prefix=".certify-write-test.", dir=existing)
    os.close(fd)
    os.remove(probe)
  except OSError as error:
    raise OutputError(
        f"Cannot write the results to {folder} "
        f"({error.strerror or error}): make it writable, or pass "
        "--output_dir with a folder you can write.") from error
  return folder


def _newest_at_stable_name(path: str, step: int) -> bool:
  """Whether a report of ``step`` should replace the one at ``path``.

  The stable names hold the newest checkpoint certified so far: certifying
  an older ``--checkpoint`` leaves them alone. An unreadable file there is
  replaced.
  """
  try:
    with open(path, encoding="utf-8") as f:
      return int(json.load(f)["checkpoint_step"]) <= step
  except (OSError, ValueError, KeyError, TypeError):
    return True


def write(report: dict, folder: str | None = None) -> list[str]:
  """Writes the JSON and the figures; returns the paths written.

  Every file is named by the checkpoint step (:func:`output_paths`), so
  certifying another checkpoint never overwrites earlier results; the same
  files also go to the stable names unless those hold a newer checkpoint.
  Both figures are drawn before anything is written. In each set the
  figures go first and the JSON last, each whole or not at all
  (:func:`_atomic_write_bytes`), so a complete JSON implies its figures.

  Args:
    report: from :func:`build_report`.
    folder: where to write; default the report's workdir (created if
      missing).

  Raises:
    OSError: a file could not be written (nothing partial is left).
  """
  from lipjax.certification import figures  # pylint: disable=import-outside-toplevel
  folder = report["workdir"] if folder is None else folder
  payloads = {
      "accuracy_png": figures.accuracy_figure(report),
      "radii_png": figures.radius_histogram(report),
      "json": (json.dumps(report, indent=2, allow_nan=False)
               + "\n").encode("utf-8")}
  os.makedirs(folder, exist_ok=True)
  step = int(report["checkpoint_step"])
  sets = [output_paths(folder, report["split"], step)]
  stable = output_paths(folder, report["split"])
  if _newest_at_stable_name(stable["json"], step):
    sets.append(stable)
  written = []
  for paths in sets:
    for name in ("accuracy_png", "radii_png", "json"):
      _atomic_write_bytes(paths[name], payloads[name])
      written.append(paths[name])
  return written


def format_table(report: dict) -> str:
  """A readable summary: accuracies per ε, per class, bound, audit, times."""
  lines = []
  norm = report["eps_normalized"]
  lines.append(f"lipjax certify: {report['workdir']} (step "
               f"{report['checkpoint_step']}), {report['dataset']} "
               f"{report['split']}, {report['num_examples']} examples")
  b = report["bound"]
  sources = [p["source"] for p in b["products"]]
  lines.append(f"bound: {b['method']}/{b['kind']}, {b['mode']} "
               f"({sources.count('exact')} exact, "
               f"{sources.count('lanczos')} Lanczos, "
               f"{sources.count('split')} split products)"
               + (f"  ** SCALED BY {b['bound_scale']} (TESTING) **"
                  if b["bound_scale"] != 1 else ""))
  lines.append(f"guarantee: {b['guarantee']}")
  margin = b.get("float32_margin")
  if margin:
    exact = ", ".join(f"{v:.4f}" for v in
                      margin["certified_accuracy_exact_arithmetic"])
    if "margin_shrink_max" in margin:
      cost = (f"margins shrink by {margin['margin_shrink_median']:.3g} "
              f"(median; at most {margin['margin_shrink_max']:.3g}) per "
              f"class pair, bounds grow by at most "
              f"{margin['slope_growth_max']:.3g}")
    else:  # A report written before the per-pair numbers.
      cost = (f"margins shrink by up to {2 * margin['elementwise_max']:.3g}"
              f" + {margin['l2_max']:.3g} per class pair, bounds grow by "
              f"{margin['l2_slope']:.3g}")
    lines.append(f"float32 evaluation covered: {cost}; certified in exact "
                 f"arithmetic alone: {exact}")
  header = "  eps (pixel)" + ("  eps (norm.)" if norm else "") + \
      "   certified      PGD    clean"
  lines += ["", header, "  " + "-" * (len(header) - 2)]
  for i, e in enumerate(report["eps_pixel"]):
    lines.append(f"  {e:11.4f}" + (f"  {norm[i]:11.4f}" if norm else "")
                 + f"   {report['certified_accuracy'][i]:9.4f}"
                 f"  {report['pgd_accuracy'][i]:7.4f}"
                 f"  {report['clean_accuracy']:7.4f}")
  r = {k: float(v) for k, v in report["radius"]["pixel"].items()
       if not isinstance(v, dict)}  # float("inf") reads JSON's "inf".
  lines += ["", f"radius (pixel): mean over correct "
            f"{r['mean_over_correct']:.4f}, mean over all "
            f"{r['mean_over_all']:.4f}, median {r['median_over_all']:.4f}, "
            f"max {r['max']:.4f}"]
  if report["num_classes"] <= _MATRIX_MAX_CLASSES:
    eps_cols = "".join(f"  cert@{e:<6.3g}" for e in report["eps_pixel"])
    lines += ["", f"  class  count   clean{eps_cols}"]
    for c in report["per_class"]:
      lines.append(f"  {c['class']:5d}  {c['count']:5d}  "
                   f"{c['clean_accuracy']:6.4f}" + "".join(
                       f"  {v:11.4f}" for v in c["certified_accuracy"]))
  s = b["statistics"]
  lines += ["", "products: source, norm x factor (Lanczos: Krylov "
            "dimension, KW epsilon, failure probability)"]
  for p in b["products"]:
    extra = (f"  steps {p['steps']}, epsilon {p['epsilon']:.2e}, delta "
             f"{p['delta']:.2e}" if p["source"] == "lanczos" else "")
    lines.append(f"  {p['layers']:>14}  {p['source']:8}  {p['norm']:.6g} x "
                 f"{p['factor']:.6g}{extra}")
  ratio = s["liplt_over_naive"]
  if ratio["count"]:
    lines.append(f"LipLT / naive per pair: min {float(ratio['min']):.4f}, "
                 f"mean {float(ratio['mean']):.4f}, max "
                 f"{float(ratio['max']):.4f}; certifying L_ij mean "
                 f"{float(s['certifying_pairwise']['mean']):.4f}")
  a = report["audit"]
  lines += ["", f"audit: {a['attacked']} certified points attacked inside "
            f"{a['radius_factor']} x radius: {a['violations']} violations"
            + ("" if a["pgd_on_certified_violations"] is None else
               f"; PGD successes on points certified at their eps: "
               f"{a['pgd_on_certified_violations']}")]
  t = report["timings_seconds"]
  lines.append("time (s): " + ", ".join(f"{k} {v:.1f}" for k, v in t.items()))
  return "\n".join(lines)


def violation_banner(report: dict) -> str:
  """The loud multi-line message printed when the audit fails."""
  a = report["audit"]
  bar = "!" * 78
  lines = [bar, "!!! SOUNDNESS VIOLATION: PGD broke points that the bound "
           "certifies.", f"!!! audit (inside {a['radius_factor']} x radius): "
           f"{a['violations']} of {a['attacked']} certified points fooled"
           + ("." if a["pgd_on_certified_violations"] is None else
              f"; at the eps list: {a['pgd_on_certified_violations']}."),
           "!!! The Lipschitz bound is NOT an upper bound for this model; do "
           "not trust these certificates."]
  if report["bound"]["bound_scale"] != 1:
    lines.append(f"!!! (the bound was deliberately scaled by "
                 f"{report['bound']['bound_scale']} for testing)")
  for ex in a["examples"][:5]:
    lines.append(f"!!!   example {ex['index']} (label {ex['label']}): radius "
                 f"{ex['radius']:.4g}, fooled at distance "
                 f"{ex['adversarial_distance']:.4g}")
  lines.append(bar)
  return "\n".join(lines)
