"""train.py's command line: --help, and one line (exit 2) for every mistake.

Each mistake is made as a user makes it, through a subprocess on the smoke
config (synthetic 8x8 data), and must be refused before the workdir exists:
an unknown or mistyped key, a mistyped config path, a bad variant, values
that could only fail later, a missing dataset, --checkpoint before any run.
(tests/resume_test.py checks the refusals of a resume.)
"""

import os
import pathlib
import subprocess
import sys

import pytest

from configs import default
from configs import fashion_mnist
from configs import smoke
from lipjax.training import config_checks

REPO = pathlib.Path(__file__).resolve().parents[1]
SMOKE = "--config=configs/smoke.py"


def run_train_py(*args, env=None):
  """``python train.py ARGS`` on one CPU device; the CompletedProcess."""
  env = dict(os.environ, JAX_NUM_CPU_DEVICES="1", **(env or {}))
  return subprocess.run([sys.executable, "train.py", *args], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=300,
                        check=False)


def test_help_explains_configs_variants_and_overrides():
  result = run_train_py("--help")
  assert result.returncode == 0, result.stderr
  out = result.stdout
  assert "--config FILE[:VARIANT]" in out and "--config.KEY=VALUE" in out
  assert "configs/default.py lists every key" in out
  assert "Exit status" in out
  for name in ("mnist", "fashion_mnist", "cifar10", "cifar100",
               "tiny_imagenet", "smoke"):
    assert f"configs/{name}.py: " in out, name
  assert "Variants: " + ", ".join(fashion_mnist.VARIANTS) in out


# The mistake (arguments after --workdir) and what its one line must say.
MISTAKES = {
    "unknown key": ([SMOKE, "--config.foo=1"], "Unknown config key 'foo'."),
    "typo in a key": ([SMOKE, "--config.optimizer.lerning_rate=1"],
                      "Did you mean 'optimizer.learning_rate'?"),
    "key without its section": ([SMOKE, "--config.lam=3"],
                                "Did you mean 'loss.lam'?"),
    "mistyped config path": (["--config=configs/smok.py"],
                             "Did you mean configs/smoke.py?"),
    "bad variant": (["--config=configs/fashion_mnist.py:fast"],
                    "Unknown variant(s) ['fast']"),
    "variant of a file without": (["--config=configs/mnist.py:quick"],
                                  "configs/mnist.py has no variants"),
    "log_every_steps=0": ([SMOKE, "--config.log_every_steps=0"],
                          "config.log_every_steps = 0 must be an integer "
                          ">= 1"),
    "eval.every_epochs=0": ([SMOKE, "--config.eval.every_epochs=0"],
                            "config.eval.every_epochs = 0"),
    "eval.batch_size=0": ([SMOKE, "--config.eval.batch_size=0"],
                          "config.eval.batch_size = 0"),
    "eval.eps=abc": ([SMOKE, "--config.eval.eps=abc"],
                     "config.eval.eps = ('abc',) must be finite radii"),
    "loss.t=0": ([SMOKE, "--config.loss.t=0"],
                 "config.loss.t = 0.0 must be a finite number > 0"),
    "not a number": ([SMOKE, "--config.loss.t=abc"], "--config.loss.t=abc"),
    "positional argument": ([SMOKE, "extra"], "unexpected argument"),
    "--checkpoint, no run yet": ([SMOKE, "--checkpoint=4"],
                                 "holds no checkpoints (saved steps: none)"),
}


@pytest.mark.parametrize("mistake", MISTAKES)
def test_mistakes_exit_2_with_one_line_and_no_workdir(mistake, tmp_path):
  args, match = MISTAKES[mistake]
  workdir = tmp_path / "run"
  result = run_train_py(f"--workdir={workdir}", *args)
  assert result.returncode == 2, result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("train.py: error: "), (
      result.stderr)
  assert match in lines[0], lines[0]
  assert not workdir.exists()


def test_missing_flags_exit_2():
  result = run_train_py()
  assert result.returncode == 2
  assert result.stderr.strip() == ("train.py: error: --config is required. "
                                   "--workdir is required. (see train.py "
                                   "--help)")


def test_missing_dataset_names_the_folder_and_leaves_no_workdir(tmp_path):
  # download is on (the config's default) but TensorFlow, which preparing
  # needs, is not installed here: the message must still name the folder.
  empty = tmp_path / "no_data"
  workdir = tmp_path / "run"
  result = run_train_py("--config=configs/fashion_mnist.py:quick",
                     f"--config.data.data_dir={empty}",
                     f"--workdir={workdir}", env={"TFDS_DATA_DIR": "/x/y"})
  assert result.returncode == 2, result.stderr
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("train.py: error: Dataset 'fashion_mnist'")
  assert str(empty / "fashion_mnist") in last
  assert "TFDS_DATA_DIR is '/x/y'" in last
  assert "Traceback" not in result.stderr
  assert not workdir.exists()


@pytest.mark.parametrize("key", sorted(config_checks.RANGES))
def test_every_range_is_checked_at_start_up(key):
  # -1 is outside every range (all start at 0, 1 or 2).
  config = smoke.get_config()
  *parents, last = key.split(".")
  node = config
  for part in parents:
    node = node[part]
  node[last] = -1
  with pytest.raises(ValueError, match=rf"config\.{key} = -1"):
    config_checks.validate(config, default.get_config())
