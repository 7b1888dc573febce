"""The package layout: src/ layout, and dependencies that point one way."""

import ast
import os
import pathlib
import subprocess
import sys

import pytest

import lipjax

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "lipjax"


def _lipjax_imports(path: pathlib.Path) -> set[str]:
  """Every ``lipjax...`` module a file imports (any depth, any form)."""
  names = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names.update(a.name for a in node.names if a.name.startswith("lipjax"))
    elif isinstance(node, ast.ImportFrom) and node.module and (
        node.module.startswith("lipjax")):
      names.update(f"{node.module}.{a.name}" for a in node.names)
  names.discard("lipjax.certification")  # The package itself: no imports.
  return names


def test_script_next_to_the_clone_imports_the_package():
  # The repository root has no lipjax/ folder that could shadow the package.
  assert not (ROOT / "lipjax").exists()
  code = "import lipjax; print(lipjax.__file__); lipjax.bound"
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True,
                       capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": ""}).stdout
  assert pathlib.Path(out.strip()).parent.name == "lipjax"
  assert not pathlib.Path(out.strip()).is_relative_to(ROOT / "lipjax")


@pytest.mark.parametrize("path", sorted(PACKAGE.glob("*.py")),
                         ids=lambda p: p.name)
def test_engine_imports_neither_training_nor_certification(path):
  for name in _lipjax_imports(path):
    if path.name == "__init__.py" and name.startswith(
        ("lipjax.certification.radii", "lipjax.certification.attacks")):
      continue  # The flat public API re-exports radii and the attack.
    assert not name.startswith(("lipjax.training", "lipjax.certification")), (
        f"{path.name} imports {name}: the bound engine must not depend on "
        "the training or certification packages.")


def test_import_lipjax_stays_light():
  code = ("import sys, lipjax; "
          "print(sorted(m for m in sys.modules if m.startswith("
          "('lipjax.training', 'orbax', 'tensorflow_datasets'))))")
  out = subprocess.run([sys.executable, "-c", code], check=True,
                       capture_output=True, text=True).stdout
  assert out.strip() == "[]"


def test_public_api_is_flat():
  for name in ("bound", "certified_radius", "certified_accuracy",
               "is_certified", "pgd_l2", "project_l2_box", "init_power_state",
               "liplt_bound", "naive_bound"):
    assert callable(getattr(lipjax, name)), name
