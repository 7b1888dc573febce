"""Tests for `lipjax.training.data` and the Tiny-ImageNet builder.

Training is only reproducible and resumable if the data pipeline is, so
these tests pin down:

* reading real Fashion-MNIST (prepared offline in array_record format) and
  TFDS mock data for mnist / cifar10 / cifar100, with the reference's 90/10
  train/validation split (docs/training.md#data);
* a missing dataset fails offline with a message that says how to prepare it;
* batches are a pure function of (seed, epoch, step): processes' slices add up
  to the global batch, a resumed epoch sees the same batches, no example
  repeats, and evaluation covers every example exactly once;
* the synthetic data is deterministic and learnable;
* augmentation (docs/training.md#data) is deterministic per key, the
  identity when disabled, and flips / shifts whole pixels as specified;
* the Tiny-ImageNet builder reads the official zip layout without TensorFlow.

Nothing is downloaded.
"""
# pylint: disable=protected-access

import functools
import io
import pathlib
import subprocess
import sys
import types
import zipfile

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from lipjax.training import augment
from lipjax.training import batches
from lipjax.training import data
from lipjax.training import tiny_imagenet
from tests import real_data

_REPO = pathlib.Path(__file__).resolve().parents[1]
_SYNTH = dict(num_train=200, num_test=60, image_shape=(8, 8, 3),
              num_classes=4, seed=3)


def _indexed_dataset(num):
  """Example i has label i and every pixel equal to i % 256."""
  images = np.broadcast_to((np.arange(num) % 256).astype(np.uint8)[
      :, None, None, None], (num, 2, 2, 1)).copy()
  return data.Dataset(images, np.arange(num, dtype=np.int32), num, "indexed")


def _rows(images):
  return {row.tobytes() for row in images}


# ---------------------------------------------------------------- loading


@pytest.mark.skipif(not real_data.has_fashion_mnist(),
                    reason=real_data.SKIP_REASON)
def test_real_fashion_mnist():
  train = data.load_split("fashion_mnist", "train[:256]",
                          data_dir=str(real_data.tfds_data_dir()))
  assert train.images.shape == (256, 28, 28, 1)
  assert train.images.dtype == np.uint8 and train.labels.dtype == np.int32
  assert train.num_classes == 10 and train.name == "fashion_mnist"
  assert 0 <= train.labels.min() and train.labels.max() <= 9
  assert len(np.unique(train.labels)) >= 5
  assert train.images.min() == 0 and train.images.max() == 255
  test = data.load_split("fashion_mnist", "test[:64]",
                         data_dir=str(real_data.tfds_data_dir()))
  assert test.images.shape == (64, 28, 28, 1) and len(test) == 64


@pytest.mark.parametrize("name,shape,classes", [
    ("mnist", (28, 28, 1), 10),
    ("cifar10", (32, 32, 3), 10),
    ("cifar100", (32, 32, 3), 100),
])
def test_mock_datasets_and_90_10_split(tmp_path, name, shape, classes):
  # USE_CODE generates examples from the builder's feature spec, so no
  # metadata files are needed. The mock ignores split slicing ("train[:n]"
  # also has num_examples) and its __getitems__ is broken in TFDS 4.9.10,
  # which load_split works around by indexing.
  with tfds.testing.mock_data(num_examples=50,
                              policy=tfds.testing.MockPolicy.USE_CODE):
    splits = data.load(name, data_dir=str(tmp_path))
  assert {k: len(v) for k, v in splits.items()} == {
      "train": 45, "validation": 5, "test": 50}
  for ds in splits.values():
    assert ds.images.shape[1:] == shape and ds.images.dtype == np.uint8
    assert ds.labels.dtype == np.int32 and ds.num_classes == classes
    assert 0 <= ds.labels.min() and ds.labels.max() < classes
  assert data.dataset_info(name).image_shape == shape


def test_missing_dataset_offline(tmp_path):
  for name in ("mnist", "tiny_imagenet"):
    with pytest.raises(data.DatasetNotFoundError) as err:
      data.load_split(name, "train", data_dir=str(tmp_path))
    assert isinstance(err.value, FileNotFoundError)
    message = str(err.value)
    assert "prepare" in message and name in message
    assert "TFDS_DATA_DIR" in message and ".[prepare]" in message
  assert "--manual_dir" in message and tiny_imagenet.ZIP_NAME in message
  with pytest.raises(data.DatasetNotFoundError):
    data.load("cifar10", data_dir=str(tmp_path))


def test_unknown_dataset():
  with pytest.raises(ValueError, match="cifar10"):
    data.dataset_info("imagenet")
  with pytest.raises(ValueError):
    data.load("imagenet")
  with pytest.raises(ValueError, match="synthetic"):
    data.load_split("synthetic", "train")


def test_prepare_without_tensorflow_says_how(tmp_path):
  try:
    import tensorflow  # pylint: disable=g-import-not-at-top,unused-import
    pytest.skip("TensorFlow is installed")
  except ImportError:
    pass
  with pytest.raises(ImportError, match=r"pip install -e '\.\[prepare\]'"):
    data.prepare("mnist", str(tmp_path))
  # download=True cannot prepare: the error still names the folder searched.
  with pytest.raises(data.DatasetNotFoundError,
                     match=rf"searched {tmp_path}/mnist; TFDS_DATA_DIR is .*"
                     "TensorFlow, which preparing needs, is not installed"):
    data.load_split("mnist", "train", data_dir=str(tmp_path), download=True)


def test_data_dir_or_default(monkeypatch):
  monkeypatch.setenv("TFDS_DATA_DIR", "/from/env")
  assert data.data_dir_or_default("/given") == "/given"
  assert data.data_dir_or_default(None) == "/from/env"
  monkeypatch.delenv("TFDS_DATA_DIR")
  assert data.data_dir_or_default(None) == str(
      pathlib.Path("~/tensorflow_datasets").expanduser())


def test_prepare_command_takes_an_argument_list(capsys):
  with pytest.raises(SystemExit) as done:
    data.main(["prepare", "--help"])
  assert done.value.code == 0
  assert "tiny_imagenet" in capsys.readouterr().out


def test_import_needs_no_tensorflow():
  code = ("import sys, lipjax.training.data, tensorflow_datasets as tfds; "
          "assert tfds.builder_cls('tiny_imagenet') is "
          "lipjax.training.tiny_imagenet.TinyImagenet; "
          "assert 'tensorflow' not in sys.modules")
  subprocess.run([sys.executable, "-c", code], check=True, cwd=_REPO,
                 timeout=60)


# ------------------------------------------------ split and synthetic data


def test_train_validation_split():
  full = data.synthetic_dataset(num_examples=260, image_shape=(8, 8, 3),
                                num_classes=4, seed=3)
  splits = data.load("synthetic", synthetic=_SYNTH)
  train, val = splits["train"], splits["validation"]
  assert (len(train), len(val), len(splits["test"])) == (180, 20, 60)
  assert not _rows(train.images) & _rows(val.images)
  assert _rows(train.images) | _rows(val.images) == _rows(full.images[:200])
  assert _rows(splits["test"].images) == _rows(full.images[200:])
  again = data.load("synthetic", synthetic=_SYNTH)
  np.testing.assert_array_equal(again["validation"].images, val.images)
  other = data.load("synthetic", synthetic=_SYNTH, split_seed=1)
  assert _rows(other["validation"].images) != _rows(val.images)
  empty = data.load("synthetic", synthetic=_SYNTH, validation_fraction=0)
  assert empty["validation"].images.shape == (0, 8, 8, 3)
  assert len(empty["train"]) == 200
  with pytest.raises(ValueError):
    data.load("synthetic", synthetic=_SYNTH, validation_fraction=1.0)


def test_synthetic_is_deterministic_and_learnable():
  make = functools.partial(data.synthetic_dataset, num_examples=300,
                           image_shape=(28, 28, 1), num_classes=10)
  a, b, c = make(seed=0), make(seed=0), make(seed=1)
  np.testing.assert_array_equal(a.images, b.images)
  np.testing.assert_array_equal(a.labels, b.labels)
  assert not np.array_equal(a.images, c.images)
  assert a.images.dtype == np.uint8 and a.labels.dtype == np.int32
  assert a.num_classes == 10 and set(a.labels.tolist()) == set(range(10))
  # Nearest class mean, fitted on the first 200 examples, on the other 100.
  x = a.images.reshape(300, -1).astype(np.float32)
  means = np.stack([x[:200][a.labels[:200] == k].mean(0) for k in range(10)])
  dist = ((x[200:, None, :] - means[None]) ** 2).sum(-1)
  assert (dist.argmin(1) == a.labels[200:]).mean() > 0.9


# ----------------------------------------------------------- batching


def test_epoch_permutation():
  p = batches.epoch_permutation(50, seed=1, epoch=2)
  assert p.dtype == np.int64 and sorted(p.tolist()) == list(range(50))
  np.testing.assert_array_equal(p, batches.epoch_permutation(50, seed=1, epoch=2))
  assert not np.array_equal(p, batches.epoch_permutation(50, seed=1, epoch=3))
  assert not np.array_equal(p, batches.epoch_permutation(50, seed=2, epoch=2))


def test_an_epoch_draws_its_permutation_once():
  batches._permutation.cache_clear()
  for step in range(4):
    batches.batch_indices(100, global_batch_size=10, seed=0, epoch=0,
                          step=step)
  info = batches._permutation.cache_info()
  assert (info.misses, info.hits) == (1, 3)


def test_processes_slice_the_global_batch():
  kw = dict(global_batch_size=10, seed=5, epoch=1)
  seen = []
  for step in range(batches.num_steps_per_epoch(103, 10)):
    whole = batches.batch_indices(103, step=step, **kw)
    parts = [batches.batch_indices(103, step=step, process_index=i,
                                process_count=2, **kw) for i in range(2)]
    assert whole.shape == (10,) and parts[0].shape == (5,)
    np.testing.assert_array_equal(np.concatenate(parts), whole)
    seen.extend(whole.tolist())
  assert len(seen) == 100 and len(set(seen)) == 100  # remainder dropped


def test_resume_sees_the_same_batches():
  ds = _indexed_dataset(37)
  kw = dict(global_batch_size=4, seed=0, epoch=3, process_index=1,
            process_count=2)
  full = list(batches.iterate_batches(ds, **kw))
  tail = list(batches.iterate_batches(ds, start_step=5, **kw))
  assert [s for s, _ in full] == list(range(9))
  assert [s for s, _ in tail] == list(range(5, 9))
  for (s1, b1), (s2, b2) in zip(full[5:], tail):
    assert s1 == s2
    np.testing.assert_array_equal(b1["image"], b2["image"])
    np.testing.assert_array_equal(b1["label"], b2["label"])
  batch = full[0][1]
  assert batch["image"].shape == (2, 2, 2, 1) and batch["label"].shape == (2,)
  assert batch["image"].dtype == np.uint8 and batch["label"].dtype == np.int32


def test_batching_errors():
  with pytest.raises(ValueError, match="divisible"):
    batches.batch_indices(100, global_batch_size=10, seed=0, epoch=0, step=0,
                       process_count=3)
  with pytest.raises(ValueError, match=r"(?s)(?=.*\b8\b)(?=.*\b5\b)"):
    batches.num_steps_per_epoch(5, 8)
  with pytest.raises(ValueError):
    batches.batch_indices(100, global_batch_size=10, seed=0, epoch=0, step=10)


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_batches_cover_every_example_once(process_count):
  ds = _indexed_dataset(23)
  per_process = [list(batches.eval_batches(ds, batch_size=8, process_index=i,
                                        process_count=process_count))
                 for i in range(process_count)]
  assert len({len(b) for b in per_process}) == 1  # same number of steps
  labels = []
  for process_batches in per_process:
    for batch in process_batches:
      assert batch["image"].shape == (8 // process_count, 2, 2, 1)
      assert batch["mask"].dtype == bool
      np.testing.assert_array_equal(batch["image"][~batch["mask"]], 0)
      real = batch["label"][batch["mask"]]
      np.testing.assert_array_equal(batch["image"][batch["mask"]][:, 0, 0, 0],
                                    real)
      labels.extend(real.tolist())
  assert sorted(labels) == list(range(23))


# ---------------------------------------------------------- augmentation


def _augment(key, images, **kw):
  kw = {"hflip": False, "rotation_degrees": 0.0, "translate": 0.0, **kw}
  return augment.augment(key, images, **kw)


def test_augment_shape_range_determinism_and_jit():
  x = augment.to_float(np.random.default_rng(0).integers(
      0, 256, (6, 12, 10, 3), dtype=np.uint8))
  assert x.dtype == np.float32 and 0 <= x.min() and x.max() <= 1
  kw = dict(hflip=True, rotation_degrees=20.0, translate=0.2)
  key = jax.random.key(0)
  y = augment.augment(key, x, **kw)
  assert y.shape == x.shape and y.dtype == np.float32
  assert 0 <= y.min() and y.max() <= 1
  np.testing.assert_array_equal(y, augment.augment(key, x, **kw))
  assert not np.array_equal(y, augment.augment(jax.random.key(1), x, **kw))
  jitted = jax.jit(functools.partial(augment.augment, **kw))
  np.testing.assert_array_equal(jitted(key, x), y)
  np.testing.assert_array_equal(_augment(key, x), x)


def test_augment_flip_gives_the_image_or_its_mirror():
  x = np.random.default_rng(1).random((32, 5, 7, 2)).astype(np.float32)
  y = np.asarray(_augment(jax.random.key(2), x, hflip=True))
  flipped = [np.array_equal(yi, xi[:, ::-1]) for xi, yi in zip(x, y)]
  same = [np.array_equal(yi, xi) for xi, yi in zip(x, y)]
  assert all(f != s for f, s in zip(flipped, same))
  assert any(flipped) and any(same)


def test_augment_translation_moves_whole_pixels():
  x = np.zeros((32, 16, 16, 1), np.float32)
  x[:, 8, 8, 0] = 1.0
  y = np.asarray(_augment(jax.random.key(3), x, translate=0.25))
  shifts = []
  for yi in y:
    rows, cols, _ = np.nonzero(yi)
    assert len(rows) == 1 and yi[rows[0], cols[0], 0] == 1.0
    shifts.append((rows[0] - 8, cols[0] - 8))
  assert max(max(abs(dy), abs(dx)) for dy, dx in shifts) <= 4
  assert len(set(shifts)) > 5


def test_augment_rotation_keeps_the_centre_and_fills_zero():
  x = np.random.default_rng(4).random((16, 15, 15, 1)).astype(np.float32)
  y = np.asarray(_augment(jax.random.key(5), x, rotation_degrees=30.0))
  np.testing.assert_array_equal(y[:, 7, 7], x[:, 7, 7])
  ones = np.asarray(_augment(jax.random.key(5), np.ones_like(x),
                             rotation_degrees=30.0))
  assert (ones[:, 0, 0, 0] == 0).mean() > 0.5  # corners come from outside
  # A pixel 5 right of the centre stays about 5 away, at most ~30 deg round.
  dot = np.zeros_like(x)
  dot[:, 7, 12] = 1.0
  moved = np.asarray(_augment(jax.random.key(6), dot, rotation_degrees=30.0))
  _, rows, cols, _ = np.nonzero(moved)
  dy, dx = rows - 7.0, cols - 7.0
  assert len(rows) >= len(x) // 2
  assert np.all(np.abs(np.hypot(dx, dy) - 5) <= 1)
  assert np.all(np.abs(np.degrees(np.arctan2(dy, dx))) <= 30 + 12)
  assert len(set(zip(rows, cols))) > 3


# --------------------------------------------------------- Tiny-ImageNet


def _jpeg(rng, mode):
  shape = (64, 64, 3) if mode == "RGB" else (64, 64)
  image = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)
  buffer = io.BytesIO()
  image.save(buffer, format="JPEG")
  return buffer.getvalue()


def _fake_zip(path, wnids=("n03", "n01", "n02")):
  """The official layout; train/n01 image 0 and val_1 are grayscale."""
  rng = np.random.default_rng(0)
  root = "tiny-imagenet-200"
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr(f"{root}/wnids.txt", "\n".join(wnids) + "\n")
    zf.writestr(f"{root}/words.txt", "".join(f"{w}\tthing\n" for w in wnids))
    for wnid in wnids:
      zf.writestr(f"{root}/train/{wnid}/{wnid}_boxes.txt", "")
      for i in range(2):
        mode = "L" if (wnid, i) == ("n01", 0) else "RGB"
        zf.writestr(f"{root}/train/{wnid}/images/{wnid}_{i}.JPEG",
                    _jpeg(rng, mode))
    val = [("val_0.JPEG", "n02"), ("val_1.JPEG", "n03"), ("val_2.JPEG", "n01")]
    for name, _ in val:
      zf.writestr(f"{root}/val/images/{name}",
                  _jpeg(rng, "L" if name == "val_1.JPEG" else "RGB"))
    zf.writestr(f"{root}/val/val_annotations.txt", "".join(
        f"{name}\t{wnid}\t0\t0\t63\t63\n" for name, wnid in val))
    zf.writestr(f"{root}/test/images/test_0.JPEG", _jpeg(rng, "RGB"))
  return path


def test_tiny_imagenet_examples(tmp_path):
  zip_path = _fake_zip(tmp_path / tiny_imagenet.ZIP_NAME)
  builder = tiny_imagenet.TinyImagenet(data_dir=str(tmp_path / "tfds"))
  image_feature = builder.info.features["image"]
  expected = {"train": {f"{w}_{i}.JPEG": label
                        for label, w in enumerate(["n01", "n02", "n03"])
                        for i in range(2)},
              "validation": {"val_0.JPEG": 1, "val_1.JPEG": 2,
                             "val_2.JPEG": 0}}
  for split, labels in expected.items():
    examples = dict(builder._generate_examples(zip_path, split))
    assert {k: v["label"] for k, v in examples.items()} == labels
    for example in examples.values():
      with Image.open(io.BytesIO(example["image"])) as image:
        assert image.mode == "RGB" and image.size == (64, 64)
      # The decoder tfds.data_source uses on the stored bytes.
      decoded = image_feature.decode_example_np(example["image"])
      assert decoded.shape == (64, 64, 3) and decoded.dtype == np.uint8
  # A grayscale JPEG becomes three equal channels.
  gray = dict(tiny_imagenet.generate_examples(zip_path, "train"))
  gray = image_feature.decode_example_np(gray["n01_0.JPEG"]["image"])
  np.testing.assert_array_equal(gray[..., 0], gray[..., 2])


def test_tiny_imagenet_split_generators_check_the_archive(tmp_path):
  builder = tiny_imagenet.TinyImagenet(data_dir=str(tmp_path / "tfds"))
  manager = types.SimpleNamespace(manual_dir=epath.Path(tmp_path))
  with pytest.raises(FileNotFoundError, match=tiny_imagenet.ZIP_NAME):
    builder._split_generators(manager)
  _fake_zip(tmp_path / tiny_imagenet.ZIP_NAME)
  with pytest.raises(ValueError, match="200"):
    builder._split_generators(manager)
  wnids = [f"n{i:08d}" for i in range(200)][::-1]
  _fake_zip(tmp_path / tiny_imagenet.ZIP_NAME, wnids=wnids)
  splits = builder._split_generators(manager)
  assert set(splits) == {"train", "validation"}
  assert builder.info.features["label"].names == sorted(wnids)
