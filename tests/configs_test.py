"""Every shipped config validates, names a known recipe, and documents its command."""

import importlib

import pytest

from configs import default
from lipjax.training import config_checks

CONFIGS = [("mnist", None), ("fashion_mnist", None), ("fashion_mnist", "quick"),
           ("fashion_mnist", "gloro"), ("fashion_mnist", "quick,ce"),
           ("cifar10", None), ("cifar100", None), ("tiny_imagenet", None),
           ("smoke", None)]


@pytest.mark.parametrize("name,variant", CONFIGS)
def test_config_is_valid_and_documented(name, variant):
  module = importlib.import_module(f"configs.{name}")
  config = module.get_config(variant) if variant else module.get_config()
  config_checks.validate(config, default.get_config())
  assert "python train.py --config configs/" in module.__doc__


def test_paper_recipes_match_the_documented_table():
  # docs/training.md#recipes: CIFAR's normalized-unit r0 and eps halved to
  # pixels.
  from configs import cifar10, mnist, tiny_imagenet  # pylint: disable=g-import-not-at-top
  m, c, t = mnist.get_config(), cifar10.get_config(), tiny_imagenet.get_config()
  assert (m.model.architecture, m.loss.t, m.loss.lam, m.loss.r0) == (
      "4C3F", 5.0, 30.0, 2.2)
  assert (m.bound.power_iterations, m.optimizer.decay_start_epoch) == (10, 25)
  assert (c.model.architecture, c.loss.lam, c.bound.power_iterations) == (
      "6C2F", 15.0, 5)
  assert c.loss.r0 == pytest.approx(0.1)
  assert c.eval.eps[0] == pytest.approx(0.0705)
  assert (t.model.architecture, t.loss.t, t.loss.lam, t.batch_size) == (
      "8C2F", 12.0, 150.0, 256)
  assert (t.optimizer.learning_rate, t.optimizer.decay_start_epoch) == (
      1e-4, 100)


def test_unknown_variant_is_an_error():
  from configs import fashion_mnist  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="quick,gloro"):
    fashion_mnist.get_config("fast")
