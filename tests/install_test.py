"""A new user's first steps, in one fresh virtual environment.

``python -m build`` makes the wheel; a new venv installs it with the
``prepare`` extra (from PyPI or pip's cache; see :func:`venv`); then, run
from outside the clone so that only the installed package can be imported:

* the build prints no deprecation banner, the wheel imports (``lipjax.bound``);
* with the dataset's server unreachable, preparing fails at once with a
  one-line error that names the offline routes;
* ``python -m lipjax.training.data prepare fashion_mnist --from_dir`` on the
  original download files of Debian's ``dataset-fashion-mnist`` package (CI
  installs it) runs TFDS's real extraction and preparation, and the result
  equals the IDX files decoded here with numpy, image for image and label for
  label, and a prepared copy at ``$TFDS_DATA_DIR`` (or the shared folder)
  when there is one.

Installing TensorFlow dominates the cost (under a minute with a warm cache).
"""

import gzip
import os
import pathlib
import subprocess
import sys
import sysconfig

import numpy as np
import pytest

from lipjax.training import data
from lipjax.training import downloads
from tests import real_data

_DEBIAN_DIR = pathlib.Path(downloads.LOCAL_COPIES["fashion_mnist"][0])
_IDX = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
        "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def _run(args, cwd, env=None, check=True):
  """Runs a command outside the clone, without the clone on PYTHONPATH."""
  env = {k: v for k, v in (env or os.environ).items() if k != "PYTHONPATH"}
  result = subprocess.run([str(a) for a in args], cwd=cwd, env=env,
                          capture_output=True, text=True, check=False)
  if check and result.returncode:
    pytest.fail(f"{' '.join(map(str, args))} exited {result.returncode}:\n"
                f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
  return result


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """(wheel path, build log) of ``python -m build`` on the clone."""
  pytest.importorskip("build", reason="pip install -e '.[test]' installs it")
  out = tmp_path_factory.mktemp("dist")
  log = _run([sys.executable, "-m", "build", "--outdir", out,
              real_data.REPO], cwd=out)
  wheels = sorted(out.glob("lipjax-*.whl"))
  assert len(wheels) == 1, wheels
  return wheels[0], log.stdout + log.stderr


@pytest.fixture(scope="module")
def venv(built, tmp_path_factory):
  """The python of a new venv holding the wheel and the prepare extra.

  The venv sees this environment's packages (which the core dependencies
  put there) through a .pth file, so pip adds only the wheel and what the
  prepare extra needs beyond them: that is what the test is about, and it
  saves installing jax & co. a second time.
  """
  root = tmp_path_factory.mktemp("venv")
  _run([sys.executable, "-m", "venv", root], cwd=root)
  python = root / "bin" / "python"
  site = _run([python, "-c", "import sysconfig; "
               "print(sysconfig.get_paths()['purelib'])"], cwd=root)
  ours = {sysconfig.get_paths()[k] for k in ("purelib", "platlib")}
  (pathlib.Path(site.stdout.strip()) / "test_env.pth").write_text(
      "".join(f"{p}\n" for p in sorted(ours)))
  _run([python, "-m", "pip", "install", "--quiet", f"{built[0]}[prepare]"],
       cwd=root)
  return python


def test_build_prints_no_deprecation_banner(built):
  assert "deprecat" not in built[1].lower(), built[1]


def test_wheel_imports_outside_the_clone(venv, tmp_path):
  code = ("import lipjax, lipjax.training.data, lipjax.certification.pipeline;"
          " assert callable(lipjax.bound); print(lipjax.__file__)")
  where = pathlib.Path(_run([venv, "-c", code], cwd=tmp_path).stdout.strip())
  assert where.is_relative_to(venv.parent.parent), where  # Not the clone's.


def test_unreachable_download_fails_at_once_in_one_line(venv, tmp_path):
  closed = "http://127.0.0.1:1"  # Every request goes to a refused port.
  env = {k: v for k, v in os.environ.items()
         if k.lower() not in ("no_proxy", "http_proxy", "https_proxy")}
  env.update(http_proxy=closed, https_proxy=closed, HTTP_PROXY=closed,
             HTTPS_PROXY=closed)
  result = _run([venv, "-m", "lipjax.training.data", "prepare",
                 "fashion_mnist", "--data_dir", tmp_path / "tfds"],
                cwd=tmp_path, env=env, check=False)
  assert result.returncode == 1, result.stderr[-3000:]
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error: Could not download fashion_mnist"), last
  for part in ("--from_dir DIR", str(_DEBIAN_DIR), "dataset-fashion-mnist",
               "TFDS_DATA_DIR"):
    assert part in last, part
  assert not data.is_prepared("fashion_mnist", str(tmp_path / "tfds"))


def _read_idx(path):
  """An IDX file of unsigned bytes (gzipped) as a uint8 array."""
  raw = gzip.decompress(path.read_bytes())
  assert raw[:3] == b"\0\0\x08", "not unsigned-byte IDX data"
  dims = np.frombuffer(raw, ">u4", count=raw[3], offset=4)
  return np.frombuffer(raw, np.uint8, offset=4 + 4 * raw[3]).reshape(dims)


def _examples(images, labels):
  """Sorted (image, label) byte rows: equal iff equal as multisets."""
  rows = np.concatenate([images.reshape(len(images), -1),
                         labels.astype(np.uint8)[:, None]], axis=1)
  return sorted(row.tobytes() for row in rows)


@pytest.mark.skipif(not all((_DEBIAN_DIR / f).is_file()
                            for pair in _IDX.values() for f in pair),
                    reason=f"no Fashion-MNIST files in {_DEBIAN_DIR}: "
                    "apt-get install dataset-fashion-mnist")
def test_prepare_fashion_mnist_from_debian_files(venv, tmp_path):
  tfds_dir = tmp_path / "tfds"
  _run([venv, "-m", "lipjax.training.data", "prepare", "fashion_mnist",
        "--data_dir", tfds_dir, "--from_dir", _DEBIAN_DIR], cwd=tmp_path)
  reference = real_data.tfds_data_dir()
  for split, (images_gz, labels_gz) in _IDX.items():
    ours = data.load_split("fashion_mnist", split, data_dir=str(tfds_dir))
    images, labels = _read_idx(_DEBIAN_DIR / images_gz), _read_idx(
        _DEBIAN_DIR / labels_gz)
    assert ours.images.shape == (len(labels), 28, 28, 1)
    # TFDS stores the examples shuffled by key: compare as multisets.
    assert _examples(ours.images[..., 0], ours.labels) == _examples(
        images, labels)
    if real_data.has_fashion_mnist():
      theirs = data.load_split("fashion_mnist", split,
                               data_dir=str(reference))
      np.testing.assert_array_equal(ours.images, theirs.images)
      np.testing.assert_array_equal(ours.labels, theirs.labels)
