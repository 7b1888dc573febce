"""Certification: hand-computed radii, the sound bound, the audit, the CLI.

One smoke run (synthetic data, 2C2F, two epochs) is trained per module and
certified in-process and through ``certify.py``: certified accuracy is at
most the clean accuracy and non-increasing in ε, the sound bound equals
``lipjax.bound`` for the same norms, a bound scaled down 10x makes the
audit fail (so the audit can fail), and the command prints its table, then
writes valid JSON and PNGs named by checkpoint step (and at the stable
names while that step is the newest) and exits 0. Every bad flag exits 2
with one line before any work; an unwritable output folder exits 3 before
any work, and a write that fails afterwards exits 3 after the table, with
nothing partial left. A model with (eval-mode) batch norm trains, its
learned BN scales enter the bound, and its certificates pass the audit.
"""

import json
import math
import os
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import lipjax
from configs import smoke
from lipjax.certification import pipeline
from lipjax.certification import radii
from lipjax.certification import report as report_lib
from lipjax.certification import sound_bound
from lipjax.certification import workdir as workdir_lib
from lipjax.training import loop

REPO = pathlib.Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# docs/bounds.md#two-classes: a hand-computable 3-layer ReLU chain.
W0 = np.diag([2.0, 1.0])
W1 = np.array([[0.0, 1.0], [1.0, 0.0]])
W2 = np.diag([3.0, 1.0])
L01_LIPLT = (math.sqrt(13) + 6 * math.sqrt(10)) / 4  # 5.644804
L01_NAIVE = 2 * math.sqrt(10)                        # 6.324555


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("certify") / "smoke")
  loop.train_and_evaluate(smoke.get_config(), path)
  return path


@pytest.fixture(scope="module")
def report(workdir):
  return pipeline.run(workdir, eps=(0.05, 0.1, 0.3, 0.6),
                           pgd_steps=5, pgd_restarts=1, progress=False)


def test_hand_computed_radius():
  lip = lipjax.bound([W0, W1, W2], method="liplt", kind="pairwise",
                     exact=True, safety_factor=1.0)
  np.testing.assert_allclose(lip[0, 1], L01_LIPLT, rtol=1e-6)
  logits, labels = jnp.array([[2.0, 0.5]]), jnp.array([0])
  radius = radii.certified_radius(logits, labels, lip)
  np.testing.assert_allclose(radius, [1.5 / L01_LIPLT], rtol=1e-6)  # 0.265731
  np.testing.assert_allclose(
      radii.certified_accuracy(logits, labels, lip, jnp.array([0.26, 0.27])),
      [1.0, 0.0])
  # The other label: the margin is negative, so is the radius.
  assert radii.certified_radius(logits, jnp.array([1]), lip)[0] < 0


def test_sound_bound_hand_computed():
  bounds, report = sound_bound.sound_bound(
      [W0, W1, W2], method="liplt", kind="pairwise", exact=True)
  # Sound: never below the true value; tight: LipLT multiplies up to three
  # norms, each by the safety factor, and rounds up to float32.
  factor = lipjax.EXACT_SAFETY_FACTOR**3
  assert L01_LIPLT <= bounds["liplt"][0, 1] <= L01_LIPLT * factor * (1 + 1e-6)
  assert L01_NAIVE <= bounds["naive"][0, 1] <= L01_NAIVE * factor * (1 + 1e-6)
  assert report["mode"] == "exact"
  norms = {tuple(p["product"]): p["norm"] for p in report["products"]}
  np.testing.assert_allclose([norms[(0, 0)], norms[(0, 1)], norms[(1, 1)]],
                             [2.0, 2.0, 1.0], rtol=1e-12)


def test_sound_bound_equals_lipjax_bound(workdir):
  restored = workdir_lib.restore(workdir)
  model = restored.model
  for exact in (True, False):
    bounds, report = sound_bound.sound_bound(
        model, method="liplt", kind="pairwise", exact=exact, seed=3)
    expected = lipjax.bound(model, method="liplt", kind="pairwise",
                            exact=exact, seed=3)
    np.testing.assert_array_equal(bounds["bound"], np.asarray(expected))
    sources = {p["source"] for p in report["products"]}
    assert sources == {"exact" if exact else "lanczos"}
  assert report["mode"] == "randomized" and report["seed"] == 3
  assert report["guarantee"] == ("randomized: holds with probability >= "
                                 "1 - 1e-09 over the Lanczos start vectors "
                                 "(seed 3)")
  lanczos_rows = report["products"]
  assert all(1.0 <= p["factor"] <= 1.0002 and p["steps"] >= 1
             and p["delta"] > 0 for p in lanczos_rows)
  np.testing.assert_allclose(sum(p["delta"] for p in lanczos_rows), 1e-9)
  # LipLT is never looser than naive with exact norms.
  bounds, _ = sound_bound.sound_bound(model, method="liplt",
                                      kind="pairwise", exact=True)
  off = ~np.eye(bounds["liplt"].shape[0], dtype=bool)
  assert np.all(bounds["liplt"][off] <= bounds["naive"][off] * (1 + 1e-6))


def test_exact_fails_clearly_and_auto_mixes():
  rng = np.random.default_rng(0)
  # Gram sides: (0, 0) and (0, 1) -> 2, (1, 1) -> 3.
  chain = [rng.normal(size=(8, 2)), rng.normal(size=(3, 8)),
           rng.normal(size=(2, 3))]
  limit = 8 * 2**2
  with pytest.raises(MemoryError,
                     match=r"--exact: .* W_1\.\.\.W_1 \(3x3, 72 bytes\)"):
    sound_bound.sound_bound(chain, method="liplt", kind="pairwise",
                            exact=True, max_exact_bytes=limit)
  bounds, report = sound_bound.sound_bound(
      chain, method="liplt", kind="pairwise", exact="auto",
      max_exact_bytes=limit, seed=0)
  assert report["mode"] == "randomized"
  by_product = {tuple(p["product"]): p for p in report["products"]}
  assert [by_product[p]["source"] for p in ((0, 0), (0, 1), (1, 1))] == [
      "exact", "exact", "lanczos"]
  randomized = by_product[(1, 1)]
  # P^T P is 8 x 8 of rank 3: the Krylov space becomes invariant after four
  # steps, and the largest Ritz value is the norm (up to the float32
  # rounding of the weights). The factor stays above 1: the bound does not
  # take a tiny residual at its word (it adds a rounding allowance), which
  # costs little only when many steps ran.
  np.testing.assert_allclose(randomized["norm"], np.linalg.norm(chain[1], 2),
                             rtol=1e-7)
  assert 1.0 < randomized["factor"] <= 1.05
  assert by_product[(0, 0)]["delta"] == 0.0
  np.testing.assert_allclose(randomized["delta"], 1e-9)
  exact, _ = sound_bound.sound_bound(chain, method="liplt",
                                     kind="pairwise", exact=True)
  # Within the randomized factor (and the float32 rounding up) of exact.
  assert exact["bound"][0, 1] * (1 - 1e-5) <= bounds["bound"][0, 1] <= (
      exact["bound"][0, 1] * randomized["factor"] * (1 + 1e-5))


def test_report_numbers_are_consistent(report):
  clean, cert = report["clean_accuracy"], np.array(
      report["certified_accuracy"])
  pgd = np.array(report["pgd_accuracy"])
  assert report["eps_pixel"] == sorted(report["eps_pixel"])
  assert np.all(cert <= clean) and np.all(np.diff(cert) <= 0)
  assert np.all(cert <= pgd) and np.all(pgd <= clean)
  assert np.all(np.diff(pgd) <= 0)
  assert len(report["per_class"]) == report["num_classes"] == 4
  counts = [c["count"] for c in report["per_class"]]
  assert sum(counts) == report["num_examples"] == 64
  weighted = sum(c["count"] * np.array(c["certified_accuracy"])
                 for c in report["per_class"]) / sum(counts)
  np.testing.assert_allclose(weighted, cert, atol=1e-12)
  # The curve agrees with the ε points (radius > ε <=> certified here).
  assert report["audit"]["violations"] == 0 and report["audit"]["passed"]
  assert report["audit"]["attacked"] == round(
      report["radius"]["fraction_positive"] * 64)
  assert report["bound"]["mode"] == "exact"
  assert report["bound"]["guarantee"].startswith("deterministic")
  margin = report["bound"]["float32_margin"]
  assert margin["covered"] and "float32" in margin["assumptions"]
  # The float32 margin can only remove certificates.
  assert np.all(cert <= np.array(
      margin["certified_accuracy_exact_arithmetic"]) + 1e-12)
  json.dumps(report, allow_nan=False)  # Every number is JSON.


def test_audit_fails_when_the_bound_is_scaled_down(workdir):
  report = pipeline.run(workdir, pgd_steps=5, pgd_restarts=1,
                             bound_scale=0.1, progress=False)
  assert report["audit"]["violations"] > 0
  assert not report["audit"]["passed"]
  assert pipeline.exit_code(report) == 1
  banner = report_lib.violation_banner(report)
  assert "SOUNDNESS VIOLATION" in banner and "scaled by 0.1" in banner


def test_missing_paths_are_named_and_nothing_is_written(tmp_path):
  missing = tmp_path / "nope"
  with pytest.raises(FileNotFoundError, match=str(missing)):
    workdir_lib.restore(str(missing))
  assert not missing.exists()
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match="config.json"):
    workdir_lib.restore(str(empty))
  (empty / "config.json").write_text(smoke.get_config().to_json_best_effort())
  with pytest.raises(FileNotFoundError, match="checkpoints"):
    workdir_lib.restore(str(empty))
  assert sorted(p.name for p in empty.iterdir()) == ["config.json"]


def test_units_and_default_eps():
  config = ml_collections.ConfigDict({
      "data": {"name": "cifar10"}, "eval": {"eps": [0.0705, 36 / 255]},
      "model": {"input_std": [0.5, 0.5, 0.5]}})
  assert pipeline.pixels_per_normalized_unit(config) == 0.5
  np.testing.assert_allclose(pipeline.default_eps(config),
                             [0.0705, 36 / 255])
  config.model.input_std = [0.5, 0.25, 0.5]
  with pytest.raises(ValueError, match="one input std"):
    pipeline.pixels_per_normalized_unit(config)
  config.model.input_std = None
  assert pipeline.pixels_per_normalized_unit(config) == 1.0
  config.data.name, config.eval.eps = "fashion_mnist", [0.1, 0.3]
  assert pipeline.default_eps(config) == (0.1, 0.25, 0.3, 0.5, 1.0)


def test_certify_py_end_to_end(workdir):
  env = dict(os.environ, JAX_NUM_CPU_DEVICES="1")
  result = subprocess.run(
      [sys.executable, "certify.py", f"--workdir={workdir}",
       "--eps=0.05,0.3,0.6", "--pgd_steps=5", "--pgd_restarts=1",
       "--progress=false"], cwd=REPO, env=env, capture_output=True,
      text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stdout + result.stderr
  assert "certified" in result.stdout and "audit:" in result.stdout
  # Without progress bars a log file still shows each phase as it ends.
  for phase in ("restored ", "bound: ", "clean accuracy ", "pgd eps=0.05:",
                "pgd eps=0.6:", "audit: "):
    assert phase in result.stderr, result.stderr
  paths = report_lib.output_paths(workdir, "test")
  with open(paths["json"], encoding="utf-8") as f:
    saved = json.load(f)
  # The same report under its checkpoint step's name.
  with open(report_lib.output_paths(workdir, "test", saved["checkpoint_step"])
            ["json"], encoding="utf-8") as f:
    assert json.load(f) == saved
  # The table is printed before anything is written.
  assert result.stdout.index("audit:") < result.stdout.index("wrote ")
  assert saved["format"] == report_lib.FORMAT
  for key in ("clean_accuracy", "certified_accuracy", "pgd_accuracy",
              "radius", "per_class", "bound", "audit", "timings_seconds",
              "versions", "units", "eps_pixel"):
    assert key in saved
  assert saved["eps_pixel"] == pytest.approx([0.05, 0.3, 0.6])
  cert = np.array(saved["certified_accuracy"])
  assert np.all(cert <= saved["clean_accuracy"]) and np.all(
      np.diff(cert) <= 0)
  assert len(saved["per_class"]) == 4
  assert saved["audit"]["violations"] == 0
  for name in ("accuracy_png", "radii_png"):
    with open(paths[name], "rb") as f:
      assert f.read(8) == PNG_MAGIC
  from PIL import Image  # pylint: disable=import-outside-toplevel
  with Image.open(paths["accuracy_png"]) as image:
    assert image.size[0] > 400 and image.size[1] > 300
  # No temporary files are left behind, and training files are untouched.
  assert not [p for p in os.listdir(workdir) if ".tmp" in p]
  assert {"config.json", "metrics.jsonl", "checkpoints"} <= set(
      os.listdir(workdir))


def test_batch_norm_model_trains_and_certifies_soundly(tmp_path):
  # BN layers are always in eval mode (use_running_average=True): training
  # learns their scale and bias through the loss and the bound, the running
  # statistics stay at their initial values, and the bound folds
  # scale / sqrt(var + eps) in, so certification must remain sound.
  config = smoke.get_config()
  config.model.batch_norm = True
  path = str(tmp_path / "bn")
  loop.train_and_evaluate(config, path)
  model = workdir_lib.restore(path).model
  assert len(model.batch_norms) == 2
  for norm in model.batch_norms:
    assert not np.allclose(np.asarray(norm.scale[...]), 1.0)
    np.testing.assert_array_equal(np.asarray(norm.mean[...]), 0.0)
    np.testing.assert_array_equal(np.asarray(norm.var[...]), 1.0)
  report = pipeline.run(path, eps=(0.05, 0.1, 0.3), pgd_steps=5,
                             pgd_restarts=1, progress=False)
  assert report["bound"]["mode"] == "exact"
  assert report["audit"]["attacked"] > 0
  assert report["audit"]["violations"] == 0 and report["audit"]["passed"]
  # The learned BN scales are part of the certified bound.
  with_bn = lipjax.bound(model, exact=True)
  for norm in model.batch_norms:
    norm.scale.set_value(jnp.ones_like(norm.scale[...]))
  assert not np.allclose(np.asarray(lipjax.bound(model, exact=True)),
                         np.asarray(with_bn))


@pytest.mark.parametrize("kwargs,match", [
    (dict(eps=()), "--eps is empty"),
    (dict(eps=(float("nan"),)), "finite"),
    (dict(eps=(float("inf"),)), "finite"),
    (dict(eps=(-0.1,)), ">= 0"),
    (dict(num_examples=-5), "num_examples"),
    (dict(batch_size=0), "batch_size"),
    (dict(pgd_steps=0), "pgd_steps"),
    (dict(pgd_restarts=0), "pgd_restarts"),
    (dict(bound_seed=-1), "bound_seed"),
    (dict(max_exact_gib=float("nan")), "max_exact_gib"),
    (dict(bound_scale=0.0), "bound_scale"),
    (dict(delta=0.0), "delta"),
])
def test_bad_settings_are_refused_before_any_work(kwargs, match, tmp_path):
  # The workdir does not even exist: the settings are checked first.
  with pytest.raises(ValueError, match=match):
    pipeline.run(str(tmp_path / "missing"), progress=False, **kwargs)


def _certify_py(*args, timeout=300):
  env = dict(os.environ, JAX_NUM_CPU_DEVICES="1")
  return subprocess.run([sys.executable, "certify.py", *args], cwd=REPO,
                        env=env, capture_output=True, text=True,
                        timeout=timeout, check=False)


def _one_error_line(result, code, match, *, after_work=False):
  """Exit status ``code`` and one stderr line, naming ``match``, no trace.

  ``after_work``: the phases' log lines may precede it on stderr.
  """
  lines = result.stderr.strip().splitlines()
  assert result.returncode == code, result.stderr
  if not after_work:
    assert len(lines) == 1, result.stderr
  assert lines[-1].startswith("certify.py: error: "), result.stderr
  assert "Traceback" not in result.stderr
  assert match in lines[-1], lines[-1]


def test_certify_py_help_exits_0():
  result = _certify_py("--help")
  assert result.returncode == 0, result.stderr
  assert "Exit status" in result.stdout and "--output_dir" in result.stdout


# A bad flag (empty: no --workdir at all) and what its one line must say.
BAD_FLAGS = {
    "": "--workdir is required", "--eps=nan": "finite", "--eps=inf": "finite",
    "--eps=": "--eps is empty", "--eps=0.1,abc": "comma-separated numbers",
    "--pgd_steps=0": "--pgd_steps must be >= 1",
    "--num_examples=-5": "--num_examples must be >= 1",
    "--batch_size=0": "--batch_size must be >= 1", "--batch_size=x": "int()",
    "--epss=0.1": "Did you mean: eps", "runs/x": "unexpected argument",
}


@pytest.mark.parametrize("flag", BAD_FLAGS)
def test_certify_py_bad_flags_exit_2_with_one_line(flag, tmp_path):
  # A workdir with config.json, no checkpoint: every flag is refused before
  # the workdir is even read (which would name the missing checkpoints).
  (tmp_path / "config.json").write_text(
      smoke.get_config().to_json_best_effort())
  args = [f"--workdir={tmp_path}", flag] if flag else []
  _one_error_line(_certify_py(*args), 2, BAD_FLAGS[flag])
  assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def test_certify_py_missing_workdir_exits_2(tmp_path):
  _one_error_line(_certify_py(f"--workdir={tmp_path / 'nope'}"), 2,
                  str(tmp_path / "nope"))


def test_certify_py_refuses_an_unwritable_output_dir_before_any_work(
    workdir, tmp_path):
  # A file where a folder should be blocks writing even for root (chmod
  # does not); the refusal comes before the certification (seconds).
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  result = _certify_py(f"--workdir={workdir}",
                       f"--output_dir={blocker / 'results'}", timeout=60)
  _one_error_line(result, 3, str(blocker / "results"))
  assert result.stdout == ""
  if os.geteuid() != 0:  # Without root, a read-only folder is refused too.
    readonly = tmp_path / "readonly"
    readonly.mkdir(mode=0o555)
    _one_error_line(_certify_py(f"--workdir={workdir}",
                                f"--output_dir={readonly}", timeout=60),
                    3, str(readonly))


def test_certify_py_prints_the_table_then_exits_3_when_writing_fails(
    workdir, tmp_path):
  # The folder is writable when checked, but the report's file cannot be
  # written (a folder in its way; works as root, unlike chmod): the table is
  # printed anyway, the exit status is 3, and nothing partial is left.
  out = tmp_path / "out"
  step = workdir_lib.restore(workdir).step
  os.makedirs(report_lib.output_paths(str(out), "test", step)["json"])
  result = _certify_py(f"--workdir={workdir}", f"--output_dir={out}",
                       "--eps=0.1", "--pgd_steps=2", "--pgd_restarts=1",
                       "--num_examples=8", "--progress=false")
  _one_error_line(result, 3, f"could not write the results to {out}",
                  after_work=True)
  assert "certified" in result.stdout and "audit:" in result.stdout
  assert "wrote" not in result.stdout
  assert not [p for p in os.listdir(out) if ".tmp" in p]
  assert not os.path.exists(report_lib.output_paths(str(out), "test")["json"])


def test_reports_are_named_by_step_and_the_stable_name_keeps_the_newest(
    report, tmp_path):
  step = report["checkpoint_step"]
  written = report_lib.write(report, str(tmp_path))
  stable = report_lib.output_paths(str(tmp_path), "test")
  for paths in (report_lib.output_paths(str(tmp_path), "test", step), stable):
    assert set(paths.values()) <= set(written)
  assert os.path.basename(written[2]) == f"certify_step{step}.json"
  # Another (older) checkpoint: its own files; the stable names keep step.
  older = dict(report, checkpoint_step=step - 4)
  written = report_lib.write(older, str(tmp_path))
  assert stable["json"] not in written
  assert json.loads(pathlib.Path(stable["json"]).read_text())[
      "checkpoint_step"] == step
  assert json.loads(pathlib.Path(report_lib.output_paths(
      str(tmp_path), "test", step)["json"]).read_text()) == json.loads(
          json.dumps(report))
  # A newer one replaces them.
  report_lib.write(dict(report, checkpoint_step=step + 4), str(tmp_path))
  assert json.loads(pathlib.Path(stable["json"]).read_text())[
      "checkpoint_step"] == step + 4
  assert len(list(tmp_path.glob("certify*.json"))) == 4
