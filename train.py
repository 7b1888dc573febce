"""Train a certifiably robust classifier.

This file is intentionally short: the logic lives in lipjax.training, where
tests can import it.

  python train.py --config configs/fashion_mnist.py:quick --workdir runs/fmnist
  python train.py --config configs/cifar10.py --workdir runs/c10 \\
      --config.num_epochs=300
  # resume from an earlier checkpoint (later ones are moved aside, kept):
  python train.py --config configs/cifar10.py --workdir runs/c10 \\
      --checkpoint 5000
  # several hosts (run on every host; JAX detects SLURM/TPU clusters):
  python train.py --config configs/cifar10.py --workdir gs://.../c10 --multiprocess

--config FILE[:VARIANT] names a config file (a Python file whose
get_config() returns an ml_collections ConfigDict); a file with variants
takes one, or several joined by commas, after a colon
(configs/fashion_mnist.py:quick,gloro). Any key can then be overridden with
--config.KEY=VALUE (e.g. --config.loss.lam=20 --config.eval.eps=0.1,0.5);
configs/default.py lists every key with its meaning.

The config, its variant, every override and every value are checked before
the workdir is touched: a mistake gets one line on stderr that names the
fix. Exit status: 0 done; 1 training diverged (a non-finite loss or
parameters, or a wild Lipschitz bound; every checkpoint kept is from before
it); 2 a usage error, nothing written (a bad flag, config, variant, key or
value, a missing dataset, a config that changes the data or model of the
run in the workdir, another train.py in it, a --checkpoint step that was
not saved or a checkpoint of another model); 3 the --checkpoint step is
corrupt (the message lists the other saved steps), or every checkpoint is
(nothing intact to resume from); nothing is moved or deleted.

Configs:
"""

import json

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from lipjax import cli
from lipjax.training import config_files

PROGRAM = "train.py"
__doc__ += config_files.describe() + "\n"  # Shown by --help.

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Experiment config: FILE[:VARIANT]; override keys with "
    "--config.KEY=VALUE (see above).", lock_config=True)
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
  del argv  # cli.flags_parser refuses positional arguments.
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
  # Errors a user fixes from the message alone (train_and_evaluate raises
  # ValueError only for bad input).
  usage_errors = (ValueError, ImportError, data.DatasetNotFoundError,
                  resume.ConfigChangedError,
                  checkpoints.IncompatibleCheckpointError,
                  checkpoints.CheckpointNotFoundError,
                  workdir_lock.WorkdirLockedError)
  try:
    final = loop.train_and_evaluate(FLAGS.config, FLAGS.workdir,
                                    checkpoint=FLAGS.checkpoint)
  except loop.NonFiniteLossError as error:
    cli.error_exit(PROGRAM, error, cli.VIOLATION)
  except usage_errors as error:
    cli.error_exit(PROGRAM, error, cli.USAGE)
  except checkpoints.CorruptCheckpointError as error:  # Nothing to resume.
    cli.error_exit(PROGRAM, error, cli.FAILURE)
  # One line per process, so multi-process runs can be compared.
  print("final metrics: " + json.dumps(final, sort_keys=True), flush=True)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.flags_parser(
      PROGRAM, check=config_files.check_command_line))
