"""PNG figures of a certification report (matplotlib, no display needed).

* :func:`accuracy_figure`: certified accuracy as a function of ε (the curve
  of all radii and the certified ε points), PGD accuracy at the ε points,
  and the clean accuracy as a horizontal line.
* :func:`radius_histogram`: the certified radii of correctly classified
  points, with the ε list marked.

Both take the report dict of :mod:`lipjax.certification.report` and return
PNG bytes, so that the caller can write them atomically.
"""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")  # Files only; never needs a display.
from matplotlib import pyplot as plt  # pylint: disable=wrong-import-position


def _title(report: dict) -> str:
  b = report["bound"]
  return (f"{report['dataset']} {report['split']} (n={report['num_examples']}"
          f"), {report['model']['architecture']}, step "
          f"{report['checkpoint_step']}\nbound {b['method']}/{b['kind']}, "
          f"{b['mode']} norms")


def _png(fig) -> bytes:
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
  plt.close(fig)
  return buffer.getvalue()


def _secondary_axis(ax, report: dict, what: str) -> None:
  """A top axis in normalized units when the report uses them."""
  scale = report["units"]["pixels_per_normalized_unit"]
  if report["units"]["normalized_units"]:
    top = ax.secondary_xaxis("top", functions=(lambda e: e / scale,
                                               lambda e: e * scale))
    top.set_xlabel(f"{what} after Normalize (reference units)")


def accuracy_figure(report: dict) -> bytes:
  """Certified and PGD accuracy vs ε with the clean accuracy line (PNG)."""
  fig, ax = plt.subplots(figsize=(7, 4.5))
  curve = report["certified_accuracy_curve"]
  eps = report["eps_pixel"]
  ax.plot(curve["eps_pixel"], curve["certified_fraction"], color="C0",
          linewidth=1.2, alpha=0.6, label="certified (all radii)")
  ax.plot(eps, report["certified_accuracy"], "o", color="C0",
          label="certified at ε")
  ax.plot(eps, report["pgd_accuracy"], "s--", color="C3",
          label=f"PGD-L2 ({report['pgd']['steps']} steps x "
                f"{report['pgd']['restarts']} restarts)")
  ax.axhline(report["clean_accuracy"], color="k", linestyle=":",
             label=f"clean {report['clean_accuracy']:.3f}")
  # The values as a small table: labels at nearby ε points would overlap.
  rows = ["    ε   cert.    PGD"] + [
      f"{e:5.3g}  {c:6.3f} {p:6.3f}" for e, c, p in zip(
          eps, report["certified_accuracy"], report["pgd_accuracy"])]
  ax.text(0.98, 0.97, "\n".join(rows), transform=ax.transAxes, ha="right",
          va="top", family="monospace", fontsize=8,
          bbox={"facecolor": "white", "edgecolor": "0.8", "alpha": 0.9})
  ax.set_xlim(0, curve["eps_pixel"][-1])
  ax.set_ylim(0, 1.02)
  ax.set_xlabel("ε (L2, [0, 1] pixel units)")
  ax.set_ylabel("accuracy")
  ax.grid(alpha=0.3)
  ax.legend(loc="lower left", fontsize=8)
  _secondary_axis(ax, report, "ε")
  ax.set_title(_title(report), fontsize=9)
  return _png(fig)


def radius_histogram(report: dict) -> bytes:
  """Histogram of certified radii of correctly classified points (PNG)."""
  fig, ax = plt.subplots(figsize=(7, 4.5))
  hist = report["radius"]["histogram_pixel"]
  edges, counts = hist["edges"], hist["counts"]
  widths = [b - a for a, b in zip(edges[:-1], edges[1:])]
  ax.bar(edges[:-1], counts, width=widths, align="edge", color="C0",
         edgecolor="white", linewidth=0.5)
  for i, e in enumerate(report["eps_pixel"]):
    ax.axvline(e, color="C3", linestyle="--", linewidth=1,
               label="ε list" if i == 0 else None)
  mean = float(report["radius"]["pixel"]["mean_over_correct"])
  ax.axvline(mean, color="k", linestyle=":", linewidth=1,
             label=f"mean {mean:.3f}")
  ax.set_xlabel("certified radius (L2, [0, 1] pixel units)")
  ax.set_ylabel("correctly classified points")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  _secondary_axis(ax, report, "radius")
  ax.set_title(_title(report), fontsize=9)
  return _png(fig)
