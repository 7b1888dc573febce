"""Converts a reference (o4lc/CRM-LipLT) checkpoint into a lipjax workdir.

  python -m lipjax.interop convert model.pth --arch 6C2F --dataset cifar10 \\
      --workdir runs/ref6c2f
  python certify.py --workdir runs/ref6c2f

  python -m lipjax.interop keys --arch 2C2F --dataset mnist

``convert`` reads a ``.pth`` (needs PyTorch: the ``interop`` extra) or an
``.npz`` of the layer tensors and writes a workdir (config.json + a step-0
Orbax checkpoint) with the dataset's recipe from configs/, so run it from the
repository root. ``keys`` prints the state-dict keys and torch shapes an
architecture has on a dataset. Exit status 0, or 2 with a one-line error.
"""

from __future__ import annotations

import argparse
import sys

from flax import nnx

from lipjax import activations
from lipjax import interop
from lipjax import models
from lipjax.interop import layout

PROG = "python -m lipjax.interop"


class _Parser(argparse.ArgumentParser):
  """Usage errors in one line, like the conversion's own."""

  def error(self, message):
    self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _floats(text: str) -> tuple[float, ...]:
  try:
    return tuple(float(v) for v in text.split(","))
  except ValueError:
    raise argparse.ArgumentTypeError(
        f"expected comma-separated numbers, got {text!r}") from None


def _parser() -> argparse.ArgumentParser:
  parser = _Parser(prog=PROG, description=__doc__.split("\n", 1)[0])
  commands = parser.add_subparsers(dest="command", required=True)
  convert = commands.add_parser(
      "convert", help="Convert a checkpoint into a workdir for certify.py.")
  convert.add_argument("checkpoint", help=".pth / .pt (needs PyTorch) or "
                       ".npz of the reference's layer tensors.")
  keys = commands.add_parser(
      "keys", help="List the state-dict keys and shapes to expect.")
  for command in (convert, keys):
    command.add_argument("--arch", required=True, help="Reference "
                         f"architecture: {', '.join(models.ARCHITECTURES)}.")
    command.add_argument("--dataset", required=True, help="What it was "
                         "trained on: "
                         f"{', '.join(interop.REFERENCE_NORMALIZATION)}.")
  convert.add_argument("--workdir", required=True, help="New folder to "
                       "write (config.json + checkpoints/).")
  convert.add_argument("--input_mean", type=_floats, help="Per-channel "
                       "mean of the input Normalize (default: the "
                       "reference's for the dataset).")
  convert.add_argument("--input_std", type=_floats, help="Per-channel std, "
                       "with --input_mean.")
  convert.add_argument("--activation", default="relu",
                       choices=activations.ACTIVATIONS, help="The reference "
                       "network's activation (its training script: relu).")
  return parser


def _print_keys(args) -> None:
  layout.check_architecture(args.arch)
  input_shape, num_classes = interop.dataset_shape(args.dataset)
  model = nnx.eval_shape(lambda: models.build(
      args.arch, num_classes=num_classes, input_shape=input_shape,
      rngs=nnx.Rngs(0)))
  for key, shape in interop.expected_shapes(model).items():
    print(f"{key}\t{shape}")


def _convert(args) -> None:
  # pylint: disable=import-outside-toplevel
  from lipjax.interop import workdir as workdir_lib
  # Everything that can be checked without the checkpoint, first.
  layout.check_architecture(args.arch)
  interop.dataset_shape(args.dataset)
  workdir_lib.check_empty(args.workdir)
  config = workdir_lib.recipe(args.dataset)
  model = interop.convert_file(
      args.checkpoint, args.arch, dataset=args.dataset,
      input_mean=args.input_mean, input_std=args.input_std,
      activation=args.activation)
  path = workdir_lib.write(model, args.arch, config, args.workdir)
  print(f"Converted {args.checkpoint} (reference {args.arch}, "
        f"{len(model.layers)} weight layers) for {args.dataset} "
        f"{model.input_shape} inputs, Normalize(mean={model.input_mean}, "
        f"std={model.input_std}) inside the model.")
  print(f"Wrote {path}; certify it with: python certify.py --workdir {path}")


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  try:
    if args.command == "keys":
      _print_keys(args)
    else:
      _convert(args)
  except (FileNotFoundError, FileExistsError, ValueError,
          interop.TorchMissingError) as error:
    print(f"{PROG}: error: {error}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
