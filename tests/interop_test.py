"""Tests for `lipjax.interop`: reference (o4lc/CRM-LipLT) checkpoints.

The converted models are checked against an independent numpy forward pass
written in the reference's layout (NCHW activations, OIHW conv weights,
``[out, in]`` linear weights, PyTorch's C-order flatten of ``[C, H, W]``,
normalization applied to the images before the network), from the
reference's own layer declarations transcribed below:

* every architecture's state-dict keys and torch shapes on its reference
  dataset are the reference's (linear input sizes 784 ... 9216);
* logits agree to 1e-5 for every architecture on small non-square inputs
  (so that a wrong flatten permutation or an H/W swap shows), with
  per-channel normalization;
* the ``.npz`` route works with PyTorch unimportable, and a ``.pth`` then
  fails with a one-line error naming the extra and the ``.npz`` route;
* missing, extra, misshaped and non-finite keys, unknown architectures,
  datasets and file types, a file recording another architecture: one-line
  errors naming them, nothing written;
* a converted model written as a workdir restores with the same logits and
  certifies (``certify``'s pipeline, audit included), also from the CLI;
* with PyTorch installed only: a real ``torch.save`` of a network built like
  the reference's, in the reference's file layout with a pickled object that
  must not run, converts to a model with torch's logits.
"""

import collections
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import smoke
from lipjax import interop
from lipjax import models
from lipjax.certification import pipeline
from lipjax.certification import workdir as workdir_lib
from lipjax.interop import __main__ as cli
from lipjax.interop import workdir as interop_workdir
from lipjax.training import augment
from lipjax.training import checkpoints
from lipjax.training import steps

# The reference's declarations (Networks/NetworkArchitectures.py of
# o4lc/CRM-LipLT), transcribed: convs as (in, out, kernel, stride, padding),
# then linears as (in, out). Its createNetwork adds a ReLU after every layer
# but the last and its layer list a Flatten before the first linear.
REFERENCE = {
    "3F": ((), ((784, 100), (100, 100), (100, 10))),
    "2C2F": (((1, 16, 4, 2, 1), (16, 32, 4, 2, 1)),
             ((1568, 100), (100, 10))),
    "4C3F": (((1, 32, 3, 1, 1), (32, 32, 4, 2, 1), (32, 64, 3, 1, 1),
              (64, 64, 4, 2, 1)),
             ((3136, 512), (512, 512), (512, 10))),
    "6C2F": (((3, 32, 3, 1, 1), (32, 32, 4, 2, 1), (32, 64, 3, 1, 1),
              (64, 64, 4, 2, 1), (64, 64, 3, 1, 1), (64, 64, 4, 2, 1)),
             ((1024, 512), (512, 10))),
    "8C2F": (((3, 64, 3, 1, 1), (64, 64, 3, 1, 0), (64, 64, 4, 2, 0),
              (64, 128, 3, 1, 1), (128, 128, 3, 1, 1), (128, 128, 4, 2, 0),
              (128, 256, 3, 1, 1), (256, 256, 4, 2, 0)),
             ((9216, 256), (256, 200))),
}
# Reference names lipjax does not declare, transcribed the same way.
REFERENCE_OTHERS = {
    "8C2FOriginal": (((3, 64, 3, 1, 1), (64, 64, 3, 1, 1), (64, 64, 4, 2, 0),
                      (64, 128, 3, 1, 1), (128, 128, 3, 1, 1),
                      (128, 128, 4, 2, 0), (128, 256, 3, 1, 1),
                      (256, 256, 4, 2, 0)),
                     ((9216, 256), (256, 200))),
}
# The dataset each was declared for.
REFERENCE_DATASET = {"3F": "mnist", "2C2F": "mnist", "4C3F": "mnist",
                     "6C2F": "cifar10", "8C2F": "tiny_imagenet"}
# Small inputs whose last feature map is not square (3 x 2), so that a
# wrong flatten order or a swapped H and W changes the logits; 3F gets three
# channels so that its flatten order matters too.
SMALL_INPUT = {"3F": (5, 4, 3), "2C2F": (12, 8, 1), "4C3F": (12, 8, 1),
               "6C2F": (24, 16, 3), "8C2F": (40, 32, 3)}
MEAN = (0.4, 0.5, 0.6)
STD = (0.2, 0.3, 0.5)


def reference_modules(arch, input_shape):
  """The reference's nn.Sequential as (kind, weight shape, stride, pad)."""
  convs, linears = {**REFERENCE, **REFERENCE_OTHERS}[arch]
  height, width, channels = input_shape
  modules = []
  for _, c_out, k, s, p in convs:
    modules += [("conv", (c_out, channels, k, k), s, p), ("relu",)]
    height, width = (height + 2 * p - k) // s + 1, (width + 2 * p - k) // s + 1
    channels = c_out
  modules.append(("flatten",))
  fan_in = channels * height * width
  for _, out in linears:
    modules += [("linear", (out, fan_in)), ("relu",)]
    fan_in = out
  return modules[:-1]  # createNetwork pops the last ReLU.


def reference_state(modules, seed=0):
  """Random weights in the reference's layout, keyed as its state dict."""
  rng = np.random.default_rng(seed)
  state = {}
  for i, module in enumerate(modules):
    if module[0] in ("conv", "linear"):
      shape = module[1]
      scale = np.sqrt(6.0 / np.prod(shape[1:]))  # Activations stay O(1).
      state[f"linear.{i}.weight"] = rng.uniform(-scale, scale, shape)
      state[f"linear.{i}.bias"] = rng.uniform(-0.5, 0.5, shape[0])
  return {k: v.astype(np.float32) for k, v in state.items()}


def conv2d_nchw(x, weight, bias, stride, pad):
  """PyTorch's Conv2d (cross-correlation) on NCHW with OIHW weights."""
  x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
  _, _, k, _ = weight.shape
  out_h = (x.shape[2] - k) // stride + 1
  out_w = (x.shape[3] - k) // stride + 1
  out = np.zeros((x.shape[0], weight.shape[0], out_h, out_w))
  for p in range(k):
    for q in range(k):
      patch = x[:, :, p:p + stride * out_h:stride, q:q + stride * out_w:stride]
      out += np.einsum("nchw,oc->nohw", patch, weight[:, :, p, q])
  return out + bias[None, :, None, None]


def reference_logits(modules, state, images_nhwc, mean, std):
  """The reference's forward pass in float64 on normalized NCHW images."""
  x = (images_nhwc.astype(np.float64) - np.asarray(mean)) / np.asarray(std)
  x = x.transpose(0, 3, 1, 2)  # ToTensor() gives C, H, W.
  for i, module in enumerate(modules):
    if module[0] == "conv":
      x = conv2d_nchw(x, state[f"linear.{i}.weight"].astype(np.float64),
                      state[f"linear.{i}.bias"], module[2], module[3])
    elif module[0] == "linear":
      x = x @ state[f"linear.{i}.weight"].astype(np.float64).T + state[
          f"linear.{i}.bias"]
    elif module[0] == "flatten":
      x = x.reshape(x.shape[0], -1)
    else:
      x = np.maximum(x, 0.0)
  return x


def images(input_shape, n=3, seed=1):
  return np.random.default_rng(seed).uniform(
      0, 1, (n, *input_shape)).astype(np.float32)


def assert_same_logits(model, modules, state, input_shape, mean, std):
  x = images(input_shape)
  want = reference_logits(modules, state, x, mean, std)
  got = np.asarray(model(jnp.asarray(x)), np.float64)
  assert np.abs(want).max() > 0.5  # A real comparison, not of zeros.
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", list(REFERENCE))
def test_keys_and_shapes_are_the_references(arch):
  dataset = REFERENCE_DATASET[arch]
  input_shape, num_classes = interop.dataset_shape(dataset)
  modules = reference_modules(arch, input_shape)
  # The transcription is consistent: the first linear's declared input
  # size is what the convs give on the reference dataset.
  declared_in = REFERENCE[arch][1][0][0]
  assert [m[1][1] for m in modules if m[0] == "linear"][0] == declared_in
  want = {k: v.shape for k, v in reference_state(modules).items()}
  model = nnx.eval_shape(lambda: models.build(
      arch, num_classes=num_classes, input_shape=input_shape,
      rngs=nnx.Rngs(0)))
  got = interop.expected_shapes(model)
  assert list(got) == list(want) and got == want


@pytest.mark.parametrize("arch", list(REFERENCE))
def test_logits_agree_with_the_reference_layout(arch):
  input_shape = SMALL_INPUT[arch]
  channels = input_shape[-1]
  mean, std = MEAN[:channels], STD[:channels]
  modules = reference_modules(arch, input_shape)
  state = reference_state(modules)
  num_classes = REFERENCE[arch][1][-1][1]
  model = interop.convert(state, arch, input_shape=input_shape,
                          num_classes=num_classes, input_mean=mean,
                          input_std=std)
  assert model.input_mean == pytest.approx(mean)
  assert model.input_std == pytest.approx(std)
  assert_same_logits(model, modules, state, input_shape, mean, std)


def test_npz_route_needs_no_torch(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "torch", None)  # import torch fails.
  modules = reference_modules("6C2F", (32, 32, 3))
  state = reference_state(modules, seed=3)
  path = str(tmp_path / "ref.npz")
  np.savez(path, **state)
  model = interop.convert_file(path, "6C2F", dataset="cifar10")
  # The reference's CIFAR Normalize(0.5, 0.5) is inside the model.
  assert model.input_mean == (0.5,) * 3 and model.input_std == (0.5,) * 3
  assert_same_logits(model, modules, state, (32, 32, 3), (0.5,) * 3,
                     (0.5,) * 3)
  (tmp_path / "ref.pth").write_bytes(b"not read")
  with pytest.raises(interop.TorchMissingError) as error:
    interop.convert_file(str(tmp_path / "ref.pth"), "6C2F", dataset="cifar10")
  message = str(error.value)
  assert "\n" not in message
  assert "lipjax[interop]" in message and ".npz" in message


def _mnist_2c2f_state():
  return reference_state(reference_modules("2C2F", (28, 28, 1)))


@pytest.mark.parametrize("edit, named", [
    (lambda s: s.pop("linear.7.bias"), "missing keys linear.7.bias"),
    (lambda s: s.update({"linear.8.weight": np.zeros(3, np.float32)}),
     "unexpected keys linear.8.weight"),
    (lambda s: s.update({"linear.5.weight": np.zeros((100, 800),
                                                     np.float32)}),
     "misshaped linear.5.weight (100, 800) (expected (100, 1568))"),
    (lambda s: s["linear.2.bias"].__setitem__(0, np.nan),
     "Non-finite values in linear.2.bias"),
])
def test_bad_keys_are_named_in_one_line(edit, named):
  state = _mnist_2c2f_state()
  edit(state)
  with pytest.raises(ValueError) as error:
    interop.convert(state, "2C2F", input_shape=(28, 28, 1), num_classes=10)
  assert named in str(error.value) and "\n" not in str(error.value)


def test_unknown_names_and_files_are_refused(tmp_path):
  with pytest.raises(ValueError, match="Unknown architecture '9C2F'.*8C2F"):
    interop.convert({}, "9C2F", input_shape=(28, 28, 1), num_classes=10)
  path = str(tmp_path / "ref.npz")
  np.savez(path, **_mnist_2c2f_state())
  with pytest.raises(ValueError, match="Unknown dataset 'svhn'"):
    interop.convert_file(path, "2C2F", dataset="svhn")
  with pytest.raises(FileNotFoundError, match="No checkpoint file"):
    interop.convert_file(path + ".missing.npz", "2C2F", dataset="mnist")
  (tmp_path / "ref.h5").write_bytes(b"")
  with pytest.raises(ValueError, match="unknown checkpoint type '.h5'"):
    interop.convert_file(str(tmp_path / "ref.h5"), "2C2F", dataset="mnist")
  # The wrong dataset for the weights: the shapes say so.
  with pytest.raises(ValueError, match="misshaped linear.0.weight"):
    interop.convert_file(path, "2C2F", dataset="cifar10")


def test_a_recorded_architecture_must_match():
  # 8C2FOriginal pads its second conv where 8C2F does not, yet on 64x64
  # inputs every weight has the same shape: only the file's record of its
  # architecture tells them apart.
  shapes = {arch: {k: v.shape for k, v in reference_state(
      reference_modules(arch, (64, 64, 3))).items()}
            for arch in ("8C2F", "8C2FOriginal")}
  assert shapes["8C2F"] == shapes["8C2FOriginal"]
  with pytest.raises(ValueError, match="'8C2FOriginal', not '8C2F': lipjax "
                     "does not declare"):
    interop.layout.check_recorded("8C2FOriginal", "8C2F", "ref.pth")
  with pytest.raises(ValueError, match="convert it with --arch 2C2F"):
    interop.layout.check_recorded("2C2F", "4C3F", "ref.pth")
  for recorded, arch in ((None, "8C2F"), ("8C2F", "8C2F"),
                         ("8C2FCIFAR100", "8C2F"),
                         ("6C2FTinyImagenet", "6C2F")):
    interop.layout.check_recorded(recorded, arch, "ref.pth")


@pytest.mark.parametrize("alias, dataset, first_in, classes", [
    ("6C2FTinyImagenet", "tiny_imagenet", 4096, 200),
    ("8C2FCIFAR100", "cifar100", 1024, 100)])
def test_aliases_are_lipjax_architectures_on_other_data(alias, dataset,
                                                        first_in, classes):
  # The reference's declarations of these names: 6C2F's and 8C2F's layers
  # with these linear sizes.
  arch = interop.REFERENCE_ALIASES[alias]
  with pytest.raises(ValueError, match=f"use '{arch}' with that dataset"):
    interop.layout.check_architecture(alias)
  input_shape, num_classes = interop.dataset_shape(dataset)
  model = nnx.eval_shape(lambda: models.build(
      arch, num_classes=num_classes, input_shape=input_shape,
      rngs=nnx.Rngs(0)))
  shapes = list(interop.expected_shapes(model).values())
  assert shapes[-4] == (REFERENCE[arch][1][0][1], first_in)
  assert shapes[-2][0] == classes


def _restore_state(workdir, config, model):
  """The workdir's checkpoint restored without loading any dataset."""
  tx = steps.make_optimizer(config, steps.make_learning_rate(config, 1))
  init_fn = steps.make_init_fn(config, tx, input_shape=model.input_shape,
                               num_classes=model.num_classes)
  abstract = jax.eval_shape(init_fn)
  with checkpoints.Checkpointer(workdir, every_steps=1, keep=1) as c:
    return c.restore(abstract)


def test_cli_converts_into_a_workdir(tmp_path, capsys):
  state = _mnist_2c2f_state()
  path = str(tmp_path / "ref.npz")
  np.savez(path, **state)
  workdir = str(tmp_path / "runs" / "ref")
  code = cli.main(["convert", path, "--arch", "2C2F", "--dataset",
                   "fashion_mnist", "--workdir", workdir])
  assert code == 0, capsys.readouterr().err
  assert "certify.py --workdir" in capsys.readouterr().out
  assert sorted(os.listdir(tmp_path / "runs")) == ["ref"]  # No leftovers.
  config = workdir_lib.load_config(workdir)
  assert config.data.name == "fashion_mnist"
  assert config.model.architecture == "2C2F"
  assert tuple(config.model.input_std) == (1.0,)
  model = interop.convert(state, "2C2F", input_shape=(28, 28, 1),
                          num_classes=10)
  restored = _restore_state(workdir, config, model)
  assert int(restored.step) == 0
  graphdef = steps.make_graphdef(config, input_shape=(28, 28, 1),
                                 num_classes=10)
  x = jnp.asarray(images((28, 28, 1)))
  np.testing.assert_array_equal(
      nnx.merge(graphdef, restored.params, restored.rest)(x), model(x))


@pytest.mark.parametrize("args, named", [
    (["--arch", "9C2F", "--dataset", "mnist"], "Unknown architecture"),
    (["--arch", "2C2F", "--dataset", "svhn"], "Unknown dataset"),
    (["--arch", "4C3F", "--dataset", "mnist"], "missing keys linear.4.weight"),
])
def test_cli_errors_are_one_line_and_write_nothing(tmp_path, capsys, args,
                                                    named):
  path = str(tmp_path / "ref.npz")
  np.savez(path, **_mnist_2c2f_state())
  workdir = tmp_path / "new"
  assert cli.main(["convert", path, "--workdir", str(workdir)] + args) == 2
  err = capsys.readouterr().err
  assert named in err and err.count("\n") == 1
  assert sorted(os.listdir(tmp_path)) == ["ref.npz"]


def test_cli_keeps_an_existing_workdir(tmp_path, capsys):
  path = str(tmp_path / "ref.npz")
  np.savez(path, **_mnist_2c2f_state())
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "config.json").write_text("{}")
  assert cli.main(["convert", path, "--arch", "2C2F", "--dataset", "mnist",
                   "--workdir", str(workdir)]) == 2
  assert "not empty" in capsys.readouterr().err
  assert os.listdir(workdir) == ["config.json"]
  assert (workdir / "config.json").read_text() == "{}"


def test_cli_lists_keys(capsys):
  assert cli.main(["keys", "--arch", "2C2F", "--dataset", "mnist"]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert lines[4] == "linear.5.weight\t(100, 1568)" and len(lines) == 8


def test_converted_workdir_certifies(tmp_path):
  # The smoke config's synthetic 8x8x1 images, 4 classes.
  config = smoke.get_config()
  modules = reference_modules("2C2F", (8, 8, 1))
  modules[-1] = ("linear", (4, 100))
  # Random weights with this seed get 7 of the first 16 test images right.
  state = reference_state(modules, seed=0)
  model = interop.convert(state, "2C2F", input_shape=(8, 8, 1),
                          num_classes=4)
  workdir = interop_workdir.write(model, "2C2F", config,
                                  str(tmp_path / "ref"))
  restored = workdir_lib.restore(workdir)
  test = restored.datasets["test"]
  x = augment.to_float(test.images[:16])
  np.testing.assert_array_equal(restored.model(x), model(x))
  accuracy = float(np.mean(np.argmax(model(x), 1) == test.labels[:16]))
  assert accuracy == 7 / 16
  report = pipeline.run(workdir, eps=(0.01, 0.05), pgd_steps=3,
                        pgd_restarts=1, num_examples=16, progress=False)
  assert report["clean_accuracy"] == accuracy
  assert 0 < report["certified_accuracy"][0] <= accuracy
  assert report["audit"]["violations"] == 0
  with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
    assert json.load(f)["model"]["architecture"] == "2C2F"
  with pytest.raises(FileExistsError, match="not empty"):
    interop_workdir.write(model, "2C2F", config, workdir)
  config.data.synthetic.num_classes = 5
  with pytest.raises(ValueError, match="5 classes"):
    interop_workdir.write(model, "2C2F", config, str(tmp_path / "other"))
  assert not (tmp_path / "other").exists()


class _MustNotRun:
  """Unpickling it would call ``_explode``: a tensors-only load must not."""

  def __reduce__(self):
    return (_explode, ("the pickled DataLoader ran",))


def _explode(message):
  raise AssertionError(message)


def _torch_reference_net(torch, arch, input_shape):
  """A network built as the reference builds it: one nn.Sequential `linear`."""
  nn = torch.nn
  layers = []
  for module in reference_modules(arch, input_shape):
    if module[0] == "conv":
      c_out, c_in, k, _ = module[1]
      layers.append(nn.Conv2d(c_in, c_out, k, module[2], module[3]))
    elif module[0] == "linear":
      layers.append(nn.Linear(module[1][1], module[1][0]))
    else:
      layers.append(nn.Flatten() if module[0] == "flatten" else nn.ReLU())
  net = nn.Module()
  net.linear = nn.Sequential(*layers)
  # Weights of O(1) logits (PyTorch's default init gives tiny ones).
  state = reference_state(reference_modules(arch, input_shape), seed=7)
  net.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
  return net


@pytest.mark.parametrize("arch, dataset", [("2C2F", "mnist"),
                                           ("6C2F", "cifar10")])
def test_torch_pth_round_trip(tmp_path, arch, dataset):
  torch = pytest.importorskip("torch")
  torch.manual_seed(0)
  input_shape, _ = interop.dataset_shape(dataset)
  net = _torch_reference_net(torch, arch, input_shape)
  # The reference's files: its state_dict override, inside the final file's
  # dict beside a checkpointDictionary that pickles its DataLoaders.
  network = {"original": net.state_dict(),
             "eigenVectors": {(0, 0): torch.randn(3)},
             "batchEigenVectors": [torch.randn(2, 3)]}
  path = str(tmp_path / "ref.pth")
  saved = {"stateDictionary": network,
           "checkpointDictionary": {"dataLoaders": _MustNotRun(),
                                    "architectureToUse": arch}}
  torch.save(saved, path)
  model = interop.convert_file(path, arch, dataset=dataset)
  x = images(input_shape)
  mean, std = interop.REFERENCE_NORMALIZATION[dataset] or ((0.0,), (1.0,))
  with torch.no_grad():
    normalized = (torch.from_numpy(x) - torch.tensor(mean)) / torch.tensor(std)
    want = net.linear(normalized.permute(0, 3, 1, 2)).numpy()
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(x))), want,
                             rtol=0, atol=1e-5)
  # The file's record of its architecture is checked.
  other = "4C3F" if arch == "2C2F" else "8C2F"
  with pytest.raises(ValueError, match=f"records the reference architecture "
                     f"'{arch}', not '{other}'"):
    interop.convert_file(path, other, dataset=dataset)
  # A plain state dict (as in tempBestStateDict.pth) loads the same way.
  torch.save(collections.OrderedDict(net.state_dict()), path)
  assert sorted(interop.read_state_dict(path)) == sorted(net.state_dict())
