"""A TFDS builder for Tiny-ImageNet (TFDS ships none).

Importing this module registers the builder under the TFDS name
``tiny_imagenet`` (version 1.0.0); :mod:`lipjax.training.data` imports it so that
``tfds.data_source("tiny_imagenet", ...)`` and ``python -m lipjax.training.data prepare
tiny_imagenet`` find it. Registration needs no TensorFlow; preparing the
dataset (``download_and_prepare``) does, like every TFDS dataset.

The official archive is read in place with :mod:`zipfile`:

* ``train``: ``tiny-imagenet-200/train/<wnid>/images/*.JPEG`` (100k images);
* ``validation``: ``tiny-imagenet-200/val/images/*.JPEG`` labelled by
  ``val/val_annotations.txt`` (10k images). The official test split has no
  labels, so the validation images serve as the test set
  (docs/training.md#data).

Labels index the 200 wnids sorted, as ``torchvision.datasets.ImageFolder``
(used by the reference) numbers its class folders. RGB JPEGs are stored
byte for byte; the few grayscale ones are converted to RGB and stored as PNG,
so every example decodes to ``uint8 [64, 64, 3]`` without a second lossy
compression.
"""

from __future__ import annotations

import io
import posixpath
import zipfile
from typing import Iterator

import tensorflow_datasets as tfds
from PIL import Image

ZIP_NAME = "tiny-imagenet-200.zip"
IMAGE_SHAPE = (64, 64, 3)
NUM_CLASSES = 200
HOMEPAGE = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"


def _root(zf: zipfile.ZipFile) -> str:
  """The archive's top folder (``tiny-imagenet-200/``), found, not assumed."""
  for name in zf.namelist():
    if posixpath.basename(name) == "wnids.txt":
      return posixpath.dirname(name)
  for name in zf.namelist():
    parts = name.split("/")
    if "train" in parts:
      return "/".join(parts[:parts.index("train")])
  raise ValueError(f"{zf.filename}: no wnids.txt or train/ folder; is this "
                   f"the official {ZIP_NAME}?")


def read_wnids(zf: zipfile.ZipFile) -> list[str]:
  """The class ids (wnids), sorted; their positions are the labels."""
  root = _root(zf)
  wnids_txt = posixpath.join(root, "wnids.txt")
  if wnids_txt in zf.namelist():
    wnids = zf.read(wnids_txt).decode().split()
  else:
    prefix = posixpath.join(root, "train") + "/"
    wnids = {n[len(prefix):].split("/")[0] for n in zf.namelist()
             if n.startswith(prefix) and "/images/" in n}
  return sorted(set(wnids))


def _encode_rgb(data: bytes, name: str) -> bytes:
  """The image's bytes, re-encoded as RGB PNG only when it is not RGB."""
  with Image.open(io.BytesIO(data)) as image:
    if image.size != IMAGE_SHAPE[:2]:
      raise ValueError(f"{name}: expected a 64x64 image, got {image.size}.")
    if image.mode == "RGB":
      return data
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def generate_examples(zip_path, split: str) -> Iterator[tuple[str, dict]]:
  """Yields ``(key, {"image": encoded bytes, "label": int})`` for a split.

  Args:
    zip_path: path to the official ``tiny-imagenet-200.zip``.
    split: ``"train"`` or ``"validation"``.

  Raises:
    ValueError: for an unknown split, an annotation with an unknown wnid, or
      an image that is not 64x64.
  """
  with zipfile.ZipFile(zip_path) as zf:
    root = _root(zf)
    label_of = {wnid: i for i, wnid in enumerate(read_wnids(zf))}
    if split == "train":
      prefix = posixpath.join(root, "train") + "/"
      items = []
      for name in sorted(zf.namelist()):
        if (name.startswith(prefix) and "/images/" in name
            and name.upper().endswith(".JPEG")):
          items.append((name, name[len(prefix):].split("/")[0]))
    elif split == "validation":
      val = posixpath.join(root, "val")
      lines = zf.read(posixpath.join(val, "val_annotations.txt")).decode()
      items = []
      for line in lines.splitlines():
        if line.strip():
          file_name, wnid = line.split("\t")[:2]
          items.append((posixpath.join(val, "images", file_name), wnid))
    else:
      raise ValueError(f"Unknown split {split!r}; use 'train' or "
                       "'validation'.")
    for name, wnid in items:
      if wnid not in label_of:
        raise ValueError(f"{name}: wnid {wnid!r} is not in wnids.txt.")
      yield posixpath.basename(name), {
          "image": _encode_rgb(zf.read(name), name),
          "label": label_of[wnid],
      }


class TinyImagenet(tfds.core.GeneratorBasedBuilder):
  """Tiny-ImageNet-200: 64x64 RGB images, 200 classes."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release (lipjax)."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      f"Download the official {ZIP_NAME} ({HOMEPAGE}) and put it, unextracted, "
      "in a folder; pass that folder as manual_dir (python -m lipjax.training.data "
      "prepare tiny_imagenet --data_dir DIR --manual_dir FOLDER).")

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description="Tiny-ImageNet-200 (CS231n): 100k training and 10k "
                    "labelled validation images, 64x64 RGB, 200 classes.",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=IMAGE_SHAPE),
            # Names are set from the archive in _split_generators.
            "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
        }),
        supervised_keys=("image", "label"),
        homepage=HOMEPAGE,
    )

  def _split_generators(self, dl_manager):
    zip_path = dl_manager.manual_dir / ZIP_NAME
    if not zip_path.exists():
      raise FileNotFoundError(f"{zip_path} not found. "
                              f"{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
    with zipfile.ZipFile(zip_path) as zf:
      wnids = read_wnids(zf)
    if len(wnids) != NUM_CLASSES:
      raise ValueError(f"{zip_path}: expected {NUM_CLASSES} wnids, found "
                       f"{len(wnids)}.")
    self.info.features["label"].names = wnids
    return {
        "train": self._generate_examples(zip_path, "train"),
        "validation": self._generate_examples(zip_path, "validation"),
    }

  def _generate_examples(self, zip_path, split):
    yield from generate_examples(zip_path, split)
