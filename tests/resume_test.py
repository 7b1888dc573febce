"""Faults around resuming: nothing trained is lost, nothing corrupt is used.

One smoke run (2 epochs of 8 steps, checkpoints at 4, 8, 12 and 16) is
trained once; each test copies it and breaks the copy: a flipped bit or a
truncated file in the newest checkpoint (detected, kept, the run falls back
to the step before and ends bit-identical to the uninterrupted run),
``--checkpoint``, a diverging run (the guard keeps only healthy checkpoints,
and its advice works), config changes that would alter the run, a second
process on the workdir, and metrics after a resume.
"""

import contextlib
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from lipjax.certification import workdir as workdir_lib
from lipjax.training import checkpoints
from lipjax.training import health
from lipjax.training import loop
from lipjax.training import resume
from lipjax.training import workdir_lock
from tests.train_test import read_metrics
from tests.train_test import restore_params
from tests.train_cli_test import run_train_py
from tests.train_test import smoke_config

REPO = pathlib.Path(__file__).resolve().parents[1]


def config(**overrides):
  return smoke_config(**{"checkpoint.keep": 10, **overrides})


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
  """An uninterrupted run: checkpoints 4, 8, 12, 16 and its metrics."""
  path = tmp_path_factory.mktemp("resume") / "full"
  loop.train_and_evaluate(config(), str(path))
  return path


def copy_run(full_run, tmp_path, *, drop_after=None):
  """A copy of the full run, without the checkpoints after ``drop_after``."""
  path = tmp_path / "run"
  shutil.copytree(full_run, path)
  for p in (path / "checkpoints").iterdir():
    if drop_after is not None and int(p.name) > drop_after:
      shutil.rmtree(p)
  return path


def largest_data_file(step_dir: pathlib.Path) -> pathlib.Path:
  files = [p for p in (step_dir / "default").rglob("*") if p.is_file()]
  return max(files, key=lambda p: p.stat().st_size)


def corrupt_checkpoint(workdir: pathlib.Path, step: int) -> None:
  """Overwrites 8 bytes in the middle of the step's largest data file."""
  victim = largest_data_file(workdir / "checkpoints" / str(step))
  data = bytearray(victim.read_bytes())
  data[len(data) // 2 : len(data) // 2 + 8] = b"\xff" * 8
  victim.write_bytes(bytes(data))


def files_of(workdir: pathlib.Path) -> dict:
  return {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}


@contextlib.contextmanager
def lock_held(workdir: pathlib.Path):
  """Another live process holds the workdir's lock; yields its Popen."""
  holder = subprocess.Popen(
      [sys.executable, "-c",
       "import sys, time\n"
       "from lipjax.training import workdir_lock\n"
       f"workdir_lock.WorkdirLock({str(workdir)!r}).acquire()\n"
       "print('locked', flush=True)\n"
       "time.sleep(600)\n"], cwd=REPO, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    yield holder
  finally:
    holder.kill()
    holder.wait()


def assert_same_params(workdir_a, workdir_b, step):
  _, params_a = restore_params(workdir_a, step)
  _, params_b = restore_params(workdir_b, step)
  for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("damage", ["flip_bit", "truncate"])
def test_corrupt_latest_checkpoint_is_kept_and_training_falls_back(
    full_run, tmp_path, capsys, damage):
  workdir = copy_run(full_run, tmp_path)
  victim = largest_data_file(workdir / "checkpoints" / "16")
  data = bytearray(victim.read_bytes())
  if damage == "flip_bit":  # Restores without any error from Orbax.
    data[len(data) // 2] ^= 0x10
  else:
    data = data[:len(data) // 2]
  victim.write_bytes(bytes(data))
  loop.train_and_evaluate(config(), str(workdir))
  err = capsys.readouterr().err
  word = "corrupt" if damage == "flip_bit" else "unreadable"
  where = re.escape(f"{workdir}/checkpoints/16")
  assert re.search(rf"Checkpoint step 16 is {word}.*{where}", err), err
  assert "Falling back to checkpoint step 12" in err
  # Kept as it was, out of the way; the run redid steps 13-16 exactly.
  kept = workdir / checkpoints.SET_ASIDE / "16.corrupt"
  assert (kept / victim.relative_to(workdir / "checkpoints" / "16")
          ).read_bytes() == bytes(data)
  assert_same_params(full_run, workdir, 16)


def test_certify_refuses_a_corrupt_checkpoint(full_run, tmp_path):
  workdir = copy_run(full_run, tmp_path)
  corrupt_checkpoint(workdir, 12)
  with pytest.raises(checkpoints.CorruptCheckpointError,
                     match=r"step 12 is corrupt.*saved: 4, 8, 16"):
    workdir_lib.restore(str(workdir), checkpoint=12)
  result = subprocess.run(
      [sys.executable, "certify.py", f"--workdir={workdir}",
       "--checkpoint=12", "--progress=false"], cwd=REPO,
      env=dict(os.environ, JAX_NUM_CPU_DEVICES="1"), capture_output=True,
      text=True, timeout=300, check=False)
  assert result.returncode == 3, result.stderr
  errors = [l for l in result.stderr.splitlines() if "error" in l.lower()]
  assert len(errors) == 1 and "step 12 is corrupt" in errors[0], errors
  assert not list(workdir.glob("certify*"))


def test_checkpoint_flag_resumes_from_the_chosen_step(full_run, tmp_path):
  workdir = copy_run(full_run, tmp_path)
  before = (workdir / "config.json").read_bytes()
  with pytest.raises(checkpoints.CheckpointNotFoundError,
                     match=r"--checkpoint 7: .*saved steps: 4, 8, 12, 16"):
    loop.train_and_evaluate(config(), str(workdir), checkpoint=7)
  assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [
      4, 8, 12, 16]
  assert (workdir / "config.json").read_bytes() == before
  loop.train_and_evaluate(config(), str(workdir), checkpoint=8)
  aside = sorted(p.name for p in (workdir / checkpoints.SET_ASIDE).iterdir())
  assert aside == ["12.superseded", "16.superseded"]
  assert_same_params(full_run, workdir, 16)


def test_divergence_guard_keeps_a_checkpoint_its_advice_resumes(tmp_path):
  # Epoch 1 trains at 3e-3; epoch 2 at 1.0, where the bound jumps ~1e5x in
  # two steps (still below max_lipschitz) and keeps growing.
  spiking = smoke_config(**{"optimizer.end_learning_rate": 1.0})
  workdir = str(tmp_path / "run")
  with pytest.raises(loop.NonFiniteLossError) as caught:
    loop.train_and_evaluate(spiking, workdir)
  message = str(caught.value)
  assert "\n" not in message
  assert message.startswith("Training diverged at step 10 (epoch 2): the "
                            "Lipschitz bound estimate jumped"), message
  assert "The last good step was 8." in message
  assert "newest good checkpoint is step 8" in message
  saved = [int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir()]
  assert sorted(saved) == [4, 8]  # keep=2: nothing from the spike
  # The advice, applied as given, trains to the end without a jump.
  step = int(re.search(r"--checkpoint (\d+) ", message).group(1))
  advice = dict(re.findall(r"--config\.optimizer\.(\w+)=(\S+)", message))
  assert advice == {"learning_rate": "0.0003", "end_learning_rate": "0.1"}
  fixed = smoke_config(**{f"optimizer.{k}": float(v)
                          for k, v in advice.items()})
  loop.train_and_evaluate(fixed, workdir, checkpoint=step)
  last, _ = restore_params(workdir)
  assert last == 16


def test_health_rules():
  limits = smoke_config().checkpoint  # max 1e6, growth 100
  ok = {"loss": 1.2, "lipschitz_max": 50.0}
  assert health.problem(ok, previous_lipschitz=1.0, checkpoint_config=limits,
                        bound_in_loss=True) is None
  cases = [({"loss": float("nan")}, {}, "the loss is nan"),
           ({}, {"params_finite": False}, "parameters are not finite"),
           ({"lipschitz_max": float("inf")}, {}, "estimate is inf"),
           ({"lipschitz_max": 2e6}, {}, "above checkpoint.max_lipschitz"),
           ({}, {"previous_lipschitz": 0.4}, "jumped from 0.4 to 50")]
  for values, kwargs, match in cases:
    kwargs = {"previous_lipschitz": None, **kwargs}
    text = health.problem({**ok, **values}, checkpoint_config=limits,
                          bound_in_loss=True, **kwargs)
    assert match in text, text
  # Plain cross-entropy does not use the bound: only finiteness counts.
  assert health.problem({**ok, "lipschitz_max": 2e6}, previous_lipschitz=0.4,
                        checkpoint_config=limits, bound_in_loss=False) is None


@pytest.mark.parametrize("key, value", [("batch_size", 64),
                                        ("data.synthetic.seed", 1),
                                        ("data.augment.hflip", True)])
def test_resume_refuses_a_change_of_data_or_batches(full_run, tmp_path, key,
                                                    value):
  workdir = copy_run(full_run, tmp_path)
  before = files_of(workdir)
  old = json.loads((workdir / "config.json").read_text())
  for part in key.split("."):
    old = old[part]
  with pytest.raises(resume.ConfigChangedError,
                     match=rf"{key} = {old!r}, .* {key} = {value!r}"):
    loop.train_and_evaluate(config(**{key: value}), str(workdir))
  assert files_of(workdir) == before


def test_workdir_lock_refuses_a_live_process_and_takes_a_stale_one(
    full_run, tmp_path):
  workdir = copy_run(full_run, tmp_path)
  with lock_held(workdir) as holder:
    with pytest.raises(workdir_lock.WorkdirLockedError,
                       match=rf"pid {holder.pid} on .* training in "
                       + re.escape(str(workdir))):
      loop.train_and_evaluate(config(), str(workdir))
  # The killed holder left its lock file behind: it is stale, taken over.
  lock_file = workdir / workdir_lock.LOCK_NAME
  assert str(holder.pid) in lock_file.read_text()
  loop.train_and_evaluate(config(), str(workdir))  # resumes at the end
  assert not lock_file.exists()


@pytest.mark.parametrize("checkpoint, killed_at", [(4, 6), (8, 8)])
def test_metrics_after_a_resume_log_each_step_once(full_run, tmp_path,
                                                   checkpoint, killed_at):
  # Killed at step 6, after the step-4 checkpoint (steps 5-6 were logged),
  # or right after the step-8 checkpoint, before epoch 1's summary and
  # validation were logged.
  workdir = copy_run(full_run, tmp_path, drop_after=checkpoint)
  full = read_metrics(str(full_run))
  with open(workdir / "metrics.jsonl", "w", encoding="utf-8") as f:
    for record in full:
      if record["step"] <= killed_at and record["kind"] == "train":
        f.write(json.dumps(record) + "\n")
  loop.train_and_evaluate(config(), str(workdir))
  resumed = read_metrics(str(workdir))
  for kind in ("train", "epoch", "eval"):
    steps = [r["step"] for r in resumed if r["kind"] == kind]
    assert steps == [r["step"] for r in full if r["kind"] == kind], kind
  losses = [r["loss"] for r in resumed if r["kind"] == "train"]
  assert losses == [r["loss"] for r in full if r["kind"] == "train"]
  # Epoch 1's summary averages its four logged steps, not the ones after
  # the checkpoint.
  epoch1 = [r for r in resumed if r["kind"] == "epoch"][0]
  assert epoch1["loss"] == pytest.approx(np.mean(losses[:4]), rel=1e-12)
  evals = [r for r in resumed if r["kind"] == "eval"]
  full_evals = [r for r in full if r["kind"] == "eval"]
  assert [r["val/mean_radius"] for r in evals] == [
      r["val/mean_radius"] for r in full_evals]


def assert_refused(result, status: int, match: str) -> None:
  """train.py exited ``status`` with one error line matching ``match``."""
  assert result.returncode == status, result.stderr
  assert "Traceback" not in result.stderr
  errors = [l for l in result.stderr.splitlines() if "error" in l.lower()]
  assert len(errors) == 1 and errors[0].startswith("train.py: error: "), (
      errors)
  assert re.search(match, errors[0]), errors[0]


def test_train_py_refusals_exit_with_one_line_and_change_nothing(
    full_run, tmp_path):
  workdir = copy_run(full_run, tmp_path)
  corrupt_checkpoint(workdir, 12)
  before = files_of(workdir)
  args = ("--config=configs/smoke.py", "--config.checkpoint.keep=10",
          f"--workdir={workdir}")
  assert_refused(run_train_py(*args, "--checkpoint=12"), 3,
                 r"step 12 is corrupt.*--checkpoint \(saved: 4, 8, 16\)")
  assert_refused(run_train_py(*args, "--checkpoint=7"), 2,
                 r"--checkpoint 7: .*saved steps: 4, 8, 12, 16")
  assert_refused(run_train_py(*args, "--config.batch_size=64"), 2,
                 r"batch_size = 32, .* batch_size = 64")
  assert files_of(workdir) == before
  with lock_held(workdir) as holder:
    assert_refused(run_train_py(*args), 2,
                   rf"Another train.py \(pid {holder.pid} on ")
  lock_file = workdir / workdir_lock.LOCK_NAME
  assert {p: b for p, b in files_of(workdir).items() if p != lock_file
          } == before
