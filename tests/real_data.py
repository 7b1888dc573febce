"""Where tests find a prepared copy of real Fashion-MNIST, if any."""

import os
import pathlib

from lipjax.training import data

REPO = pathlib.Path(__file__).resolve().parents[1]


def tfds_data_dir() -> pathlib.Path:
  """``$TFDS_DATA_DIR``, else ``shared/tensorflow_datasets`` by the clone."""
  return pathlib.Path(os.environ.get("TFDS_DATA_DIR")
                      or REPO.parent / "shared" / "tensorflow_datasets")


def has_fashion_mnist() -> bool:
  return data.is_prepared("fashion_mnist", str(tfds_data_dir()))


SKIP_REASON = (f"no prepared Fashion-MNIST in {tfds_data_dir()} (set "
               f"TFDS_DATA_DIR)")
