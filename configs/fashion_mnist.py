"""Fashion-MNIST, CRM + LipLT pairwise (or a baseline loss).

Full recipe (4C3F, the MNIST schedule of docs/training.md#recipes, 100
epochs):

  python train.py --config configs/fashion_mnist.py --workdir runs/fmnist

CPU-budget variant behind the README results table (25 epochs):

  python train.py --config configs/fashion_mnist.py:cpu --workdir runs/fmnist_cpu_crm

Quick variant for a 2-core CPU (a few minutes; what `make demo` runs):

  python train.py --config configs/fashion_mnist.py:quick --workdir runs/fmnist_quick

Baselines with the same architecture and budget: add `gloro` or `ce`, e.g.

  python train.py --config configs/fashion_mnist.py:gloro --workdir runs/fmnist_gloro
  python train.py --config configs/fashion_mnist.py:quick,ce --workdir runs/q_ce

A residual network (ResNet4) in place of 4C3F: add `resnet4`, e.g.

  python train.py --config configs/fashion_mnist.py:cpu,resnet4 --workdir runs/fmnist_resnet4

Set TFDS_DATA_DIR (or --config.data.data_dir) to a folder holding the
prepared `fashion_mnist` (array_record) to run offline.
"""

from configs import default

# Combine any with commas, e.g. --config configs/fashion_mnist.py:quick,gloro.
VARIANTS = ("full", "cpu", "quick", "crm", "gloro", "ce", "resnet4")


def get_config(variant: str = "full"):
  options = [v.strip() for v in variant.split(",") if v.strip()]
  unknown = [v for v in options if v not in VARIANTS]
  if unknown:
    raise ValueError(f"Unknown variant(s) {unknown}; combine any of "
                     f"{VARIANTS} with commas, e.g. 'quick,gloro'.")
  c = default.get_config()
  c.data.name = "fashion_mnist"
  c.model.architecture = "4C3F"
  c.bound.power_iterations = 10
  c.loss.t, c.loss.lam, c.loss.r0 = 5.0, 30.0, 2.2
  c.loss.robust_start_epoch = 10
  c.optimizer.decay_start_epoch = 25
  c.batch_size, c.num_epochs = 512, 100
  c.eval.eps = (0.1, 0.25, 0.5, 1.0)
  # GloRo trains at a margin of 1.1x the largest evaluation radius of
  # interest here (as the reference's 0.1551 = 1.1 x 0.141).
  c.loss.train_eps = 0.55
  if "cpu" in options:
    # The README's results table: 4C3F on a budget one 2-core CPU session
    # affords (25 epochs, ~30-55 min per loss). The schedule keeps the full
    # recipe's proportions (CRM from 10% of the epochs, decay from 25%).
    c.num_epochs = 25
    c.loss.robust_start_epoch = 3
    c.optimizer.decay_start_epoch = 6
    c.eval.every_epochs = 5
    # Chosen by experiments/fashion_mnist/sweep.sh on the validation split
    # (highest mean certified accuracy over eval.eps; t = 5 kept, t = 1 and
    # 10 scored lower; table in docs/results/fashion_mnist_sweep.md).
    c.loss.lam, c.loss.r0 = 30.0, 1.0
  if "quick" in options:
    c.model.architecture = "2C2F"
    c.batch_size, c.num_epochs = 256, 3
    c.bound.power_iterations = 5
    c.loss.robust_start_epoch = 1
    c.optimizer.decay_start_epoch = 2
    c.optimizer.end_learning_rate = 1e-4
    c.eval.every_epochs = 1
    c.eval.power_iterations = 20
    c.log_every_steps = 20
    c.checkpoint.every_steps = 100
  if "resnet4" in options:
    # A residual network on the same budget (docs/residual.md): two stages
    # of two one-activation blocks, widths 32 and 64.
    c.model.architecture = "ResNet4"
  if "gloro" in options:
    c.loss.name = "gloro"
  if "ce" in options:
    c.loss.name = "ce"
  return c
