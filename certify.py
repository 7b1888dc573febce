"""Certify a trained workdir: certified bound, certified/PGD accuracy, audit.

This file is intentionally short: the logic lives in lipjax.certification,
where tests can import it.

  python certify.py --workdir runs/fashion_mnist_quick
  python certify.py --workdir runs/c10 --eps 0.141,0.282 --normalized_units
  python certify.py --workdir runs/mnist --checkpoint 5000 --exact
  python certify.py --workdir /read/only/run --output_dir results/run

Every flag, the workdir and the output folder are checked before any work.
The table is printed first; then, in --output_dir (default: the workdir),
certify_step<N>.json and its figures certify_step<N>_accuracy.png and
certify_step<N>_radii.png (N: the checkpoint step), and the same files at
certify.json, certify_accuracy.png, certify_radii.png unless those hold a
newer checkpoint's results (certify_<split>* for another --split).

Exit status: 0 done; 1 soundness violation (the attack audit broke a
certified point); 2 usage error (a bad flag, a missing workdir, checkpoint
or dataset, --exact impossible), nothing done; 3 I/O or other failure: the
checkpoint is corrupt (unreadable, or failing its checksums; the message
lists the other saved steps) or the output folder is not writable (both
refused before any certifying), or a write failed after the table was
printed (no partial file is left).
"""

import sys
import traceback

from absl import app
from absl import flags
from absl import logging

from lipjax import cli

PROGRAM = "certify.py"

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Training workdir (config.json + "
                    "checkpoints/).")
flags.DEFINE_integer("checkpoint", None, "Checkpoint step (default: latest).")
flags.DEFINE_list("eps", None, "Comma-separated L2 radii; default: the "
                  "dataset's list plus the config's eval.eps.")
flags.DEFINE_enum("split", "test", ["test", "validation", "train"],
                  "Which split to certify.")
flags.DEFINE_bool("exact", False, "Exact norms for every product (a "
                  "deterministic certificate); fail if a Gram matrix exceeds "
                  "--max_exact_gib. Default: exact where it fits, float64 "
                  "Lanczos from fresh random starts elsewhere (fails with "
                  "probability at most --delta).")
flags.DEFINE_enum("guarantee", "randomized", ["randomized", "deterministic"],
                  "For the products whose Gram matrix exceeds "
                  "--max_exact_gib: 'randomized' (Lanczos, fails with "
                  "probability at most --delta) or 'deterministic' (a bound "
                  "by proof: exact segments and conv symbol bounds; looser).")
flags.DEFINE_float("delta", 1e-9, "Failure probability of the whole "
                   "certificate over the Lanczos start vectors.")
flags.DEFINE_integer("bound_seed", None, "Seed of the Lanczos start vectors "
                     "(default: fresh from the OS; the report records it). "
                     "Pass a report's seed to replay its bound bit for bit.")
flags.DEFINE_float("max_exact_gib", 4.0, "Memory limit of one exact Gram "
                   "matrix, GiB.")
flags.DEFINE_bool("normalized_units", False, "--eps and the report in units "
                  "measured after the model's Normalize(mean, std), as the "
                  "reference's CIFAR-10 numbers (eps_pixel = eps * std).")
flags.DEFINE_integer("pgd_steps", 50, "PGD steps per restart.")
flags.DEFINE_integer("pgd_restarts", 2, "PGD starts (the first is the "
                     "clean point).")
flags.DEFINE_bool("attack_certified", False, "Also attack points certified "
                  "at each eps (the audit attacks them inside 0.99 x radius "
                  "anyway).")
flags.DEFINE_integer("batch_size", None, "Default: config.eval.batch_size.")
flags.DEFINE_integer("num_examples", None, "Only the first N examples.")
flags.DEFINE_integer("seed", 0, "Seed of the PGD attacks.")
flags.DEFINE_string("data_dir", None, "TFDS data_dir (default: the saved "
                    "config's, else $TFDS_DATA_DIR).")
flags.DEFINE_string("output_dir", None, "Folder for the results (created if "
                    "missing; default: the workdir). One per workdir.")
flags.DEFINE_bool("progress", True, "Progress bars on stderr.")
# Testing only: scales the certifying bound so the audit can be seen to fail.
flags.DEFINE_float("bound_scale", 1.0, "Testing only; leave at 1.")
flags.mark_flags_as_required(["workdir"])


def _eps():
  """--eps as floats (None: the defaults); ValueError naming a bad entry."""
  if FLAGS.eps is None:
    return None
  try:
    return tuple(float(e) for e in FLAGS.eps)
  except ValueError:
    raise ValueError(f"--eps must be comma-separated numbers, e.g. "
                     f"--eps 0.1,0.5; got {','.join(FLAGS.eps)!r}.") from None


def _settings(eps) -> dict:
  """pipeline.run's keyword arguments from the flags."""
  return dict(
      checkpoint=FLAGS.checkpoint, eps=eps, split=FLAGS.split,
      exact=True if FLAGS.exact else "auto",
      max_exact_gib=FLAGS.max_exact_gib,
      normalized_units=FLAGS.normalized_units, pgd_steps=FLAGS.pgd_steps,
      pgd_restarts=FLAGS.pgd_restarts,
      attack_certified=FLAGS.attack_certified, batch_size=FLAGS.batch_size,
      seed=FLAGS.seed, delta=FLAGS.delta, bound_seed=FLAGS.bound_seed,
      guarantee_kind=FLAGS.guarantee, num_examples=FLAGS.num_examples,
      data_dir=FLAGS.data_dir, bound_scale=FLAGS.bound_scale,
      progress=FLAGS.progress)


def _certify():
  """Checks everything, then certifies; returns ``(report, output folder)``.

  Exits 2 on a usage error and 3 when the output folder is not writable,
  both before any work. The heavy imports are here, not at the top, so
  that --help and flag errors do not wait for TFDS and Orbax.
  """
  # pylint: disable=import-outside-toplevel
  from lipjax.certification import pipeline, report as report_lib
  from lipjax.certification import workdir as workdir_lib
  from lipjax.training import checkpoints, data
  usage_errors = (FileNotFoundError, ValueError, MemoryError,
                  checkpoints.IncompatibleCheckpointError,
                  data.DatasetNotFoundError)
  try:
    settings = _settings(_eps())
    pipeline.check_arguments(**{k: settings[k] for k in (
        "eps", "num_examples", "batch_size", "delta", "pgd_steps",
        "pgd_restarts", "max_exact_gib", "bound_seed", "bound_scale")})
    workdir_lib.load_config(FLAGS.workdir)  # Missing workdir: usage error.
  except usage_errors as error:
    cli.error_exit(PROGRAM, error, cli.USAGE)
  try:
    folder = report_lib.check_output_dir(FLAGS.output_dir or FLAGS.workdir)
  except report_lib.OutputError as error:
    cli.error_exit(PROGRAM, error, cli.FAILURE)
  try:
    return pipeline.run(FLAGS.workdir, **settings), folder
  except usage_errors as error:
    cli.error_exit(PROGRAM, error, cli.USAGE)
  except OSError as error:  # E.g. a corrupt checkpoint (steps listed).
    cli.error_exit(PROGRAM, error, cli.FAILURE)


def _certify_print_write() -> int:
  """Certifies, prints the table, then writes; returns the exit status."""
  # pylint: disable=import-outside-toplevel
  from lipjax.certification import pipeline, report as report_lib
  report, folder = _certify()
  print(report_lib.format_table(report), flush=True)
  code = pipeline.exit_code(report)
  if code:
    print(report_lib.violation_banner(report), flush=True)
    print(f"{PROGRAM}: SOUNDNESS VIOLATION (see above); exit status 1",
          file=sys.stderr, flush=True)
  try:
    paths = report_lib.write(report, folder)
  except OSError as error:
    # A soundness violation (1) matters more than the lost files (3).
    cli.error_exit(PROGRAM, f"could not write the results to {folder} "
                   f"({error}); every number is in the table above. Free "
                   "space or pass a writable --output_dir and run again",
                   code or cli.FAILURE)
  print("wrote " + ", ".join(paths), flush=True)
  if report_lib.output_paths(folder, report["split"])["json"] not in paths:
    print("(the stable names keep a newer checkpoint's results)", flush=True)
  return code


def main(argv):
  del argv  # cli.flags_parser refuses positional arguments.
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file at INFO.
  try:
    return _certify_print_write()
  except Exception as error:  # pylint: disable=broad-except
    traceback.print_exc()  # A bug, not a user's mistake: keep the trace.
    cli.error_exit(PROGRAM, f"failed: {error!r}", cli.FAILURE)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.flags_parser(PROGRAM))
