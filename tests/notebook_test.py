"""examples/quickstart.ipynb runs end to end, and is stored without outputs.

The notebook is executed in a fresh kernel (nbclient) that imports this
checkout's lipjax (``src/`` first on its PYTHONPATH), on one CPU device. Any
cell that raises fails the test, and so does a run over the time limit: the
notebook promises to finish in about a minute on a CPU.
"""

import os
import pathlib
import re
import time

import nbclient  # The `test` extra installs nbclient, nbformat, ipykernel.
import nbformat

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "examples" / "quickstart.ipynb"
# Generous for a shared 2-core CI machine; about a minute on an idle one.
TIMEOUT_S = 300


def _outputs_text(notebook) -> str:
  return "".join(out.get("text", "") for cell in notebook.cells
                 if cell.cell_type == "code" for out in cell.outputs)


def test_notebook_is_stored_without_outputs():
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  code = [c for c in notebook.cells if c.cell_type == "code"]
  assert code and all(not c.outputs and c.execution_count is None
                      for c in code)


def test_quickstart_notebook_runs(monkeypatch):
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
      [str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
  monkeypatch.setenv("JAX_NUM_CPU_DEVICES", "1")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(
      notebook, timeout=TIMEOUT_S, kernel_name="python3",
      resources={"metadata": {"path": str(NOTEBOOK.parent)}})
  start = time.monotonic()
  client.execute()  # Raises CellExecutionError on the first failing cell.
  assert time.monotonic() - start < TIMEOUT_S
  text = _outputs_text(notebook)
  # The kernel imported this checkout, and every section printed its table.
  assert f"lipjax from {ROOT / 'src' / 'lipjax'}" in text
  # LipLT is never looser than naive, pair by pair.
  ratio = re.search(r"LipLT/naive over all pairs: min ([\d.]+), "
                    r"mean ([\d.]+), max ([\d.]+)", text)
  assert ratio and 0 < float(ratio[1]) <= float(ratio[3]) <= 1
  # One labelled row per product: 3 naive (W_0, W_1, W_2), 6 LipLT.
  rows = re.findall(r"^  (W_\d\.\.\.W_\d) +lanczos ", text, re.M)
  assert rows.count("W_0...W_0") == 2 and len(rows) == 9
  assert "guarantee: randomized" in text and "seed 0" in text
  assert "deterministic" in text  # The trained model's exact bound.
  figures = [out for cell in notebook.cells if cell.cell_type == "code"
             for out in cell.outputs if "image/png" in out.get("data", {})]
  assert len(figures) == 1  # The certified radii.
  removed = re.search(r"removed (\S+)", text)
  assert removed and not os.path.exists(removed[1])  # Temp workdir gone.
