"""Certify a trained workdir: certified bound, certified/PGD accuracy, audit.

This file is intentionally short: the logic lives in lipjax.certification,
where tests can import it.

  python certify.py --workdir runs/fashion_mnist_quick
  python certify.py --workdir runs/c10 --eps 0.141,0.282 --normalized_units
  python certify.py --workdir runs/mnist --checkpoint 5000 --exact

Writes WORKDIR/certify.json, certify_accuracy.png and certify_radii.png
(certify_<split>* for another --split) and prints a table. Exit status: 0;
1 if the attack audit broke a certified point (a soundness violation); 2 for
a usage error (missing workdir, checkpoint or dataset, --exact impossible);
3 for a corrupt checkpoint (unreadable, or failing its checksums).
"""

import sys

from absl import app
from absl import flags
from absl import logging

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
flags.DEFINE_bool("progress", True, "Progress bars on stderr.")
# Testing only: scales the certifying bound so the audit can be seen to fail.
flags.DEFINE_float("bound_scale", 1.0, "Testing only; leave at 1.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  del argv
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file at INFO.
  # Imported here so that --help and flag errors do not wait for JAX.
  # pylint: disable=import-outside-toplevel
  from lipjax.certification import pipeline, report as report_lib
  from lipjax.training import checkpoints, data
  try:
    eps = None if FLAGS.eps is None else tuple(float(e) for e in FLAGS.eps)
    report = pipeline.run(
        FLAGS.workdir, checkpoint=FLAGS.checkpoint, eps=eps,
        split=FLAGS.split, exact=True if FLAGS.exact else "auto",
        max_exact_gib=FLAGS.max_exact_gib,
        normalized_units=FLAGS.normalized_units, pgd_steps=FLAGS.pgd_steps,
        pgd_restarts=FLAGS.pgd_restarts,
        attack_certified=FLAGS.attack_certified, batch_size=FLAGS.batch_size,
        seed=FLAGS.seed, delta=FLAGS.delta, bound_seed=FLAGS.bound_seed,
        guarantee_kind=FLAGS.guarantee,
        num_examples=FLAGS.num_examples,
        data_dir=FLAGS.data_dir, bound_scale=FLAGS.bound_scale,
        progress=FLAGS.progress)
  except (FileNotFoundError, ValueError, MemoryError,
          checkpoints.IncompatibleCheckpointError,
          data.DatasetNotFoundError) as error:
    print(f"certify.py: error: {error}", file=sys.stderr)
    return 2
  except checkpoints.CorruptCheckpointError as error:
    print(f"certify.py: error: {error}", file=sys.stderr)
    return 3
  paths = report_lib.write(report)
  print(report_lib.format_table(report), flush=True)
  print("wrote " + ", ".join(paths.values()), flush=True)
  code = pipeline.exit_code(report)
  if code:
    print(report_lib.violation_banner(report), flush=True)
    print("certify.py: SOUNDNESS VIOLATION (see above); exit status 1",
          file=sys.stderr, flush=True)
  return code


if __name__ == "__main__":
  app.run(main)  # Exits with main's return value.
