"""Markdown tables for the Fashion-MNIST sweep and results runs.

  python -m experiments.fashion_mnist.summarize sweep OUTDIR
  python -m experiments.fashion_mnist.summarize results OUTDIR
  python -m experiments.fashion_mnist.summarize figure OUTDIR PNG

``sweep`` reads the final validation record of every ``OUTDIR/*/metrics.jsonl``
written by ``sweep.sh`` and ranks the points by their mean certified accuracy
over the evaluated radii (the selection rule fixed before the sweep ran).
``results`` reads ``OUTDIR/{crm,gloro,ce,resnet4}/certify.json`` (and the training
metrics next to it) written by ``results.sh``; ``figure`` draws their
certified-accuracy curves on one plot.
"""

from __future__ import annotations

import json
import pathlib
import sys
from typing import Any


def _records(metrics_path: pathlib.Path) -> list[dict[str, Any]]:
  with open(metrics_path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _epochs(metrics_path: pathlib.Path) -> list[dict[str, Any]]:
  """One summary record per epoch, in order.

  A resumed run repeats the epochs after its last checkpoint; the last
  record of an epoch is the one whose parameters the run carried on from,
  so it wins (and the discarded work does not count as training time).
  """
  by_epoch = {r["epoch"]: r for r in _records(metrics_path)
              if r["kind"] == "epoch"}
  return [by_epoch[e] for e in sorted(by_epoch)]


def _eps_label(eps: float) -> str:
  return f"{eps:g}"


def _markdown(head: list[str], body: list[list[str]]) -> list[str]:
  return (["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
          + ["| " + " | ".join(cells) + " |" for cells in body])


def sweep_rows(out: pathlib.Path) -> list[dict[str, Any]]:
  """One row per finished sweep point: config, validation numbers, score."""
  rows = []
  for metrics in sorted(out.glob("*/metrics.jsonl")):
    evals = [r for r in _records(metrics) if r["kind"] == "eval"]
    if not evals:
      continue
    config = json.loads((metrics.parent / "config.json").read_text())
    last = evals[-1]
    eps = [float(e) for e in config["eval"]["eps"]]
    certified = [last[f"val/certified_accuracy@{_eps_label(e)}"] for e in eps]
    epochs = _epochs(metrics)
    rows.append({
        "name": metrics.parent.name,
        "t": config["loss"]["t"], "lam": config["loss"]["lam"],
        "r0": config["loss"]["r0"], "epochs": len(epochs),
        "eps": eps, "clean": last["val/clean_accuracy"],
        "certified": certified, "score": sum(certified) / len(certified),
        "bound_mode": last.get("val/bound_mode", "?"),
        "train_seconds": sum(r["epoch_time"] for r in epochs),
    })
  rows.sort(key=lambda r: -r["score"])
  return rows


def sweep_table(out: pathlib.Path) -> str:
  rows = sweep_rows(out)
  if not rows:
    raise SystemExit(f"No finished sweep point under {out}; run "
                     "experiments/fashion_mnist/sweep.sh first.")
  eps = rows[0]["eps"]
  head = (["t", "λ", "r0", "epochs", "val clean"]
          + [f"val cert@{_eps_label(e)}" for e in eps] + ["mean cert"])
  lines = _markdown(head, [
      [f"{r['t']:g}", f"{r['lam']:g}", f"{r['r0']:g}", str(r["epochs"]),
       f"{r['clean']:.3f}"] + [f"{c:.3f}" for c in r["certified"]]
      + [f"{r['score']:.3f}"] for r in rows])
  best = rows[0]
  lines.append("")
  lines.append(f"Selected (highest mean certified accuracy): t={best['t']:g}, "
               f"λ={best['lam']:g}, r0={best['r0']:g}. Bounds: "
               f"{best['bound_mode']}.")
  return "\n".join(lines)


_LOSS_NAMES = {"crm": "CRM (LipLT, pairwise)", "gloro": "GloRo",
               "ce": "cross-entropy",
               "resnet4": "CRM, residual ResNet4 (LipLT, pairwise)"}


def results_rows(out: pathlib.Path) -> list[dict[str, Any]]:
  rows = []
  for loss in _LOSS_NAMES:
    report_path = out / loss / "certify.json"
    if not report_path.exists():
      continue
    report = json.loads(report_path.read_text())
    config = json.loads((out / loss / "config.json").read_text())
    epochs = _epochs(out / loss / "metrics.jsonl")
    stats = report["bound"]["statistics"]
    rows.append({
        "loss": loss, "name": _LOSS_NAMES[loss],
        "epochs": len(epochs), "config": config,
        "eps": report["eps_pixel"], "clean": report["clean_accuracy"],
        "certified": report["certified_accuracy"],
        "pgd": report["pgd_accuracy"],
        "audit": report["audit"],
        "train_seconds": sum(r["epoch_time"] for r in epochs),
        "certify_seconds": report["timings_seconds"]["total"],
        "bound_mode": report["bound"]["mode"],
        "sources": sorted({p["source"] for p in report["bound"]["products"]}),
        "liplt_over_naive": stats.get("liplt_over_naive"),
        "mean_radius": report["radius"]["pixel"]["mean_over_all"],
        "exact_arithmetic": report["bound"].get("float32_margin", {}).get(
            "certified_accuracy_exact_arithmetic"),
    })
  return rows


def results_table(out: pathlib.Path) -> str:
  rows = results_rows(out)
  if not rows:
    raise SystemExit(f"No certify.json under {out}/"
                     "{crm,gloro,ce,resnet4}; run "
                     "experiments/fashion_mnist/results.sh first.")
  eps = rows[0]["eps"]
  head = (["loss", "epochs", "clean"]
          + [f"cert@{_eps_label(e)}" for e in eps]
          + [f"PGD@{_eps_label(e)}" for e in eps]
          + ["audit violations", "train min", "certify min"])
  lines = _markdown(head, [
      [r["name"], str(r["epochs"]), f"{r['clean']:.4f}"]
      + [f"{c:.4f}" for c in r["certified"]]
      + [f"{c:.4f}" for c in r["pgd"]]
      + [f"{r['audit']['violations']} / {r['audit']['attacked']}",
         f"{r['train_seconds'] / 60:.1f}", f"{r['certify_seconds'] / 60:.1f}"]
      for r in rows])
  lines.append("")
  for r in rows:
    ratio = r["liplt_over_naive"]
    ratio_text = (f"; LipLT/naive pairwise bound ratio mean {ratio['mean']:.3f}"
                  f" (min {ratio['min']:.3f}, max {ratio['max']:.3f})"
                  if ratio else "")
    exact = r["exact_arithmetic"]
    exact_text = ("; certified without the float32 margin (exact arithmetic) "
                  + " / ".join(f"{c:.4f}" for c in exact) if exact else "")
    lines.append(f"- {r['name']}: bound mode {r['bound_mode']} (norm sources: "
                 f"{', '.join(r['sources'])}){ratio_text}; mean certified "
                 f"radius {r['mean_radius']:.3f}{exact_text}.")
  return "\n".join(lines)


def results_figure(out: pathlib.Path, png: pathlib.Path) -> None:
  """Certified accuracy vs eps (pixel L2) of every loss, one curve each."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(5.5, 3.8))
  found = False
  for loss in _LOSS_NAMES:
    report_path = out / loss / "certify.json"
    if not report_path.exists():
      continue
    found = True
    curve = json.loads(report_path.read_text())["certified_accuracy_curve"]
    ax.plot(curve["eps_pixel"], curve["certified_fraction"],
            label=_LOSS_NAMES[loss])
  if not found:
    raise SystemExit(f"No certify.json under {out}/{{crm,gloro,ce,resnet4}}.")
  ax.set_xlabel("ε (L2, pixel units)")
  ax.set_ylabel("certified accuracy (test)")
  ax.set_title("Fashion-MNIST, 25 epochs (4C3F unless named)")
  ax.grid(alpha=0.3)
  ax.legend()
  png.parent.mkdir(parents=True, exist_ok=True)
  fig.tight_layout()
  fig.savefig(png, dpi=120)
  plt.close(fig)


def main(argv: list[str]) -> int:
  if argv[1:2] == ["figure"] and len(argv) == 4:
    results_figure(pathlib.Path(argv[2]), pathlib.Path(argv[3]))
    return 0
  if len(argv) != 3 or argv[1] not in ("sweep", "results"):
    print(__doc__, file=sys.stderr)
    return 2
  out = pathlib.Path(argv[2])
  table = sweep_table(out) if argv[1] == "sweep" else results_table(out)
  print(table)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
