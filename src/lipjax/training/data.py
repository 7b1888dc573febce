"""Datasets as in-memory uint8 arrays: TFDS loading, splits, preparing.

Datasets are TFDS datasets prepared in array_record format and read with
``tfds.data_source`` (random access, no TensorFlow). Each split is decoded once
into ``uint8 [N, H, W, C]`` images and ``int32 [N]`` labels; MNIST, CIFAR and
Tiny-ImageNet all fit in memory. The reference's ``random_split(0.9)`` of the
official training set gives the train/validation pair
(docs/training.md#data).

Batching is in :mod:`lipjax.training.batches`, augmentation (on the device,
with an explicit key) in :mod:`lipjax.training.augment`.

Preparing a dataset needs TensorFlow (``pip install -e '.[prepare]'``)::

  python -m lipjax.training.data prepare cifar10 --data_dir ~/tensorflow_datasets
  python -m lipjax.training.data prepare tiny_imagenet --data_dir D --manual_dir M

Offline, from a folder of the original download files (here Debian's
``dataset-fashion-mnist`` package; see :mod:`lipjax.training.downloads`)::

  python -m lipjax.training.data prepare fashion_mnist \
      --from_dir /usr/share/datasets/fashion-mnist
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import os
import sys
import tempfile

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from lipjax.training import downloads

# Registers the "tiny_imagenet" TFDS builder. It lives in its own module so
# that `python -m lipjax.training.data` does not register it twice (as __main__ too).
from lipjax.training import tiny_imagenet


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Static facts about a dataset; ``None`` where it is chosen per run."""
  name: str
  image_shape: tuple[int, int, int] | None  # (H, W, C)
  num_classes: int | None
  tfds_name: str | None
  train_split: str | None
  test_split: str | None


DATASETS: dict[str, DatasetInfo] = {i.name: i for i in (
    DatasetInfo("mnist", (28, 28, 1), 10, "mnist", "train", "test"),
    DatasetInfo("fashion_mnist", (28, 28, 1), 10, "fashion_mnist", "train",
                "test"),
    DatasetInfo("cifar10", (32, 32, 3), 10, "cifar10", "train", "test"),
    DatasetInfo("cifar100", (32, 32, 3), 100, "cifar100", "train", "test"),
    # The official test images are unlabelled: test on the 10k labelled
    # validation images (docs/training.md#data).
    DatasetInfo("tiny_imagenet", tiny_imagenet.IMAGE_SHAPE,
                tiny_imagenet.NUM_CLASSES, "tiny_imagenet", "train",
                "validation"),
    DatasetInfo("synthetic", None, None, None, None, None),
)}

# Per-pixel noise of synthetic examples around their class prototype (pixels
# are 0..255): small enough that a tiny net learns the classes in a few steps.
_SYNTHETIC_NOISE_STD = 40.0
_DECODE_CHUNK = 1024
_PROGRESS_ABOVE = 10_000


class DatasetNotFoundError(FileNotFoundError):
  """A dataset is not prepared in the data_dir and may not be downloaded."""


@dataclasses.dataclass(frozen=True)
class Dataset:
  """One split in memory."""
  images: np.ndarray  # uint8 [N, H, W, C]
  labels: np.ndarray  # int32 [N], in [0, num_classes)
  num_classes: int
  name: str

  def __len__(self) -> int:
    return len(self.labels)


def dataset_info(name: str) -> DatasetInfo:
  """Looks up a dataset; ValueError naming the known ones if unknown."""
  if name not in DATASETS:
    raise ValueError(f"Unknown dataset {name!r}; known: {sorted(DATASETS)}.")
  return DATASETS[name]


def data_dir_or_default(data_dir: str | None) -> str:
  """The given data_dir, else ``$TFDS_DATA_DIR``, else TFDS's default."""
  if data_dir:
    return os.fspath(os.path.expanduser(data_dir))
  return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser(
      "~/tensorflow_datasets")


def _tfds_info(name: str) -> DatasetInfo:
  info = dataset_info(name)
  if info.tfds_name is None:
    raise ValueError(f"Dataset {name!r} is generated, not stored: use "
                     f"load({name!r}, synthetic=...).")
  return info


def _is_prepared(data_dir: str, tfds_name: str) -> bool:
  root = epath.Path(data_dir, tfds_name)  # <version>/ or <config>/<version>/
  return any(any(root.glob(p)) for p in ("*/dataset_info.json",
                                          "*/*/dataset_info.json"))


def is_prepared(name: str, data_dir: str | None = None) -> bool:
  """Whether ``name`` is prepared in ``data_dir`` (default as in load)."""
  if name == "synthetic":
    return True
  return _is_prepared(data_dir_or_default(data_dir), _tfds_info(name).tfds_name)


def _not_found_message(name: str, split: str, data_dir: str) -> str:
  manual = ""
  if name == "tiny_imagenet":
    manual = (f" --manual_dir M, where the folder M holds the official "
              f"{tiny_imagenet.ZIP_NAME} ({tiny_imagenet.HOMEPAGE})")
  env = os.environ.get("TFDS_DATA_DIR")
  searched = os.path.join(data_dir, _tfds_info(name).tfds_name)
  return (
      f"Dataset {name!r} (split {split!r}) is not prepared in array_record "
      f"format under data_dir={data_dir!r} (searched {searched}; "
      f"TFDS_DATA_DIR is {'unset' if env is None else repr(env)}). Either "
      f"point to a data_dir that holds it (set TFDS_DATA_DIR or "
      f"config.data.data_dir), or prepare it there (needs TensorFlow): pip "
      f"install -e '.[prepare]' && python -m lipjax.training.data prepare "
      f"{name} --data_dir {data_dir}{manual}.")


def _decode(source, name: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """Decodes every record of a TFDS data source into numpy arrays."""
  num = len(source)
  shape = DATASETS[name].image_shape
  images = np.empty((num, *shape), np.uint8)
  labels = np.empty((num,), np.int32)
  show = num > _PROGRESS_ABOVE
  for start in range(0, num, _DECODE_CHUNK):
    keys = list(range(start, min(start + _DECODE_CHUNK, num)))
    try:
      records = source.__getitems__(keys)  # Batched reads: far faster.
    except (AttributeError, TypeError):
      # tfds.testing.mock_data (4.9.10) installs a __getitems__ that fails
      # with a TypeError; plain indexing works everywhere.
      records = [source[k] for k in keys]
    for i, record in zip(keys, records):
      image = np.asarray(record["image"])
      if image.shape != shape:
        raise ValueError(f"{name} {split}[{i}]: image shape {image.shape}, "
                         f"expected {shape}.")
      images[i] = image
      labels[i] = record["label"]
    done = keys[-1] + 1
    if show and (done == num or done * 10 // num > start * 10 // num):
      print(f"\rlipjax.training.data: decoding {name} {split}: {done}/{num}",
            end="\n" if done == num else "", file=sys.stderr, flush=True)
  return images, labels


def load_split(name: str, split: str, *, data_dir: str | None = None,
               download: bool = False) -> Dataset:
  """Reads one TFDS split (e.g. ``"test"``, ``"train[:512]"``) into memory.

  Args:
    name: a key of :data:`DATASETS` (not ``"synthetic"``).
    split: a TFDS split string; slicing syntax works.
    data_dir: TFDS data_dir; see :func:`data_dir_or_default`.
    download: prepare the dataset (needs TensorFlow) if it is missing.

  Returns:
    The split as a :class:`Dataset`.

  Raises:
    DatasetNotFoundError: the dataset is missing and ``download`` is False
      or TensorFlow (which preparing needs) is not installed; the message
      names the folder searched and says how to prepare it.
    ValueError: unknown name, or records that do not match the dataset.
  """
  info = _tfds_info(name)
  data_dir = data_dir_or_default(data_dir)
  try:
    # download=False always: preparing is our decision (and needs TF).
    source = tfds.data_source(info.tfds_name, split=split, data_dir=data_dir,
                              download=False)
  except Exception as e:  # TFDS raises several types for a missing dataset.
    if _is_prepared(data_dir, info.tfds_name):
      raise
    if not download:
      raise DatasetNotFoundError(_not_found_message(name, split,
                                                    data_dir)) from e
    if importlib.util.find_spec("tensorflow") is None:
      raise DatasetNotFoundError(
          _not_found_message(name, split, data_dir) + " (config.data."
          "download is on, but TensorFlow, which preparing needs, is not "
          "installed.)") from e
    prepare(name, data_dir)
    return load_split(name, split, data_dir=data_dir, download=False)
  images, labels = _decode(source, name, split)
  if len(labels) and not 0 <= labels.min() <= labels.max() < info.num_classes:
    raise ValueError(f"{name} {split}: labels outside [0, {info.num_classes}).")
  return Dataset(images, labels, info.num_classes, name)


class DatasetDownloadError(DatasetNotFoundError):
  """Preparing a dataset failed because its files could not be downloaded."""


def prepare(name: str, data_dir: str, *, manual_dir: str | None = None,
            from_dir: str | None = None) -> None:
  """Downloads (or reads from manual_dir / from_dir) and prepares a dataset.

  Writes array_record files, the format :func:`load_split` reads.

  Args:
    name: a key of :data:`DATASETS` (not ``"synthetic"``).
    data_dir: TFDS data_dir to prepare it in.
    manual_dir: folder of manually downloaded files, for builders that ask
      for one (tiny_imagenet).
    from_dir: folder that holds the dataset's original download files (e.g.
      Debian's ``/usr/share/datasets/fashion-mnist``); TFDS prepares them
      without going online (see :mod:`lipjax.training.downloads`).

  Raises:
    ImportError: TensorFlow, which TFDS needs to prepare, is not installed.
    ValueError: unknown dataset, tiny_imagenet without manual_dir, or both
      manual_dir and from_dir.
    FileNotFoundError: from_dir lacks one of the download files.
    DatasetDownloadError: the download failed; the message names the
      offline routes.
  """
  info = _tfds_info(name)
  if manual_dir is not None and from_dir is not None:
    raise ValueError("Give manual_dir or from_dir, not both.")
  try:
    import tensorflow  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    raise ImportError("Preparing a TFDS dataset needs TensorFlow: pip "
                      "install -e '.[prepare]'") from e
  if name == "tiny_imagenet" and manual_dir is None:
    raise ValueError(tiny_imagenet.TinyImagenet.MANUAL_DOWNLOAD_INSTRUCTIONS)
  data_dir = data_dir_or_default(data_dir)
  builder = tfds.builder(info.tfds_name, data_dir=data_dir,
                         file_format="array_record")
  if from_dir is not None:
    with tempfile.TemporaryDirectory() as cache:
      differing = downloads.seed_cache(builder, from_dir, cache)
      downloads.warn_differing(name, from_dir, differing)
      builder.download_and_prepare(download_dir=cache)
    return
  config = None
  if manual_dir is not None:
    config = tfds.download.DownloadConfig(
        manual_dir=os.path.expanduser(manual_dir))
  try:
    if manual_dir is None:  # Fail at once, not after TFDS's retries.
      downloads.check_reachable(downloads.uncached_urls(
          builder, os.path.join(data_dir, "downloads")))
    builder.download_and_prepare(download_config=config)
  except downloads.DOWNLOAD_ERRORS as e:
    raise DatasetDownloadError(
        downloads.download_failed_message(name, data_dir, e)) from e


def _subset(dataset: Dataset, indices: np.ndarray) -> Dataset:
  return dataclasses.replace(dataset, images=dataset.images[indices],
                             labels=dataset.labels[indices])


def _split_train(train: Dataset, validation_fraction: float, split_seed: int
                 ) -> tuple[Dataset, Dataset]:
  """The reference's random_split of the training set (docs/training.md)."""
  num = len(train)
  # Floor, as torch.utils.data.random_split rounds the validation part down.
  num_val = math.floor(num * validation_fraction + 1e-9)
  perm = np.random.default_rng(split_seed).permutation(num)
  return (_subset(train, np.sort(perm[num_val:])),
          _subset(train, np.sort(perm[:num_val])))


def load(name: str, *, data_dir: str | None = None, download: bool = False,
         validation_fraction: float = 0.1, split_seed: int = 0,
         synthetic: dict | None = None, max_train_examples: int | None = None,
         max_test_examples: int | None = None) -> dict[str, Dataset]:
  """Loads ``{"train", "validation", "test"}`` for a dataset.

  Train and validation are a deterministic split (seeded by ``split_seed``)
  of the official training set; validation_fraction=0 gives an empty
  validation set. For ``name="synthetic"``, ``synthetic`` holds
  ``num_train, num_test, image_shape, num_classes, seed``.
  ``max_train_examples`` / ``max_test_examples`` keep only the first N
  examples of the official splits (quick runs and tests; only those are
  decoded).
  """
  dataset_info(name)
  if not 0 <= validation_fraction < 1:  # Checked before a long decode.
    raise ValueError(f"validation_fraction must be in [0, 1), got "
                     f"{validation_fraction}.")
  if name == "synthetic":
    if synthetic is None:
      raise ValueError("name='synthetic' needs synthetic=dict(num_train, "
                       "num_test, image_shape, num_classes, seed).")
    s = dict(synthetic)
    # One draw for train and test so that both share the class prototypes.
    full = synthetic_dataset(num_examples=s["num_train"] + s["num_test"],
                             image_shape=s["image_shape"],
                             num_classes=s["num_classes"], seed=s["seed"])
    train, test = (_subset(full, np.arange(s["num_train"])),
                   _subset(full, np.arange(s["num_train"], len(full))))
  else:
    info = _tfds_info(name)
    train, test = (load_split(name, _head(split, limit), data_dir=data_dir,
                              download=download)
                   for split, limit in ((info.train_split, max_train_examples),
                                        (info.test_split, max_test_examples)))
  # Also truncates synthetic data and mocks that ignore split slicing.
  if max_train_examples is not None:
    train = _subset(train, np.arange(min(max_train_examples, len(train))))
  if max_test_examples is not None:
    test = _subset(test, np.arange(min(max_test_examples, len(test))))
  train, validation = _split_train(train, validation_fraction, split_seed)
  return {"train": train, "validation": validation, "test": test}


def _head(split: str, limit: int | None) -> str:
  return split if limit is None else f"{split}[:{int(limit)}]"


def synthetic_dataset(*, num_examples: int, image_shape, num_classes: int,
                      seed: int) -> Dataset:
  """A learnable synthetic dataset: class prototype plus noise.

  Each class has a fixed uniform-random prototype image (from ``seed``);
  an example is its class's prototype plus Gaussian noise, clipped to
  ``[0, 255]``. Labels are balanced and shuffled. Deterministic in ``seed``.
  """
  shape = tuple(int(d) for d in image_shape)
  if len(shape) != 3 or num_classes < 2 or num_examples < 0:
    raise ValueError(f"Need image_shape (H, W, C), num_classes >= 2 and "
                     f"num_examples >= 0; got {shape}, {num_classes}, "
                     f"{num_examples}.")
  # Separate streams: prototypes do not depend on num_examples.
  prototypes = np.random.default_rng([seed, 0]).uniform(
      0, 255, (num_classes, *shape))
  rng = np.random.default_rng([seed, 1])
  labels = rng.permutation(np.arange(num_examples) % num_classes)
  noise = rng.normal(0, _SYNTHETIC_NOISE_STD, (num_examples, *shape))
  images = np.clip(np.rint(prototypes[labels] + noise), 0, 255)
  return Dataset(images.astype(np.uint8), labels.astype(np.int32),
                 int(num_classes), "synthetic")


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="python -m lipjax.training.data")
  commands = parser.add_subparsers(dest="command", required=True)
  prep = commands.add_parser("prepare", help="Prepare a TFDS dataset in "
                             "array_record format (needs TensorFlow).")
  prep.add_argument("name", choices=[k for k, i in DATASETS.items()
                                     if i.tfds_name])
  prep.add_argument("--data_dir", help="TFDS data_dir (default: "
                    "$TFDS_DATA_DIR, else ~/tensorflow_datasets).")
  prep.add_argument("--manual_dir", help="Folder of manually downloaded "
                    f"files (tiny_imagenet: {tiny_imagenet.ZIP_NAME}).")
  prep.add_argument("--from_dir", help="Folder holding the dataset's "
                    "original download files; nothing is downloaded (e.g. "
                    f"{downloads.LOCAL_COPIES['fashion_mnist'][0]}).")
  args = parser.parse_args(argv)
  data_dir = data_dir_or_default(args.data_dir)
  try:
    prepare(args.name, data_dir, manual_dir=args.manual_dir,
            from_dir=args.from_dir)
  except (ImportError, ValueError, FileNotFoundError) as error:
    sys.exit(f"error: {error}")  # The message says what to do.
  print(f"Prepared {args.name} in {data_dir}.")


if __name__ == "__main__":
  main()
