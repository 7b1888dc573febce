"""Tests for `lipjax.training.downloads`: preparing without going online.

The seeded cache is read by TFDS's real ``DownloadManager`` (its download
step; extraction needs TensorFlow and is exercised end to end on
Fashion-MNIST in ``install_test.py``). Nothing is downloaded: the URLs point
at a closed local port, so any attempt to fetch fails at once.
"""

import dataclasses
import gzip
import time
import types

import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.core.download import checksums

from lipjax.training import downloads

_URL = "http://127.0.0.1:1/files/"  # Port 1: connection refused.


def _toy(tmp_path):
  """A folder with two download files and a builder registering them.

  ``exact.gz`` has the registered checksum; ``restamped.gz`` holds the same
  data under another gzip header (as Debian's copies do), so it differs.
  """
  src = tmp_path / "files"
  src.mkdir()
  payload = bytes(range(256)) * 7
  (src / "exact.gz").write_bytes(gzip.compress(payload, mtime=0))
  (src / "restamped.gz").write_bytes(gzip.compress(payload, mtime=1))
  exact = checksums.compute_url_info(src / "exact.gz")
  infos = {_URL + "exact.gz": exact, _URL + "restamped.gz":
           dataclasses.replace(exact, filename="restamped.gz")}
  return src, types.SimpleNamespace(name="toy", url_infos=infos)


def test_seeded_cache_feeds_tfds_download_manager(tmp_path):
  src, builder = _toy(tmp_path)
  cache = tmp_path / "cache"
  assert sorted(downloads.uncached_urls(builder, str(cache))) == sorted(
      builder.url_infos)
  differing = downloads.seed_cache(builder, str(src), str(cache))
  assert differing == ["restamped.gz"]
  assert downloads.uncached_urls(builder, str(cache)) == []
  manager = tfds.download.DownloadManager(
      download_dir=cache, url_infos=builder.url_infos, dataset_name="toy")
  paths = manager.download({"a": _URL + "exact.gz",
                            "b": _URL + "restamped.gz"})
  assert paths["a"].read_bytes() == (src / "exact.gz").read_bytes()
  assert paths["b"].read_bytes() == (src / "restamped.gz").read_bytes()
  assert (src / "exact.gz").read_bytes() != (
      src / "restamped.gz").read_bytes()


def test_seed_cache_names_missing_files_before_writing(tmp_path):
  src, builder = _toy(tmp_path)
  (src / "restamped.gz").unlink()
  cache = tmp_path / "cache"
  with pytest.raises(FileNotFoundError, match="lacks restamped.gz"):
    downloads.seed_cache(builder, str(src), str(cache))
  assert not cache.exists()
  no_downloads = types.SimpleNamespace(name="tiny_imagenet", url_infos=None)
  with pytest.raises(ValueError, match="--manual_dir"):
    downloads.seed_cache(no_downloads, str(src), str(cache))


def test_unreachable_server_fails_at_once_with_the_offline_routes():
  start = time.monotonic()
  with pytest.raises(downloads.DOWNLOAD_ERRORS) as error:
    downloads.check_reachable(["ftp://ignored/x", _URL + "exact.gz"])
  assert time.monotonic() - start < 10  # TFDS alone retries ~3.5 minutes.
  message = downloads.download_failed_message(
      "fashion_mnist", "/data", error.value)
  assert "\n" not in message
  assert message.startswith(
      f"Could not download fashion_mnist (ConnectionError for {_URL}exact.gz)")
  for part in ("prepare fashion_mnist --data_dir /data --from_dir DIR",
               "/usr/share/datasets/fashion-mnist",
               "dataset-fashion-mnist", "TFDS_DATA_DIR"):
    assert part in message
  other = downloads.download_failed_message(
      "cifar10", "/data", tfds.download.DownloadError("HTTP code: 404."))
  assert "(DownloadError: HTTP code: 404.)" in other
  assert "Debian" not in other and "--from_dir DIR" in other
