"""The Fashion-MNIST results summarizer reads what train.py/certify.py write."""

import json
import pathlib

import pytest

from experiments.fashion_mnist import summarize


def _write_run(workdir: pathlib.Path, *, loss: dict, evals: list[dict],
               epoch_times: list[float], resumed_at: int | None = None
               ) -> None:
  """A workdir as train.py leaves it; ``resumed_at`` (an epoch index)
  repeats the epochs from there on with 100x their time, as a run killed
  mid-way and resumed from an earlier checkpoint logs them twice."""
  workdir.mkdir(parents=True)
  config = {"loss": loss, "eval": {"eps": [0.1, 1.0]}}
  (workdir / "config.json").write_text(json.dumps(config))
  records = [{"kind": "train", "step": 1}]
  records += [{"kind": "epoch", "epoch": i + 1, "epoch_time": t * (
      100 if resumed_at is not None and i >= resumed_at else 1)}
              for i, t in enumerate(epoch_times)]
  if resumed_at is not None:
    records += [{"kind": "epoch", "epoch": i + 1, "epoch_time": t}
                for i, t in enumerate(epoch_times) if i >= resumed_at]
  records += [{"kind": "eval", **e} for e in evals]
  (workdir / "metrics.jsonl").write_text(
      "".join(json.dumps(r) + "\n" for r in records))


def _sweep_eval(clean, c01, c1):
  return {"val/clean_accuracy": clean, "val/certified_accuracy@0.1": c01,
          "val/certified_accuracy@1": c1, "val/bound_mode": "estimate"}


def test_sweep_ranks_by_mean_certified_accuracy_of_the_last_eval(tmp_path):
  _write_run(tmp_path / "a", loss={"t": 5.0, "lam": 30.0, "r0": 2.2},
             evals=[_sweep_eval(0.9, 0.9, 0.9), _sweep_eval(0.7, 0.6, 0.5)],
             epoch_times=[10.0, 20.0])
  _write_run(tmp_path / "b", loss={"t": 5.0, "lam": 10.0, "r0": 1.0},
             evals=[_sweep_eval(0.8, 0.7, 0.6)], epoch_times=[10.0])
  (tmp_path / "unfinished").mkdir()
  rows = summarize.sweep_rows(tmp_path)
  assert [r["name"] for r in rows] == ["b", "a"]
  assert rows[0]["score"] == pytest.approx(0.65)
  assert rows[1]["score"] == pytest.approx(0.55)  # the last eval, not the best
  assert rows[1]["train_seconds"] == pytest.approx(30.0)
  table = summarize.sweep_table(tmp_path)
  assert "| 5 | 10 | 1 | 1 | 0.800 | 0.700 | 0.600 | 0.650 |" in table
  assert "λ=10, r0=1" in table


def test_results_table_reports_certify_json_numbers(tmp_path):
  _write_run(tmp_path / "crm", loss={"t": 5.0, "lam": 10.0, "r0": 1.0},
             evals=[], epoch_times=[60.0, 60.0], resumed_at=1)
  report = {
      "eps_pixel": [0.1, 1.0], "clean_accuracy": 0.75,
      "certified_accuracy": [0.7, 0.5], "pgd_accuracy": [0.72, 0.6],
      "audit": {"violations": 0, "attacked": 700, "passed": True},
      "timings_seconds": {"total": 90.0},
      "radius": {"pixel": {"mean_over_all": 1.25}},
      "bound": {"mode": "mixed", "products": [{"source": "exact"},
                                              {"source": "converged"}],
                "statistics": {"liplt_over_naive": {"mean": 0.9, "min": 0.8,
                                                    "max": 0.95}},
                "float32_margin": {
                    "certified_accuracy_exact_arithmetic": [0.71, 0.52]}},
      "certified_accuracy_curve": {"eps_pixel": [0.0, 1.0],
                                   "certified_fraction": [0.75, 0.5]},
  }
  (tmp_path / "crm" / "certify.json").write_text(json.dumps(report))
  table = summarize.results_table(tmp_path)
  assert ("| CRM (LipLT, pairwise) | 2 | 0.7500 | 0.7000 | 0.5000 | 0.7200 | "
          "0.6000 | 0 / 700 | 2.0 | 1.5 |") in table
  assert "ratio mean 0.900 (min 0.800, max 0.950)" in table
  assert "norm sources: converged, exact" in table
  assert "(exact arithmetic) 0.7100 / 0.5200." in table
  png = tmp_path / "docs" / "curves.png"
  summarize.results_figure(tmp_path, png)
  assert png.stat().st_size > 0


def test_missing_runs_name_the_script_to_run(tmp_path):
  with pytest.raises(SystemExit, match="sweep.sh"):
    summarize.sweep_table(tmp_path)
  with pytest.raises(SystemExit, match="results.sh"):
    summarize.results_table(tmp_path)
