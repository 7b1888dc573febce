"""Tests of the residual architectures (lipjax.residual_models).

Shapes are checked abstractly (``nnx.eval_shape`` / ``jax.eval_shape``: no
parameter is initialized, nothing compiles); one network is built for real
to check its outputs and the split/merge round trip.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lipjax import models
from lipjax import residual_models
from lipjax.residual_models import ResidualNet

NAMES = tuple(residual_models.ARCHITECTURES)
STEM = ("conv", 4, 3, 1, 1)
LOGITS = ("dense", None)


def abstract(name, shape=(28, 28, 1), classes=10, **kwargs):
  return nnx.eval_shape(lambda: models.build(
      name, num_classes=classes, input_shape=shape, rngs=nnx.Rngs(0),
      **kwargs))


@pytest.mark.parametrize("shape", [(28, 28, 1), (32, 32, 3)])
@pytest.mark.parametrize("name", NAMES)
def test_named_architectures_build_with_their_shapes(name, shape):
  model = abstract(name, shape, batch_norm=True)
  assert isinstance(model, ResidualNet)
  graphdef, state = nnx.split(model)
  images = jax.ShapeDtypeStruct((2,) + shape, jnp.float32)
  logits = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state,
                          images)
  assert logits.shape == (2, 10)
  # Two stride-2 transitions (ResNet6: three), each floor(n / 2) for a
  # 4x4 kernel with padding 1: the hidden dense layer sees (side, side, 64).
  side = shape[0]
  for _ in range(3 if name == "ResNet6" else 2):
    side //= 2
  assert model.layer_input_shapes[-2] == (side, side, 64)
  kinds = [layer[0] for layer in model.spec]
  blocks = [layer for layer, spec in zip(model.layers, model.spec)
            if spec[0] == "residual"]
  if name == "LiResNet4":
    assert kinds.count("linear_residual") == 4 and not blocks
    return
  assert len(blocks) == {"ResNet8": 8, "ResNet6": 6}.get(name, 4)
  inner = 2 if name == "ResNet4x2" else 1
  assert all(len(b.convs) == inner + 1 for b in blocks)
  # Projections exactly where a block changes the shape (ResNet4P's
  # stride-2 blocks), each with its batch norm.
  projected = [b.projection is not None for b in blocks]
  assert projected == [b.stride == 2 for b in blocks]
  assert any(projected) == (name == "ResNet4P")
  assert all(len(b.norms) == len(b.convs) + p
             for b, p in zip(blocks, projected))


def test_a_built_network_runs_and_survives_split_and_merge():
  model = models.build("ResNet4P", num_classes=10, input_shape=(28, 28, 1),
                       rngs=nnx.Rngs(0), batch_norm=True,
                       input_mean=(0.3,), input_std=(0.4,))
  images = jnp.asarray(np.random.default_rng(0).uniform(
      size=(2, 28, 28, 1)), jnp.float32)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  forward = jax.jit(lambda variables, x: models.merge(graphdef, *variables)(x))
  logits = np.asarray(forward((params, rest), images))
  assert logits.shape == (2, 10) and np.all(np.isfinite(logits))
  assert not np.allclose(logits[0], logits[1])
  # The whole state in one piece, and the params swapped in with update
  # (arrays compared: one compiled forward is enough).
  graphdef_all, state = nnx.split(model)
  same = lambda a, b: jax.tree.all(jax.tree.map(  # noqa: E731
      np.array_equal, nnx.state(a), nnx.state(b)))
  assert same(models.merge(graphdef_all, state), model)
  twin = models.build("ResNet4P", num_classes=10, input_shape=(28, 28, 1),
                      rngs=nnx.Rngs(1), batch_norm=True,
                      input_mean=(0.3,), input_std=(0.4,))
  assert not same(twin, model)
  nnx.update(twin, params)
  assert same(twin, model)
  np.testing.assert_array_equal(
      forward(nnx.split(twin, nnx.Param, ...)[1:], images), logits)


@pytest.mark.parametrize("other", [
    dict(name="ResNet4", classes=5),             # same leaves, other shapes
    dict(name="ResNet4", shape=(32, 32, 3)),     # same leaves, other shapes
    dict(name="LiResNet4"),                      # other leaves
    dict(name="4C3F"),                           # a plain network
])
def test_merge_refuses_params_of_another_network(other):
  graphdef, _ = nnx.split(abstract("ResNet4"))
  kwargs = {k: v for k, v in other.items() if k != "name"}
  _, state = nnx.split(abstract(other["name"], **kwargs))
  with pytest.raises(ValueError) as error:
    models.merge(graphdef, state)
  message = str(error.value)
  assert "\n" not in message
  assert message.startswith("The params do not fit the model: the graphdef "
                            "describes ResNet4 [conv 32, conv 32, residual")
  assert "Merge params with the graphdef of the model that produced them" \
      in message


@pytest.mark.parametrize("spec, match", [
    ([STEM, ("residual", 8, 2, 1, 1), LOGITS],
     r"Layer 1: expected \('residual', features, kernel, activations, "
     r"stride\) with an odd kernel and 1 or 2 activations"),
    ([STEM, ("residual", 8, 3, 3, 1), LOGITS],
     r"Layer 1: .* 1 or 2 activations, got \('residual', 8, 3, 3, 1\)"),
    ([STEM, ("residual", 8, 3, 1), LOGITS],
     r"Layer 1: expected \('residual', features, kernel, activations, "
     r"stride\)"),
    ([STEM, ("residual", 8, 3, 1, 0), LOGITS], r"Layer 1: expected"),
    ([STEM, ("linear_residual", 3, 1), LOGITS],
     r"Layer 1: expected \('linear_residual', kernel\) with an odd kernel"),
    ([STEM, ("linear_residual", 2), LOGITS], r"with an odd kernel"),
    ([STEM, ("dense", 8), ("residual", 8, 3, 1, 1), LOGITS],
     r"Layer 2: a residual layer after a dense layer is not supported "
     r"\(convolutional layers come first\)"),
    ([STEM, ("dense", 8), ("linear_residual", 3), LOGITS],
     r"Layer 2: a linear_residual layer after a dense layer"),
    ([("residual", 8, 3, 1, 1), LOGITS],
     r"starts with a plain 'conv' or 'dense' layer \(the stem"),
    ([STEM, ("residual", 4, 3, 1, 1)],
     r"The last layer must be \('dense', None\), the logits"),
    # Plain layers are numbered where they stand, not among plain layers.
    ([STEM, ("residual", 4, 3, 1, 1), ("residual", 4, 3, 1, 1),
      ("conv", 8, 3, 1), LOGITS],
     r"^Layer 3: expected \('conv', features, kernel, stride, padding\)"),
    ([STEM, ("residual", 4, 3, 1, 1), ("resdual", 4, 3, 1, 1), LOGITS],
     r"^Layer 2: unknown layer kind .* use 'conv', 'dense', 'residual' or "
     r"'linear_residual'"),
])
def test_bad_specs_fail_with_one_line_naming_the_fix(spec, match):
  with pytest.raises(ValueError, match=match) as error:
    models.build(spec, num_classes=3, input_shape=(8, 8, 1),
                 rngs=nnx.Rngs(0))
  assert "\n" not in str(error.value)


def test_spec_helpers_check_their_arguments():
  with pytest.raises(ValueError, match="downsample must be 'conv' or "
                     "'block', got 'pool'"):
    residual_models.residual_spec((1,), (8,), downsample="pool")
  spec = residual_models.residual_spec((2, 1), (8, 16), inner_activations=2,
                                       hidden=32, downsample="block")
  assert spec == (("conv", 8, 3, 1, 1), ("residual", 8, 3, 2, 2),
                  ("residual", 8, 3, 2, 1), ("residual", 16, 3, 2, 2),
                  ("dense", 32), ("dense", None))
  assert residual_models.is_residual_spec(spec)
  assert not residual_models.is_residual_spec(models.ARCHITECTURES["4C3F"])
