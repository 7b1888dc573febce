"""End-to-end training tests on the smoke config (synthetic data, CPU).

Covers: a full smoke run (checkpoints, metrics, config.json), 8 fake devices
== 1 device, resume after an interruption == uninterrupted (bit-identical),
NaN handling that keeps the last good checkpoint, clear config errors, and a
few real Fashion-MNIST steps when a prepared copy is present ($TFDS_DATA_DIR,
else shared/tensorflow_datasets beside the clone).
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import types

import jax
import numpy as np
import pytest

from configs import smoke
from lipjax.training import checkpoints
from lipjax.training import loop
from lipjax.training import steps
from tests import real_data

REPO = pathlib.Path(__file__).resolve().parents[1]


def smoke_config(**overrides):
  config = smoke.get_config()
  for key, value in overrides.items():
    node = config
    *parents, last = key.split(".")
    for p in parents:
      node = node[p]
    node[last] = value
  return config


def restore_params(workdir, step=None):
  """The params pytree of a checkpoint, as numpy (structure-agnostic)."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  path = pathlib.Path(workdir) / "checkpoints"
  step = max(int(p.name) for p in path.iterdir() if p.name.isdigit()) \
      if step is None else step
  tree = ocp.StandardCheckpointer().restore(path / str(step) / "default")
  return step, jax.tree.map(np.asarray, tree["params"])


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_smoke_end_to_end(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  workdir = "run"  # relative, as users type it
  result = loop.train_and_evaluate(smoke_config(), workdir)
  # 288 examples -> 260 train (90 %) -> 8 steps of 32 per epoch, 2 epochs.
  steps = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints")
                 .iterdir() if p.name.isdigit())
  assert steps[-1] == 16 and len(steps) <= 2
  records = read_metrics(workdir)
  kinds = {r["kind"] for r in records}
  assert {"train", "epoch", "eval"} <= kinds
  train = [r for r in records if r["kind"] == "train"]
  assert all(np.isfinite(r["loss"]) for r in train)
  assert {"lipschitz_mean", "learning_rate", "mean_radius", "lam"} <= set(
      train[-1])
  assert 0.0 <= result["val/clean_accuracy"] <= 1.0
  assert result["val/certified_accuracy@0.1"] <= result[
      "val/certified_accuracy@0.05"] <= result["val/clean_accuracy"]
  saved = json.loads((tmp_path / "run" / "config.json").read_text())
  assert saved["model"]["architecture"] == "2C2F"


def test_step_time_is_the_span_since_the_last_log_per_step():
  # The host dispatches steps ahead of the device; the span between two
  # waits for results, over the steps it covers, is the time per step.
  times = iter([10.0, 13.0, 14.0])
  clock = loop._StepClock(5, clock=lambda: next(times))
  assert clock.lap(8) == 1.0  # 3 s over steps 6, 7, 8
  assert clock.lap(12) == 0.25  # 1 s over steps 9 .. 12


def test_resumed_first_epoch_time_starts_at_its_first_step():
  # No record before epoch 0: its start is the first record's time less
  # the steps that record covers, at its step_time each.
  records = [{"kind": "train", "step": 4, "time": 100.0, "step_time": 2.0},
             {"kind": "train", "step": 8, "time": 108.0, "step_time": 2.0}]
  run = types.SimpleNamespace(steps_per_epoch=10, kept_records=records)
  logs, seconds = loop._kept_epoch_part(run, 0)
  assert seconds == 16.0
  assert [r["step_time"] for r in logs] == [2.0, 2.0]


def test_resume_after_interruption_is_bit_identical(tmp_path):
  config = smoke_config(**{"checkpoint.keep": 10})
  full, resumed = str(tmp_path / "full"), str(tmp_path / "resumed")
  loop.train_and_evaluate(config, full)
  # Simulate a kill after the step-4 checkpoint: drop everything later.
  shutil.copytree(full, resumed)
  for p in (pathlib.Path(resumed) / "checkpoints").iterdir():
    if p.name.isdigit() and int(p.name) > 4:
      shutil.rmtree(p)
  loop.train_and_evaluate(config, resumed)
  step_a, params_a = restore_params(full)
  step_b, params_b = restore_params(resumed)
  assert step_a == step_b == 16
  for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
    np.testing.assert_array_equal(a, b)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
  real_loss = steps._loss  # pylint: disable=protected-access

  def poisoned(config, hyper, epoch, logits, labels, lip):
    loss, aux, logged = real_loss(config, hyper, epoch, logits, labels, lip)
    return jax.numpy.where(epoch >= 1, jax.numpy.nan, loss), aux, logged

  monkeypatch.setattr(steps, "_loss", poisoned)
  workdir = str(tmp_path / "nan")
  with pytest.raises(loop.NonFiniteLossError, match="last good"):
    loop.train_and_evaluate(smoke_config(), workdir)
  step, params = restore_params(workdir)
  assert step <= 8  # nothing saved after the poisoned epoch started
  assert all(np.all(np.isfinite(p)) for p in jax.tree.leaves(params))


def test_config_errors_name_the_fix(tmp_path):
  with pytest.raises(ValueError, match="Did you mean 'loss.lam'"):
    config = smoke_config()
    config.loss.lamb = 3.0
    loop.train_and_evaluate(config, str(tmp_path / "a"))
  with pytest.raises(ValueError, match="not one of"):
    loop.train_and_evaluate(smoke_config(**{"loss.name": "trades"}),
                                str(tmp_path / "b"))
  with pytest.raises(ValueError, match="divisible by the 8 devices"):
    loop.train_and_evaluate(smoke_config(batch_size=12),
                                str(tmp_path / "c"))
  with pytest.raises(ValueError, match="does not fit input_shape"):
    loop.train_and_evaluate(
        smoke_config(**{"model.architecture": "8C2F"}), str(tmp_path / "d"))


def test_incompatible_workdir_is_refused_and_untouched(tmp_path):
  workdir = tmp_path / "run"
  config = smoke_config(num_epochs=1)
  loop.train_and_evaluate(config, str(workdir))
  before = {p: p.stat().st_mtime_ns for p in workdir.rglob("*")}
  other = smoke_config(num_epochs=1, **{"model.architecture": "3F"})
  with pytest.raises(ValueError, match="new --workdir"):
    loop.train_and_evaluate(other, str(workdir))
  # Without config.json the checkpoint itself is checked.
  (workdir / "config.json").unlink()
  del before[workdir / "config.json"]
  before = {p: t for p, t in before.items() if p.exists()}
  with pytest.raises(checkpoints.IncompatibleCheckpointError,
                     match="Nothing was changed"):
    loop.train_and_evaluate(other, str(workdir))
  after = {p: p.stat().st_mtime_ns for p in before}
  assert after == before


def _run_single_device(workdir, num_steps_epochs):
  code = (
      "import sys; sys.path.insert(0, %r)\n"
      "from tests.train_test import smoke_config\n"
      "from lipjax.training import loop\n"
      "loop.train_and_evaluate(smoke_config(num_epochs=%d), %r)\n"
  ) % (str(REPO), num_steps_epochs, workdir)
  env = dict(os.environ, JAX_NUM_CPU_DEVICES="1", JAX_PLATFORMS="cpu")
  subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=REPO,
                 timeout=600)


def test_eight_devices_match_one_device(tmp_path):
  assert jax.device_count() == 8
  eight, one = str(tmp_path / "eight"), str(tmp_path / "one")
  loop.train_and_evaluate(smoke_config(num_epochs=1), eight)
  _run_single_device(one, 1)
  loss8 = [r["loss"] for r in read_metrics(eight) if r["kind"] == "train"]
  loss1 = [r["loss"] for r in read_metrics(one) if r["kind"] == "train"]
  np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
  _, params8 = restore_params(eight)
  _, params1 = restore_params(one)
  for a, b in zip(jax.tree.leaves(params8), jax.tree.leaves(params1)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(not real_data.has_fashion_mnist(),
                    reason=real_data.SKIP_REASON)
def test_real_fashion_mnist_steps(tmp_path):
  from configs import fashion_mnist  # pylint: disable=import-outside-toplevel
  config = fashion_mnist.get_config("quick")
  config.data.data_dir = str(real_data.tfds_data_dir())
  config.data.download = False
  config.data.max_train_examples = 512
  config.batch_size, config.num_epochs = 64, 1
  config.eval.final_test = False
  config.progress = False
  result = loop.train_and_evaluate(config, str(tmp_path / "fmnist"))
  records = read_metrics(str(tmp_path / "fmnist"))
  train = [r for r in records if r["kind"] == "train"]
  assert train and all(np.isfinite(r["loss"]) for r in train)
  assert result["val/clean_accuracy"] > 0.2  # well above chance after 7 steps
