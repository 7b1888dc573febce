"""Train a certifiably robust classifier.

This file is intentionally short: the logic lives in lipjax.training, where
tests can import it.

  python train.py --config configs/fashion_mnist.py:quick --workdir runs/fmnist
  python train.py --config configs/cifar10.py --workdir runs/c10 \
      --config.num_epochs=300
  # resume from an earlier checkpoint (later ones are moved aside, kept):
  python train.py --config configs/cifar10.py --workdir runs/c10 \
      --checkpoint 5000
  # several hosts (run on every host; JAX detects SLURM/TPU clusters):
  python train.py --config configs/cifar10.py --workdir gs://.../c10 --multiprocess
"""

import json
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, metrics and config.json.")
flags.DEFINE_integer("checkpoint", None, "Resume from this saved step "
                     "(default: the newest intact checkpoint); later "
                     "checkpoints are moved to WORKDIR/checkpoints_set_aside.")
flags.DEFINE_bool("multiprocess", False,
                  "Call jax.distributed.initialize() before using devices.")
flags.DEFINE_string("coordinator_address", None,
                    "host:port of process 0 (with --multiprocess, for "
                    "clusters JAX cannot detect).")
flags.DEFINE_integer("num_processes", None, "With --coordinator_address.")
flags.DEFINE_integer("process_id", None, "With --coordinator_address.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file at INFO.
  # Imported here so --multiprocess initializes before JAX touches devices.
  from lipjax.training import parallel  # pylint: disable=import-outside-toplevel
  if FLAGS.multiprocess:
    parallel.initialize_distributed(
        coordinator_address=FLAGS.coordinator_address,
        num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  # pylint: disable=import-outside-toplevel
  from lipjax.training import checkpoints
  from lipjax.training import data
  from lipjax.training import loop
  from lipjax.training import resume
  from lipjax.training import workdir_lock
  expected = (data.DatasetNotFoundError, checkpoints.IncompatibleCheckpointError,
              checkpoints.CorruptCheckpointError,
              checkpoints.CheckpointNotFoundError, resume.ConfigChangedError,
              workdir_lock.WorkdirLockedError, loop.NonFiniteLossError,
              ImportError)
  try:
    final = loop.train_and_evaluate(FLAGS.config, FLAGS.workdir,
                                    checkpoint=FLAGS.checkpoint)
  except expected as error:
    # Errors a user fixes from the message alone: no traceback.
    sys.exit(f"error: {error}")
  # One line per process, so multi-process runs can be compared.
  print("final metrics: " + json.dumps(final, sort_keys=True), flush=True)


if __name__ == "__main__":
  app.run(main)
