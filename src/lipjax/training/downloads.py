"""Feeding TFDS's download step with local copies of a dataset's files.

A TFDS builder fetches its source files through a ``DownloadManager`` that
looks in its download cache before it goes online: a file named after the URL
and the registered sha256 (``resource.get_dl_fname``) with an ``.INFO`` file
beside it. :func:`seed_cache` fills a (temporary) cache with the files of a
local folder, so that TFDS's own extraction, example generation and writing
run on them and nothing is fetched. This is how ``python -m
lipjax.training.data prepare NAME --from_dir DIR`` prepares Fashion-MNIST on a
machine without internet access, e.g. from Debian's ``dataset-fashion-mnist``
package (:data:`LOCAL_COPIES`).

Each file is compared with the sha256 TFDS registered for its URL. A copy
that differs is used as given, with a warning: repackaged copies re-stamp
the gzip header (Debian's drop the original file name and carry the package's
build time), so their checksums cannot match although the data is the same
(``tests/install_test.py`` checks Debian's against the decompressed IDX
content, and against a copy prepared from the real download when present).
"""

from __future__ import annotations

import os
import pathlib
import posixpath
import sys
import urllib.error
import urllib.parse

import requests
import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core.download import checksums
from tensorflow_datasets.core.download import resource

# Where a system package puts a dataset's original download files:
# {dataset: (folder, package)}.
LOCAL_COPIES = {
    "fashion_mnist": ("/usr/share/datasets/fashion-mnist",
                      "Debian's dataset-fashion-mnist"),
}

# What TFDS's downloader raises when a URL cannot be fetched (DNS, refused
# connection, HTTP status, FTP).
DOWNLOAD_ERRORS = (requests.exceptions.RequestException,
                   urllib.error.URLError, tfds.download.DownloadError)


def _filename(url: str, info: checksums.UrlInfo) -> str:
  return info.filename or posixpath.basename(urllib.parse.urlparse(url).path)


def _cache_path(download_dir: pathlib.Path, name: str, url: str,
                info: checksums.UrlInfo) -> pathlib.Path:
  # Where TFDS's DownloadManager keeps a verified download.
  return download_dir / name / resource.get_dl_fname(url, info.checksum)


def registered_files(builder: tfds.core.DatasetBuilder
                     ) -> dict[str, checksums.UrlInfo]:
  """``{url: UrlInfo}`` of the files TFDS downloads to prepare ``builder``.

  Raises:
    ValueError: the builder registers no downloads (e.g. Tiny-ImageNet,
      whose archive is given with ``manual_dir``).
  """
  infos = builder.url_infos
  if not infos:
    raise ValueError(f"TFDS registers no download files for "
                     f"{builder.name!r}; --from_dir does not apply (use "
                     f"--manual_dir if the dataset takes one).")
  return dict(infos)


def seed_cache(builder: tfds.core.DatasetBuilder, from_dir: str,
               download_dir: str) -> list[str]:
  """Links ``from_dir``'s copies of ``builder``'s downloads into a cache.

  Every file is checked to exist before anything is written.

  Args:
    builder: the TFDS builder to prepare.
    from_dir: folder that holds the files under their download names (e.g.
      ``train-images-idx3-ubyte.gz``).
    download_dir: the download cache to fill; pass it as ``download_dir`` to
      ``builder.download_and_prepare``.

  Returns:
    The names of the files whose sha256 differs from TFDS's registered one.

  Raises:
    FileNotFoundError: a file is missing in ``from_dir``.
    ValueError: see :func:`registered_files`.
  """
  infos = registered_files(builder)
  src = pathlib.Path(os.path.expanduser(from_dir))
  paths = {url: src / _filename(url, info) for url, info in infos.items()}
  missing = sorted(p.name for p in paths.values() if not p.is_file())
  if missing:
    raise FileNotFoundError(
        f"--from_dir {from_dir} lacks {', '.join(missing)}: it must hold the "
        f"original download files of {builder.name!r}, under these names.")
  cache = pathlib.Path(download_dir)
  (cache / builder.name).mkdir(parents=True, exist_ok=True)
  differing = []
  for url, path in paths.items():
    actual = checksums.compute_url_info(path)
    if actual != infos[url]:
      differing.append(path.name)
    cached = _cache_path(cache, builder.name, url, infos[url])
    cached.symlink_to(path.resolve())
    # original_fname (e.g. *.gz) tells TFDS how to extract the file.
    resource.write_info_file(url=url, path=epath.Path(cached),
                             dataset_name=builder.name,
                             original_fname=path.name, url_info=actual)
  return differing


def uncached_urls(builder: tfds.core.DatasetBuilder, download_dir: str
                  ) -> list[str]:
  """The registered URLs whose files are not in TFDS's download cache."""
  cache = pathlib.Path(download_dir)
  return [url for url, info in (builder.url_infos or {}).items()
          if not any(resource.is_locally_cached(epath.Path(p)) for p in (
              _cache_path(cache, builder.name, url, info),
              cache / resource.get_dl_fname(url, info.checksum)))]  # Legacy.


def check_reachable(urls: list[str], timeout: float = 20.0) -> None:
  """Raises what requests raises if a URL's server cannot be reached.

  One HEAD request per server, without retries: TFDS's downloader retries
  a connection error for about 3.5 minutes before it gives up, so an
  offline machine learns it at once. The HTTP status is not checked (TFDS
  reports a bad one itself); proxies come from the environment, as for
  TFDS's downloads.
  """
  servers = {}
  for url in urls:
    parts = urllib.parse.urlparse(url)
    if parts.scheme in ("http", "https"):
      servers.setdefault((parts.scheme, parts.netloc), url)
  for url in servers.values():
    requests.head(url, timeout=timeout, allow_redirects=False).close()


def warn_differing(name: str, from_dir: str, differing: list[str]) -> None:
  """One line on stderr naming files that are not TFDS's exact downloads."""
  if differing:
    print(f"lipjax.training.data: {', '.join(differing)} in {from_dir} "
          f"differ from the downloads TFDS registered for {name} (sha256); "
          f"using them as given (repackaged copies re-stamp gzip headers).",
          file=sys.stderr, flush=True)


def download_failed_message(name: str, data_dir: str, error: Exception
                            ) -> str:
  """A one-line error for a failed download that names the offline routes."""
  url = getattr(getattr(error, "request", None), "url", None)
  if url:  # requests' own text is a long repr of its retry chain.
    reason = f"{type(error).__name__} for {url}"
  else:
    first = (str(error).splitlines() or [""])[0]
    reason = f"{type(error).__name__}: {first[:160]}"
  hint = "DIR holding its original download files"
  if name in LOCAL_COPIES:
    folder, package = LOCAL_COPIES[name]
    hint = (f"DIR={folder} from {package} package, or any folder holding "
            f"its original download files")
  return (f"Could not download {name} ({reason}). Offline, prepare it from "
          f"local files: python -m lipjax.training.data prepare {name} "
          f"--data_dir {data_dir} --from_dir DIR ({hint}); or set "
          f"TFDS_DATA_DIR to a folder that already holds it prepared.")
